"""The loader of --mode=export's artifact (written by esm/exporter.py): jax and numpy only.

    f = esm.export.load('DIR/export')     # no flax, orbax, TFDS or model code
    scores, maps = f(images)              # uint8 [N,S,S,3] at the exported size S; any N

The artifact computes, for a fixed batch B and image size S: preprocessing (x * 2/255 - 1),
reconstruction with the per-image noise keys, the raw detector maps, the saved normalisation, the
combined blurred map and the image score (eq. 14, 15, or the standardised mean of
detect.image_score). Its inputs are the uint8 images and each
image's content digest (esm/preprocess.py), which the loader computes with numpy and hashlib, so
the noise, and hence every score, equals Detector.predict's. The parameters are constants inside
the artifact. DIR/export/detector.json holds the thresholds and the input contract.
"""

import json
import os
from typing import Callable, Tuple

import jax
import numpy as np

from esm import preprocess

ARTIFACT = 'scoring.jaxexport'
CONTRACT = 'detector.json'


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
