"""The development defect families (esm/dev_defects.py): visible masks, seeds, strengths, placement."""

import numpy as np
import pytest

from datasets.folder import resize_rgb
from esm import dev_defects as dd
from esm.errors import UserError

SIDE, SIZE = 96, 24  # stored and model resolution
STRENGTHS = (1.0, 2.0, 4.0)


def _object_image(seed: int) -> np.ndarray:
  """A textured disc (the object) on a plain light background, as a category's images are."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:SIDE, 0:SIDE]
  disc = np.hypot(y - SIDE / 2, x - SIDE / 2) < SIDE * 0.35
  texture = 90 + 30 * np.sin(x / 3.0 + seed)[..., None] + rng.normal(0, 6, (SIDE, SIDE, 3))
  img = np.where(disc[..., None], texture * [1.0, 0.8, 0.6], 215 + rng.normal(0, 2, (SIDE, SIDE, 3)))
  return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def normal():
  return dd.make_normal([_object_image(s) for s in range(1, 13)], SIZE, num_textures=4)


@pytest.mark.parametrize('family', dd.FAMILIES)
def test_mask_is_the_visible_change_and_lies_on_the_object(family, normal):
  img = _object_image(100)
  d = dd.paint(family, img, normal, 2.0, np.random.default_rng(0))
  clean = resize_rgb(img, SIZE)
  change = np.abs(d.image.astype(int) - clean.astype(int)).max(axis=-1)
  np.testing.assert_array_equal(d.mask, change >= dd.VISIBLE_LEVELS)
  assert d.mask.sum() >= dd.MIN_VISIBLE_FRACTION * SIZE**2 and d.image.dtype == np.uint8
  on_object = resize_rgb((dd.object_mask(img)[..., None] * np.full(3, 255)).astype(np.uint8),
                         SIZE)[..., 0] > 0
  assert np.mean(on_object[d.mask]) >= 0.9


@pytest.mark.parametrize('family', dd.FAMILIES)
def test_a_seed_reproduces_its_defect(family, normal):
  img = _object_image(101)
  a, b, c = (dd.paint(family, img, normal, 2.0, np.random.default_rng(seed)) for seed in (5, 5, 6))
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.mask, b.mask)
  assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize('family', dd.FAMILIES)
def test_strengths_are_ordered(family, normal):
  """For one draw, a stronger strength never changes less; over draws it changes more."""
  img = _object_image(102)
  fg, clean = dd.object_mask(img), resize_rgb(img, SIZE)
  totals = []
  for seed in range(6):
    d = dd.draw(family, img, fg, normal, np.random.default_rng(seed))
    alphas = [dd.calibrate(img, d, s, normal, clean) for s in STRENGTHS]
    changes = [np.abs(dd.apply(img, d, a, SIZE, clean)[0].astype(int) - clean).sum() for a in alphas]
    assert alphas == sorted(alphas) and changes == sorted(changes), (alphas, changes)
    totals.append(changes)
  mean = np.mean(totals, axis=0)
  assert mean[0] < mean[1] < mean[2], mean


@pytest.mark.parametrize('family', ('field', 'patch'))
def test_the_area_range_sets_the_region_size(family, normal):
  """tune.defect_area: a higher range draws larger regions, at the same seeds."""
  img = _object_image(103)
  fg = dd.object_mask(img)

  def mean_opacity(area):
    return np.mean([dd.draw(family, img, fg, normal, np.random.default_rng(seed),
                            area=area).opacity.mean() for seed in range(6)])

  small, large = mean_opacity((0.01, 0.02)), mean_opacity((0.15, 0.3))
  assert 0 < small < 0.03 and large > 3 * small


def test_the_strength_sets_the_change_in_standard_deviations(normal):
  img = _object_image(103)
  for strength in (1.0, 2.0):
    z = [dd.paint('painted', img, normal, strength, np.random.default_rng(s)) for s in range(8)]
    reached = [d.mean_z / strength for d in z if d.alpha < 1.0]
    assert reached and 0.6 < np.median(reached) < 1.6, reached


def test_a_texture_is_its_own_object():
  rng = np.random.default_rng(0)
  texture = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
  assert dd.object_mask(texture).all()
  plate = np.full((64, 64, 3), 200, np.uint8)
  plate[20:40, 10:50] = (30, 60, 160)
  fg = dd.object_mask(plate)
  assert fg[30, 30] and not fg[2, 2] and 0.15 < fg.mean() < 0.35


def test_a_defect_that_never_stays_visible_is_an_error(normal):
  with pytest.raises(UserError, match='stayed visible'):
    dd.paint('patch', _object_image(104), normal, 1e-4, np.random.default_rng(0))


def test_non_square_images_are_painted_at_their_own_size(normal):
  img = np.concatenate([_object_image(105), _object_image(106)[:48]], axis=0)  # 144 x 96
  d = dd.paint('painted', img, normal, 2.0, np.random.default_rng(0))
  assert d.image.shape == (SIZE, SIZE, 3) and d.mask.any()
