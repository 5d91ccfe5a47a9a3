"""Paper section 3.1 measured where the true score is known: ESM_l and DSM_l on Gaussian mixtures.

Reading of ‖E[(·)^l]‖₁ (paper: "element-wise exponential"): raise the score difference vector
element-wise to the power l, average over Monte-Carlo samples, then take the L1 norm over the d
dimensions, i.e. Σ_d |E[(s_θ - target)_d^l]|. ESM_l uses the marginal score ∇log p_i(x̃) as target,
DSM_l the conditional score ∇log q(x̃|x_0) = -ε̄/√(1-ᾱ_i), on the same samples (x_0, ε̄).

Every score estimator is measured on the same samples (common random numbers), so the difference
(ESM_l - DSM_l)(A) - (ESM_l - DSM_l)(B) has a small Monte-Carlo error, estimated per dimension.
For l = 2 it is zero in expectation (Vincent 2011): per dimension, DSM_2 - ESM_2 = E[Var(c_d | x̃)],
which does not depend on θ and is also computed here in closed form.
"""

import dataclasses
import functools
import time
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
from absl import logging

from esm.analysis import gmm as gmm_lib
from esm.analysis import score_models
from esm.errors import UserError
from esm.sde import SDEConfig, VPSDE, esm_score, get_sde

# Row labels of the score estimators, in table order; the DSM model is the reference of the
# difference-of-differences statistics.
ESTIMATORS = ('ESM model, eq. 3', 'DSM model, eq. 4', 'ESM model ε, eq. 4', 'loss minimiser, eq. 3')
REFERENCE = 'DSM model, eq. 4'


@dataclasses.dataclass(frozen=True)
class ScoreErrorConfig:
  dims: Tuple[int, ...] = (2, 64)  # data dimensions d
  steps: Tuple[int, ...] = (10, 50, 100, 250, 500, 900)  # step labels i where scores are measured
  powers: Tuple[int, ...] = (2, 3, 4)  # the l of ESM_l and DSM_l
  num_samples: int = 16384  # Monte-Carlo samples (x_0, ε̄) per step label
  hidden: int = 128  # MLP width
  num_blocks: int = 2  # residual blocks per stream
  time_dim: int = 64  # sinusoidal embedding size
  train: score_models.TrainConfig = score_models.TrainConfig()
  seed: int = 0  # data family, initialisation, training and Monte-Carlo samples all derive from it


def _mc_stats(values: jax.Array):
  """Mean over samples of [n, d] values, and the standard error of their sum over d."""
  n = values.shape[0]
  mean = jnp.mean(values, axis=0)
  total_se = jnp.std(jnp.sum(values, axis=1)) / jnp.sqrt(n)
  return mean, total_se


def _z_squared_mean(delta: jax.Array) -> jax.Array:
  """Mean over d of (mean_d / se_d)²: about 1 when every dimension's mean is zero, ≫ 1 otherwise."""
  n = delta.shape[0]
  se = jnp.std(delta, axis=0) / jnp.sqrt(n)
  return jnp.mean(jnp.square(jnp.mean(delta, axis=0) / jnp.maximum(se, 1e-30)))


@functools.partial(jax.jit, static_argnums=3)
def _score_moments(score, true, cond, power: int):
  """ESM_l, DSM_l, Σ_d E[gap] with its standard error, and the per-sample gap [n, d] of one
  estimator, where gap = (s-g)^l - (s-c)^l.

  For l = 2 every term is >= 0, so Σ_d E[gap] is ESM_2 - DSM_2; taken per sample it keeps the
  float32 precision that the difference of the two large norms loses.
  """
  esm_terms, dsm_terms = (score - true) ** power, (score - cond) ** power
  gap = esm_terms - dsm_terms
  gap_mean, gap_se = _mc_stats(gap)
  return (jnp.sum(jnp.abs(jnp.mean(esm_terms, 0))), jnp.sum(jnp.abs(jnp.mean(dsm_terms, 0))),
          jnp.sum(gap_mean), gap_se, gap)


