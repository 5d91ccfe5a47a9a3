"""The detectors that need no diffusion model: z-score and DINO patch kNN."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_default_config
from esm import baselines
from esm import detectors as det
from esm.config import from_configdict
from esm.errors import UserError
from esm.features.extractor import get_feature_fn
from esm.image_set import ImageSet


def _images(n, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-0.2, 0.2, (n, size, size, 3)).astype(np.float32)


def test_zscore_is_the_per_pixel_standard_score_blurred_and_top_n():
  train = _images(20)
  state = baselines.fit_zscore(train)
  np.testing.assert_allclose(state['mean'], train.mean(0), atol=1e-6)
  np.testing.assert_allclose(state['std'], train.std(0), atol=1e-6)
  test = _images(2, seed=1)
  test[1, 4:7, 4:7] = 0.9  # a bright square
  maps, scores = baselines.zscore_score(state, test)
  z = np.abs(test - state['mean']) / (state['std'] + baselines.ZSCORE_STD_FLOOR)
  sigma, top_n = baselines.zscore_scale(16)
  expected = det.gaussian_blur(jnp.asarray(z.mean(-1)), sigma)
  np.testing.assert_allclose(maps, expected, rtol=1e-5)
  np.testing.assert_allclose(scores, det.image_score(expected, top_n), rtol=1e-5)
  assert scores[1] > scores[0] and maps[1, 5, 5] > maps[1, 12, 12]


def test_zscore_scale_follows_the_image_side_and_area():
  assert baselines.zscore_scale(48) == (0.75, 10)
  assert baselines.zscore_scale(96) == (1.5, 40)
  with pytest.raises(UserError, match='at least 2 training images'):
    baselines.fit_zscore(_images(1))


def test_coreset_keeps_the_far_points_and_all_of_a_small_set():
  rng = np.random.default_rng(0)
  cluster = rng.normal(0, 0.01, (200, 8)).astype(np.float32)
  far = np.eye(8, dtype=np.float32)[:3] * 10  # three points far from the cluster and each other
  features = np.concatenate([cluster, far])
  keep = baselines.coreset(features, 4)
  assert len(keep) == 4 and {200, 201, 202} <= set(keep.tolist())
  np.testing.assert_array_equal(baselines.coreset(features[:3], 10), [0, 1, 2])


def _knn_context(bank_size=64):
  config = from_configdict(get_default_config())
  features = dataclasses.replace(config.features, model='dino_vits16', weights='random',
                                 layers=(0, 1), image_size=32)
  cfg = dataclasses.replace(config.baselines, knn_layers=(0, 1), knn_bank_size=bank_size)
  return baselines.Context(cfg, config.detect, get_feature_fn(features))


def test_knn_scores_the_training_images_zero_and_a_changed_one_higher():
  context = _knn_context(bank_size=10_000)  # every training patch in the bank
  train = _images(3, size=32)
  state = baselines.fit_knn(train, context)
  maps, scores = baselines.knn_score(state, train[:2], context)
  assert maps.shape == (2, 32, 32)
  np.testing.assert_allclose(scores, 0.0, atol=5e-3)
  changed = train[:1].copy()
  changed[0, 8:20, 8:20] = 1.0
  _, changed_score = baselines.knn_score(state, changed, context)
  assert float(changed_score[0]) > 0.05


def test_score_image_set_and_availability():
  train = _images(4)
  images = _images(5, seed=2)
  data = ImageSet(5, False, [{}] * 5, 16, 2, lambda i: {'image': images[i]})
  state = baselines.fit_zscore(train)
  maps, scores = baselines.score_image_set('zscore', state, data, None)
  np.testing.assert_allclose(scores, baselines.zscore_score(state, images)[1], rtol=1e-6)
  assert maps.shape == (5, 16, 16)
  cfg = get_default_config()
  cfg.features.model = 'none'
  assert baselines.available(from_configdict(cfg)) == {'zscore': None,
                                                        'knn': baselines.NO_FEATURES}
  cfg.baselines.methods = ('zscore', 'pca')
  with pytest.raises(UserError, match='baselines.methods'):
    from_configdict(cfg)
