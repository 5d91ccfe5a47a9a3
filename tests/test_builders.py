"""Tests of the TFDS builders (datasets/builder.py, mvtec_ad.py, visa.py, mpdd.py)."""

import glob
import os
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from datasets import builder
from datasets import mpdd
from datasets import mvtec_ad
from datasets import visa
from esm.errors import UserError
from tests.helpers import data_folders
from tests.helpers.shared_data import shared_data_dir


def test_one_config_per_official_category():
  assert [c.name for c in mvtec_ad.MvtecAd.BUILDER_CONFIGS] == [
      'bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut', 'leather', 'metal_nut', 'pill',
      'screw', 'tile', 'toothbrush', 'transistor', 'wood', 'zipper']
  assert [c.name for c in visa.Visa.BUILDER_CONFIGS] == [
      'candle', 'capsules', 'cashew', 'chewinggum', 'fryum', 'macaroni1', 'macaroni2', 'pcb1',
      'pcb2', 'pcb3', 'pcb4', 'pipe_fryum']
  assert [c.name for c in mpdd.Mpdd.BUILDER_CONFIGS] == [
      'bracket_black', 'bracket_brown', 'bracket_white', 'connector', 'metal_plate', 'tubes']


def _prepare_bottle_like(tmp_path):
  root = str(tmp_path / 'src')
  data_folders.write_mvtec_category(root, 'bottle', num_train=4, defects=('broken_large',))
  return root, builder.prepare(mvtec_ad.MvtecAd, root, 'bottle', str(tmp_path / 'tfds'))


def test_prepare_writes_array_record_readable_by_data_source(tmp_path):
  root, built = _prepare_bottle_like(tmp_path)
  assert glob.glob(os.path.join(built.data_dir, '*.array_record-*'))
  assert built.info.metadata['has_masks'] is True
  source = tfds.data_source('mvtec_ad/bottle', data_dir=str(tmp_path / 'tfds'))
  assert len(source['train']) == 4 and len(source['test']) == 4
  ex = source['test'][3]
  assert ex['filename'] == b'test/broken_large/001.png' and ex['label'] == 1
  assert ex['image'].shape == (16, 16, 3) and ex['mask'].shape == (16, 16, 1)
  np.testing.assert_array_equal(ex['mask'][..., 0], (ex['image'] == 255).all(-1))
  assert 'tensorflow' not in sys.modules


def test_data_source_prepares_from_manual_dir(tmp_path):
  root = str(tmp_path / 'src')
  data_folders.write_mvtec_category(root, 'tubes', num_train=3)
  # No file_format argument: the builders default to array_record (TFDS's own default, tfrecord,
  # would need TensorFlow).
  assert tfds.builder('mpdd/tubes', data_dir=str(tmp_path / 'tfds')).info.file_format.value == \
      'array_record'
  source = tfds.data_source(
      'mpdd/tubes', split='train', data_dir=str(tmp_path / 'tfds'),
      download_and_prepare_kwargs={
          'download_config': tfds.download.DownloadConfig(manual_dir=root)})
  assert len(source) == 3 and source[0]['image'].dtype == np.uint8
  assert 'tensorflow' not in sys.modules


def test_prepared_twice_is_not_rebuilt_but_source_change_is(tmp_path, monkeypatch):
  root, built = _prepare_bottle_like(tmp_path)
  record = glob.glob(os.path.join(built.data_dir, '*train.array_record-*'))[0]
  mtime = os.stat(record).st_mtime_ns
  calls = []
  original = builder._encode_entry
  monkeypatch.setattr(builder, '_encode_entry', lambda e: calls.append(e) or original(e))
  again = builder.prepare(mvtec_ad.MvtecAd, root, 'bottle', str(tmp_path / 'tfds'))
  assert not calls and os.stat(record).st_mtime_ns == mtime
  assert again.info.splits['train'].num_examples == 4
  # The same folder named another way (relative, through a link) is the same source.
  os.symlink(root, str(tmp_path / 'link'))
  monkeypatch.chdir(tmp_path)
  for spelt in ('src', 'link', os.path.join('link', '..', 'src')):
    builder.prepare(mvtec_ad.MvtecAd, spelt, 'bottle', str(tmp_path / 'tfds'))
  assert not calls and os.stat(record).st_mtime_ns == mtime
  data_folders.save(np.zeros((16, 16, 3), np.uint8), os.path.join(root, 'bottle', 'train', 'good',
                                                               '100.png'))
  rebuilt = builder.prepare(mvtec_ad.MvtecAd, root, 'bottle', str(tmp_path / 'tfds'))
  assert calls and rebuilt.info.splits['train'].num_examples == 5


