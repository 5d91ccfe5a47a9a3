"""Reads the anomaly-detection folder layouts into examples.

Layouts (paths relative to the data root):
  * MVTec-AD and MPDD: <category>/train/good, <category>/test/<type>,
    <category>/ground_truth/<type>/<stem>_mask.png (masks required for every defect image).
  * generic folder: the same, but ground_truth is optional; without it only image-level metrics
    are possible later (Listing.has_masks is False).
  * VisA: <category>/Data/Images/{Normal,Anomaly}, <category>/Data/Masks/Anomaly and the split file
    split_csv/1cls.csv (columns object, split, label, image, mask; paths relative to the root).

An example is a dict: image uint8 HxWx3, mask uint8 HxW in {0,1} (zeros for good images),
label 0 good / 1 defect, defect_type str, filename (path relative to the category root).
Every problem with the input raises esm.errors.UserError naming the path. Nothing is ever written.
"""

import csv
import dataclasses
import hashlib
import os
from typing import Iterable, Optional

import numpy as np
from PIL import Image

from esm.errors import UserError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
GOOD = 'good'
SPLITS = ('train', 'test')
VISA_CSV = os.path.join('split_csv', '1cls.csv')
VISA_COLUMNS = ('object', 'split', 'label', 'image', 'mask')


@dataclasses.dataclass(frozen=True)
class Entry:
  """One image of a layout, before decoding."""
  split: str  # 'train' or 'test'
  image_path: str
  mask_path: Optional[str]  # None: all-zero mask
  label: int  # 0 good, 1 defect
  defect_type: str
  filename: str  # relative to the category root


@dataclasses.dataclass(frozen=True)
class Listing:
  """All entries of one category, train first, each split in a fixed order."""
  category_root: str
  entries: tuple[Entry, ...]
  has_masks: bool  # False: no ground truth, so only image-level metrics are possible

  def split(self, name: str) -> list[Entry]:
    return [e for e in self.entries if e.split == name]

  def fingerprint(self) -> str:
    """Hash of every listed file's path, size and mtime: changes when the source changes, and not
    when the same folder is named another way (relative, absolute, through a link)."""
    h = hashlib.sha256(os.path.realpath(self.category_root).encode())
    for e in self.entries:
      for path in (e.image_path, e.mask_path):
        if path:
          st = os.stat(path)
          name = os.path.relpath(path, self.category_root)
          h.update(f'{e.split}|{e.label}|{e.defect_type}|{name}|{st.st_size}|{st.st_mtime_ns}\n'
                   .encode())
    return h.hexdigest()[:16]


def _is_hidden(name: str) -> bool:
  return name.startswith('.') or name == 'Thumbs.db' or name == 'desktop.ini'


def list_image_files(folder: str) -> list[str]:
  """Sorted image file names in `folder`; hidden files and sub-folders are skipped.

  Raises UserError for a missing folder or a file that is not an image.
  """
  if not os.path.isdir(folder):
    raise UserError(f'{folder}: folder not found; expected a folder of images')
  names = []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if _is_hidden(name) or os.path.isdir(path):
      continue
    if not name.lower().endswith(IMAGE_EXTENSIONS):
      raise UserError(f'{path}: not an image file; expected one of {", ".join(IMAGE_EXTENSIONS)}')
    names.append(name)
  return names


def _stems(folder: str, names: Iterable[str]) -> dict[str, str]:
  """Maps file stem -> name, rejecting two images with the same stem (ambiguous masks)."""
  out = {}
  for name in names:
    stem = os.path.splitext(name)[0]
    if stem in out:
      raise UserError(f'{os.path.join(folder, name)}: two images share the stem {stem!r} '
                      f'(also {out[stem]}); expected unique names')
    out[stem] = name
  return out


def _require_dir(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise UserError(f'{path}: missing {what}')


def _check_category_root(root: str, category: str) -> str:
  if not root or not os.path.isdir(root):
    raise UserError(f'{root!r}: data root not found; expected the folder that holds the '
                    'category folders (data.root)')
  category_root = os.path.join(root, category)
  if not os.path.isdir(category_root):
    present = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not _is_hidden(d))
    raise UserError(f'{category_root}: category folder not found; folders present in the root: '
                    f'{", ".join(present) or "none"}')
  return category_root


