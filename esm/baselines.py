"""Detectors that need no diffusion model: the floor a model has to clear.

Each is registered in BASELINES with a fit on the training images (--mode=train runs it beside the
model and saves the result in DIR/baselines/) and a scorer that gives pixel maps and image scores
for any ImageSet, so that evaluation reports them on the same split, with the same metrics, as the
diffusion models.

* zscore: each pixel of an image against the mean and standard deviation of that pixel over the
  training images, at model resolution: |x - mean| / (std + ZSCORE_STD_FLOOR), averaged over the
  channels, blurred (σ = 0.75 px at 48², scaled with the side) and scored as the mean of its top 10
  pixels (at 48², scaled with the area). No training, seconds to run; strong on aligned objects,
  weak on objects that move or rotate.
* knn: PatchCore's recipe on the project's DINO ViT (config.features, blocks baselines.knn_layers):
  the patch tokens of each tapped block, L2-normalised and averaged over each 3x3 neighbourhood,
  are concatenated; the training images' patches form a memory bank, subsampled to at most
  baselines.knn_bank_size by greedy k-centre coreset selection on a random projection. A test patch
  scores its distance to the nearest bank patch; the map is that distance upsampled to the image
  and blurred like the diffusion models' maps; the image score is the largest patch distance.
"""

import dataclasses
import os
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from esm import detectors as det
from esm import files
from esm.errors import UserError
from esm.features import get_feature_fn
from esm.features.vit import FeaturesConfig
from esm.image_set import ImageSet

ZSCORE_REFERENCE_SIZE = 48  # the side at which the blur and N_a below hold
ZSCORE_BLUR_SIGMA = 0.75
ZSCORE_TOP_N = 10
# Floor of the per-pixel std, in model units ([-1, 1]): a pixel that never varies over the training
# images (a flat background) would otherwise turn sensor noise into an unbounded score.
ZSCORE_STD_FLOOR = 0.02
KNN_PROJECTION_DIM = 128  # coreset selection works on a random projection of this width
_QUERY_CHUNK = 4096  # test patches per distance block


@dataclasses.dataclass(frozen=True)
class BaselinesConfig:
  """config.baselines: the model-free detectors fitted by train and reported by eval."""
  methods: Tuple[str, ...]  # names in BASELINES; () = none
  knn_layers: Tuple[int, ...]  # ViT blocks whose patch tokens form the kNN features
  knn_bank_size: int  # most bank patches kept by the coreset

  def __post_init__(self):
    unknown = set(self.methods) - set(BASELINES)
    if unknown:
      raise UserError(f'baselines.methods: unknown baselines {sorted(unknown)}; expected names '
                      f'from {tuple(BASELINES)}')
    if self.knn_bank_size < 1:
      raise UserError(f'baselines.knn_bank_size: expected a positive integer, got '
                      f'{self.knn_bank_size}')
    if not self.knn_layers:
      raise UserError('baselines.knn_layers: expected at least one ViT block')


@dataclasses.dataclass(frozen=True)
class RegisteredBaseline:
  name: str
  label: str  # as tables print it
  fit: Callable  # (images [N,H,W,C], context) -> {name: array}, the saved state
  score: Callable  # (state, images [B,H,W,C], context) -> (pixel maps [B,H,W], scores [B])
  needs_features: bool


@dataclasses.dataclass(frozen=True)
class Context:
  """What a baseline may read besides the images: its config and, for knn, the ViT."""
  config: BaselinesConfig
  detect: det.DetectConfig
  feature_fn: Optional[Callable]


BASELINES: Dict[str, RegisteredBaseline] = {}


def register_baseline(name: str, label: str, *, needs_features: bool = False):
  """Decorator on a (fit, score) pair's fit; the score function is passed as `score=`."""
  def register(fit_and_score):
    fit, score = fit_and_score
    BASELINES[name] = RegisteredBaseline(name, label, fit, score, needs_features)
    return fit_and_score
  return register


# --- zscore --------------------------------------------------------------------------------------

def fit_zscore(images: np.ndarray, context: Optional[Context] = None) -> Dict[str, np.ndarray]:
  """The per-pixel mean and std of training images [N,H,W,C] in [-1, 1]."""
  del context
  images = np.asarray(images, np.float64)
  if images.ndim != 4 or len(images) < 2:
    raise UserError(f'zscore: expected at least 2 training images [N,H,W,C], got {images.shape}')
  return {'mean': images.mean(axis=0).astype(np.float32),
          'std': images.std(axis=0).astype(np.float32)}


