"""Per step label: the ε error of trained models, σ²_θ's calibration and ESM's step multiplier λ.

  python3 experiments/per_label.py --workdirs=esm=RUN/esm/train,sgm=RUN/sgm/train \
      [--labels=1,2,5,12,25,50,100,175,250] [--draws=4]

For each workdir (a trained model; its config.json says which), on the held-out train/good images
(data.val_fraction: never trained on; no test image is read), at each step label i with `draws`
noise draws per image (the same draws for every model):
- eps_mse: mean of (ε̄ - ε_θ)², the DSM loss; for a dual-stream model its ε stream, read as eq. 4
  reads it. Lower is a better ε estimate.
- For a dual-stream model (ESM, hybrid) also:
  - var / err: mean σ²_θ against the mean of its eq. 10 target (1-ᾱ_i)(ε̄-ε_θ)²; 1 is calibrated.
  - corr: the per-pixel correlation of log σ²_θ with log (1-ᾱ_i)(ε̄-ε_θ)², pooled over images.
  - weight: the mean eq. 10 weight (1-ᾱ_i)/σ²_θ of the ε gradient, relative to DSM's weight 1.
  - λ p5 / p50 / p95: ESM's per-pixel step multiplier over SGM's, (1-ᾱ_i)/max(σ²_θ, esm_min_var)
    (eq. 3 against eq. 4 in eq. 5), at its 5th, 50th and 95th percentile.
Prints one table (one row per label, a column group per model).
"""

import sys
import os

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from datasets import pipeline
from esm import detector_state
from esm import host_memory
from esm import parallel
from esm import scoring
from esm.models import utils as mutils
# pylint: enable=g-import-not-at-top,wrong-import-position

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'name=workdir pairs of trained models.')
_LABELS = flags.DEFINE_list('labels', ['1', '2', '5', '12', '25', '50', '100', '175', '250'],
                            'Step labels i (1..T).')
_DRAWS = flags.DEFINE_integer('draws', 4, 'Noise draws per image and label.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the noise draws.')
flags.mark_flag_as_required('workdirs')


def held_out_images(config) -> np.ndarray:
  val = pipeline.get_eval_data(config.data, 'val', global_batch_size=config.eval.batch_size)
  return np.stack([val.load(k)['image'] for k in range(val.num_examples)])


def get_label_stats_fn(net_fn, sde, esm_min_var: float):
  """(params, x0 [N,H,W,C], i, key) -> dict of per-label statistics (see the module docstring)."""

  @jax.jit
  def stats(params, x0, i, key):
    labels = jnp.full((x0.shape[0],), i)
    x_i, noise = sde.sample_marginal(key, x0, labels)
    out = net_fn(params, x_i, labels, train=False, rng=None)
    err = jnp.square(noise - out.eps.astype(jnp.float32))
    result = {'eps_mse': jnp.mean(err)}
    if out.log_var is not None:
      one_minus_ab = 1.0 - sde.alpha_bar[i]
      log_var = out.log_var.astype(jnp.float32)
      var = jnp.exp(log_var)
      target = one_minus_ab * err
      lam = one_minus_ab / jnp.maximum(var, esm_min_var)
      a = log_var - jnp.mean(log_var)
      b = jnp.log(target + 1e-12)
      b = b - jnp.mean(b)
      result.update(var=jnp.mean(var), target=jnp.mean(target),
                    corr=jnp.sum(a * b) / jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b)),
                    weight=jnp.mean(one_minus_ab * jnp.exp(-log_var)),
                    lam=jnp.quantile(lam, jnp.array([0.05, 0.5, 0.95])))
    return result

  return stats


def measure(name: str, workdir: str, labels, draws: int, seed: int):
  config = detector_state.saved_config(workdir)
  mesh = parallel.make_mesh()
  params, step = scoring.restore_ema_params(config, workdir, mesh)
  built = mutils.build(config, config.data.image_size)
  stats_fn = get_label_stats_fn(built.net_fn, built.sde, float(config.sampling.esm_min_var))
  images = jnp.asarray(held_out_images(config))
  rows = {}
  for i in labels:
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), i), draws)
    per_draw = [jax.device_get(stats_fn(params, images, i, k)) for k in keys]
    rows[i] = {k: np.mean([d[k] for d in per_draw], axis=0) for k in per_draw[0]}
  print(f'{name}: {workdir}, {config.loss.kind} loss, step {step}, {images.shape[0]} held-out '
        f'images x {draws} draws', file=sys.stderr)
  return rows


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # as main.py, before XLA starts
  labels = [int(i) for i in _LABELS.value]
  models = dict(pair.split('=', 1) for pair in _WORKDIRS.value)
  results = {name: measure(name, wd, labels, _DRAWS.value, _SEED.value)
             for name, wd in models.items()}
  header, rule = ['| i |'], ['|---|']
  for name, rows in results.items():
    dual = 'var' in rows[labels[0]]
    cols = ['eps_mse'] + (['var / err', 'corr', 'weight', 'λ p5 / p50 / p95'] if dual else [])
    header += [f' {name} {c} |' for c in cols]
    rule += ['---|'] * len(cols)
  lines = [''.join(header), ''.join(rule)]
  for i in labels:
    cells = [f'| {i} |']
    for rows in results.values():
      r = rows[i]
      cells.append(f' {r["eps_mse"]:.4f} |')
      if 'var' in r:
        cells += [f' {r["var"]:.3g} / {r["target"]:.3g} |', f' {r["corr"]:.2f} |',
                  f' {r["weight"]:.3g} |', ' ' + ' / '.join(f'{v:.2f}' for v in r['lam']) + ' |']
    lines.append(''.join(cells))
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
