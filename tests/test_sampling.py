"""Tests of esm/sampling.py with stub networks on 8x8x3 images and the default 1000-step schedule.

Compiling a sampler costs seconds on CPU (mostly the threefry noise), so tests share a few sampler
configurations: `get_reconstruct_fn` caches per (net_fn, config, T_d) and jax.jit per batch shape.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_default_config
from esm import sampling
from esm.config import section_from_dict
from esm.errors import UserError
from esm.models.dual_stream import NetOutput
from esm.sde import SDEConfig, VPSDE

SDE = VPSDE(SDEConfig())
SHAPE = (8, 8, 3)
T_D = 6
BASE = sampling.SamplingConfig(method='esm_sigma', var_source='i1',
                               snapshot_steps=(200, 150, 100, 80, 50, 20, 0))
CALLS = []  # batch size of every network call executed, appended by the stubs at run time


def cfg(**kw):
  return dataclasses.replace(BASE, **kw)


def clean_images(n, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n,) + SHAPE, minval=-1.0, maxval=1.0)


def count_call(x):
  jax.debug.callback(lambda n: CALLS.append(int(n)), x.shape[0])


def generic_net(dual=True):
  """A smooth, label-dependent stub whose σ² varies over pixels around the sampler's clamps."""
  def net_fn(params, x, i, *, train=False, rng=None):
    del train, rng
    count_call(x)
    t = SDE.time(i)[:, None, None, None]
    eps = jnp.tanh(params['w'] * x + t)
    log_var = jnp.log(0.015) + params['a'] * x - t if dual else None
    return NetOutput(eps, log_var)
  return net_fn


PARAMS = {'w': jnp.float32(0.7), 'a': jnp.float32(0.5)}
GENERIC = generic_net()
GENERIC_SGM = generic_net(dual=False)