def list_mvtec_layout(root: str, category: str, *, masks_required: bool = True) -> Listing:
  """Lists <root>/<category>/{train/good, test/<type>, ground_truth/<type>/<stem>_mask.*}.

  Args:
    root: the folder that holds the category folders.
    category: the category folder name.
    masks_required: True for MVTec-AD and MPDD. False for a generic folder, where a missing
      ground_truth folder means "no masks" (a present one must still cover every defect image).
  """
  category_root = _check_category_root(root, category)
  train_dir = os.path.join(category_root, 'train', GOOD)
  _require_dir(train_dir, 'train/good folder (expected <category>/train/good/*.png)')
  test_dir = os.path.join(category_root, 'test')
  _require_dir(test_dir, 'test folder (expected <category>/test/<defect type>/*.png)')
  gt_dir = os.path.join(category_root, 'ground_truth')
  has_masks = os.path.isdir(gt_dir)
  if masks_required and not has_masks:
    raise UserError(f'{gt_dir}: missing ground_truth folder (expected '
                    'ground_truth/<defect type>/<stem>_mask.png)')

  entries = [Entry('train', os.path.join(train_dir, n), None, 0, GOOD,
                   os.path.join('train', GOOD, n)) for n in list_image_files(train_dir)]
  types = sorted(d for d in os.listdir(test_dir)
                 if os.path.isdir(os.path.join(test_dir, d)) and not _is_hidden(d))
  types.sort(key=lambda t: t != GOOD)  # good first, then defect types alphabetically
  for defect_type in types:
    image_dir = os.path.join(test_dir, defect_type)
    stems = _stems(image_dir, list_image_files(image_dir))
    masks = _list_masks(os.path.join(gt_dir, defect_type), image_dir, stems) if has_masks else {}
    label = 0 if defect_type == GOOD else 1
    for stem, name in stems.items():
      mask = masks.get(stem)
      if label and has_masks and mask is None:
        raise UserError(f'{os.path.join(image_dir, name)}: defect image without its mask; expected '
                        f'{os.path.join(gt_dir, defect_type, stem + "_mask.png")}')
      entries.append(Entry('test', os.path.join(image_dir, name), mask, label, defect_type,
                           os.path.join('test', defect_type, name)))
  if has_masks:  # a mask folder whose test folder is gone is a mask without its image
    for defect_type in sorted(os.listdir(gt_dir)):
      if (not _is_hidden(defect_type) and defect_type not in types
          and os.path.isdir(os.path.join(gt_dir, defect_type))):
        for name in list_image_files(os.path.join(gt_dir, defect_type)):
          raise UserError(f'{os.path.join(gt_dir, defect_type, name)}: mask without its image; '
                          f'expected {os.path.join(test_dir, defect_type)}/ to hold it')
  listing = Listing(category_root, tuple(entries), has_masks)
  _check_not_empty(listing, train_dir, test_dir)
  return listing


def _list_masks(mask_dir: str, image_dir: str, image_stems: dict[str, str]) -> dict[str, str]:
  """Maps image stem -> mask path for <stem>_mask.* files; a mask without its image is an error."""
  if not os.path.isdir(mask_dir):
    return {}
  masks = {}
  for name in list_image_files(mask_dir):
    stem = os.path.splitext(name)[0]
    image_stem = stem[:-len('_mask')] if stem.endswith('_mask') else stem
    if image_stem not in image_stems:
      raise UserError(f'{os.path.join(mask_dir, name)}: mask without its image; expected '
                      f'{os.path.join(image_dir, image_stem)}.png')
    masks[image_stem] = os.path.join(mask_dir, name)
  return masks


def _check_not_empty(listing: Listing, train_where: str, test_where: str) -> None:
  for split, where in (('train', train_where), ('test', test_where)):
    if not listing.split(split):
      raise UserError(f'{where}: empty {split} split; expected at least one image')


def list_visa_layout(root: str, category: str) -> Listing:
  """Lists a VisA category from <root>/split_csv/1cls.csv (paths in the CSV are root-relative)."""
  category_root = _check_category_root(root, category)
  csv_path = os.path.join(root, VISA_CSV)
  if not os.path.isfile(csv_path):
    raise UserError(f'{csv_path}: VisA split file not found; expected split_csv/1cls.csv with '
                    f'columns {", ".join(VISA_COLUMNS)}')
  with open(csv_path, newline='') as f:
    reader = csv.DictReader(f)
    missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise UserError(f'{csv_path}: missing columns {", ".join(missing)}; expected '
                      f'{", ".join(VISA_COLUMNS)}')
    rows = [r for r in reader if r['object'].strip() == category]
  if not rows:
    raise UserError(f'{csv_path}: no rows with object={category!r}')
  entries = {s: [] for s in SPLITS}
  for line, row in enumerate(rows):
    split, label_name = row['split'].strip().lower(), row['label'].strip().lower()
    if split not in SPLITS or label_name not in ('normal', 'anomaly'):
      raise UserError(f'{csv_path}: row {line + 1} of {category}: split={split!r}, '
                      f'label={label_name!r}; expected train/test and normal/anomaly')
    image_path = os.path.join(root, row['image'].strip())
    if not os.path.isfile(image_path):
      raise UserError(f'{image_path}: named in {csv_path} but missing; expected the image file')
    label = int(label_name == 'anomaly')
    mask_path = None
    if label:
      mask_rel = (row['mask'] or '').strip()
      mask_path = os.path.join(root, mask_rel) if mask_rel else ''
      if not os.path.isfile(mask_path):
        raise UserError(f'{mask_path or csv_path}: mask of {image_path} named in {csv_path} is '
                        'missing; expected the mask file')
    filename = os.path.relpath(image_path, category_root)
    entries[split].append(Entry(split, image_path, mask_path, label,
                                'anomaly' if label else GOOD, filename))
  for split in SPLITS:
    entries[split].sort(key=lambda e: (e.label, e.filename))
  listing = Listing(category_root, tuple(entries['train'] + entries['test']), True)
  _check_not_empty(listing, f'{csv_path} (train rows of {category})',
                   f'{csv_path} (test rows of {category})')
  return listing


