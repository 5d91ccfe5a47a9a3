"""Tests of datasets/folder.py: every layout, image-mode conversion, each bad input, real data."""

import os

import numpy as np
from PIL import Image
import pytest

from datasets import folder
from esm.errors import UserError
from tests.helpers import data_folders
from tests.helpers.shared_data import shared_data_dir


def test_mvtec_layout_lists_and_decodes(tmp_path):
  data_folders.write_mvtec_category(str(tmp_path), 'widget', num_train=3, defects=('dent', 'crack'))
  listing = folder.list_mvtec_layout(str(tmp_path), 'widget')
  assert listing.has_masks
  assert [e.filename for e in listing.split('train')] == [
      f'train/good/00{i}.png' for i in range(3)]
  test = listing.split('test')
  assert [e.defect_type for e in test] == ['good'] * 2 + ['crack'] * 2 + ['dent'] * 2
  assert [e.label for e in test] == [0, 0, 1, 1, 1, 1]
  example = data_folders.load_example(test[2])
  assert example['image'].dtype == np.uint8 and example['image'].shape == (16, 16, 3)
  assert example['mask'].dtype == np.uint8 and set(np.unique(example['mask'])) == {0, 1}
  # The mask marks exactly the white square of the defect image.
  np.testing.assert_array_equal(example['mask'], (example['image'] == 255).all(-1))
  good = data_folders.load_example(test[0])
  assert good['mask'].sum() == 0 and good['label'] == 0 and good['filename'] == 'test/good/000.png'


def test_folder_without_ground_truth_has_no_masks(tmp_path):
  data_folders.write_mvtec_category(str(tmp_path), 'mine', masks=False)
  listing = folder.list_mvtec_layout(str(tmp_path), 'mine', masks_required=False)
  assert not listing.has_masks
  assert all(e.mask_path is None for e in listing.entries)
  with pytest.raises(UserError, match='ground_truth'):
    folder.list_mvtec_layout(str(tmp_path), 'mine', masks_required=True)


def test_visa_layout(tmp_path):
  data_folders.write_visa(str(tmp_path), ('candle', 'pcb1'), num_train=4, num_good_test=2,
                     num_anomaly=3)
  listing = folder.list_visa_layout(str(tmp_path), 'pcb1')
  assert len(listing.split('train')) == 4 and len(listing.split('test')) == 5
  test = listing.split('test')
  assert [e.label for e in test] == [0, 0, 1, 1, 1]
  assert test[-1].filename == 'Data/Images/Anomaly/008.JPG' and test[-1].defect_type == 'anomaly'
  example = data_folders.load_example(test[-1])
  assert example['mask'].shape == example['image'].shape[:2] and example['mask'].sum() > 0


@pytest.mark.parametrize('mode', ['L', 'P', 'RGBA', 'I;16', 'LA', 'CMYK'])
def test_image_modes_become_rgb(tmp_path, mode):
  rgb = np.zeros((8, 10, 3), np.uint8)
  rgb[:, :5] = 200
  base = Image.fromarray(rgb)
  if mode == 'I;16':
    im = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # 16-bit grayscale
  elif mode == 'P':
    im = base.convert('P')
  else:
    im = base.convert(mode)
  path = str(tmp_path / ('x.tif' if mode == 'CMYK' else 'x.png'))
  im.save(path)
  out = folder.read_image(path)
  assert out.dtype == np.uint8 and out.shape == (8, 10, 3)
  tolerance = 8 if mode == 'P' else 2  # the web palette has no exact 200
  assert abs(int(out[0, 0, 0]) - 200) <= tolerance and out[0, 9].max() <= tolerance


def _mvtec(tmp_path):
  return data_folders.write_mvtec_category(str(tmp_path), 'widget', num_train=2, defects=('crack',))


def _break(case, base):
  """Applies one kind of bad input to a valid MVTec-layout category folder at `base`."""
  if case == 'missing_train_good':
    for name in os.listdir(os.path.join(base, 'train', 'good')):
      os.remove(os.path.join(base, 'train', 'good', name))
    os.rmdir(os.path.join(base, 'train', 'good'))
  elif case == 'image_without_mask':
    os.remove(os.path.join(base, 'ground_truth', 'crack', '001_mask.png'))
  elif case == 'mask_without_image':
    os.remove(os.path.join(base, 'test', 'crack', '001.png'))
  elif case == 'non_image_file':
    (open(os.path.join(base, 'train', 'good', 'notes.txt'), 'w')).write('hello')
  elif case == 'empty_split':
    for name in os.listdir(os.path.join(base, 'train', 'good')):
      os.remove(os.path.join(base, 'train', 'good', name))