def test_concurrent_prepares_take_turns_and_share_one_result(tmp_path, monkeypatch):
  # Parallel jobs that find the same stale cache must not delete each other's folder mid-write.
  root, _ = _prepare_bottle_like(tmp_path)
  data_folders.save(np.zeros((16, 16, 3), np.uint8), os.path.join(root, 'bottle', 'train', 'good',
                                                               '100.png'))
  inside, most_inside, lock = [0], [0], threading.Lock()
  original = builder.CategoryBuilder.download_and_prepare

  def slow_prepare(self, *args, **kwargs):
    with lock:
      inside[0] += 1
      most_inside[0] = max(most_inside[0], inside[0])
    time.sleep(0.5)  # long enough for the other thread to arrive while this one writes
    try:
      return original(self, *args, **kwargs)
    finally:
      with lock:
        inside[0] -= 1

  monkeypatch.setattr(builder.CategoryBuilder, 'download_and_prepare', slow_prepare)
  results, errors = [], []

  def job():
    try:
      results.append(builder.prepare(mvtec_ad.MvtecAd, root, 'bottle', str(tmp_path / 'tfds')))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=job) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and most_inside[0] == 1
  assert [r.info.splits['train'].num_examples for r in results] == [5, 5]


def test_failed_prepare_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
  root = str(tmp_path / 'src')
  data_folders.write_mvtec_category(root, 'bottle', num_train=6)
  data_dir = str(tmp_path / 'tfds')
  original, seen = builder._encode_entry, []

  def failing(entry):
    seen.append(entry)
    if len(seen) == 5:
      raise RuntimeError('simulated crash mid-prepare')
    return original(entry)

  monkeypatch.setattr(builder, '_encode_entry', failing)
  with pytest.raises(RuntimeError, match='simulated'):
    builder.prepare(mvtec_ad.MvtecAd, root, 'bottle', data_dir)
  assert not builder.is_prepared(mvtec_ad.MvtecAd(config='bottle', data_dir=data_dir))
  assert not glob.glob(os.path.join(data_dir, 'mvtec_ad', 'bottle', '1.0.0'))
  # A killed run leaves its temporary folder behind, or a version folder without its info:
  # neither may be trusted.
  leftover = os.path.join(data_dir, 'mvtec_ad', 'bottle', 'incomplete.ABC123_1.0.0')
  os.makedirs(leftover)
  open(os.path.join(leftover, 'mvtec_ad-train.array_record-00000-of-00001'), 'wb').write(b'x')
  os.makedirs(os.path.join(data_dir, 'mvtec_ad', 'bottle', '1.0.0'))
  monkeypatch.setattr(builder, '_encode_entry', original)
  built = builder.prepare(mvtec_ad.MvtecAd, root, 'bottle', data_dir)
  assert built.info.splits['train'].num_examples == 6
  assert len(built.as_data_source(split='test')) == 6


def test_corrupt_image_fails_prepare_with_user_error(tmp_path):
  root = str(tmp_path / 'src')
  base = data_folders.write_mvtec_category(root, 'bottle', num_train=3)
  bad = os.path.join(base, 'train', 'good', '001.png')
  open(bad, 'wb').write(open(bad, 'rb').read()[:40])
  with pytest.raises(UserError, match='001.png'):
    builder.prepare(mvtec_ad.MvtecAd, root, 'bottle', str(tmp_path / 'tfds'))
  assert not glob.glob(str(tmp_path / 'tfds' / 'mvtec_ad' / 'bottle' / '1.0.0'))


def test_tfds_dir_inside_source_is_refused(tmp_path):
  root = str(tmp_path)
  base = data_folders.write_mvtec_category(root, 'bottle', num_train=2)
  before = data_folders.snapshot(base)
  with pytest.raises(UserError, match='inside the source'):
    builder.prepare(mvtec_ad.MvtecAd, root, 'bottle', os.path.join(base, 'cache'))
  assert data_folders.snapshot(base) == before


def test_visa_builder(tmp_path):
  root = str(tmp_path / 'src')
  data_folders.write_visa(root, ('pcb1',), num_train=3, num_good_test=1, num_anomaly=2)
  before = data_folders.snapshot(root)
  built = builder.prepare(visa.Visa, root, 'pcb1', str(tmp_path / 'tfds'))
  test = built.as_data_source(split='test')
  assert [int(test[i]['label']) for i in range(3)] == [0, 1, 1]
  assert test[2]['defect_type'] == b'anomaly' and test[2]['mask'].sum() > 0
  assert data_folders.snapshot(root) == before


def test_folder_builder_without_masks(tmp_path):
  root = str(tmp_path / 'src')
  data_folders.write_mvtec_category(root, 'My Parts', num_train=2, masks=False)
  config = builder.folder_config(root, 'My Parts')
  built = builder.prepare(builder.AnomalyFolder, root, 'My Parts', str(tmp_path / 'tfds'),
                          config=config)
  assert built.info.metadata['has_masks'] is False
  assert config.name.startswith('my_parts_')
  assert config.name != builder.folder_config(str(tmp_path / 'other'), 'My Parts').name


def test_real_mpdd_metal_plate(tmp_path):
  root = shared_data_dir('mpdd')
  shared_data_dir('mpdd', 'metal_plate')
  built = builder.prepare(mpdd.Mpdd, str(root), 'metal_plate', str(tmp_path / 'tfds'))
  assert built.info.splits['train'].num_examples == 54
  assert built.info.splits['test'].num_examples == 97
  test = built.as_data_source(split='test', decoders={'image': tfds.decode.SkipDecoding()})
  labels = [int(test[i]['label']) for i in range(len(test))]
  assert sum(labels) == 71
  last = test[len(test) - 1]
  assert last['label'] == 1 and last['mask'].any()
