"""Tests of datasets/pipeline.py: train resume, sharding, eval padding, val split, predict."""

import collections
import os

import jax
import numpy as np
import pytest

from configs.default import get_default_config
from datasets import pipeline
from esm.errors import UserError
from tests.helpers import data_folders


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('pipe')
  c = get_default_config().data
  c.dataset, c.category, c.root = 'synthetic', 'object', str(tmp / 'syn')
  c.tfds_dir, c.image_size = str(tmp / 'tfds'), 16
  c.synthetic_size, c.synthetic_num_train, c.synthetic_num_test = 32, 10, 9
  c.hflip = c.vflip = True
  pipeline.prepare_dataset(c)  # once for the module
  return c


def _take(iterator, n):
  return [next(iterator)['image'] for _ in range(n)]


def test_train_batches_shape_range_and_resume(cfg):
  full = _take(pipeline.get_train_iterator(cfg, global_batch_size=4, seed=7), 7)
  assert full[0].shape == (4, 16, 16, 3) and full[0].dtype == np.float32
  assert -1.0 <= min(b.min() for b in full) and max(b.max() for b in full) <= 1.0
  resumed = _take(pipeline.get_train_iterator(cfg, global_batch_size=4, seed=7, start_step=4), 3)
  for a, b in zip(full[4:], resumed):  # 7 steps of 4 cross three epochs of 9 images
    np.testing.assert_array_equal(a, b)
  other = _take(pipeline.get_train_iterator(cfg, global_batch_size=4, seed=8), 1)
  assert not np.array_equal(other[0], full[0])


def _train_images(cfg):
  """The decoded train/good images (no flips), in record order."""
  source = pipeline.prepare_dataset(cfg).as_data_source(split='train', decoders=pipeline._RAW)
  return np.stack([pipeline.to_float(pipeline.decode_image(source[i]['image'], cfg.image_size))
                   for i in range(len(source))])


def test_each_epoch_sees_each_train_image_once_and_never_val(cfg):
  plain = cfg.copy_and_resolve_references()
  plain.hflip = plain.vflip = False
  images = _train_images(plain)
  train_idx, val_idx = pipeline.split_train_val(len(images), plain.val_fraction, 0)
  assert len(val_idx) == 1 and len(train_idx) == 9 == pipeline.num_train_examples(plain)
  batches = _take(pipeline.get_train_iterator(plain, global_batch_size=3, seed=1), 6)
  seen = [int(np.argmin(np.abs(images - x).reshape(len(images), -1).max(-1)))
          for b in batches for x in b]
  for epoch in (seen[:9], seen[9:]):
    assert sorted(epoch) == sorted(train_idx.tolist())
  assert seen[:9] != seen[9:]  # reshuffled per epoch
  val = pipeline.get_eval_data(plain, 'val', global_batch_size=2)
  assert val.num_examples == 1 and val.records[0]['filename'] == f'train/good/{val_idx[0]:03d}.png'


def test_flips_are_applied(cfg):
  plain = cfg.copy_and_resolve_references()
  plain.hflip = plain.vflip = False
  images = _train_images(plain)
  flipped = np.concatenate(_take(pipeline.get_train_iterator(cfg, global_batch_size=4, seed=7), 4))
  kinds = collections.Counter()
  for x in flipped:
    for name, f in (('none', x), ('h', x[:, ::-1]), ('v', x[::-1]), ('hv', x[::-1, ::-1])):
      if np.abs(images - f).reshape(len(images), -1).max(-1).min() < 1e-6:
        kinds[name] += 1
        break
  assert sum(kinds.values()) == 16 and len(kinds) >= 3, kinds


def test_two_processes_split_each_global_batch(cfg, monkeypatch):
  whole = _take(pipeline.get_train_iterator(cfg, global_batch_size=4, seed=3), 3)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  parts = []
  for p in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda p=p: p)
    parts.append(_take(pipeline.get_train_iterator(cfg, global_batch_size=4, seed=3), 3))
  for step in range(3):
    np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), whole[step])
  with pytest.raises(UserError, match='multiple of the process count 2'):
    pipeline.get_train_iterator(cfg, global_batch_size=3, seed=3)
  seen = []
  for p in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda p=p: p)
    data = pipeline.get_eval_data(cfg, 'test', global_batch_size=4)
    for b in data.batches():
      assert b['image'].shape[0] == 2
      seen += b['index'][b['valid']].tolist()
  assert sorted(seen) == list(range(9))