@jax.jit
def _pair_stats(gap, reference_gap):
  """Σ_d of the mean difference of differences, its standard error, and the per-dimension q."""
  delta = gap - reference_gap
  mean, se = _mc_stats(delta)
  return jnp.sum(mean), se, _z_squared_mean(delta)


def get_measure_fn(data: gmm_lib.GaussianMixture, sde: VPSDE, score_fns: Dict,
                   powers: Tuple[int, ...], num_samples: int, log_var_bound: float,
                   reference: str = REFERENCE):
  """measure(params_by_name, rng, i) -> dict of statistics at step label i.

  score_fns maps a params key to scores_fn(params, x, i) -> {estimator label: score [n, d]}
  (one network evaluation can give several estimators); the loss minimiser is added here from
  the closed-form noise posterior, clipped to the model family's range. Keys are 'name/ESM_l',
  'name/DSM_l', 'name/gap_l' (Σ_d E[(s-g)^l - (s-c)^l]), 'name/gap_l_se', 'name/rel_err' and,
  against the reference estimator, 'name/delta_l' (Σ_d of the mean difference of differences),
  'name/delta_l_se' and 'name/q_l'. The work is split into small jitted pieces shared by all
  estimators and powers, so that each piece compiles once.
  """
  @jax.jit
  def draw(rng, i):
    rng_data, rng_noise = jax.random.split(rng)
    x0 = gmm_lib.sample(data, rng_data, num_samples)
    x, noise = sde.sample_marginal(rng_noise, x0, i)
    ab = sde.alpha_bar[i]
    true = gmm_lib.marginal_score(data, x, ab)
    cond = -noise / jnp.sqrt(1.0 - ab)
    eps_mean, eps_var = gmm_lib.noise_posterior(data, x, ab)
    # The ESM loss minimiser: ε = E[ε̄|x̃], σ² = (1-ᾱ)Var(ε̄|x̃), log(σ²/(1-ᾱ)) clipped as v is.
    ratio = jnp.exp(jnp.clip(jnp.log(jnp.maximum(eps_var, 1e-30)), -log_var_bound, log_var_bound))
    minimiser = esm_score(eps_mean, (1.0 - ab) * ratio, ab)
    # DSM_2 - ESM_2 per dimension is E[Var(c_d | x̃)] = E[Var(ε̄_d | x̃)]/(1-ᾱ).
    expected_gap, expected_gap_se = _mc_stats(eps_var / (1.0 - ab))
    stats = {'one_minus_alpha_bar': 1.0 - ab, 'expected_gap2': -jnp.sum(expected_gap),
             'expected_gap2_se': expected_gap_se,
             'true_score_sq': jnp.sum(jnp.mean(true ** 2, 0))}
    return x, true, cond, minimiser, stats

  jitted_scores = {key: jax.jit(fn) for key, fn in score_fns.items()}

  def measure(params_by_name, rng, i):
    i = jnp.asarray(i, jnp.int32)
    x, true, cond, minimiser, out = draw(rng, i)
    scores = {}
    for key, fn in jitted_scores.items():
      scores.update(fn(params_by_name[key], x, i))
    scores[ESTIMATORS[3]] = minimiser
    gaps = {}
    for name, s in scores.items():
      for l in powers:
        (out[f'{name}/ESM_{l}'], out[f'{name}/DSM_{l}'], out[f'{name}/gap_{l}'],
         out[f'{name}/gap_{l}_se'], gaps[name, l]) = _score_moments(s, true, cond, l)
      out[f'{name}/rel_err'] = jnp.sqrt(out[f'{name}/ESM_2'] / out['true_score_sq'])
    for name in scores:
      if name == reference:
        continue
      for l in powers:
        (out[f'{name}/delta_{l}'], out[f'{name}/delta_{l}_se'],
         out[f'{name}/q_{l}']) = _pair_stats(gaps[name, l], gaps[reference, l])
    return out

  return measure


