"""grain loaders over the prepared (array_record) datasets: train, eval ('test' | 'val' | 'train').

* Train: an infinite stream. Global sample g = step * global_batch + j reads example
  perm_e[g mod n] of epoch e = g // n, where perm_e is drawn from (seed, e); flips come from
  (seed, step, j). So an iterator created at start_step yields exactly what an uninterrupted one
  yields from that step, without pickled iterator state. Process p takes rows
  [p * local_b, (p + 1) * local_b) of every global batch.
* Eval: a fixed order, padded to a multiple of the global batch; padding rows have valid=False
  and index=-1, so no example is dropped or counted twice. Process p gets its slice of each batch.
* 'val': a held-out slice of train/good (data.val_fraction), chosen from data.val_seed and never
  seen in training; used to normalise scores.
Images are resized with an antialiasing (triangle) filter and scaled to [-1, 1]; masks use nearest.
"""

import io
import os
import threading
from typing import Callable, Iterator

from absl import logging
import grain
import jax
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from datasets import builder as builder_lib
from datasets import catalog
from datasets import folder
from datasets import mpdd
from datasets import mvtec_ad
from datasets import synthetic
from datasets import visa
from esm import files
from esm import parallel
from esm import preprocess
from esm.image_set import ImageSet
from esm.errors import UserError

_BUILDERS = {'mvtec_ad': mvtec_ad.MvtecAd, 'visa': visa.Visa, 'mpdd': mpdd.Mpdd}
_FOREVER = 2**62  # length of the (lazily indexed) train stream
_THREADS = max(1, min(8, os.cpu_count() or 1))
_RAW = {'image': tfds.decode.SkipDecoding(), 'mask': tfds.decode.SkipDecoding()}


def category_names(dataset: str, root: str = '') -> list[str]:
  """Categories of a dataset; for 'folder', the sub-folders of `root` that hold train/good."""
  if dataset != 'folder':
    catalog.check_dataset(dataset)
    return list(catalog.known_categories(dataset))
  if not root or not os.path.isdir(root):
    raise UserError(f'data.root={root!r}: expected the folder holding your category folders')
  return sorted(d for d in os.listdir(root)
                if os.path.isdir(os.path.join(root, d, 'train', folder.GOOD)))


def prepare_dataset(data_cfg) -> builder_lib.CategoryBuilder:
  """Prepares (once) and returns the TFDS builder that data_cfg names."""
  dataset, category = data_cfg.dataset, data_cfg.category
  if category == 'all':
    raise UserError("data.category='all' names every category; prepare them one at a time")
  tfds_dir = data_cfg.tfds_dir or os.path.join(files.default_cache_dir(), 'tfds')
  if dataset == 'synthetic':
    root = synthetic.ensure_synthetic(
        data_cfg.root or os.path.join(files.default_cache_dir(), 'synthetic'),
        size=data_cfg.synthetic_size, num_train=data_cfg.synthetic_num_train,
        num_test=data_cfg.synthetic_num_test, seed=data_cfg.synthetic_seed)
    return builder_lib.prepare(builder_lib.AnomalyFolder, root, category, tfds_dir,
                               config=builder_lib.folder_config(root, category))
  if not data_cfg.root:
    raise UserError(f'data.root is empty; expected the folder that holds the {dataset} '
                    'category folders')
  if dataset == 'folder':
    return builder_lib.prepare(builder_lib.AnomalyFolder, data_cfg.root, category, tfds_dir,
                               config=builder_lib.folder_config(data_cfg.root, category))
  cls = _BUILDERS[dataset]
  return builder_lib.prepare(cls, data_cfg.root, category, tfds_dir)


MAX_HELD_OUT_SHARE = 5  # data.min_val_images never takes more than 1/5 of train/good