def known_x0(params, x):
  """params['x0'] matched to x, which the sampler may pass as a stack of batches ([x̂_0; x_0])."""
  return jnp.tile(params['x0'], (x.shape[0] // params['x0'].shape[0], 1, 1, 1))


def vp_denoiser(params, x, i, *, train=False, rng=None):
  """The exact ε of q(x_i | x_0) for clean images params['x0'], and σ² = 1-ᾱ_i."""
  del train, rng
  count_call(x)
  ab = SDE.alpha_bar[i][:, None, None, None]
  eps = (x - jnp.sqrt(ab) * known_x0(params, x)) / jnp.sqrt(1.0 - ab)
  return NetOutput(eps, jnp.broadcast_to(jnp.log1p(-ab), x.shape))


def sigma_denoiser(c, t_d, matched):
  """Exact for ESM^σ with constant σ² = c: the state x_i has accumulated A_i = (1-c)^i.

  It reads A from the label: the literal label i gives (1-c)^i; a matched label m gives (1-c)^i for
  the i whose (1-c)^i is nearest ᾱ_m. It returns ε with √(1-ᾱ_m) ε = x - √A x_0, so eq. 13 removes
  exactly the accumulated noise, but only when the sampler feeds the right label and uses its ᾱ.
  """
  ab = np.asarray(SDE.alpha_bar_np)
  acc = (1.0 - c) ** np.arange(1, t_d + 1)
  if matched:
    table = acc[np.argmin(np.abs(ab[:, None] - acc[None, :]), axis=1)]
  else:
    table = (1.0 - c) ** np.arange(SDE.num_steps + 1)
  table = jnp.asarray(table, jnp.float32)

  def net_fn(params, x, i, *, train=False, rng=None):
    del train, rng
    count_call(x)
    a = table[i][:, None, None, None]
    ab_i = SDE.alpha_bar[i][:, None, None, None]
    eps = (x - jnp.sqrt(a) * known_x0(params, x)) / jnp.sqrt(1.0 - ab_i)
    return NetOutput(eps, jnp.full(x.shape, np.log(c), jnp.float32))
  return net_fn


C_SIGMA, T_D_SIGMA = 0.015, 12
SIGMA_NETS = {m: sigma_denoiser(C_SIGMA, T_D_SIGMA, m == 'matched') for m in ('literal', 'matched')}
CONST_VAR = lambda p, x, i, **kw: NetOutput(GENERIC(p, x, i).eps, jnp.full(x.shape, np.log(0.5)))


def run(net_fn, params, x0, c, t_d=T_D, indices=None, seed=0, raw_keys=False):
  """Reconstruction and the network image-forwards it executed per image."""
  keys = sampling.image_keys(seed, np.arange(x0.shape[0]) if indices is None else indices)
  CALLS.clear()
  fn = sampling.get_reconstruct_fn(net_fn, SDE, c, t_d)
  rec = jax.block_until_ready(fn(params, x0, jax.random.key_data(keys) if raw_keys else keys))
  jax.effects_barrier()
  return rec, sum(CALLS) / x0.shape[0]


X0 = clean_images(2)
WRONG = {'x0': clean_images(2, seed=5)}  # vp_denoiser told other clean images: not a denoiser
ALL_STEPS = tuple(range(T_D_SIGMA + 1))


def test_esm_step_equals_sgm_step_when_var_is_one_minus_alpha_bar():
  x, eps = jax.random.normal(jax.random.key(1), (2, 4) + SHAPE)
  for i in (1, 2, 50, 500, 1000):
    ab = SDE.alpha_bar[i]
    want = sampling.sgm_step(x, eps, SDE.betas[i], ab)
    got = sampling.esm_step(x, eps, jnp.exp(jnp.log1p(-ab)), SDE.betas[i], ab)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert not np.allclose(sampling.esm_step(x, eps, 0.5, SDE.betas[500], SDE.alpha_bar[500]),
                         sampling.sgm_step(x, eps, SDE.betas[500], SDE.alpha_bar[500]), atol=1e-3)


def test_esm_reconstruction_equals_sgm_when_var_is_one_minus_alpha_bar():
  # vp_denoiser told the wrong clean images: σ² ≡ 1-ᾱ_i, and ε that does not recover the input.
  sgm, _ = run(vp_denoiser, WRONG, X0, cfg(method='sgm', sigma_min_var=0.0), 20)
  esm, _ = run(vp_denoiser, WRONG, X0, cfg(method='esm', esm_min_var=0.0), 20)
  np.testing.assert_allclose(esm.x0_hat, sgm.x0_hat, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(esm.snapshots, sgm.snapshots, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(esm.var_range, sgm.var_range, rtol=1e-5)
  assert float(jnp.max(jnp.abs(sgm.x0_hat - X0))) > 0.1


@pytest.mark.parametrize('method', ['sgm', 'esm'])
def test_perfect_denoiser_reproduces_input_sgm_esm(method):
  t_d = 20
  rec, _ = run(vp_denoiser, {'x0': X0}, X0, cfg(method=method, esm_min_var=0.0), t_d)
  np.testing.assert_allclose(rec.x0_hat, X0, atol=2e-5)
  # The start really is x_{T_d} ~ q(x_{T_d} | x_0): noise of std √(1-ᾱ_{T_d}) around √ᾱ x_0.
  assert list(rec.snapshot_steps) == [20, 0]
  ab = float(SDE.alpha_bar[t_d])
  noise_std = float(jnp.std(rec.snapshots[0] - np.sqrt(ab) * X0))
  assert abs(noise_std / np.sqrt(1 - ab) - 1) < 0.15
  np.testing.assert_array_equal(rec.snapshots[-1], rec.x0_hat)


def test_esm_clamps_learned_variance_but_not_var0():
  # ESM^σ's per-step bound sigma_min_var differs on purpose: ESM's clamp is esm_min_var alone.
  rec, _ = run(vp_denoiser, {'x0': X0}, X0, cfg(method='esm', esm_min_var=0.01, sigma_min_var=0.015), 20)
  want = np.maximum(1.0 - np.asarray(SDE.alpha_bar)[np.arange(20, 0, -1)], 0.01)
  np.testing.assert_allclose(rec.var_range, np.broadcast_to(want[:, None, None], (20, 2, 2)), rtol=1e-5)
  # With σ² held at 0.01 > 1-ᾱ_i the score is too weak and noise is left: the clamp is in effect.
  assert float(jnp.max(jnp.abs(rec.x0_hat - X0))) > 1e-3
  # σ²_0 and σ²_in ('i1') are the network at label 1, 1-ᾱ_1 = 1e-4, far below σ²_min.
  np.testing.assert_allclose(rec.var0, 1.0 - SDE.alpha_bar[1], rtol=1e-3)
  np.testing.assert_allclose(rec.var_in, 1.0 - SDE.alpha_bar[1], rtol=1e-3)


@pytest.mark.parametrize('sigma_time', ['literal', 'matched'])
def test_perfect_denoiser_esm_sigma(sigma_time):
  c, t_d, matched = C_SIGMA, T_D_SIGMA, sigma_time == 'matched'
  config = cfg(method='esm_sigma', sigma_time=sigma_time, snapshot_steps=ALL_STEPS)
  rec, _ = run(SIGMA_NETS[sigma_time], {'x0': X0}, X0, config, t_d)
  acc = (1.0 - c) ** np.arange(t_d + 1)  # A_i = Π_{j<i}(1-b_j)
  x = rec.snapshots[::-1]  # x[i] = x_i, i = 0..T_d
  # The forward pass made x_{T_d} ~ N(√A x_0, (1-A) I).
  noise_std = float(jnp.std(x[t_d] - np.sqrt(acc[t_d]) * X0))
  assert abs(noise_std / np.sqrt(1 - acc[t_d]) - 1) < 0.15
  # Each reverse step of eq. 13 with the exact ε: x_{i-1} = √A_i x_0 + (c/2) x_i.
  for i in range(1, t_d + 1):
    np.testing.assert_allclose(x[i - 1], np.sqrt(acc[i]) * X0 + c / 2 * x[i], atol=1e-5, err_msg=f'i={i}')
  # Hence x̂_0 = x_0 up to (c/2)·√c·noise and O(c²) x_0.
  np.testing.assert_allclose(rec.x0_hat, X0, atol=5 * (c / 2) * np.sqrt(c) + c**2)
  want_labels = (np.asarray(SDE.matched_step(jnp.asarray(acc[1:], jnp.float32)))
                 if matched else np.arange(1, t_d + 1))
  if matched:
    assert want_labels[0] > 20  # b_j >= 0.01 outruns β_j: labels far from i (DESIGN, ambiguity 2)
  np.testing.assert_array_equal(rec.net_labels, np.repeat(want_labels[::-1, None], 2, axis=1))
  np.testing.assert_array_equal(rec.forward_net_labels[0], [1, 1])  # label 0 is fed as 1
  np.testing.assert_array_equal(rec.forward_net_labels[1:, 0], want_labels[:-1])
  np.testing.assert_allclose(rec.var_range, c, rtol=1e-5)
  np.testing.assert_allclose(rec.var0, c, rtol=1e-5)


def test_esm_sigma_clips_b_and_s():
  rec, _ = run(GENERIC, {'w': 0.7, 'a': 3.0}, X0, cfg(method='esm_sigma'))
  for r in (rec.forward_var_range, rec.var_range):
    assert float(r.min()) == pytest.approx(0.01) and float(r.max()) == pytest.approx(0.02)


@pytest.mark.parametrize('method,sigma_time,source', [('esm', 'literal', 't_d'),
                                                      ('esm_sigma', 'literal', 'i1'),
                                                      ('esm_sigma', 'matched', 't_d')])
def test_var_source_network_at_a_label(method, sigma_time, source):
  rec, _ = run(GENERIC, PARAMS, X0, cfg(method=method, sigma_time=sigma_time, var_source=source))
  # 't_d' uses the label of the reverse step T_d (the matched one for 'matched').
  labels = jnp.ones((2,), jnp.int32) if source == 'i1' else rec.net_labels[0]
  if source == 't_d' and sigma_time == 'literal':
    np.testing.assert_array_equal(labels, [T_D, T_D])
  np.testing.assert_allclose(rec.var0, jnp.exp(GENERIC(PARAMS, rec.x0_hat, labels).log_var), rtol=1e-5)
  np.testing.assert_allclose(rec.var_in, jnp.exp(GENERIC(PARAMS, X0, labels).log_var), rtol=1e-5)
  assert not np.allclose(rec.var0, rec.var0.mean(), rtol=1e-3)  # a map, not a constant


def test_var_source_mean_esm_follows_both_paths():
  config = cfg(method='esm', var_source='mean', snapshot_steps=tuple(range(T_D + 1)))
  rec, _ = run(GENERIC, PARAMS, X0, config)
  x = rec.snapshots[::-1]
  var = lambda x, i: jnp.exp(GENERIC(PARAMS, x, jnp.full((2,), i, jnp.int32)).log_var)
  want0 = sum(var(x[i], i) for i in range(1, T_D + 1)) / T_D
  np.testing.assert_allclose(rec.var0, want0, rtol=1e-5)
  # σ²_in: along the input's own forward path x_i = √ᾱ_i x_0 + √(1-ᾱ_i) z, z from x_{T_d}.
  ab = np.asarray(SDE.alpha_bar)
  z = (x[T_D] - np.sqrt(ab[T_D]) * X0) / np.sqrt(1 - ab[T_D])
  want_in = sum(var(np.sqrt(ab[i]) * X0 + np.sqrt(1 - ab[i]) * z, i) for i in range(1, T_D + 1)) / T_D
  np.testing.assert_allclose(rec.var_in, want_in, rtol=1e-4)


def test_var_source_mean_esm_sigma_is_unclamped():
  rec, _ = run(CONST_VAR, PARAMS, X0, cfg(method='esm_sigma', var_source='mean'))
  np.testing.assert_allclose(rec.var0, 0.5, rtol=1e-5)
  np.testing.assert_allclose(rec.var_in, 0.5, rtol=1e-5)
  np.testing.assert_allclose(rec.var_range, 0.02, rtol=1e-5)  # while the step used σ²_max


def test_sgm_has_no_variance_outputs():
  rec, _ = run(vp_denoiser, WRONG, X0, cfg(method='sgm', sigma_min_var=0.0), 20)
  assert rec.var0 is None and rec.var_in is None and rec.forward_var_range is None
  np.testing.assert_allclose(rec.var_range[:, 0, 0], 1.0 - SDE.alpha_bar[20:0:-1], rtol=1e-6)


@pytest.mark.parametrize('net,params,config,t_d', [
    (vp_denoiser, WRONG, cfg(method='sgm', sigma_min_var=0.0), 20),
    (GENERIC, PARAMS, cfg(method='esm', var_source='t_d'), T_D),
    (GENERIC, PARAMS, cfg(method='esm_sigma', sigma_time='matched', var_source='t_d'), T_D)])
def test_reproducible_and_independent_of_batch(net, params, config, t_d):
  full, _ = run(net, params, X0, config, t_d)
  again, _ = run(net, params, X0, config, t_d)
  np.testing.assert_array_equal(full.x0_hat, again.x0_hat)
  # Image 1 in another batch: first, beside another image, each with its global index.
  x0 = jnp.stack([X0[1], clean_images(1, seed=9)[0]])
  params_part = {'x0': jnp.stack([WRONG['x0'][1], X0[0]])} if net is vp_denoiser else params
  part, _ = run(net, params_part, x0, config, t_d, indices=[1, 7])
  np.testing.assert_allclose(part.x0_hat[0], full.x0_hat[1], atol=1e-6)
  np.testing.assert_allclose(part.snapshots[:, 0], full.snapshots[:, 1], atol=1e-6)
  np.testing.assert_array_equal(part.net_labels[:, 0], full.net_labels[:, 1])
  assert float(jnp.max(jnp.abs(part.x0_hat[1] - full.x0_hat[0]))) > 1e-3
  # Another seed gives another start x_{T_d} (a perfect denoiser may still land on the same x̂_0).
  other, _ = run(net, params, X0, config, t_d, seed=1)
  assert float(jnp.max(jnp.abs(other.snapshots[0] - full.snapshots[0]))) > 1e-3


def test_raw_uint32_keys_are_accepted():
  fn = sampling.get_reconstruct_fn(GENERIC, SDE, cfg(method='esm'), T_D)
  keys = sampling.image_keys(0, [0, 1])
  raw = jax.eval_shape(fn.pure, PARAMS, X0, jax.random.key_data(keys))
  assert raw.x0_hat.shape == X0.shape


@pytest.mark.parametrize('method', ['sgm', 'esm', 'esm_sigma'])
def test_one_scan_and_trace_size_flat_in_t_d(method):
  keys = sampling.image_keys(0, [0, 1])
  sizes = []
  for t_d in (5, 20):
    fn = sampling.get_reconstruct_fn(GENERIC, SDE, cfg(method=method), t_d)
    jaxpr = jax.make_jaxpr(fn.pure)(PARAMS, X0, keys)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
    assert len(scans) == (2 if method == 'esm_sigma' else 1)
    assert all(e.params['length'] == t_d for e in scans)
    sizes.append(len(str(jaxpr).splitlines()))
  assert sizes[0] == sizes[1]


@pytest.mark.parametrize('net,config,t_d,extra', [
    (vp_denoiser, cfg(method='sgm', sigma_min_var=0.0), 20, 0),
    (vp_denoiser, cfg(method='esm', esm_min_var=0.01), 20, 2),
    (GENERIC, cfg(method='esm', var_source='mean', snapshot_steps=tuple(range(T_D + 1))), T_D, T_D),
    (GENERIC, cfg(method='esm_sigma', var_source='i1'), T_D, 2),
    (CONST_VAR, cfg(method='esm_sigma', var_source='mean'), T_D, 0)])
def test_nfe_counts_network_calls(net, config, t_d, extra):
  params = {'x0': X0} if net is vp_denoiser else PARAMS
  _, calls = run(net, params, X0, config, t_d)
  fn = sampling.get_reconstruct_fn(net, SDE, config, t_d)
  assert fn.nfe == sampling.SAMPLERS[config.method].nfe(t_d) == (2 * t_d if config.method == 'esm_sigma' else t_d)
  assert fn.extra_net_calls == extra
  assert calls == fn.nfe + extra


def test_snapshots_clipped_to_t_d():
  for t_d, want in ((5, [0]), (100, [100, 80, 50, 20, 0]), (150, [150, 100, 80, 50, 20, 0])):
    fn = sampling.get_reconstruct_fn(GENERIC, SDE, cfg(method='esm'), t_d)
    assert list(fn.snapshot_steps) == want
    out = jax.eval_shape(fn.pure, PARAMS, X0, sampling.image_keys(0, [0, 1]))
    assert out.snapshots.shape == (len(want), 2) + SHAPE
    assert out.var_range.shape == (t_d, 2, 2) and out.net_labels.shape == (t_d, 2)
  all_steps = cfg(method='esm', var_source='mean', snapshot_steps=tuple(range(T_D + 1)))
  rec, _ = run(GENERIC, PARAMS, X0, all_steps)
  np.testing.assert_array_equal(rec.snapshot_steps, np.arange(T_D, -1, -1))
  np.testing.assert_array_equal(rec.steps, np.arange(T_D, 0, -1))
  np.testing.assert_array_equal(rec.snapshots[-1], rec.x0_hat)
  assert not np.allclose(rec.snapshots[0], rec.snapshots[1])


def test_jitted_function_is_cached():
  a = sampling.get_reconstruct_fn(GENERIC, SDE, cfg(method='esm'), 9)
  assert sampling.get_reconstruct_fn(GENERIC, SDE, cfg(method='esm'), 9) is a
  assert sampling.get_reconstruct_fn(GENERIC, SDE, cfg(method='esm'), 10) is not a


def test_config_from_default():
  c = section_from_dict(sampling.SamplingConfig, get_default_config().sampling.to_dict(), 'sampling')
  assert (c.method, c.t_d, c.esm_min_var, c.sigma_min_var, c.sigma_max_var, c.var_source) == (
      'esm', 100, 0.01, 0.01, 0.02, 't_d')


@pytest.mark.parametrize('bad,field', [({'method': 'ddim'}, 'sampling.method'),
                                       ({'sigma_time': 'x'}, 'sampling.sigma_time'),
                                       ({'var_source': 'x'}, 'sampling.var_source'),
                                       ({'sigma_min_var': 0.1}, 'sampling.sigma_min_var'),
                                       ({'esm_min_var': 1.0}, 'sampling.esm_min_var'),
                                       ({'snapshot_steps': (-1,)}, 'sampling.snapshot_steps')])
def test_bad_config_fields(bad, field):
  with pytest.raises(UserError, match=field):
    cfg(**bad)


@pytest.mark.parametrize('t_d', [0, -3, 1001, 2.5])
def test_t_d_out_of_range(t_d):
  with pytest.raises(UserError, match=r'sampling.t_d: expected an integer in 1..1000'):
    sampling.get_reconstruct_fn(GENERIC, SDE, cfg(method='esm'), t_d)


def test_esm_needs_dual_stream():
  fn = sampling.get_reconstruct_fn(GENERIC_SGM, SDE, cfg(method='esm'), 3)
  with pytest.raises(UserError, match='dual-stream'):
    jax.eval_shape(fn.pure, PARAMS, X0, sampling.image_keys(0, [0, 1]))


def test_esm_sigma_beta_floor_adds_the_schedule_noise_where_the_variance_is_small():
  """sigma_floor='beta': with σ²_θ far below β everywhere, b_i = β_{i+1} and s_i = β_i, so the
  forward pass adds exactly the noise of the literal time labels; 'constant' adds σ²_min per step."""
  tiny = lambda p, x, i, **kw: NetOutput(GENERIC(p, x, i).eps, jnp.full(x.shape, np.log(1e-9)))
  rec, _ = run(tiny, PARAMS, X0, cfg(method='esm_sigma', sigma_floor='beta'), 20)
  betas = np.asarray(SDE.betas)
  np.testing.assert_allclose(rec.forward_var_range[:, 0, 0], betas[1:21], rtol=1e-6)
  np.testing.assert_allclose(rec.var_range[:, 0, 1], betas[20:0:-1], rtol=1e-6)
  rec, _ = run(tiny, PARAMS, X0, cfg(method='esm_sigma'), 20)
  np.testing.assert_allclose(rec.forward_var_range[:, 0, 0], BASE.sigma_min_var, rtol=1e-6)
