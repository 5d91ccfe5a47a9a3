"""Tables of label-free tuning against the paper's T_d, from tuned and swept workdirs.

  python3 experiments/tuning_report.py --runs=bottle_esm,bottle_sgm --root=/tmp/runs

Each run is a workdir that was trained, tuned (`--mode=tune`) and evaluated with
`--config.eval.sweep_t_d=True`, so its report/results.json holds the test AUROC of every tuning
candidate. For each sampler: the T_d the development set chose, the test AUROC there, at the paper's
T_d (the config's, i.e. its table scaled to T) and at the test sweep's best T_d. The test numbers are
read here, after the fact; no choice uses them.
"""

import json
import os
import sys

from absl import app
from absl import flags

_RUNS = flags.DEFINE_list('runs', None, 'Workdir names under --root.')
_ROOT = flags.DEFINE_string('root', None, 'Folder holding the workdirs.')
flags.mark_flags_as_required(['runs', 'root'])


def _load(workdir: str):
  with open(os.path.join(workdir, 'tuned.json')) as f:
    tuned = json.load(f)
  with open(os.path.join(workdir, 'report', 'results.json')) as f:
    result = next(iter(json.load(f).values()))
  with open(os.path.join(workdir, 'config.json')) as f:
    paper_t_d = json.load(f)['sampling']['t_d']
  return tuned, result, paper_t_d


def rows_of(name: str, workdir: str) -> list:
  tuned, result, paper_t_d = _load(workdir)
  sweep = result.get('t_d_sweep') or []
  rows = []
  for method, choice in tuned['by_method'].items():
    test = {r['t_d']: r for r in sweep if r['method'] == method}
    if not test:
      continue
    best_t_d = max(test, key=lambda t: test[t]['image_auroc'])
    at = lambda t: (f"{test[t]['image_auroc']:.3f} / {test[t]['pixel_auroc']:.3f}"
                    if t in test else '–')
    gap = test[best_t_d]['image_auroc'] - test[choice['t_d']]['image_auroc']
    rows.append(f"| {name} | {method}{' **chosen**' if method == tuned['method'] else ''} | "
                f"{choice['t_d']} ({'+'.join(n for n, w in zip(('cos', 'u', 'kl', 're'), choice['weights']) if w)}) | "
                f"{choice['image_auroc']:.3f} / {choice['pixel_auroc']:.3f} | {at(choice['t_d'])} | "
                f"{paper_t_d}: {at(paper_t_d)} | {best_t_d}: {at(best_t_d)} | {gap:.3f} |")
  return rows


def main(argv):
  del argv
  print('| run | sampler | dev-chosen T_d (detectors) | dev image / pixel | test at chosen | '
        'test at paper T_d | test at best T_d | best − chosen (image) |')
  print('|---|---|---|---|---|---|---|---|')
  for name in _RUNS.value:
    workdir = os.path.join(_ROOT.value, name)
    if not os.path.exists(os.path.join(workdir, 'report', 'results.json')):
      print(f'| {name} | not evaluated yet | | | | | | |', file=sys.stderr)
      continue
    for row in rows_of(name, workdir):
      print(row)


if __name__ == '__main__':
  app.run(main)