def num_held_out(num: int, val_fraction: float, min_val: int = 0) -> int:
  """How many of `num` train/good images are held out: round(val_fraction * num), raised to
  min(min_val, num // MAX_HELD_OUT_SHARE), at least 1 and at most num - 1; 0 when val_fraction is 0.
  So with data.min_val_images = 20, a category of 100 or more keeps at least 20 clean images for
  tuning, and a smaller one (metal_plate: 54) at most a fifth of them (10)."""
  if val_fraction <= 0:
    return 0
  wanted = max(round(val_fraction * num), min(min_val, num // MAX_HELD_OUT_SHARE))
  return min(num - 1, max(1, wanted))


def split_train_val(num: int, val_fraction: float, seed: int,
                    min_val: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (train, val) indices of train/good; val holds num_held_out(...) images."""
  num_val = num_held_out(num, val_fraction, min_val)
  perm = np.random.default_rng([abs(seed), 0x5A1]).permutation(num)
  return np.sort(perm[num_val:]), np.sort(perm[:num_val])


def held_out_split(data_cfg, num: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) indices of a category's `num` train/good images under data_cfg: the one rule
  that training, tuning and evaluation share."""
  return split_train_val(num, data_cfg.val_fraction, data_cfg.val_seed, data_cfg.min_val_images)


def num_train_examples(data_cfg) -> int:
  """Images the train stream cycles through: train/good minus the held-out val slice."""
  num = prepare_dataset(data_cfg).info.splits['train'].num_examples
  return len(held_out_split(data_cfg, num)[0])


def decode_image(data: bytes, size: int) -> np.ndarray:
  """Encoded image bytes -> uint8 size x size x 3, resized with an antialiasing filter."""
  with Image.open(io.BytesIO(data)) as im:
    im.draft('RGB', (size, size))  # JPEG only: decode at a reduced scale, still >= size
    return folder.resize_rgb(folder.image_to_rgb(im), size)


def decode_mask(data: bytes, size: int) -> np.ndarray:
  """Encoded {0,1} mask bytes -> uint8 size x size in {0,1}, resized with nearest."""
  with Image.open(io.BytesIO(data)) as im:
    a = np.asarray(im)
  a = a[..., 0] if a.ndim == 3 else a
  if a.shape != (size, size):
    a = np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.NEAREST))
  return a


def decode_source_image(data: bytes) -> np.ndarray:
  """Encoded image bytes -> uint8 H x W x 3 at the stored size (no resize, no JPEG draft)."""
  with Image.open(io.BytesIO(data)) as im:
    return folder.image_to_rgb(im)


to_float = preprocess.to_float  # uint8 -> float32 [-1, 1]; one definition, shared with esm/export.py


class _ImageCache:
  """Decoded, resized uint8 images by example index, up to a byte budget (then no new entries)."""

  def __init__(self, budget_bytes: int):
    self._budget, self._used, self._items = budget_bytes, 0, {}
    self._lock = threading.Lock()

  def __getstate__(self):  # grain worker processes start with an empty cache of their own
    return {'budget': self._budget}

  def __setstate__(self, state):
    self.__init__(state['budget'])

  def get(self, key: int, make: Callable[[], np.ndarray]) -> np.ndarray:
    item = self._items.get(key)
    if item is None:
      item = make()
      with self._lock:
        if key not in self._items and self._used + item.nbytes <= self._budget:
          self._items[key] = item
          self._used += item.nbytes
    return item


class _TrainSample:
  """Maps a process-local sample number k to its augmented image (a pure function of k)."""

  def __init__(self, source, indices: np.ndarray, *, seed: int, global_batch: int,
               local_batch: int, process_index: int, size: int, hflip: bool, vflip: bool,
               cache_bytes: int, crop: int = 0):
    self._source, self._indices = source, indices
    self._seed, self._gb, self._lb, self._p = abs(seed), global_batch, local_batch, process_index
    self._size, self._hflip, self._vflip, self._crop = size, hflip, vflip, crop
    self._cache = _ImageCache(cache_bytes)
    self._perms = {}

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self._seed, epoch, 0xE9]).permutation(len(self._indices))
      if len(self._perms) > 4:
        self._perms.clear()
      self._perms[epoch] = perm
    return perm

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    step, row = divmod(k, self._lb)
    j = self._p * self._lb + row  # row within the global batch
    epoch, pos = divmod(step * self._gb + j, len(self._indices))
    index = int(self._indices[self._perm(epoch)[pos]])
    image = self._cache.get(index, lambda: decode_image(self._source[index]['image'], self._size))
    flips = np.random.default_rng([self._seed, step, j, 0xF1]).integers(0, 2, 2)
    if self._hflip and flips[0]:
      image = image[:, ::-1]
    if self._vflip and flips[1]:
      image = image[::-1]
    if self._crop:  # a random crop_size window, its corner drawn like the flips
      y, x = np.random.default_rng([self._seed, step, j, 0xC7]).integers(
          0, self._size - self._crop + 1, 2)
      image = image[y:y + self._crop, x:x + self._crop]
    return {'image': to_float(image)}


