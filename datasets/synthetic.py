"""The embedded procedural dataset: deterministic, numpy-only, written in the MVTec folder layout.

Two categories:
  * 'texture': a woven pattern (period size/8) with random phase, brightness and pixel noise;
    defects 'scratch' (thick dark stroke), 'hole' (irregular dark opening), 'stain' (tinted blob).
  * 'object': a shaded metal washer centred on a dark background with small shifts in position,
    radius and brightness; defects 'scratch', 'missing' (bite out of the rim), 'extra' (lump on
    the rim) and 'stain'.
Defects are at least size/24 wide so they stay visible after resizing to 32-64 px. A mask is
exactly the set of pixels the defect changed. Everything is seeded: the same arguments give the
same bytes. The folder is written to a temporary sibling and renamed, so it is never half there.
"""

import math
import os
import shutil
import tempfile
import time
from typing import Callable

from absl import logging
import numpy as np
from PIL import Image

from datasets import catalog
from esm.defects import blob, grid, noise, paint, stroke, uniform
from esm.errors import UserError

CATEGORIES = catalog.SYNTHETIC_CATEGORIES
DEFECT_TYPES = {'texture': ('scratch', 'hole', 'stain'),
                'object': ('scratch', 'missing', 'extra', 'stain')}
GENERATOR_VERSION = 1  # bump when the images change, so stale caches are not reused
_CHANGED = 12  # a pixel belongs to the mask when some channel changed by more than this


def dataset_dir(base: str, *, size: int, num_train: int, num_test: int, seed: int = 0) -> str:
  """The folder holding the category folders for these parameters."""
  return os.path.join(base, str(size),
                      f'v{GENERATOR_VERSION}_train{num_train}_test{num_test}_seed{seed}')


def good_texture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
  """A plain weave: threads alternate over and under every half period."""
  y, x = grid(size)
  half = size / 16.0
  fy, fx = (y + uniform(rng, 0, 2 * half)) / half, (x + uniform(rng, 0, 2 * half)) / half
  over = (np.floor(fx) + np.floor(fy)) % 2 == 0  # which thread is on top in this cell
  # A thread is brightest along its middle and dark at its edges (rounded-thread shading).
  profile = np.where(over, np.sin(np.pi * (fy % 1.0)), np.sin(np.pi * (fx % 1.0))) ** 0.7
  warp, weft = np.array([196, 162, 110], np.float32), np.array([172, 140, 96], np.float32)
  colour = np.where(over[..., None], warp, weft)
  gain = uniform(rng, 0.95, 1.05)
  img = colour * (0.45 + 0.55 * profile[..., None]) * gain + noise(rng, size, 3.0)
  return np.clip(img, 0, 255), {}


def good_object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
  """A lit metal washer (outer rim, groove, centre hole) on a dark, slightly vignetted table."""
  y, x = grid(size)
  cy, cx = (size / 2 + uniform(rng, -0.02, 0.02) * size for _ in range(2))
  r = np.hypot(y - cy, x - cx) / size
  outer = 0.33 * uniform(rng, 0.98, 1.02)
  light = ((cx - x) + (cy - y)) / (size * outer * 2.0)  # lit from the top left
  metal = 150 + 45 * light + 20 * np.cos(r * 60.0)  # fine concentric machining rings
  metal = np.where(np.abs(r - 0.22) < 0.012, metal - 60, metal)  # the groove
  table = 38 - 10 * (np.hypot(y - size / 2, x - size / 2) / size)
  on = (r < outer) & (r > 0.09)
  img = np.where(on, metal, table)[..., None] * np.array([1.0, 1.0, 1.04], np.float32)
  img = img * uniform(rng, 0.95, 1.05) + noise(rng, size, 3.0)
  return np.clip(img, 0, 255), {'on': on, 'centre': (cy, cx), 'outer': outer * size}


