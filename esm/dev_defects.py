"""Development defects of label-free tuning (esm/dev_set.py), made from the category's own training
images: no external data, no test image. Numpy and scipy; every draw comes from the caller's rng.

A defect is drawn at the stored resolution of the image it is painted on, as a target image T and
an opacity map A, and applied as img + α·A·(T - img); the result is downsampled to model resolution
with the pipeline's own filter (datasets/folder.py resize_rgb). Families:
  field     DRAEM's recipe with the category as its texture source: a smooth random field (two
            octaves of cubically upsampled Gaussian noise) thresholded to the region, filled with
            another training image, rotated, rescaled, shifted and colour-jittered; edge soft by 1 px.
  patch     NSA's recipe: a rectangle from the object of another training image, rescaled and
            pasted on the object with a feathered edge.
  cutpaste  CutPaste: a colour-jittered rectangle of the same image pasted elsewhere with a hard
            edge; half of them CutPaste-scar, a thin strip at a random angle.
  painted   the painters of esm/defects.py (scratch, hole, stain, ...) at graded contrast.
Strength: α is set so that the mean change inside the mask, in standard deviations of the training
images at each pixel at model resolution (the z-score baseline's statistics, esm/baselines.py), is
the strength's target (tune.strengths) times a jitter in JITTER drawn with the geometry; α <= 1, so
a target that a draw cannot reach gets its full contrast.
Mask: the pixels whose downsampled change reaches VISIBLE_LEVELS grey levels (of 255) in some
channel, about twice the quantisation step plus the z-score's std floor; a defect with fewer than
MIN_VISIBLE_FRACTION of the image visible is drawn again (at most MAX_DRAWS times).
Area: field, patch and CutPaste regions cover a log-uniform share of the image in tune.defect_area
(AREA by default); scars and painters have their own geometry.
Placement: on the object, estimated per image as the pixels that differ from the image's border
colour by more than FOREGROUND_LEVELS in some channel (blurred). Where that covers less than 5% or
more than 95% of the image (a texture, or an object that fills the frame), the whole image is the
object. The per-pixel spread over the training images is not used: where objects move (metal_plate)
it marks every place an object has been, not where this one is.
"""

import dataclasses
import math
from typing import Dict, Sequence

import numpy as np
import scipy.ndimage

from datasets.folder import resize_rgb
from esm import baselines
from esm import defects
from esm.errors import UserError

FAMILIES = ('field', 'patch', 'cutpaste', 'painted')
VISIBLE_LEVELS = 6
MIN_VISIBLE_FRACTION = 0.0025  # 6 pixels at 48²
MAX_DRAWS = 50
AREA = (0.02, 0.15)  # region area as a fraction of the image, log-uniform (tune.defect_area)
JITTER = (0.8, 1.25)  # strength jitter, log-uniform
FOREGROUND_LEVELS = 30
FOREGROUND_SHARE = (0.05, 0.95)
ALPHA_ITERATIONS = 3


@dataclasses.dataclass(frozen=True)
class Normal:
  """What the defects read from the training slice: texture sources at their stored size with
  their objects, and the per-pixel statistics at model resolution."""
  textures: Sequence[np.ndarray]  # uint8 [H,W,3]
  texture_objects: Sequence[np.ndarray]  # bool [H,W]
  stats: Dict[str, np.ndarray]  # the z-score's 'mean' and 'std' [size,size,3], model units

  @property
  def size(self) -> int:
    return int(self.stats['mean'].shape[0])


def make_normal(train_images: Sequence[np.ndarray], size: int, num_textures: int = 16) -> Normal:
  """Normal from the training slice's images (uint8, stored size): the statistics from all of
  them at model resolution, the textures from num_textures spread over them."""
  small = np.stack([resize_rgb(im, size) for im in train_images]).astype(np.float32) / 127.5 - 1
  pick = np.unique(np.linspace(0, len(train_images) - 1, num_textures).round().astype(int))
  textures = [train_images[i] for i in pick]
  return Normal(textures, [object_mask(t) for t in textures], baselines.fit_zscore(small))


@dataclasses.dataclass(frozen=True)
class Draw:
  """A drawn defect before its strength: target and opacity at the source size."""
  family: str
  target: np.ndarray  # float32 [H,W,3], 0..255
  opacity: np.ndarray  # float32 [H,W], 0..1
  jitter: float


@dataclasses.dataclass(frozen=True)
class DevDefect:
  """A painted development image at model resolution, with its mask and how it was made."""
  image: np.ndarray  # uint8 [size,size,3]
  mask: np.ndarray  # bool [size,size]: the visible change
  alpha: float
  mean_z: float  # mean change inside the mask, in standard deviations
  draws: int  # 1 + how often it was drawn again


def _side(shape) -> int:
  return min(shape[0], shape[1])


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
  return scipy.ndimage.gaussian_filter(a.astype(np.float32), sigma) if sigma > 0 else a


