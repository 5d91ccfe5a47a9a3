"""Defects painted on images: the shape primitives, shared with the embedded synthetic dataset
(datasets/synthetic.py), and the generic defects painted on held-out training images for the
label-free development set (esm/tune.py). Numpy only; everything is drawn from the caller's rng.
"""

import functools
import math

import numpy as np


def _hw(shape) -> tuple[int, int]:
  """(height, width) of a side (a square) or of a (height, width) shape."""
  return (int(shape), int(shape)) if np.ndim(shape) == 0 else (int(shape[0]), int(shape[1]))


@functools.lru_cache(maxsize=8)
def grid(shape) -> tuple[np.ndarray, np.ndarray]:
  """Row and column coordinates of a square of side `shape`, or of a (height, width) shape."""
  h, w = _hw(shape)
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  y.flags.writeable = x.flags.writeable = False
  return y, x


def uniform(rng: np.random.Generator, low: float, high: float) -> float:
  return float(rng.uniform(low, high))  # a Python float keeps the float32 maths in float32


def noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
  return rng.standard_normal(_hw(shape) + (1,), dtype=np.float32) * np.float32(sigma)


def blob(rng: np.random.Generator, shape, centre, radius: float) -> np.ndarray:
  """An irregular blob: a circle whose radius wobbles with the angle."""
  y, x = grid(shape)
  angle = np.arctan2(y - centre[0], x - centre[1])
  wobble = sum(uniform(rng, 0.05, 0.18) * np.cos(k * angle + uniform(rng, 0, 2 * np.pi))
               for k in (2, 3, 5))
  return np.hypot(y - centre[0], x - centre[1]) < radius * (1 + wobble)


def stroke(rng: np.random.Generator, shape, centre, length: float, width: float) -> np.ndarray:
  """A straight stroke of the given width through `centre` at a random angle."""
  y, x = grid(shape)
  theta = uniform(rng, 0, np.pi)
  dy, dx = y - centre[0], x - centre[1]
  along = dx * math.cos(theta) + dy * math.sin(theta)
  across = -dx * math.sin(theta) + dy * math.cos(theta)
  return (np.abs(along) < length / 2) & (np.abs(across) < width / 2)


def paint(img: np.ndarray, region: np.ndarray, colour, alpha: float,
          rng: np.random.Generator) -> np.ndarray:
  target = np.asarray(colour, np.float32) + noise(rng, img.shape[:2], 4.0)
  return np.where(region[..., None], (1 - alpha) * img + alpha * target, img)


# Defects painted on real images for the label-free development set (esm/tune.py): each kind is
# generic, needing no knowledge of the object, and sized relative to the image side.
PAINTED_DEFECTS = ('scratch', 'hole', 'stain', 'missing', 'extra', 'colour', 'texture')


def paint_defect(img: np.ndarray, kind: str, rng: np.random.Generator,
                 centre=None) -> tuple[np.ndarray, np.ndarray]:
  """(defective image, mask) for a float RGB image in 0..255; the mask is exactly the pixels that
  changed. Sizes are relative to the shorter side; `centre` (row, column), drawn in the middle
  half when None. scratch: a thin dark or bright stroke; hole: a dark blob; stain: a translucent
  coloured blob; missing: a blob filled with the image's border (background) colour; extra: a
  blob filled with another part of the image's colour; colour: a blob whose colour balance
  shifts; texture: a blob showing the image's content from elsewhere, noised."""
  h, w = img.shape[:2]
  size = min(h, w)
  if centre is None:
    centre = (uniform(rng, 0.25, 0.75) * h, uniform(rng, 0.25, 0.75) * w)
  region_of = lambda lo, hi: blob(rng, (h, w), centre, uniform(rng, lo, hi) * size)
  if kind == 'scratch':
    region = stroke(rng, (h, w), centre, uniform(rng, 0.3, 0.5) * size, max(1.0, size / 24))
    shade = (235, 230, 220) if rng.random() < 0.5 else (35, 30, 28)
    bad = paint(img, region, shade, 0.9, rng)
  elif kind == 'hole':
    bad = paint(img, region_of(0.06, 0.1), (18, 18, 22), 1.0, rng)
  elif kind == 'stain':
    colour = rng.uniform(40, 220, 3)
    bad = paint(img, region_of(0.08, 0.13), colour, 0.6, rng)
  elif kind == 'missing':
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bad = paint(img, region_of(0.07, 0.11), np.median(border, axis=0), 1.0, rng)
  elif kind == 'extra':
    y, x = (int(v) for v in rng.integers(0, size, 2))
    bad = paint(img, region_of(0.05, 0.09), img[y * h // size, x * w // size], 1.0, rng)
  elif kind == 'colour':
    region = region_of(0.08, 0.13)
    gains = np.asarray(rng.permutation([0.55, 1.0, 1.45]), np.float32)
    bad = np.where(region[..., None], img * gains + 25 * (gains - 1), img)
  elif kind == 'texture':
    region = region_of(0.08, 0.13)
    dy, dx = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
    elsewhere = np.roll(img, (dy * h // size, dx * w // size), axis=(0, 1)) + noise(rng, (h, w), 12.0)
    bad = np.where(region[..., None], elsewhere, img)
  else:
    raise ValueError(f'unknown painted defect {kind!r}; expected one of {PAINTED_DEFECTS}')
  bad = np.clip(bad, 0, 255)
  return bad, np.any(np.abs(bad - img) > 0.5, axis=-1)
