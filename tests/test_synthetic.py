"""Tests of datasets/synthetic.py: layout, determinism, exact and visible defects, atomic writes."""

import os

import numpy as np
from PIL import Image
import pytest

from datasets import folder
from datasets import synthetic
from tests.helpers import data_folders


@pytest.fixture(scope='module')
def generated(tmp_path_factory):
  base = str(tmp_path_factory.mktemp('syn'))
  return base, synthetic.ensure_synthetic(base, size=32, num_train=4, num_test=9, seed=1)


def test_layout_is_mvtec_and_complete(generated):
  _, root = generated
  assert sorted(os.listdir(root)) == sorted(synthetic.CATEGORIES)
  for category in synthetic.CATEGORIES:
    listing = folder.list_mvtec_layout(root, category, masks_required=True)
    assert len(listing.split('train')) == 4 and len(listing.split('test')) == 9
    types = {e.defect_type for e in listing.split('test')}
    assert types == {'good', *synthetic.DEFECT_TYPES[category]}
    for entry in listing.split('test'):
      example = data_folders.load_example(entry)
      assert example['image'].shape == (32, 32, 3)
      assert bool(example['mask'].any()) == bool(entry.label)


def test_written_masks_are_exactly_the_changed_pixels(generated):
  _, root = generated
  num_good = max(1, 9 // 3)  # as the generator splits 9 test images
  for k, category in enumerate(synthetic.CATEGORIES):
    types = synthetic.DEFECT_TYPES[category]
    for i in range(num_good, 9):  # regenerate test image i without its defect
      clean = synthetic._GOOD[category](np.random.default_rng([1, k, 1, i]), 32)[0].astype(np.uint8)
      defect_type, n = types[(i - num_good) % len(types)], (i - num_good) // len(types)
      image = np.asarray(Image.open(os.path.join(root, category, 'test', defect_type,
                                                 f'{n:03d}.png')))
      mask = np.asarray(Image.open(os.path.join(root, category, 'ground_truth', defect_type,
                                                f'{n:03d}_mask.png')))
      changed = np.abs(image.astype(int) - clean).max(-1) > synthetic._CHANGED
      np.testing.assert_array_equal(mask > 0, changed)
      assert changed.any()


def test_deterministic_and_not_regenerated(generated, tmp_path):
  base, root = generated
  stamp = os.stat(os.path.join(root, 'object', 'train', 'good', '000.png')).st_mtime_ns
  assert synthetic.ensure_synthetic(base, size=32, num_train=4, num_test=9, seed=1) == root
  assert os.stat(os.path.join(root, 'object', 'train', 'good', '000.png')).st_mtime_ns == stamp
  other = synthetic.ensure_synthetic(str(tmp_path), size=32, num_train=4, num_test=9, seed=1)
  for rel in ('texture/test/stain/000.png', 'object/ground_truth/extra/000_mask.png'):
    assert open(os.path.join(root, rel), 'rb').read() == open(os.path.join(other, rel), 'rb').read()
  changed = synthetic.ensure_synthetic(str(tmp_path), size=32, num_train=4, num_test=9, seed=2)
  assert changed != other


@pytest.mark.parametrize('category', synthetic.CATEGORIES)
def test_masks_are_exact_and_defects_visible_at_32px(category):
  size = 128
  for k, defect_type in enumerate(synthetic.DEFECT_TYPES[category]):
    rng = np.random.default_rng(k)
    clean, geometry = synthetic._GOOD[category](rng, size)
    clean = clean.astype(np.uint8)
    bad = np.clip(synthetic.add_defect(clean.astype(np.float32), geometry, category, defect_type,
                                       rng), 0, 255).astype(np.uint8)
    mask = np.abs(bad.astype(int) - clean).max(-1) > synthetic._CHANGED
    assert mask.mean() > 0.004, defect_type  # not a hairline
    small = lambda a: np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.BILINEAR))
    small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(
        (32, 32), Image.Resampling.NEAREST)).astype(bool)
    contrast = np.abs(small(bad).astype(int) - small(clean)).max(-1)[small_mask].mean()
    assert contrast > 40, (defect_type, contrast)  # still plain to see after resizing to 32 px


def test_good_images_vary_only_a_little():
  for category in synthetic.CATEGORIES:
    images = [synthetic._GOOD[category](np.random.default_rng(i), 64)[0] for i in range(4)]
    mean = np.mean(images, axis=0)
    assert 0 < np.mean([np.abs(im - mean).mean() for im in images]) < 40


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
  calls = []
  original = synthetic._save

  def failing(array, path):
    calls.append(path)
    if len(calls) == 6:
      raise OSError('disk full (simulated)')
    original(array, path)

  monkeypatch.setattr(synthetic, '_save', failing)
  with pytest.raises(OSError, match='simulated'):
    synthetic.ensure_synthetic(str(tmp_path), size=16, num_train=3, num_test=3)
  assert os.listdir(tmp_path / '16') == []  # neither the final folder nor the temporary one
  monkeypatch.setattr(synthetic, '_save', original)
  root = synthetic.ensure_synthetic(str(tmp_path), size=16, num_train=3, num_test=3)
  assert len(os.listdir(os.path.join(root, 'texture', 'train', 'good'))) == 3