def zscore_scale(image_size: int) -> Tuple[float, int]:
  """(blur σ, N_a) of the z-score detector at this image side."""
  ratio = image_size / ZSCORE_REFERENCE_SIZE
  return ZSCORE_BLUR_SIGMA * ratio, max(1, round(ZSCORE_TOP_N * ratio * ratio))


def zscore_score(state: Dict[str, np.ndarray], images, context: Optional[Context] = None):
  """(pixel maps [B,H,W], image scores [B]) of images [B,H,W,C] in [-1, 1]."""
  del context
  z = jnp.abs(jnp.asarray(images, jnp.float32) - state['mean']) / (state['std'] + ZSCORE_STD_FLOOR)
  sigma, top_n = zscore_scale(int(state['mean'].shape[0]))
  maps = det.gaussian_blur(jnp.mean(z, axis=-1), sigma)
  return maps, det.image_score(maps, top_n)


register_baseline('zscore', 'z-score (no model)')((fit_zscore, zscore_score))


# --- knn -----------------------------------------------------------------------------------------

def patch_features(feature_fn: Callable, images) -> jax.Array:
  """[B, h, w, D]: each tapped block's tokens, L2-normalised, 3x3-averaged, concatenated."""
  out = []
  for tokens in feature_fn(jnp.asarray(images, jnp.float32)):
    unit = tokens / jnp.maximum(jnp.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)
    pooled = jax.lax.reduce_window(unit, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), 'SAME')
    count = jax.lax.reduce_window(jnp.ones_like(unit[..., :1]), 0.0, jax.lax.add, (1, 3, 3, 1),
                                  (1, 1, 1, 1), 'SAME')
    out.append(pooled / count)
  return jnp.concatenate(out, axis=-1)


@jax.jit
def _farthest_point_order(projected: jax.Array, start: jax.Array, steps: jax.Array) -> jax.Array:
  """Greedy k-centre: indices chosen one at a time, each the farthest from those before."""
  num = projected.shape[0]

  def body(k, carry):
    chosen, dist = carry
    nxt = jnp.argmax(dist)
    chosen = chosen.at[k].set(nxt)
    dist = jnp.minimum(dist, jnp.sum((projected - projected[nxt]) ** 2, axis=-1))
    return chosen, dist

  chosen = jnp.zeros((num,), jnp.int32).at[0].set(start)
  dist = jnp.sum((projected - projected[start]) ** 2, axis=-1)
  chosen, _ = jax.lax.fori_loop(1, steps, body, (chosen, dist))
  return chosen


def coreset(features: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
  """Indices of at most `size` rows of features [N,D], by greedy k-centre selection."""
  if len(features) <= size:
    return np.arange(len(features))
  rng = np.random.default_rng(seed)
  proj = rng.standard_normal((features.shape[1], KNN_PROJECTION_DIM)).astype(np.float32)
  projected = jnp.asarray(features @ (proj / np.sqrt(KNN_PROJECTION_DIM)))
  order = _farthest_point_order(projected, jnp.int32(rng.integers(len(features))), jnp.int32(size))
  return np.sort(np.asarray(order[:size]))


def fit_knn(images: np.ndarray, context: Context) -> Dict[str, np.ndarray]:
  """The memory bank of the training images' patch features."""
  feats = np.concatenate([np.asarray(patch_features(context.feature_fn, images[s:s + 8]))
                          for s in range(0, len(images), 8)])
  flat = feats.reshape(-1, feats.shape[-1])
  keep = coreset(flat, context.config.knn_bank_size)
  logging.info('knn: memory bank of %d of %d training patches (%d dims)', len(keep), len(flat),
               flat.shape[1])
  return {'bank': flat[keep].astype(np.float32)}


@jax.jit
def _nearest_distance(queries: jax.Array, bank: jax.Array) -> jax.Array:
  """Euclidean distance of each query row to its nearest bank row."""
  sq = (jnp.sum(queries ** 2, -1)[:, None] - 2 * queries @ bank.T + jnp.sum(bank ** 2, -1)[None])
  return jnp.sqrt(jnp.maximum(jnp.min(sq, axis=-1), 0.0))


def knn_score(state: Dict[str, np.ndarray], images, context: Context):
  """(pixel maps [B,H,W], image scores [B]) of images [B,H,W,C] in [-1, 1]."""
  feats = patch_features(context.feature_fn, images)
  b, h, w, d = feats.shape
  flat = feats.reshape(-1, d)
  bank = jnp.asarray(state['bank'])
  dist = jnp.concatenate([_nearest_distance(flat[s:s + _QUERY_CHUNK], bank)
                          for s in range(0, flat.shape[0], _QUERY_CHUNK)]).reshape(b, h, w)
  size = images.shape[1:3]
  maps = jax.image.resize(dist, (b, *size), method='bilinear')
  maps = det.gaussian_blur(maps, det.scaled_blur_sigma(context.detect, size))
  return maps, jnp.max(dist.reshape(b, -1), axis=-1)


register_baseline('knn', 'DINO patch kNN (no model)', needs_features=True)((fit_knn, knn_score))


# --- fitting, saving and scoring ImageSets -------------------------------------------------------

def state_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, 'baselines', f'{name}.npz')


