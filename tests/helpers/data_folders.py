"""Test helper: writers of tiny MVTec-layout and VisA-layout folders, for tests of the data layer.

Each image has a distinct flat colour (so tests can tell images apart after decoding) and each
defect image a white square that its mask marks exactly.
"""

import csv
import os
from typing import Sequence

import numpy as np
from PIL import Image

from datasets import folder


def load_example(entry: folder.Entry) -> dict:
  """Decodes one listed entry the way the readers do: image, mask (zeros without one), labels."""
  image = folder.read_image(entry.image_path)
  if entry.mask_path:
    mask = folder.read_mask(entry.mask_path, image.shape[:2], entry.image_path)
  else:
    mask = np.zeros(image.shape[:2], np.uint8)
  return {'image': image, 'mask': mask, 'label': entry.label, 'defect_type': entry.defect_type,
          'filename': entry.filename}


def _colour(i: int) -> tuple[int, int, int]:
  return (40 + 7 * i % 200, 90 + 13 * i % 150, 10 + 29 * i % 230)


def image_with_square(i: int, size: int, defect: bool) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 RGB image, uint8 {0,1} mask): flat colour i, plus a square when `defect`."""
  image = np.empty((size, size, 3), np.uint8)
  image[:] = _colour(i)
  mask = np.zeros((size, size), np.uint8)
  if defect:
    a, b = size // 4 + i % 3, size // 2 + i % 3
    image[a:b, a:b] = 255
    mask[a:b, a:b] = 1
  return image, mask


def save(array: np.ndarray, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)
  return path


def write_mvtec_category(root: str, category: str = 'widget', *, num_train: int = 6,
                         num_good_test: int = 2, defects: Sequence[str] = ('crack', 'dent'),
                         per_defect: int = 2, size: int = 16, masks: bool = True) -> str:
  """Writes <root>/<category> in the MVTec layout; returns the category folder."""
  base = os.path.join(root, category)
  k = 0
  for i in range(num_train):
    save(image_with_square(k, size, False)[0], os.path.join(base, 'train', 'good', f'{i:03d}.png'))
    k += 1
  for i in range(num_good_test):
    save(image_with_square(k, size, False)[0], os.path.join(base, 'test', 'good', f'{i:03d}.png'))
    k += 1
  for defect in defects:
    for i in range(per_defect):
      image, mask = image_with_square(k, size, True)
      save(image, os.path.join(base, 'test', defect, f'{i:03d}.png'))
      if masks:
        save(mask * 255, os.path.join(base, 'ground_truth', defect, f'{i:03d}_mask.png'))
      k += 1
  return base


def write_visa(root: str, categories: Sequence[str] = ('candle',), *, num_train: int = 5,
               num_good_test: int = 2, num_anomaly: int = 3, size: int = 16) -> str:
  """Writes the VisA layout (JPEG images, PNG masks) and split_csv/1cls.csv; returns the CSV."""
  rows = []
  for category in categories:
    k = 0
    for split, count, anomalous in (('train', num_train, False), ('test', num_good_test, False),
                                    ('test', num_anomaly, True)):
      for _ in range(count):
        image, mask = image_with_square(k, size, anomalous)
        kind = 'Anomaly' if anomalous else 'Normal'
        rel = f'{category}/Data/Images/{kind}/{k:03d}.JPG'
        Image.fromarray(image).save(os.path.join(_mkdirs(root, rel), os.path.basename(rel)),
                                    format='JPEG', quality=95)
        mask_rel = ''
        if anomalous:
          mask_rel = f'{category}/Data/Masks/Anomaly/{k:03d}.png'
          save(mask * 255, os.path.join(root, mask_rel))
        rows.append([category, split, 'anomaly' if anomalous else 'normal', rel, mask_rel])
        k += 1
  csv_path = os.path.join(root, 'split_csv', '1cls.csv')
  os.makedirs(os.path.dirname(csv_path), exist_ok=True)
  with open(csv_path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['object', 'split', 'label', 'image', 'mask'])
    writer.writerows(rows)
  return csv_path


def _mkdirs(root: str, rel: str) -> str:
  folder = os.path.dirname(os.path.join(root, rel))
  os.makedirs(folder, exist_ok=True)
  return folder


def snapshot(folder: str) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of every file and folder, to prove nothing was written."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(folder):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      st = os.stat(path)
      out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
  return out