def object_mask(img: np.ndarray) -> np.ndarray:
  """bool [H,W]: where the object is (module docstring), the whole image for a texture."""
  band = max(1, _side(img.shape) // 64)
  border = np.concatenate([img[:band].reshape(-1, 3), img[-band:].reshape(-1, 3),
                           img[:, :band].reshape(-1, 3), img[:, -band:].reshape(-1, 3)])
  diff = np.abs(img.astype(np.float32) - np.median(border, axis=0)).max(axis=-1)
  fg = _blur(diff, 2.0 * _side(img.shape) / 256) > FOREGROUND_LEVELS
  if not FOREGROUND_SHARE[0] <= fg.mean() <= FOREGROUND_SHARE[1]:
    return np.ones(img.shape[:2], bool)
  return fg


def _log_uniform(rng, lo: float, hi: float) -> float:
  return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _area_px(rng, shape, area) -> int:
  return max(1, int(_log_uniform(rng, *area) * shape[0] * shape[1]))


def _point_on(rng, where: np.ndarray) -> tuple[float, float]:
  ys, xs = np.nonzero(where)
  k = int(rng.integers(ys.size))
  return float(ys[k]), float(xs[k])


def warp(src: np.ndarray, shape, dst_centre, src_centre, angle: float, scale: float) -> np.ndarray:
  """float32 [H,W,3]: src rotated by `angle` and scaled by `scale` about src_centre, which lands on
  dst_centre; bilinear, mirrored at src's edges."""
  y, x = defects.grid(tuple(shape[:2]))
  dy, dx = y - dst_centre[0], x - dst_centre[1]
  c, s = math.cos(angle) / scale, math.sin(angle) / scale
  coords = [src_centre[0] + c * dy - s * dx, src_centre[1] + s * dy + c * dx]
  return np.stack([scipy.ndimage.map_coordinates(src[..., ch].astype(np.float32), coords, order=1,
                                                 mode='mirror') for ch in range(3)], axis=-1)


def _jitter_colour(rng, img: np.ndarray) -> np.ndarray:
  return img * rng.uniform(0.85, 1.15, 3).astype(np.float32) + np.float32(rng.uniform(-15, 15))


def smooth_field(rng, shape) -> np.ndarray:
  """float32 [H,W]: two octaves of Gaussian noise on coarse grids, cubically upsampled."""
  cells = int(rng.integers(2, 6))
  field = np.zeros(shape[:2], np.float32)
  for octave, weight in ((cells, 1.0), (2 * cells, 0.5)):
    coarse = rng.standard_normal((octave + 1, octave + 1)).astype(np.float32)
    zoom = (shape[0] / coarse.shape[0], shape[1] / coarse.shape[1])
    field += weight * scipy.ndimage.zoom(coarse, zoom, order=3, mode='reflect', grid_mode=True)
  return field


def _rectangle(shape, centre, length: float, width: float, angle: float) -> np.ndarray:
  y, x = defects.grid(tuple(shape[:2]))
  dy, dx = y - centre[0], x - centre[1]
  along = dx * math.cos(angle) + dy * math.sin(angle)
  across = -dx * math.sin(angle) + dy * math.cos(angle)
  return (np.abs(along) < length / 2) & (np.abs(across) < width / 2)


def _draw_field(rng, img, fg, normal: Normal, area_range):
  field = smooth_field(rng, img.shape)
  values = field[fg]
  area = min(_area_px(rng, img.shape, area_range), values.size)
  region = (field >= np.partition(values, -area)[-area]) & fg
  src = normal.textures[int(rng.integers(len(normal.textures)))]
  src_centre = (rng.uniform(0, src.shape[0]), rng.uniform(0, src.shape[1]))
  dst_centre = (img.shape[0] / 2, img.shape[1] / 2)
  texture = warp(src, img.shape, dst_centre, src_centre, rng.uniform(0, 2 * math.pi),
                 _log_uniform(rng, 0.75, 1.33))
  return _jitter_colour(rng, texture), np.clip(_blur(region, _side(img.shape) / 256), 0, 1)


def _draw_patch(rng, img, fg, normal: Normal, area_range):
  k = int(rng.integers(len(normal.textures)))
  src, src_fg = normal.textures[k], normal.texture_objects[k]
  area, aspect = _area_px(rng, img.shape, area_range), _log_uniform(rng, 0.5, 2.0)
  length, width = math.sqrt(area * aspect), math.sqrt(area / aspect)
  dst_centre, src_centre = _point_on(rng, fg), _point_on(rng, src_fg)
  patch = warp(src, img.shape, dst_centre, src_centre, 0.0, _log_uniform(rng, 0.75, 1.33))
  rect = _rectangle(img.shape, dst_centre, length, width, 0.0)
  feather = _blur(rect, 0.15 * min(length, width))
  return patch, np.clip(2 * feather, 0, 1) * _blur(fg, 1.0)


def _draw_cutpaste(rng, img, fg, normal: Normal, area_range):
  del normal
  side = _side(img.shape)
  if rng.random() < 0.5:  # scar: 2-16 px wide at 256², 10-25% of the side long
    width, length = rng.uniform(2, 16) * side / 256, rng.uniform(0.1, 0.25) * side
    angle = rng.uniform(0, math.pi)
  else:
    area, aspect = _area_px(rng, img.shape, area_range), _log_uniform(rng, 1 / 3, 3.0)
    length, width, angle = math.sqrt(area * aspect), math.sqrt(area / aspect), 0.0
  dst_centre, src_centre = _point_on(rng, fg), _point_on(rng, fg)
  piece = _jitter_colour(rng, warp(img, img.shape, dst_centre, src_centre, 0.0, 1.0))
  return piece, (_rectangle(img.shape, dst_centre, length, width, angle) & fg).astype(np.float32)


def _draw_painted(rng, img, fg, kinds: Sequence[str]):
  kind = kinds[int(rng.integers(len(kinds)))]
  bad, mask = defects.paint_defect(img.astype(np.float32), kind, rng, centre=_point_on(rng, fg))
  return bad, (mask & fg).astype(np.float32)


def draw(family: str, img: np.ndarray, fg: np.ndarray, normal: Normal, rng,
         kinds: Sequence[str] = defects.PAINTED_DEFECTS, area=AREA) -> Draw:
  """One defect of `family` on img (uint8 [H,W,3], stored size), on its object fg; area: the
  (low, high) range of region areas, fractions of the image (not read by scars and painters)."""
  jitter = _log_uniform(rng, *JITTER)
  if family == 'field':
    target, opacity = _draw_field(rng, img, fg, normal, area)
  elif family == 'patch':
    target, opacity = _draw_patch(rng, img, fg, normal, area)
  elif family == 'cutpaste':
    target, opacity = _draw_cutpaste(rng, img, fg, normal, area)
  elif family == 'painted':
    target, opacity = _draw_painted(rng, img, fg, kinds)
  else:
    raise ValueError(f'unknown development defect family {family!r}; expected one of {FAMILIES}')
  return Draw(family, np.clip(target, 0, 255).astype(np.float32), opacity.astype(np.float32),
              jitter)


def apply(img: np.ndarray, d: Draw, alpha: float, size: int, clean=None):
  """(defective uint8 [size,size,3], visible mask [size,size]) of d at opacity alpha; clean is
  img at model resolution (resized here when None)."""
  img_f = img.astype(np.float32)
  bad = img_f + np.float32(alpha) * d.opacity[..., None] * (d.target - img_f)
  bad = np.clip(np.rint(bad), 0, 255).astype(np.uint8)
  clean = resize_rgb(img, size) if clean is None else clean
  small = resize_rgb(bad, size)
  change = np.abs(small.astype(np.int16) - clean.astype(np.int16)).max(axis=-1)
  return small, change >= VISIBLE_LEVELS


def change_z(small: np.ndarray, clean: np.ndarray, stats: Dict[str, np.ndarray]) -> np.ndarray:
  """[size,size]: the change from clean to small (uint8) in standard deviations of the training
  images at that pixel (the z-score baseline's, floor included), averaged over the channels."""
  delta = np.abs(small.astype(np.float32) - clean.astype(np.float32)) / 127.5
  return np.mean(delta / (stats['std'] + baselines.ZSCORE_STD_FLOOR), axis=-1)


def mean_z(small: np.ndarray, clean: np.ndarray, mask: np.ndarray, normal: Normal) -> float:
  """Mean change inside the mask, in standard deviations: how far the defect sits from normal."""
  return float(np.mean(change_z(small, clean, normal.stats)[mask])) if mask.any() else 0.0


def calibrate(img: np.ndarray, d: Draw, target_z: float, normal: Normal, clean=None) -> float:
  """The opacity α <= 1 at which d's mean change inside its visible mask is target_z standard
  deviations (proportional updates: the change is linear in α, the mask shrinks with it)."""
  clean = resize_rgb(img, normal.size) if clean is None else clean
  alpha = 1.0
  for _ in range(ALPHA_ITERATIONS):
    small, mask = apply(img, d, alpha, normal.size, clean)
    if not mask.any():
      return alpha
    alpha = min(1.0, alpha * target_z / max(mean_z(small, clean, mask, normal), 1e-6))
  return alpha


def paint(family: str, img: np.ndarray, normal: Normal, strength: float, rng,
          kinds: Sequence[str] = defects.PAINTED_DEFECTS, fg=None, clean=None,
          area=AREA) -> DevDefect:
  """A development defect of `family` at `strength` (its target mean change in standard
  deviations) on img (uint8, stored size), drawn again until enough of it stays visible."""
  fg = object_mask(img) if fg is None else fg
  clean = resize_rgb(img, normal.size) if clean is None else clean
  min_pixels = max(1, math.ceil(MIN_VISIBLE_FRACTION * normal.size**2))
  for attempt in range(MAX_DRAWS):
    d = draw(family, img, fg, normal, rng, kinds, area)
    alpha = calibrate(img, d, strength * d.jitter, normal, clean)
    small, mask = apply(img, d, alpha, normal.size, clean)
    if mask.sum() >= min_pixels:
      return DevDefect(small, mask, alpha, mean_z(small, clean, mask, normal), attempt + 1)
  raise UserError(f'tune: no {family} defect stayed visible at {normal.size}² in {MAX_DRAWS} '
                  'draws; the images may be too small or too uniform for it (tune.families)')
