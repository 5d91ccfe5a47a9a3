"""Paper section 3.1 where the true score is known: ESM_l / DSM_l on Gaussian mixtures (d = 2, 64).

Usage: python3 experiments/score_analysis.py [--train_steps 3000] [--num_samples 16384] [--seed 0]
                                             [--out_dir docs/figures]

Trains, per dimension, a two-stream MLP with the project's esm_loss and a one-stream MLP with its
dsm_loss (schedule and variance bound from configs/default.py), then measures at a few step labels
ESM_l and DSM_l (l = 2, 3, 4) of four score estimators on common Monte-Carlo samples, and their
error against the closed-form marginal score. Prints one table; writes it as markdown and JSON and
draws the figure under --out_dir.
"""

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from configs.default import get_default_config
from esm import files
from esm.analysis import plot, study
from esm.sde import get_sde
# pylint: enable=g-import-not-at-top,wrong-import-position

_DEFAULTS = study.StudyConfig()
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', _DEFAULTS.train.num_steps, 'Training steps.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', _DEFAULTS.num_samples, 'Monte-Carlo samples.')
_DIMS = flags.DEFINE_list('dims', [str(d) for d in _DEFAULTS.dims], 'Data dimensions.')
_SEED = flags.DEFINE_integer('seed', _DEFAULTS.seed, 'Seed.')
_OUT_DIR = flags.DEFINE_string('out_dir', 'docs/figures', 'Where the table, JSON and figure go.')


def main(argv):
  del argv
  config = get_default_config()
  cfg = dataclasses.replace(
      _DEFAULTS, dims=tuple(int(d) for d in _DIMS.value), num_samples=_NUM_SAMPLES.value,
      seed=_SEED.value, train=dataclasses.replace(_DEFAULTS.train, num_steps=_TRAIN_STEPS.value))
  start, start_cpu = time.perf_counter(), time.process_time()
  result = study.run_study(cfg, get_sde(config.sde), float(config.model.log_var_bound))
  wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu

  table = study.markdown_table(result['rows'], cfg.powers)
  print(table)
  out_dir = _OUT_DIR.value
  os.makedirs(out_dir, exist_ok=True)
  figure = os.path.join(out_dir, 'score_analysis.png')
  plot.study_figure(result['rows'], figure, cfg.powers)
  command = 'python3 experiments/score_analysis.py ' + ' '.join(sys.argv[1:])
  files.write_text(os.path.join(out_dir, 'score_analysis.md'),
         f'Command: `{command.strip()}`; wall {wall:.0f} s, process CPU {cpu:.0f} s.\n\n'
         f'{table}\n')
  files.write_text(os.path.join(out_dir, 'score_analysis.json'),
         json.dumps({'config': dataclasses.asdict(cfg), 'wall_s': wall, 'cpu_s': cpu, **result},
                    indent=1, default=str))
  losses = ', '.join(f'd={d} {k}: {v["final_loss"]:.4f}' for d, per in result['train'].items()
                     for k, v in per.items())
  print(f'\nwall {wall:.0f} s, process CPU {cpu:.0f} s; final training losses: {losses}; '
        f'figure {figure}')


if __name__ == '__main__':
  app.run(main)
