"""esm/detectors.py: each map on hand-made inputs, normalisation, blur, eq. 14/15, ablation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from configs import default
from esm import detectors
from esm import metrics
from esm.config import section_from_dict
from esm.errors import UserError

B, H, W, C = 2, 16, 16, 3


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (B, H, W, C)).astype(np.float32)
  x0_hat = rng.uniform(-1, 1, (B, H, W, C)).astype(np.float32)
  var0 = rng.uniform(0.01, 0.5, (B, H, W, C)).astype(np.float32)
  var_in = rng.uniform(0.01, 0.5, (B, H, W, C)).astype(np.float32)
  return x0, x0_hat, var0, var_in


def _random_conv_features(images):
  """A fixed random 3x3 conv + 4x4 average pool: two 'layers' of [B, 4, 4, 8] features."""
  kernel = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, C, 8)), jnp.float32)
  feats = jax.lax.conv_general_dilated(images, kernel, (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  pooled = jax.lax.reduce_window(feats, 0.0, jax.lax.add, (1, 4, 4, 1), (1, 4, 4, 1), 'VALID')
  return [pooled, jnp.tanh(pooled)]


def test_config_from_default_and_bad_fields():
  cfg = section_from_dict(detectors.DetectConfig, default.get_default_config().detect.to_dict(),
                          'detect')
  assert cfg == detectors.DetectConfig((1.0, 1.0, 1.0, 1.0), 4.0, 250, 'absolute', 1e-8, 99.0)
  assert cfg == detectors.DetectConfig()  # the dataclass and the config agree
  bad = {'weights': (1.0, 1.0), 're_kind': 'cubed', 'top_n': 0, 'blur_sigma': -1.0,
         'var_floor': 0.0, 'threshold_percentile': 101.0, 'image_detectors': ('x',)}
  for field, value in bad.items():
    detect = default.get_default_config().detect.to_dict()
    detect[field] = value
    with pytest.raises(UserError, match=f'^detect.{field}'):
      section_from_dict(detectors.DetectConfig, detect, 'detect')


def test_scaling_with_image_size():
  cfg = detectors.DetectConfig()
  assert detectors.scaled_blur_sigma(cfg, 256) == 4.0
  assert detectors.scaled_blur_sigma(cfg, 128) == 2.0
  assert detectors.scaled_top_n(cfg, 256) == 250
  assert detectors.scaled_top_n(cfg, 128) == 63  # 62.5 rounds half up
  assert detectors.scaled_top_n(cfg, 8) == 1  # at least one pixel


def test_reconstruction_maps(images):
  x0, x0_hat, var0, var_in = images
  diff = x0 - x0_hat
  np.testing.assert_allclose(detectors.s_re(x0, x0_hat), np.mean(diff**2, -1), rtol=1e-6)
  np.testing.assert_allclose(detectors.s_re(x0, x0_hat, 'absolute'), np.mean(np.abs(diff), -1),
                             rtol=1e-6)
  np.testing.assert_allclose(detectors.s_u(x0, x0_hat, np.full_like(var0, 0.25)),
                             np.mean(4 * diff**2, -1), rtol=1e-6)
  expected_kl = 0.5 * (np.log(var0 / var_in) + (var_in + diff**2) / var0 - 1)
  np.testing.assert_allclose(detectors.s_kl(x0, x0_hat, var0, var_in),
                             np.mean(expected_kl, -1), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(detectors.s_kl(x0, x0, var0, var0)) == 0.0)
  # The floor keeps a zero variance finite.
  assert np.all(np.isfinite(detectors.s_u(x0, x0_hat, np.zeros_like(var0), 1e-8)))


def test_cosine_map():
  rng = np.random.default_rng(2)
  f = jnp.asarray(rng.normal(size=(1, 4, 4, 6)), jnp.float32)
  np.testing.assert_allclose(detectors.s_cos([f], [f], (8, 8)), 0.0, atol=1e-6)
  e0 = jnp.zeros((1, 4, 4, 6)).at[..., 0].set(1.0)
  e1 = jnp.zeros((1, 4, 4, 6)).at[..., 1].set(2.0)
  ortho = detectors.s_cos([e0, f], [e1, f], (8, 8))
  assert ortho.shape == (1, 8, 8)
  np.testing.assert_allclose(ortho, 0.5, atol=1e-6)  # mean of 1 (orthogonal) and 0 (identical)
  np.testing.assert_allclose(detectors.s_cos([e0], [-e0], (4, 4)), 2.0, atol=1e-6)


def test_compute_maps_keys_and_values(images):
  x0, x0_hat, var0, var_in = images
  sgm = detectors.compute_maps(x0, x0_hat)
  assert list(sgm) == ['re']
  cfg = detectors.DetectConfig(re_kind='absolute')
  maps = jax.jit(functools.partial(detectors.compute_maps, feature_fn=_random_conv_features,
                                   re_kind=cfg.re_kind, var_floor=cfg.var_floor))(
                                       x0, x0_hat, var0, var_in)
  assert set(maps) == {'cos', 'u', 'kl', 're'}
  assert all(m.shape == (B, H, W) and m.dtype == jnp.float32 for m in maps.values())
  np.testing.assert_allclose(maps['re'], detectors.s_re(x0, x0_hat, 'absolute'), rtol=1e-6)
  same = detectors.compute_maps(x0, x0, var0, var_in, _random_conv_features)
  np.testing.assert_allclose(same['cos'], 0.0, atol=1e-5)
  assert 'kl' not in detectors.compute_maps(x0, x0_hat, var0, None)


def test_select_detectors_for_sgm_model():
  sel = detectors.select_detectors((1.0, 1.0, 1.0, 0.0), variance=False, features=True)
  assert sel.used == ('cos',)
  assert set(sel.unavailable) == {'u', 'kl'}
  assert all('SGM' in reason for reason in sel.unavailable.values())
  assert sel.disabled == ('re',)
  assert detectors.select_detectors((1, 1, 1, 1), variance=True, features=True).used == (
      'cos', 'u', 'kl', 're')
  with pytest.raises(UserError, match='detect.weights'):
    detectors.select_detectors((1.0, 1.0, 1.0, 0.0), variance=False, features=False)


def test_registry_is_in_weight_order_and_says_what_each_detector_needs():
  assert detectors.DETECTOR_NAMES == ('cos', 'u', 'kl', 're')
  needs = {n: (d.needs_variance, d.needs_features) for n, d in detectors.DETECTORS.items()}
  assert needs == {'cos': (False, True), 'u': (True, False), 'kl': (True, False),
                   're': (False, False)}


def test_normaliser_streams_batches_with_padding():
  rng = np.random.default_rng(3)
  val = rng.normal(3.0, 2.0, (7, H, W)).astype(np.float32)
  const = np.full((7, H, W), 5.0, np.float32)
  acc = detectors.NormAccumulator()
  for start in range(0, 7, 3):  # batches of 3, the last one padded with junk
    part = {'re': val[start:start + 3], 'u': const[start:start + 3]}
    real = part['re'].shape[0]
    valid = np.arange(3) < real
    padded = {k: np.concatenate([v, np.full((3 - real, H, W), 1e6, np.float32)])
              for k, v in part.items()}
    acc.update(padded, valid)
  stats = acc.stats()
  assert stats.count == {'re': 7 * H * W, 'u': 7 * H * W}
  assert stats.mean['re'] == pytest.approx(val.mean(dtype=np.float64), rel=1e-5)
  assert stats.std['re'] == pytest.approx(val.std(dtype=np.float64), rel=1e-5)
  assert stats == detectors.NormStats.from_dict(stats.to_dict())
  whole = detectors.fit_normaliser({'re': val, 'u': const})
  assert whole.std['re'] == pytest.approx(stats.std['re'], rel=1e-5)
  norm = detectors.normalise({'re': val, 'u': const}, stats)
  assert float(jnp.mean(norm['re'])) == pytest.approx(0.0, abs=1e-5)
  assert float(jnp.std(norm['re'])) == pytest.approx(1.0, rel=1e-4)
  np.testing.assert_allclose(norm['u'], 0.0, atol=1e-6)  # constant val map: not blown up


def test_gaussian_blur():
  const = jnp.full((2, 20, 24), 3.0)
  np.testing.assert_allclose(detectors.gaussian_blur(const, 1.5), 3.0, rtol=1e-6)
  delta = jnp.zeros((1, 20, 24)).at[0, 10, 12].set(1.0)
  assert float(jnp.sum(detectors.gaussian_blur(delta, 1.5))) == pytest.approx(1.0, rel=1e-5)
  rng = np.random.default_rng(4)
  maps = rng.random((2, 20, 24)).astype(np.float32)
  ref = scipy.ndimage.gaussian_filter(maps, sigma=(0, 2.0, 2.0), mode='reflect', truncate=4.0)
  np.testing.assert_allclose(detectors.gaussian_blur(jnp.asarray(maps), 2.0), ref, atol=1e-5)
  np.testing.assert_array_equal(detectors.gaussian_blur(jnp.asarray(maps), 0.0), maps)


def test_image_score_is_mean_of_top_n():
  m = jnp.zeros((2, 4, 4)).at[0, 0, :3].set(jnp.array([5.0, 3.0, 1.0])).at[1].set(-1.0)
  np.testing.assert_allclose(detectors.image_score(m, 2), [4.0, -1.0])
  np.testing.assert_allclose(detectors.image_score(m, 3), [3.0, -1.0])
  np.testing.assert_allclose(detectors.image_score(m, 100), [9.0 / 16, -1.0])


def test_combine_score_fn_and_ablation():
  rng = np.random.default_rng(5)
  maps = {k: rng.normal(size=(3, H, W)).astype(np.float32) for k in ('u', 'kl', 're')}
  cfg = detectors.DetectConfig(weights=(1.0, 2.0, 0.5, 1.0), blur_sigma=16.0, top_n=1024)
  combined = detectors.combine(maps, {'u': 2.0, 're': 1.0})
  np.testing.assert_allclose(combined, 2 * maps['u'] + maps['re'], rtol=1e-6)
  pixel, score = detectors.get_score_fn(cfg, H, ('u', 're'))(maps)
  # At 16x16, σ = 16 * 16/256 = 1 px and N_a = 1024 / 256 = 4 pixels.
  expected = detectors.gaussian_blur(combined, 1.0)
  np.testing.assert_allclose(pixel, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(score, detectors.image_score(expected, 4), rtol=1e-5)
  assert len(detectors.ablation_subsets(['cos', 'u', 'kl', 're'])) == 15
  results = list(detectors.iter_ablation(cfg, H, maps, batch_size=2))
  assert [subset for subset, _, _ in results] == detectors.ablation_subsets(['u', 'kl', 're'])
  by_subset = {subset: (p, s) for subset, p, s in results}
  np.testing.assert_allclose(by_subset[('u', 're')][0], pixel, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(by_subset[('u', 're')][1], score, rtol=1e-5)
  assert by_subset[('kl',)][0].shape == (3, H, W) and by_subset[('kl',)][1].shape == (3,)


def test_image_detectors_score_their_own_map_and_keep_the_pixel_map():
  rng = np.random.default_rng(6)
  maps = {k: rng.normal(size=(3, H, W)).astype(np.float32) for k in ('cos', 're')}
  cfg = detectors.DetectConfig(blur_sigma=16.0, top_n=1024, image_detectors=('re',))
  pixel, score = detectors.get_score_fn(cfg, H, ('cos', 're'))(maps)
  np.testing.assert_allclose(pixel, detectors.gaussian_blur(maps['cos'] + maps['re'], 1.0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(score, detectors.image_score(detectors.gaussian_blur(maps['re'], 1.0),
                                                          4), rtol=1e-5)
  by_subset = {s: (p, sc) for s, p, sc in detectors.iter_ablation(cfg, H, maps, batch_size=2)}
  np.testing.assert_allclose(by_subset[('cos', 're')][1], score, rtol=1e-5)
  np.testing.assert_allclose(by_subset[('re',)][1], score, rtol=1e-5)
  # A subset without S_RE scores images from its own map, as the paper does.
  np.testing.assert_allclose(by_subset[('cos',)][1], detectors.image_score(
      detectors.gaussian_blur(maps['cos'], 1.0), 4), rtol=1e-5)
  assert detectors.image_weights({'cos': 1.0, 're': 2.0}, ()) == {'cos': 1.0, 're': 2.0}
  assert detectors.image_weights({'cos': 1.0, 're': 0.0}, ('re',)) == {'cos': 1.0, 're': 0.0}
  with pytest.raises(UserError, match='image_detectors'):
    detectors.DetectConfig(image_detectors=('sharpness',))
  with pytest.raises(UserError, match='image_detectors'):
    detectors.DetectConfig(image_detectors='re')


def test_standardised_mean_keeps_a_detector_noisy_on_clean_images_from_dominating():
  # Both maps have unit pixel std on clean images once normalised, but S_RE's is mostly a fixed
  # ramp shared by every image, so its image score barely moves between clean images, while S_U's
  # moves a lot and carries no defect signal. The map's image score then follows S_U; the
  # standardised mean weighs each by its spread across clean images and follows S_RE.
  rng = np.random.default_rng(1)
  labels = np.repeat([0, 1], 40)
  ramp = np.broadcast_to(np.linspace(-17.0, 17.0, W), (H, W))

  def maps_of(n, signal):
    u, re = rng.normal(0.0, 10.0, n), rng.normal(0.0, 1.0, n) + 5.0 * signal
    return {'u': np.broadcast_to(u[:, None, None], (n, H, W)).astype(np.float32),
            're': (ramp + re[:, None, None]).astype(np.float32)}

  held_out, test = maps_of(20, np.zeros(20)), maps_of(80, labels)
  cfg = detectors.DetectConfig(blur_sigma=16.0, top_n=1024, image_score='standardised_mean')
  stats = detectors.fit_stats(held_out, cfg, H, batch_size=8)
  normed = detectors.normalise(test, stats)
  _, plain = detectors.get_score_fn(dataclasses.replace(cfg, image_score='map'), H,
                                    ('u', 're'))(normed)
  pixel, score = detectors.get_score_fn(cfg, H, ('u', 're'), stats)(normed)
  assert metrics.auroc(np.asarray(plain), labels) < 0.75
  assert metrics.auroc(np.asarray(score), labels) > 0.95
  # At 16x16, σ = 1 px and N_a = 4 pixels (test_combine_score_fn_and_ablation).
  own = lambda maps, k: np.asarray(detectors.image_score(detectors.gaussian_blur(
      jnp.asarray(maps[k]), 1.0), 4), np.float64)
  held_own = detectors.normalise(held_out, stats)
  for k in ('u', 're'):
    assert stats.score_mean[k] == pytest.approx(own(held_own, k).mean(), abs=1e-4)
    assert stats.score_std[k] == pytest.approx(own(held_own, k).std(ddof=1), rel=1e-3)
  z = {k: (own(normed, k) - stats.score_mean[k]) / stats.score_std[k] for k in ('u', 're')}
  np.testing.assert_allclose(score, (z['u'] + z['re']) / 2, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(pixel, detectors.gaussian_blur(normed['u'] + normed['re'], 1.0),
                             rtol=1e-5, atol=1e-5)
  assert stats == detectors.NormStats.from_dict(stats.to_dict())
  # The ablation scores each subset by the standardised mean of its own members, and
  # image_detectors names the detectors the mean reads.
  by_subset = {s: sc for s, _, sc in detectors.iter_ablation(cfg, H, normed, stats=stats)}
  np.testing.assert_allclose(by_subset[('u', 're')], score, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(by_subset[('re',)], z['re'], rtol=1e-3, atol=1e-3)
  _, re_only = detectors.get_score_fn(dataclasses.replace(cfg, image_detectors=('re',)), H,
                                      ('u', 're'), stats)(normed)
  np.testing.assert_allclose(re_only, z['re'], rtol=1e-3, atol=1e-3)


def test_standardised_mean_needs_the_held_out_image_score_statistics():
  cfg = detectors.DetectConfig(image_score='standardised_mean')
  saved_before = {'mean': {'re': 0.0}, 'std': {'re': 1.0}, 'count': {'re': 10}}
  with pytest.raises(UserError, match='run --mode=eval'):
    detectors.get_score_fn(cfg, H, ('re',), detectors.NormStats.from_dict(saved_before))
  with pytest.raises(UserError, match='image_score'):
    detectors.DetectConfig(image_score='sum')


def test_subset_weights_keep_each_members_configured_weight():
  assert detectors.subset_weights((0.5, 1.0, 2.0, 1.0), ('cos', 're')) == (0.5, 0.0, 0.0, 1.0)
  # A detector the config turns off still enters a subset that holds it, at weight 1.
  assert detectors.subset_weights((0.0, 1.0, 1.0, 3.0), ('cos', 'kl')) == (1.0, 0.0, 1.0, 0.0)
  assert detectors.subset_weights((1.0,) * 4, ()) == (0.0,) * 4