def test_eval_padding_covers_every_example_once(cfg):
  data = pipeline.get_eval_data(cfg, 'test', global_batch_size=4)
  assert data.num_examples == 9 and data.has_masks and data.num_batches == 3
  batches = list(data.batches())
  assert len(batches) == 3
  index = np.concatenate([b['index'] for b in batches])
  valid = np.concatenate([b['valid'] for b in batches])
  assert index[valid].tolist() == list(range(9)) and valid.sum() == 9
  labels = np.concatenate([b['label'] for b in batches])[valid]
  assert labels.tolist() == [r['label'] for r in data.records]
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.shape == (12, 16, 16) and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
  assert all(masks[i].any() == bool(labels[i]) for i in range(9))
  assert batches[0]['image'].dtype == np.float32 and batches[0]['label'].dtype == np.int32


def test_split_train_val_is_deterministic_and_disjoint():
  train, val = pipeline.split_train_val(209, 0.1, 0)
  assert len(val) == 21 and len(train) == 188 and not set(train) & set(val)
  np.testing.assert_array_equal(val, pipeline.split_train_val(209, 0.1, 0)[1])
  assert not np.array_equal(val, pipeline.split_train_val(209, 0.1, 1)[1])
  assert len(pipeline.split_train_val(5, 0.0, 0)[1]) == 0


def test_unknown_dataset_and_category(cfg):
  bad = cfg.copy_and_resolve_references()
  bad.category = 'bottle'
  with pytest.raises(UserError, match='texture, object'):
    pipeline.get_train_iterator(bad, global_batch_size=2, seed=0)
  bad.dataset, bad.category = 'mvtec_ad', 'bottel'
  with pytest.raises(UserError, match='bottle, cable'):
    pipeline.get_eval_data(bad, 'test', global_batch_size=2)
  bad.dataset = 'imagenet'
  with pytest.raises(UserError, match="'mvtec_ad', 'visa', 'mpdd', 'folder', 'synthetic'"):
    pipeline.prepare_dataset(bad)
  assert [len(pipeline.category_names(d)) for d in ('mvtec_ad', 'visa', 'mpdd', 'synthetic')] == [
      15, 12, 6, 2]


def test_folder_dataset_without_masks_writes_nothing_into_source(tmp_path):
  root = str(tmp_path / 'mine')
  data_folders.write_mvtec_category(root, 'parts', num_train=3, masks=False)
  before = data_folders.snapshot(root)
  c = get_default_config().data
  c.dataset, c.root, c.category = 'folder', root, 'parts'
  c.tfds_dir, c.image_size = str(tmp_path / 'tfds'), 16
  assert pipeline.category_names('folder', root) == ['parts']
  data = pipeline.get_eval_data(c, 'test', global_batch_size=2)
  assert not data.has_masks and data.num_examples == 6
  assert next(pipeline.get_train_iterator(c, global_batch_size=2, seed=0))['image'].shape == (
      2, 16, 16, 3)
  assert data_folders.snapshot(root) == before
  c.tfds_dir = os.path.join(root, 'cache')
  with pytest.raises(UserError, match='inside the source'):
    pipeline.prepare_dataset(c)


def test_empty_root_uses_the_cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  c = get_default_config().data
  c.dataset, c.category, c.root, c.tfds_dir = 'synthetic', 'texture', '', ''
  c.synthetic_size, c.synthetic_num_train, c.synthetic_num_test = 16, 3, 3
  built = pipeline.prepare_dataset(c)
  assert os.path.isdir(tmp_path / 'esm_ad' / 'synthetic' / '16')
  assert str(built.data_dir).startswith(str(tmp_path / 'esm_ad' / 'tfds'))