def add_defect(img: np.ndarray, geometry: dict, category: str, defect_type: str,
               rng: np.random.Generator) -> np.ndarray:
  """Returns the defective image (float, 0..255); the caller derives the exact mask.

  `geometry` is what the good-image function returned beside the image (the washer's extent).
  """
  size = img.shape[0]
  if category == 'texture':
    centre = (uniform(rng, 0.25, 0.75) * size, uniform(rng, 0.25, 0.75) * size)
    if defect_type == 'scratch':
      region = stroke(rng, size, centre, uniform(rng, 0.35, 0.55) * size, size / 24)
      return paint(img, region, (45, 35, 30), 0.9, rng)
    if defect_type == 'hole':
      return paint(img, blob(rng, size, centre, uniform(rng, 0.07, 0.1) * size), (18, 18, 22),
                    1.0, rng)
    return paint(img, blob(rng, size, centre, uniform(rng, 0.09, 0.14) * size), (60, 70, 150),
                  0.65, rng)
  on, (cy, cx), outer = geometry['on'], geometry['centre'], geometry['outer']
  angle = uniform(rng, 0, 2 * np.pi)
  rim = (cy + outer * math.sin(angle), cx + outer * math.cos(angle))
  if defect_type == 'scratch':
    mid = (cy + 0.24 * size * math.sin(angle), cx + 0.24 * size * math.cos(angle))
    region = stroke(rng, size, mid, uniform(rng, 0.18, 0.26) * size, size / 24) & on
    return paint(img, region, (250, 245, 235), 0.9, rng)
  if defect_type == 'missing':
    return paint(img, blob(rng, size, rim, uniform(rng, 0.08, 0.11) * size) & on, (30, 30, 31),
                  1.0, rng)
  if defect_type == 'extra':
    lump = blob(rng, size, rim, uniform(rng, 0.06, 0.085) * size) & ~on
    return paint(img, lump, (165, 165, 172), 1.0, rng)
  mid = (cy + 0.16 * size * math.sin(angle), cx + 0.16 * size * math.cos(angle))
  return paint(img, blob(rng, size, mid, uniform(rng, 0.07, 0.1) * size) & on, (150, 60, 30),
                0.7, rng)


_GOOD: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, dict]]] = {
    'texture': good_texture, 'object': good_object}


def _save(array: np.ndarray, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format='PNG', compress_level=1)


def _write_category(out: str, category: str, cat_index: int, *, size: int, num_train: int,
                    num_test: int, seed: int) -> None:
  make_good = _GOOD[category]
  for i in range(num_train):
    rng = np.random.default_rng([seed, cat_index, 0, i])
    _save(make_good(rng, size)[0].astype(np.uint8),
          os.path.join(out, 'train', 'good', f'{i:03d}.png'))
  num_good = max(1, num_test // 3)
  types = DEFECT_TYPES[category]
  counts = {t: 0 for t in types}
  for i in range(num_test):
    rng = np.random.default_rng([seed, cat_index, 1, i])
    clean, geometry = make_good(rng, size)
    if i < num_good:
      _save(clean.astype(np.uint8), os.path.join(out, 'test', 'good', f'{i:03d}.png'))
      continue
    defect_type = types[(i - num_good) % len(types)]
    image = add_defect(clean, geometry, category, defect_type, rng)
    image = np.clip(image, 0, 255).astype(np.uint8)
    changed = np.abs(image.astype(np.int16) - clean.astype(np.uint8)).max(-1) > _CHANGED
    name = f'{counts[defect_type]:03d}'
    counts[defect_type] += 1
    _save(image, os.path.join(out, 'test', defect_type, f'{name}.png'))
    _save(changed.astype(np.uint8) * 255,
          os.path.join(out, 'ground_truth', defect_type, f'{name}_mask.png'))


def ensure_synthetic(base: str, *, size: int = 256, num_train: int = 60, num_test: int = 30,
                     seed: int = 0) -> str:
  """Generates the dataset under `base` unless present; returns the folder of category folders."""
  if size < 16 or num_train < 1 or num_test < 2:
    raise UserError(f'synthetic dataset: size={size}, num_train={num_train}, num_test={num_test}; '
                    'expected size >= 16, num_train >= 1 and num_test >= 2')
  final = dataset_dir(base, size=size, num_train=num_train, num_test=num_test, seed=seed)
  if os.path.isdir(final):
    return final
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.incomplete-', dir=parent)
  start = time.time()
  try:
    for k, category in enumerate(CATEGORIES):
      _write_category(os.path.join(tmp, category), category, k, size=size, num_train=num_train,
                      num_test=num_test, seed=seed)
      logging.info('synthetic: wrote %s (%d/%d categories), %.1f s', category, k + 1,
                   len(CATEGORIES), time.time() - start)
    os.rename(tmp, final)
  except OSError:
    if not os.path.isdir(final):  # not a lost race with another process: a real failure
      raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  logging.info('synthetic dataset at %s (%d px, %d train, %d test per category)', final, size,
               num_train, num_test)
  return final