def _train_models(cfg: ScoreErrorConfig, dim: int, data, sde, log_var_bound: float, rng):
  """The ESM (two-stream) and DSM (one-stream) MLPs, trained on the same data family."""
  results, net_fns = {}, {}
  for index, kind in enumerate(('esm', 'dsm')):
    mlp = score_models.MLPConfig(dim=dim, two_stream=kind == 'esm', hidden=cfg.hidden,
                                 num_blocks=cfg.num_blocks, time_dim=cfg.time_dim,
                                 log_var_bound=log_var_bound)
    model = score_models.ScoreMLP(mlp)
    results[kind] = score_models.train(model, sde, data, kind, cfg.train,
                                       jax.random.fold_in(rng, index))
    net_fns[kind] = score_models.get_net_fn(model, sde)
  return results, net_fns


def measure_score_errors(cfg: ScoreErrorConfig = ScoreErrorConfig(), sde: Optional[VPSDE] = None,
              log_var_bound: float = 12.0) -> Dict:
  """Trains both models per dimension and measures every estimator at every step label.

  sde defaults to the project's default schedule (linear β from 1e-4 to 0.02, T = 1000).

  Returns {'rows': one dict per (d, i, estimator), 'train': per dimension and model the first
  and final mean loss and the (wall, CPU) seconds of each training chunk, 'seconds': wall and
  process-CPU seconds of the whole run and of its measurement phase}.
  """
  if 2 not in cfg.powers:
    raise UserError(f'analysis powers: expected a tuple that contains 2, got {cfg.powers}')
  sde = sde or get_sde(SDEConfig())
  start, start_cpu = time.perf_counter(), time.process_time()
  rng = jax.random.key(cfg.seed)
  rows: List[Dict] = []
  train_info = {}
  seconds = {'measure': 0.0, 'measure_cpu': 0.0}
  for dim in cfg.dims:
    rng_dim = jax.random.fold_in(rng, dim)
    data = gmm_lib.get_gmm(dim, seed=cfg.seed)
    results, net_fns = _train_models(cfg, dim, data, sde, log_var_bound,
                                     jax.random.fold_in(rng_dim, 0))
    # Mean loss over the first and the last fifth of training (at most 100 steps each).
    span = max(1, min(100, cfg.train.num_steps // 5))
    train_info[dim] = {kind: {'first_loss': float(jnp.mean(r.losses[:span])),
                              'final_loss': float(jnp.mean(r.losses[-span:])),
                              'chunk_seconds': r.chunk_seconds,
                              'chunk': min(cfg.train.chunk, cfg.train.num_steps)}
                       for kind, r in results.items()}
    score_fns = {
        'esm': score_models.get_scores_fn(net_fns['esm'], sde,
                                          {ESTIMATORS[0]: 'esm', ESTIMATORS[2]: 'dsm'}),
        'dsm': score_models.get_scores_fn(net_fns['dsm'], sde, {ESTIMATORS[1]: 'dsm'}),
    }
    measure = get_measure_fn(data, sde, score_fns, cfg.powers, cfg.num_samples, log_var_bound)
    params = {kind: r.params for kind, r in results.items()}
    measure_start, measure_cpu = time.perf_counter(), time.process_time()
    for done, step in enumerate(cfg.steps, 1):
      stats = jax.device_get(measure(params, jax.random.fold_in(rng_dim, 1000 + step), step))
      rows.extend(_rows(dim, step, stats, cfg.powers))
      elapsed = time.perf_counter() - measure_start
      logging.info('analysis measure d=%d: %d/%d step labels, %.1f s each, ETA %.0fs', dim, done,
                   len(cfg.steps), elapsed / done, elapsed / done * (len(cfg.steps) - done))
    seconds['measure'] += time.perf_counter() - measure_start
    seconds['measure_cpu'] += time.process_time() - measure_cpu
  seconds['total'] = time.perf_counter() - start
  seconds['total_cpu'] = time.process_time() - start_cpu
  return {'rows': rows, 'train': train_info, 'seconds': seconds}


def projected_seconds(result: Dict, num_steps: int, cpu: bool = False) -> float:
  """The run's time had each model trained num_steps steps instead.

  Per model, the first chunk's time minus its steady-state share is the compile cost; later chunks
  give the seconds per step. Needs at least two chunks per model.
  """
  col = 1 if cpu else 0
  total = result['seconds']['total_cpu' if cpu else 'total']
  for per_kind in result['train'].values():
    for info in per_kind.values():
      times = [t[col] for t in info['chunk_seconds']]
      if len(times) < 2:
        raise ValueError('projected_seconds: needs at least two training chunks per model')
      per_step = sum(times[1:]) / (len(times[1:]) * info['chunk'])
      compile_cost = max(times[0] - per_step * info['chunk'], 0.0)
      total += compile_cost + per_step * num_steps - sum(times)
  return total


def _rows(dim: int, step: int, stats: Dict, powers) -> List[Dict]:
  rows = []
  for name in ESTIMATORS:
    row = {'d': dim, 'i': step, 'one_minus_alpha_bar': float(stats['one_minus_alpha_bar']),
           'score': name, 'expected_gap2': float(stats['expected_gap2']),
           'expected_gap2_se': float(stats['expected_gap2_se']),
           'rel_err': float(stats[f'{name}/rel_err'])}
    for l in powers:
      row[f'ESM_{l}'] = float(stats[f'{name}/ESM_{l}'])
      row[f'DSM_{l}'] = float(stats[f'{name}/DSM_{l}'])
      for key in (f'delta_{l}', f'delta_{l}_se', f'q_{l}'):
        row[key] = float(stats[f'{name}/{key}']) if f'{name}/{key}' in stats else None
    row['gap2'] = float(stats[f'{name}/gap_2'])  # ESM_2 - DSM_2, summed per sample
    row['gap2_se'] = float(stats[f'{name}/gap_2_se'])
    rows.append(row)
  return rows


def _fmt(value, signed: bool = False) -> str:
  if value is None:
    return '—'
  return f'{value:+.3g}' if signed else f'{value:.3g}'


def markdown_table(rows: List[Dict], powers=(2, 3, 4)) -> str:
  """The measurements as one markdown table, a row per (d, i, score estimator)."""
  # '∣' (U+2223), not '|', which would split the markdown cell.
  head = ['d', 'i', '1−ᾱ_i', 'score', 'ESM_2', 'DSM_2', 'ESM_2−DSM_2', '−ΣE[Var(c∣x̃)]',
          'Δ_2 ± SE']
  for l in powers:
    head += [f'q_{l}'] if l == 2 else [f'ESM_{l}', f'DSM_{l}', f'q_{l}']
  head += ['rel. err. vs ∇log p_i']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    delta2 = ('—' if r['delta_2'] is None else
              f"{r['delta_2']:+.3g} ± {r['delta_2_se']:.2g}")
    cells = [str(r['d']), str(r['i']), _fmt(r['one_minus_alpha_bar']), r['score'],
             _fmt(r['ESM_2']), _fmt(r['DSM_2']), f"{r['gap2']:+.4g} ± {r['gap2_se']:.2g}",
             f"{r['expected_gap2']:+.4g} ± {r['expected_gap2_se']:.2g}", delta2]
    for l in powers:
      if l != 2:
        cells += [_fmt(r[f'ESM_{l}']), _fmt(r[f'DSM_{l}'])]
      cells.append(_fmt(r[f'q_{l}']))
    cells.append(_fmt(r['rel_err']))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
