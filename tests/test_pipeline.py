"""Tests of datasets/pipeline.py: train resume, sharding, eval padding, val split, predict."""

import collections
import dataclasses
import os

import jax
import numpy as np
import pytest

from configs.default import get_default_config
from datasets import pipeline
from datasets.catalog import DataConfig
from esm.config import section_from_dict
from esm.errors import UserError
from tests.helpers import data_folders


def data_config(**changes) -> DataConfig:
  """The default config.data with `changes`, typed as the library takes it."""
  values = get_default_config().data.to_dict()
  values.update(changes)
  return section_from_dict(DataConfig, values, 'data')


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('pipe')
  c = data_config(dataset='synthetic', category='object', root=str(tmp / 'syn'),
                  tfds_dir=str(tmp / 'tfds'), image_size=16, synthetic_size=32,
                  synthetic_num_train=10, synthetic_num_test=9, hflip=True, vflip=True)
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
  plain = dataclasses.replace(cfg, hflip=False, vflip=False)
  images = _train_images(plain)
  train_idx, val_idx = pipeline.held_out_split(plain, len(images))
  # data.min_val_images = 20 holds out a fifth of these 10 (2), above val_fraction's 1.
  assert len(val_idx) == 2 and len(train_idx) == 8 == pipeline.num_train_examples(plain)
  batches = _take(pipeline.get_train_iterator(plain, global_batch_size=3, seed=1), 6)
  seen = [int(np.argmin(np.abs(images - x).reshape(len(images), -1).max(-1)))
          for b in batches for x in b]
  for epoch in (seen[:8], seen[8:16]):
    assert sorted(epoch) == sorted(train_idx.tolist())
  assert seen[:8] != seen[8:16]  # reshuffled per epoch
  val = pipeline.get_eval_data(plain, 'val', global_batch_size=2)
  assert val.num_examples == 2 and [r['filename'] for r in val.records] == [
      f'train/good/{i:03d}.png' for i in val_idx]
  stored = pipeline.source_images(plain, 'val')
  assert [im.shape for im in stored] == [(32, 32, 3)] * 2 and stored[0].dtype == np.uint8
  np.testing.assert_array_equal(pipeline.to_float(pipeline.folder.resize_rgb(stored[0], 16)),
                                val.load(0)['image'])
  assert len(pipeline.source_images(plain, 'train')) == 8
  assert len(pipeline.source_images(plain, 'train', limit=3)) == 3


def test_flips_are_applied(cfg):
  plain = dataclasses.replace(cfg, hflip=False, vflip=False)
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


def test_held_out_count_rule():
  # At least data.min_val_images for 100 or more, at most a fifth below that; fractions above win.
  for num, fraction, min_val, expected in ((209, 0.1, 20, 21), (150, 0.1, 20, 20),
                                           (100, 0.1, 20, 20), (54, 0.1, 20, 10), (16, 0.25, 20, 4),
                                           (267, 0.1, 20, 27), (54, 0.1, 0, 5), (54, 0.0, 20, 0)):
    assert pipeline.num_held_out(num, fraction, min_val) == expected, (num, fraction, min_val)
    assert len(pipeline.split_train_val(num, fraction, 0, min_val)[1]) == expected
  small, large = (pipeline.split_train_val(54, 0.1, 0, m)[1] for m in (0, 20))
  assert set(small) <= set(large)  # raising the count only adds images to the held-out slice


def test_unknown_dataset_and_category(cfg):
  with pytest.raises(UserError, match='texture, object'):
    dataclasses.replace(cfg, category='bottle')
  with pytest.raises(UserError, match='bottle, cable'):
    dataclasses.replace(cfg, dataset='mvtec_ad', category='bottel')
  with pytest.raises(UserError, match="'mvtec_ad', 'visa', 'mpdd', 'folder', 'synthetic'"):
    dataclasses.replace(cfg, dataset='imagenet')
  with pytest.raises(UserError, match="'mvtec_ad', 'visa', 'mpdd', 'folder', 'synthetic'"):
    pipeline.category_names('imagenet')
  assert [len(pipeline.category_names(d)) for d in ('mvtec_ad', 'visa', 'mpdd', 'synthetic')] == [
      15, 12, 6, 2]


def test_folder_dataset_without_masks_writes_nothing_into_source(tmp_path):
  root = str(tmp_path / 'mine')
  data_folders.write_mvtec_category(root, 'parts', num_train=3, masks=False)
  before = data_folders.snapshot(root)
  c = data_config(dataset='folder', root=root, category='parts', tfds_dir=str(tmp_path / 'tfds'),
                  image_size=16)
  assert pipeline.category_names('folder', root) == ['parts']
  data = pipeline.get_eval_data(c, 'test', global_batch_size=2)
  assert not data.has_masks and data.num_examples == 6
  assert next(pipeline.get_train_iterator(c, global_batch_size=2, seed=0))['image'].shape == (
      2, 16, 16, 3)
  assert data_folders.snapshot(root) == before
  with pytest.raises(UserError, match='inside the source'):
    pipeline.prepare_dataset(dataclasses.replace(c, tfds_dir=os.path.join(root, 'cache')))


def test_empty_root_uses_the_cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  c = data_config(dataset='synthetic', category='texture', root='', tfds_dir='',
                  synthetic_size=16, synthetic_num_train=3, synthetic_num_test=3)
  built = pipeline.prepare_dataset(c)
  assert os.path.isdir(tmp_path / 'esm_ad' / 'synthetic' / '16')
  assert str(built.data_dir).startswith(str(tmp_path / 'esm_ad' / 'tfds'))



def test_train_crops_are_windows_of_the_training_images(cfg):
  plain = dataclasses.replace(cfg, hflip=False, vflip=False)
  images = _train_images(plain)
  cropped = dataclasses.replace(plain, train_crop=8)
  batches = _take(pipeline.get_train_iterator(cropped, global_batch_size=4, seed=7), 3)
  assert batches[0].shape == (4, 8, 8, 3)
  corners = set()
  for crop in np.concatenate(batches):
    found = [(k, y, x) for k in range(len(images)) for y in range(9) for x in range(9)
             if np.array_equal(images[k, y:y + 8, x:x + 8], crop)]
    assert found, 'a crop that is no window of a training image'
    corners.add(found[0][1:])
  assert len(corners) > 3  # the windows move
  again = _take(pipeline.get_train_iterator(cropped, global_batch_size=4, seed=7, start_step=2), 1)
  np.testing.assert_array_equal(again[0], batches[2])  # a resumed stream crops alike
  with pytest.raises(UserError, match='data.train_crop'):
    dataclasses.replace(plain, train_crop=17)
