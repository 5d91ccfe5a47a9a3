"""Detectors that need no diffusion model, the floor a model has to clear.

zscore: each pixel of a test image against the mean and standard deviation of that pixel over the
training images, at model resolution: |x - mean| / (std + ZSCORE_STD_FLOOR), averaged over the
channels, blurred (σ = 0.75 px at 48², scaled with the image side) and scored as the mean of its
top 10 pixels (at 48², scaled with the image area). It needs no training and runs in seconds; on
aligned objects it is strong, on objects that move or rotate it is weak.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from esm import detectors as det
from esm.errors import UserError

ZSCORE_REFERENCE_SIZE = 48  # the side at which the blur and N_a below hold
ZSCORE_BLUR_SIGMA = 0.75
ZSCORE_TOP_N = 10
# Floor of the per-pixel std, in model units ([-1, 1]): a pixel that never varies over the training
# images (a flat background) would otherwise turn sensor noise into an unbounded score.
ZSCORE_STD_FLOOR = 0.02


@dataclasses.dataclass(frozen=True)
class ZScoreStats:
  """Per-pixel statistics of the training images, [H,W,C] float32."""
  mean: np.ndarray
  std: np.ndarray

  @property
  def image_size(self) -> int:
    return int(self.mean.shape[0])


def fit_zscore(images: np.ndarray) -> ZScoreStats:
  """The per-pixel mean and std of training images [N,H,W,C] in [-1, 1]."""
  images = np.asarray(images, np.float64)
  if images.ndim != 4 or len(images) < 2:
    raise UserError(f'zscore: expected at least 2 training images [N,H,W,C], got {images.shape}')
  return ZScoreStats(images.mean(axis=0).astype(np.float32), images.std(axis=0).astype(np.float32))


def zscore_raw_maps(stats: ZScoreStats, images) -> jax.Array:
  """Unblurred maps [B,H,W]: |z| averaged over the channels."""
  z = jnp.abs(jnp.asarray(images, jnp.float32) - stats.mean) / (stats.std + ZSCORE_STD_FLOOR)
  return jnp.mean(z, axis=-1)


def zscore_scale(image_size: int):
  """(blur σ, N_a) of the z-score detector at this image side."""
  ratio = image_size / ZSCORE_REFERENCE_SIZE
  return ZSCORE_BLUR_SIGMA * ratio, max(1, round(ZSCORE_TOP_N * ratio * ratio))


def zscore_score(stats: ZScoreStats, images):
  """(pixel maps [B,H,W], image scores [B]) of test images [B,H,W,C] in [-1, 1]."""
  sigma, top_n = zscore_scale(stats.image_size)
  maps = det.gaussian_blur(zscore_raw_maps(stats, images), sigma)
  return maps, det.image_score(maps, top_n)
