"""--mode=export: the whole scoring function as a serialised jax.export artifact, and its loader.

    f = esm.export.load('DIR/export')     # jax and numpy only: no flax, orbax, TFDS or model code
    scores, maps = f(images)              # uint8 [N,S,S,3] at the exported size S; any N

The artifact computes, for a fixed batch B and image size S: preprocessing (x * 2/255 - 1),
reconstruction with the per-image noise keys, the raw detector maps, the saved normalisation, the
combined blurred map and the image score (eq. 14, 15). Its inputs are the uint8 images and each
image's content digest (esm/preprocess.py), which the loader computes with numpy and hashlib, so
the noise, and hence every score, equals Detector.predict's. The parameters are constants inside
the artifact. DIR/export/detector.json holds the thresholds and the input contract.
"""

import json
import os
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from esm import preprocess

ARTIFACT = 'scoring.jaxexport'
CONTRACT = 'detector.json'


def export_detector(workdir: str, batch_size: int, out_dir: str = '') -> str:
  """Writes workdir/export/ (or out_dir) from the workdir's saved detector; returns the folder."""
  # pylint: disable=g-import-not-at-top
  from esm import detectors as det
  from esm import files
  from esm import sampling
  from esm.detector import Detector
  # pylint: enable=g-import-not-at-top
  detector = Detector.load(workdir, batch_size=batch_size)
  scorer, size = detector.scorer, detector.image_size
  score_fn = det.get_score_fn(scorer.detect_cfg, size, scorer.selection.used)
  params, seed, stats = scorer.params, scorer.config.seed, scorer.stats

  def scoring(images_u8, digests):
    x = images_u8.astype(jnp.float32) * jnp.float32(2.0 / 255.0) - jnp.float32(1.0)
    keys = jax.random.key_data(sampling.image_keys(seed, digests))
    _, raw = scorer.analyse_fn(params, x, keys)
    pixel, image = score_fn(det.normalise(raw, stats))
    return image, pixel

  specs = (jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
           jax.ShapeDtypeStruct((batch_size,), jnp.uint32))
  exported = jax.export.export(jax.jit(scoring))(*specs)
  out_dir = out_dir or os.path.join(workdir, 'export')
  os.makedirs(out_dir, exist_ok=True)
  with files.atomic_path(os.path.join(out_dir, ARTIFACT)) as tmp:
    with open(tmp, 'wb') as f:
      f.write(exported.serialize())
  state = detector.state
  contract = {
      'artifact': ARTIFACT, 'batch_size': batch_size, 'image_size': size,
      'input': f'uint8 [N, {size}, {size}, 3] RGB, already resized to {size}x{size} '
               '(antialiasing bilinear); any N (padded to batch_size)',
      'outputs': {'scores': 'float32 [N] image scores (eq. 15)',
                  'maps': f'float32 [N, {size}, {size}] combined anomaly maps (eq. 14, blurred)'},
      'noise_digest': 'blake2b (4 bytes, little endian) of the float32 preprocessed pixels',
      'image_threshold': state['image_threshold'], 'pixel_threshold': state['pixel_threshold'],
      'map_colour_range': state['map_colour_range'], 'checkpoint_step': state['checkpoint_step'],
      'version': state['version'], 'platforms': list(exported.platforms),
  }
  files.write_text(os.path.join(out_dir, CONTRACT), json.dumps(contract, indent=1))
  return out_dir


def load(path: str) -> Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]:
  """f(uint8 [N,S,S,3]) -> (scores [N], maps [N,S,S]) from an export folder."""
  with open(os.path.join(path, CONTRACT)) as f:
    contract = json.load(f)
  with open(os.path.join(path, contract['artifact']), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  batch, size = contract['batch_size'], contract['image_size']

  def scores_and_maps(images) -> Tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3):
      raise ValueError(f'images of dtype {images.dtype} and shape {images.shape}: expected uint8 '
                       f'[N, {size}, {size}, 3]')
    scores, maps = [], []
    for start in range(0, len(images), batch):
      chunk = images[start:start + batch]
      padded = np.zeros((batch, size, size, 3), np.uint8)
      padded[:len(chunk)] = chunk
      digests = preprocess.content_digests(preprocess.to_float(padded))
      s, m = exported.call(padded, digests)
      scores.append(np.asarray(s)[:len(chunk)])
      maps.append(np.asarray(m)[:len(chunk)])
    return np.concatenate(scores), np.concatenate(maps)

  scores_and_maps.contract = contract
  return scores_and_maps