NO_FEATURES = "no ViT (features.model is 'none')"


def available(config) -> Dict[str, Optional[str]]:
  """Each baseline of config.baselines.methods -> None when it can run, else why not."""
  return {n: NO_FEATURES if BASELINES[n].needs_features and config.features.model == 'none'
          else None for n in config.baselines.methods}


def make_context(config, names=None) -> Context:
  """The context of config's baselines, or of those in `names` (the ViT only when a runnable one
  needs it)."""
  features: FeaturesConfig = config.features
  feature_fn = None
  if any(BASELINES[n].needs_features and not why and (names is None or n in names)
         for n, why in available(config).items()):
    feature_fn = get_feature_fn(dataclasses.replace(features, layers=config.baselines.knn_layers))
  return Context(config.baselines, config.detect, feature_fn)


def images_of(image_set: ImageSet) -> np.ndarray:
  """Every image of an ImageSet, [N,H,W,C]."""
  return np.stack([image_set.load(i)['image'] for i in range(image_set.num_examples)])


def fit_and_save(config, workdir: str, train_images: ImageSet, names=None) -> None:
  """Fits the runnable baselines of config.baselines.methods (or `names`) on the training images
  and writes DIR/baselines/<name>.npz."""
  names = [n for n, why in available(config).items() if not why and (names is None or n in names)]
  if not names:
    return
  context, images = make_context(config), images_of(train_images)
  for name in names:
    state = BASELINES[name].fit(images, context)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(state_path(workdir, name)), exist_ok=True)
      with files.atomic_path(state_path(workdir, name)) as tmp:
        np.savez(tmp, **state)
    logging.info('baseline %s fitted on %d training images', name, len(images))


def fit_missing(config, workdir: str, train_images: Callable[[], ImageSet]) -> None:
  """Fits the baselines whose DIR/baselines/<name>.npz is missing; train_images() gives the
  training images (read only when one is missing)."""
  missing = [n for n, why in available(config).items()
             if not why and load_state(workdir, n) is None]
  if missing:
    fit_and_save(config, workdir, train_images(), missing)


def load_state(workdir: str, name: str) -> Optional[Dict[str, np.ndarray]]:
  path = state_path(workdir, name)
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def load_fitted(config, workdir: str) -> Dict[str, Dict[str, np.ndarray]]:
  """The saved state of each runnable baseline of config that DIR/baselines/ holds."""
  states = {n: load_state(workdir, n) for n, why in available(config).items() if not why}
  return {n: s for n, s in states.items() if s is not None}


def score_image_set(name: str, state, image_set: ImageSet, context: Context):
  """(pixel maps [N,H,W], image scores [N]) of a baseline on every image of an ImageSet."""
  maps, scores = [], []
  for start in range(0, image_set.num_examples, image_set.global_batch_size):
    stop = min(start + image_set.global_batch_size, image_set.num_examples)
    images = np.stack([image_set.load(i)['image'] for i in range(start, stop)])
    m, s = jax.device_get(BASELINES[name].score(state, images, context))
    maps.append(np.asarray(m, np.float32))
    scores.append(np.asarray(s, np.float32))
  return np.concatenate(maps), np.concatenate(scores)