def get_train_iterator(data_cfg, *, global_batch_size: int, seed: int,
                       start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields {'image': f32 [global_batch_size // process_count, S, S, 3] in [-1, 1]} forever; S is
  data.train_crop when it is set (random windows of the image_size image), else image_size."""
  local_batch = parallel.local_batch_size(global_batch_size)
  built = prepare_dataset(data_cfg)
  source = built.as_data_source(split='train', decoders=_RAW)
  train_idx, _ = held_out_split(data_cfg, len(source))
  sample = _TrainSample(
      source, train_idx, seed=seed, global_batch=global_batch_size, local_batch=local_batch,
      process_index=jax.process_index(), size=data_cfg.image_size, hflip=data_cfg.hflip,
      vflip=data_cfg.vflip, cache_bytes=int(data_cfg.cache_mb) << 20, crop=data_cfg.train_crop)
  logging.info('train stream: %d images (%d held out for val), local batch %d, from step %d',
               len(train_idx), len(source) - len(train_idx), local_batch, start_step)
  ds = grain.MapDataset.range(start_step * local_batch, _FOREVER).map(sample)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=_THREADS,
                                            prefetch_buffer_size=4 * local_batch))
  ds = ds.batch(local_batch, drop_remainder=True)
  if data_cfg.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return iter(ds)


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def get_eval_data(data_cfg, split: str, *, global_batch_size: int) -> ImageSet:
  """The 'test' split, 'val' (the held-out slice of train/good) or 'train' (the rest of
  train/good, what the model trains on), in a fixed order."""
  if split not in ('test', 'val', 'train'):
    raise UserError(f'split={split!r}: expected test, val or train')
  parallel.local_batch_size(global_batch_size)
  built = prepare_dataset(data_cfg)
  source = built.as_data_source(split='test' if split == 'test' else 'train', decoders=_RAW)
  if split == 'test':
    indices = np.arange(len(source))
  else:
    train, val = held_out_split(data_cfg, len(source))
    indices = val if split == 'val' else train
  if not len(indices):
    raise UserError(f'{split} split of {data_cfg.dataset}/{data_cfg.category} is empty; expected '
                    'at least one image (data.val_fraction > 0 for val)')
  rows = [source[int(i)] for i in indices]
  records = [{'filename': _text(r['filename']), 'defect_type': _text(r['defect_type']),
              'label': int(r['label'])} for r in rows]
  size = data_cfg.image_size

  def load(i: int) -> dict[str, np.ndarray]:
    row = source[int(indices[i])]
    return {'image': to_float(decode_image(row['image'], size)),
            'mask': decode_mask(row['mask'], size), 'label': np.int32(row['label'])}

  return ImageSet(len(indices), bool(built.info.metadata.get('has_masks', False)), records, size,
                  global_batch_size, load)


def source_images(data_cfg, split: str, limit: int = 0) -> list[np.ndarray]:
  """The held-out ('val') or the training ('train') slice of train/good at the stored size, uint8
  H x W x 3, in index order; limit > 0 keeps that many, spread evenly over the slice. What the
  development defects are painted on and taken from (esm/dev_defects.py)."""
  if split not in ('train', 'val'):
    raise UserError(f'split={split!r}: expected train or val')
  source = prepare_dataset(data_cfg).as_data_source(split='train', decoders=_RAW)
  indices = held_out_split(data_cfg, len(source))[0 if split == 'train' else 1]
  if limit and len(indices) > limit:
    indices = indices[np.linspace(0, len(indices) - 1, limit).round().astype(int)]
  return [decode_source_image(source[int(i)]['image']) for i in indices]
