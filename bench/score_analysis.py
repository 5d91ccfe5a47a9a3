"""Paper section 3.1 where the true score is known: ESM_l / DSM_l on Gaussian mixtures (d = 2, 64).

Usage: python3 bench/score_analysis.py [--train_steps 3000] [--num_samples 16384] [--seed 0]
                                       [--out_dir docs/figures]

Trains, per dimension, a two-stream MLP with the project's esm_loss and a one-stream MLP with its
dsm_loss (schedule and variance bound from configs/default.py), then measures at a few step labels
ESM_l and DSM_l (l = 2, 3, 4) of four score estimators on common Monte-Carlo samples, and their
error against the closed-form marginal score. Prints one table; writes it as markdown and JSON and
draws the figure under --out_dir.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.default import get_default_config  # pylint: disable=wrong-import-position
from esm import files  # pylint: disable=wrong-import-position
from esm.analysis import plot, study  # pylint: disable=wrong-import-position
from esm.sde import get_sde  # pylint: disable=wrong-import-position



def main() -> None:
  defaults = study.StudyConfig()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--train_steps', type=int, default=defaults.train.num_steps)
  parser.add_argument('--num_samples', type=int, default=defaults.num_samples)
  parser.add_argument('--dims', type=str, default=','.join(map(str, defaults.dims)))
  parser.add_argument('--seed', type=int, default=defaults.seed)
  parser.add_argument('--out_dir', type=str, default='docs/figures')
  args = parser.parse_args()

  config = get_default_config()
  cfg = dataclasses.replace(
      defaults, dims=tuple(int(d) for d in args.dims.split(',')), num_samples=args.num_samples,
      seed=args.seed, train=dataclasses.replace(defaults.train, num_steps=args.train_steps))
  start, start_cpu = time.perf_counter(), time.process_time()
  result = study.run_study(cfg, get_sde(config.sde), float(config.model.log_var_bound))
  wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu

  table = study.markdown_table(result['rows'], cfg.powers)
  print(table)
  os.makedirs(args.out_dir, exist_ok=True)
  figure = os.path.join(args.out_dir, 'score_analysis.png')
  plot.study_figure(result['rows'], figure, cfg.powers)
  command = 'python3 bench/score_analysis.py ' + ' '.join(sys.argv[1:])
  files.write_text(os.path.join(args.out_dir, 'score_analysis.md'),
         f'Command: `{command.strip()}`; wall {wall:.0f} s, process CPU {cpu:.0f} s.\n\n'
         f'{table}\n')
  files.write_text(os.path.join(args.out_dir, 'score_analysis.json'),
         json.dumps({'config': dataclasses.asdict(cfg), 'wall_s': wall, 'cpu_s': cpu, **result},
                    indent=1, default=str))
  losses = ', '.join(f'd={d} {k}: {v["final_loss"]:.4f}' for d, per in result['train'].items()
                     for k, v in per.items())
  print(f'\nwall {wall:.0f} s, process CPU {cpu:.0f} s; final training losses: {losses}; '
        f'figure {figure}')


if __name__ == '__main__':
  main()
