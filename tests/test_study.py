"""experiments/study.py: the development set is built from held-out training images only."""

import os
import sys

import numpy as np
from PIL import Image

from configs import common
from datasets import pipeline
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
  val_names = sorted(os.path.basename(r['filename']) for r in val.records)
  dev_root = study.build_dev_set(base, str(tmp_path / 'dev'))
  dev = common.override(base, {'data.dataset': 'folder', 'data.root': dev_root})

  test = pipeline.get_eval_data(dev.data, 'test', global_batch_size=4)
  good = sorted(os.path.basename(r['filename']) for r in test.records if r['label'] == 0)
  bad = sorted(os.path.basename(r['filename']) for r in test.records if r['label'] == 1)
  assert good == val_names and bad == val_names  # one clean and one defective copy of each
  # The folder dataset holds out the same images, so the model never trained on the dev test set.
  dev_val = pipeline.get_eval_data(dev.data, 'val', global_batch_size=4)
  assert sorted(os.path.basename(r['filename']) for r in dev_val.records) == val_names

  category = os.path.join(dev_root, 'bottle')
  for kind in os.listdir(os.path.join(category, 'ground_truth')):
    for name in os.listdir(os.path.join(category, 'test', kind)):
      stem = os.path.splitext(name)[0]
      clean = np.asarray(Image.open(os.path.join(category, 'test', 'good', name)), np.int32)
      painted = np.asarray(Image.open(os.path.join(category, 'test', kind, name)), np.int32)
      mask = np.asarray(Image.open(os.path.join(category, 'ground_truth', kind, f'{stem}_mask.png')))
      changed = np.any(clean != painted, axis=-1)
      assert mask.any() and np.array_equal(changed, mask > 0)


def test_choice_ties_go_to_the_default_reading_and_t_d_sweep_brackets_the_table_value():
  rows = {'literal': {'image_auroc': 0.9, 'pixel_auroc': 0.8},
          'matched': {'image_auroc': 0.8, 'pixel_auroc': 0.9}}
  assert study._pick(rows) == 'literal'  # pylint: disable=protected-access
  rows['matched']['pixel_auroc'] = 0.95
  assert study._pick(rows) == 'matched'  # pylint: disable=protected-access
  assert study.sweep_values(25) == [6, 12, 25, 38, 50]
  assert study.sweep_values(12) == [3, 6, 12, 18, 24]