# What PIL raises for a file that is not a readable image.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _unreadable_image(path: str, e: Exception) -> UserError:
  reason = (str(e).splitlines() or [type(e).__name__])[0]
  return UserError(f'{path}: corrupt, truncated or unreadable image ({reason}); expected a '
                   'readable PNG/JPEG/BMP/TIFF file')


def _open(path: str) -> Image.Image:
  try:
    im = Image.open(path)
    im.load()
    return im
  except _IMAGE_ERRORS as e:
    raise _unreadable_image(path, e) from None


def _to_uint8(im: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 HxW or HxWx3; 16-bit and float images are rescaled, not clipped."""
  if im.mode.startswith('I'):  # 16-bit PNG/TIFF ('I;16*') or 32-bit int ('I')
    a = np.asarray(im).astype(np.int64)
    return (np.clip(a, 0, 65535) >> 8).astype(np.uint8) if a.max(initial=0) > 255 else \
        np.clip(a, 0, 255).astype(np.uint8)
  if im.mode == 'F':
    a = np.asarray(im, dtype=np.float32)
    scale = 255.0 if a.max(initial=0.0) <= 1.0 else 1.0
    return np.clip(np.round(a * scale), 0, 255).astype(np.uint8)
  if im.mode == 'L':
    return np.asarray(im)
  return np.asarray(im.convert('RGB'))


def image_to_rgb(im: Image.Image) -> np.ndarray:
  """uint8 HxWx3 from any PIL mode (grayscale, palette, RGBA, 16-bit, CMYK, ...)."""
  a = _to_uint8(im)
  return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def check_image_file(path: str) -> None:
  """Raises UserError unless the file parses as an image (header and, for PNG, chunk checksums),
  without decoding the pixels: a cheap check before any compute."""
  try:
    with Image.open(path) as im:
      im.verify()
  except _IMAGE_ERRORS as e:
    raise _unreadable_image(path, e) from None


def read_image(path: str) -> np.ndarray:
  """Decodes an image file to uint8 HxWx3, or raises UserError naming the file."""
  with _open(path) as im:
    return image_to_rgb(im)


def read_image_with_bytes(path: str) -> tuple[np.ndarray, bytes, bool]:
  """(rgb array, file bytes, whether the bytes already are an 8-bit RGB PNG/JPEG)."""
  with _open(path) as im:
    reusable = im.mode == 'RGB' and im.format in ('PNG', 'JPEG')
    rgb = image_to_rgb(im)
  with open(path, 'rb') as f:
    return rgb, f.read(), reusable


def binarize_mask(a: np.ndarray) -> np.ndarray:
  """{0,1} uint8 from a 0/255 (or 0/1) mask; anti-aliased edges split at half intensity."""
  if a.ndim == 3:
    a = a.max(axis=-1)
  return (a > 0).astype(np.uint8) if a.max(initial=0) <= 1 else (a >= 128).astype(np.uint8)


def read_mask(path: str, image_shape: tuple[int, int], image_path: str) -> np.ndarray:
  """Decodes a mask to uint8 HxW in {0,1}; its size must match the image's."""
  with _open(path) as im:
    a = _to_uint8(im)
  if a.shape[:2] != tuple(image_shape):
    raise UserError(f'{path}: mask is {a.shape[1]}x{a.shape[0]} but its image {image_path} is '
                    f'{image_shape[1]}x{image_shape[0]}; expected the same size')
  return binarize_mask(a)


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
  """uint8 RGB resized to size x size with an antialiasing (bilinear) filter."""
  if rgb.shape[:2] == (size, size):
    return rgb
  return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))
