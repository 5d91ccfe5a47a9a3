"""Tests for esm/analysis: closed-form mixture scores, the l = 2 identity, training, the score_error."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from esm.analysis import gmm as gmm_lib
from esm.analysis import plot, score_error, score_models
from esm.errors import UserError
from esm.sde import SDEConfig, get_sde

SDE = get_sde(SDEConfig())
REPO = pathlib.Path(__file__).resolve().parents[1]
# The default measurement, trained for two short chunks per model instead of the default steps; its
# training time is then projected to the default step count.
QUICK_STUDY = """
import dataclasses, json
from esm.analysis import score_error
cfg = score_error.ScoreErrorConfig()
cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=100, chunk=50))
print(json.dumps(score_error.measure_score_errors(cfg)))
"""


@pytest.fixture(scope='module')
def quick_measurement():
  """The quick measurement, run in a subprocess with XLA's default optimisation level: conftest lowers it
  for this process, which compiles faster but runs training steps slower than the bench does."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if not f.startswith('--xla_backend_optimization_level'))
  env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')])
  proc = subprocess.run([sys.executable, '-c', QUICK_STUDY], cwd=REPO, env=env,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('dim', [2, 64])
def test_marginal_score_is_grad_of_log_prob(dim):
  data = gmm_lib.get_gmm(dim, seed=1)
  log_prob = lambda v, ab: gmm_lib.marginal_log_prob(data, v[None], ab)[0]
  grad_fn = jax.jit(jax.vmap(jax.grad(log_prob), in_axes=(0, None)))
  score_fn = jax.jit(gmm_lib.marginal_score)
  x0 = gmm_lib.sample(data, jax.random.key(0), 16)
  for alpha_bar in (0.999, 0.5, 1e-3):
    x = math.sqrt(alpha_bar) * x0
    x = x + math.sqrt(1 - alpha_bar) * jax.random.normal(jax.random.key(1), x.shape)
    grad = grad_fn(x, alpha_bar)
    np.testing.assert_allclose(score_fn(data, x, alpha_bar), grad, rtol=2e-4,
                               atol=2e-4 * float(jnp.max(jnp.abs(grad))))


def test_log_prob_integrates_to_one_in_2d():
  data = gmm_lib.get_gmm(2)
  h = 0.01
  axis = jnp.arange(-5.0, 5.0, h) + h / 2
  grid = jnp.stack(jnp.meshgrid(axis, axis), -1).reshape(-1, 2)
  mass_fn = jax.jit(lambda ab: jnp.sum(jnp.exp(gmm_lib.marginal_log_prob(data, grid, ab))) * h * h)
  for alpha_bar in (1.0, 0.9, 0.1):
    assert abs(float(mass_fn(alpha_bar)) - 1.0) < 2e-3, alpha_bar


def test_samples_match_mixture_moments():
  data = gmm_lib.get_gmm(2)
  x = np.asarray(gmm_lib.sample(data, jax.random.key(0), 200_000), np.float64)
  w, mu = np.asarray(data.weights), np.asarray(data.means)
  u, lam = np.asarray(data.eigvecs), np.asarray(data.eigvals)
  mean = w @ mu
  cov = sum(w[k] * (u[k] @ np.diag(lam[k]) @ u[k].T + np.outer(mu[k], mu[k]))
            for k in range(len(w))) - np.outer(mean, mean)
  np.testing.assert_allclose(x.mean(0), mean, atol=5e-3)
  np.testing.assert_allclose(np.cov(x.T), cov, atol=5e-3)


@pytest.mark.slow
def test_noise_posterior_is_consistent():
  """Tweedie: score = -E[ε̄|x]/√(1-ᾱ); total variance: E Var(ε̄|x) + Var E[ε̄|x] = 1 per dim."""
  data = gmm_lib.get_gmm(64)

  @jax.jit
  def check(i):
    ab = SDE.alpha_bar[i]
    x0 = gmm_lib.sample(data, jax.random.key(2), 20_000)
    x, noise = SDE.sample_marginal(jax.random.key(3), x0, i)
    eps_mean, eps_var = gmm_lib.noise_posterior(data, x, ab)
    score = gmm_lib.marginal_score(data, x, ab)
    tweedie = jnp.max(jnp.abs(-eps_mean / jnp.sqrt(1 - ab) - score)) / jnp.max(jnp.abs(score))
    total = jnp.mean(eps_var, 0) + jnp.var(eps_mean, 0)
    cond = -(x - jnp.sqrt(ab) * x0) / (1.0 - ab) * jnp.sqrt(1 - ab)  # ∇ log q(x_i | x_0) √(1-ᾱ)
    return tweedie, total, jnp.max(jnp.abs(cond + noise))

  for step in (10, 300, 900):
    tweedie, total, cond_err = check(step)
    assert float(tweedie) < 1e-3, step
    np.testing.assert_allclose(total, 1.0, atol=0.03)
    assert float(cond_err) < 1e-3, step


def _random_net_scores(dim: int, seeds):
  model = score_models.ScoreMLP(score_models.MLPConfig(dim=dim, two_stream=False, hidden=32,
                                                       num_blocks=1))
  score_fn = score_models.get_score_fn(score_models.get_net_fn(model, SDE), SDE, 'dsm')
  params = {f'net{s}': score_models.init_params(model, jax.random.key(s)) for s in seeds}
  return params, score_fn


@pytest.mark.slow
def test_l2_identity_holds_for_two_random_networks():
  dim = 64
  data = gmm_lib.get_gmm(dim)
  params, score_fn = _random_net_scores(dim, (1, 2))
  score_fns = {name: (lambda p, x, i, name=name: {name: score_fn(p, x, i)}) for name in params}
  measure = score_error.get_measure_fn(data, SDE, score_fns, (2, 4), 8192, 12.0, reference='net2')
  stats = measure(params, jax.random.key(0), 100)
  x = jax.random.normal(jax.random.key(1), (256, dim))
  s1, s2 = (score_fn(params[name], x, 100) for name in ('net1', 'net2'))
  assert float(jnp.mean(jnp.square(s1 - s2))) > 0.1 * float(jnp.mean(jnp.square(s2)))
  # Each network's ESM_2 - DSM_2 is the closed-form -Σ_d E[Var(c_d|x̃)].
  for name in ('net1', 'net2'):
    gap = stats[f'{name}/ESM_2'] - stats[f'{name}/DSM_2']
    np.testing.assert_allclose(gap, stats[f'{name}/gap_2'], rtol=1e-3)
    se = math.hypot(stats[f'{name}/gap_2_se'], stats['expected_gap2_se'])
    assert abs(float(stats[f'{name}/gap_2'] - stats['expected_gap2'])) < 5 * se
  # Common random numbers: their difference is zero within Monte-Carlo error, in every dimension.
  assert abs(float(stats['net1/delta_2'])) < 4 * float(stats['net1/delta_2_se'])
  # q_l is χ²_d/d under 'no θ dependence' (mean 1, sd √(2/d)); allow five standard deviations.
  bound = 1 + 5 * math.sqrt(2 / dim)
  assert float(stats['net1/q_2']) < bound
  # l = 4 has no such identity: the same statistic detects a θ-dependent difference.
  assert float(stats['net1/q_4']) > bound


def test_score_forms_agree_when_variance_is_one_minus_alpha_bar():
  """A fresh two-stream model has v = 0, so σ² = 1-ᾱ and eq. 3 equals eq. 4 (DESIGN's check)."""
  model = score_models.ScoreMLP(score_models.MLPConfig(dim=3, two_stream=True, hidden=16,
                                                       num_blocks=1))
  params = score_models.init_params(model, jax.random.key(0))
  net_fn = score_models.get_net_fn(model, SDE)
  x = jax.random.normal(jax.random.key(1), (5, 3))
  i = jnp.array([1, 10, 100, 500, 1000])
  esm = jax.jit(score_models.get_score_fn(net_fn, SDE, 'esm'))(params, x, i)
  dsm = jax.jit(score_models.get_score_fn(net_fn, SDE, 'dsm'))(params, x, i)
  np.testing.assert_allclose(esm, dsm, rtol=1e-4)
  np.testing.assert_allclose(jax.jit(net_fn)(params, x, i).log_var,
                             jnp.broadcast_to(jnp.log1p(-SDE.alpha_bar[i])[:, None], (5, 3)),
                             rtol=1e-5)


def test_bad_input_raises_user_error():
  with pytest.raises(UserError):
    gmm_lib.get_gmm(0)
  model = score_models.ScoreMLP(score_models.MLPConfig(dim=2, two_stream=False))
  with pytest.raises(UserError):
    score_models.train(model, SDE, gmm_lib.get_gmm(2), 'esm', score_models.TrainConfig(),
                       jax.random.key(0))
  with pytest.raises(UserError):
    score_models.get_score_fn(score_models.get_net_fn(model, SDE), SDE, 'sgm')


@pytest.mark.slow
def test_quick_measurement_trains_and_keeps_the_l2_identity(quick_measurement):
  rows = quick_measurement['rows']
  cfg = score_error.ScoreErrorConfig()
  assert len(rows) == len(cfg.dims) * len(cfg.steps) * len(score_error.ESTIMATORS)
  for kind_info in quick_measurement['train'].values():
    for info in kind_info.values():
      assert info['final_loss'] < info['first_loss'], info
  for r in rows:
    assert np.isfinite(r['ESM_2']) and np.isfinite(r['DSM_4']) and r['rel_err'] > 0
    assert abs(r['gap2'] - r['expected_gap2']) < 5 * math.hypot(r['gap2_se'],
                                                                 r['expected_gap2_se']), r
    if r['delta_2'] is not None:
      assert abs(r['delta_2']) < 5 * r['delta_2_se'], r


def test_projection_adds_compile_cost_and_steady_steps():
  """projected_seconds (bench/analysis_time.py): per model, the first chunk's excess over the
  later chunks' rate is compile time; the later chunks give the seconds per step."""
  chunks = [(3.0, 2.5), (1.0, 0.5), (1.0, 0.5)]  # (wall, CPU) of three chunks of 50 steps
  result = {'seconds': {'total': 10.0, 'total_cpu': 8.0},
            'train': {2: {'esm': {'chunk_seconds': chunks, 'chunk': 50}}}}
  # wall: 0.02 s/step, compile 2 s: 10 - 5 (the chunks) + 2 + 0.02 * 1000
  assert score_error.projected_seconds(result, 1000) == pytest.approx(27.0)
  # CPU: 0.01 s/step, compile 2 s: 8 - 3.5 + 2 + 0.01 * 1000
  assert score_error.projected_seconds(result, 1000, cpu=True) == pytest.approx(16.5)
  result['train'][2]['esm']['chunk_seconds'] = chunks[:1]
  with pytest.raises(ValueError, match='two training chunks'):
    score_error.projected_seconds(result, 1000)


@pytest.mark.slow
def test_table_and_figure(quick_measurement, tmp_path):
  table = score_error.markdown_table(quick_measurement['rows'])
  lines = table.splitlines()
  assert len(lines) == 2 + len(quick_measurement['rows'])
  assert len({line.count('|') for line in lines}) == 1
  path = str(tmp_path / 'fig.png')
  fig = plot.score_error_figure(quick_measurement['rows'], path)
  num_dims = len({r['d'] for r in quick_measurement['rows']})
  assert len(fig.axes) == num_dims * 4 and all(ax.get_lines() for ax in fig.axes)
  with Image.open(path) as image:
    assert image.size == (4 * plot.PANEL_PX[0], 70 + num_dims * plot.PANEL_PX[1])
