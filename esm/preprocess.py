"""Model input and noise digest of an image, with numpy and hashlib only: shared by the data
pipeline, the sampler's per-image keys and the exported detector's loader (esm/export.py), which
must reproduce both bit for bit without the rest of the project."""

import hashlib

import numpy as np


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1], as x * 2/255 - 1."""
  return image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def content_digests(images: np.ndarray) -> np.ndarray:
  """uint32 [B] digest (blake2b, 4 bytes) of each image's float32 pixels at model resolution: the
  noise key of an image is then a function of its content, whatever folder or batch it is in."""
  rows = np.ascontiguousarray(np.asarray(images, np.float32))
  return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=4).digest(), 'little')
                   for r in rows], np.uint32)