@pytest.mark.parametrize('case, where', [
    ('missing_train_good', 'train/good'),
    ('image_without_mask', 'test/crack/001.png'),
    ('mask_without_image', 'ground_truth/crack/001_mask.png'),
    ('non_image_file', 'train/good/notes.txt'),
    ('empty_split', 'train/good'),
])
def test_bad_layout_raises_one_line_user_error(tmp_path, case, where):
  base = _mvtec(tmp_path)
  _break(case, base)
  with pytest.raises(UserError) as err:
    folder.list_mvtec_layout(str(tmp_path), 'widget')
  message = str(err.value)
  assert '\n' not in message and os.path.join(base, where) in message


@pytest.mark.parametrize('case', ['size_mismatch', 'corrupt', 'truncated'])
def test_bad_files_raise_when_decoded(tmp_path, case):
  base = _mvtec(tmp_path)
  image = os.path.join(base, 'test', 'crack', '000.png')
  mask = os.path.join(base, 'ground_truth', 'crack', '000_mask.png')
  if case == 'size_mismatch':
    data_folders.save(np.zeros((9, 16), np.uint8), mask)
    bad = mask
  else:
    data = open(image, 'rb').read()
    open(image, 'wb').write(b'not a png at all' if case == 'corrupt' else data[:len(data) // 2])
    bad = image
  entry = next(e for e in folder.list_mvtec_layout(str(tmp_path), 'widget').entries
               if e.image_path == image)
  with pytest.raises(UserError) as err:
    data_folders.load_example(entry)
  assert bad in str(err.value) and '\n' not in str(err.value)


def test_missing_root_and_category(tmp_path):
  with pytest.raises(UserError, match='data root not found'):
    folder.list_mvtec_layout(str(tmp_path / 'nope'), 'widget')
  _mvtec(tmp_path)
  with pytest.raises(UserError, match='widget'):  # lists the folders that are there
    folder.list_mvtec_layout(str(tmp_path), 'gadget')


def test_hidden_files_are_skipped(tmp_path):
  base = _mvtec(tmp_path)
  open(os.path.join(base, 'train', 'good', '.DS_Store'), 'wb').write(b'\0\1junk')
  open(os.path.join(base, 'ground_truth', 'crack', '._000_mask.png'), 'wb').write(b'junk')
  assert len(folder.list_mvtec_layout(str(tmp_path), 'widget').split('train')) == 2


def test_visa_csv_naming_missing_file(tmp_path):
  data_folders.write_visa(str(tmp_path), ('candle',))
  missing = os.path.join(str(tmp_path), 'candle', 'Data', 'Images', 'Anomaly', '008.JPG')
  os.remove(missing)
  with pytest.raises(UserError) as err:
    folder.list_visa_layout(str(tmp_path), 'candle')
  assert missing in str(err.value)
  os.remove(os.path.join(str(tmp_path), 'split_csv', '1cls.csv'))
  with pytest.raises(UserError, match='1cls.csv'):
    folder.list_visa_layout(str(tmp_path), 'candle')


def test_nothing_written_to_source(tmp_path):
  base = _mvtec(tmp_path)
  before = data_folders.snapshot(base)
  for entry in folder.list_mvtec_layout(str(tmp_path), 'widget').entries:
    data_folders.load_example(entry)
  assert data_folders.snapshot(base) == before


@pytest.mark.parametrize('dataset, category, num_train, num_test, num_masks', [
    ('mvtec_ad', 'bottle', 209, 83, 63),
    ('mpdd', 'metal_plate', 54, 97, 71),
])
def test_real_data_counts_and_alignment(dataset, category, num_train, num_test, num_masks):
  root = shared_data_dir(dataset)
  shared_data_dir(dataset, category)
  listing = folder.list_mvtec_layout(str(root), category)
  test = listing.split('test')
  assert len(listing.split('train')) == num_train and len(test) == num_test
  masked = [e for e in test if e.mask_path]
  assert len(masked) == num_masks and all(e.label == 1 for e in masked)
  for entry in masked[::7]:  # every 7th keeps this fast; each mask must sit on its image
    stem = os.path.splitext(os.path.basename(entry.image_path))[0]
    assert os.path.basename(entry.mask_path) == f'{stem}_mask.png'
    assert os.path.basename(os.path.dirname(entry.mask_path)) == entry.defect_type
    example = data_folders.load_example(entry)
    assert example['mask'].shape == example['image'].shape[:2] and example['mask'].any()
