"""experiments/study.py: the readings are chosen on tuning's development set (held-out training
images only), by tuning's choice rule."""

import os
import sys

import numpy as np

from datasets import pipeline
from esm import dev_set
from esm.dev_defects import VISIBLE_LEVELS
from tests.helpers import data_folders

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments'))
import study  # pylint: disable=g-import-not-at-top,wrong-import-position


def _base(tmp_path):
  root = tmp_path / 'data'
  data_folders.write_mvtec_category(str(root / 'mvtec_ad'), 'bottle', num_train=10, size=64)
  c = study.base_config('bottle', str(root))
  c.data.tfds_dir = str(tmp_path / 'tfds')
  c.data.val_fraction = 0.3
  return c


def test_dev_set_is_the_held_out_train_images_with_painted_defects(tmp_path):
  base = _base(tmp_path)
  val = pipeline.get_eval_data(base.data, 'val', global_batch_size=4)
  dev = study.make_dev_set(base)
  clean = np.flatnonzero(dev.labels == 0)
  assert len(clean) == val.num_examples and dev.labels.sum() > 0
  for k in range(dev.data.num_examples):
    image = dev.data.load(k)['image']
    source = val.load(int(dev.source[k]))['image']
    if dev.labels[k] == 0:  # the clean copy is the held-out image itself
      np.testing.assert_array_equal(image, source)
      assert not dev.masks[k].any()
    else:  # a painted copy differs visibly from its held-out image inside its mask only
      change = np.abs(image - source).max(axis=-1) * 127.5
      assert dev.masks[k].any() and change[dev.masks[k] == 0].max() < VISIBLE_LEVELS + 0.5


def test_choice_ties_go_to_the_default_reading_and_t_d_sweep_brackets_the_table_value():
  rows = [{'option': 'literal', 'score': 0.85, 'nfe': 50, 't_d': 25, 'detectors': ['u', 're']},
          {'option': 'matched', 'score': 0.85, 'nfe': 50, 't_d': 25, 'detectors': ['u', 're']}]
  assert dev_set.choose(rows, 0.005)['option'] == 'literal'
  rows[1]['score'] = 0.9
  assert dev_set.choose(rows, 0.005)['option'] == 'matched'
  assert study.sweep_values(25) == [6, 12, 25, 38, 50]
  assert study.sweep_values(12) == [3, 6, 12, 18, 24]
