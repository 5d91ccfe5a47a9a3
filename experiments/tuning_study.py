"""Label-free tuning against the paper's T_d on real categories at CPU scale (docs/benchmarks.md).

  python3 experiments/tuning_study.py --category=bottle --root=../shared/data --runs=/tmp/runs \
      --sweep=6,12,25,50

For each model (ESM, SGM) of the category, trained in RUNS/<category>_<model> with configs/cpu/
(`main.py --mode=train`): tunes it (`--mode=tune`, skipped when tuned.json exists), then measures
the test AUROC of each sampler the model supports at the T_d the development set chose for it, at
the paper's T_d (configs/cpu/ scales the table to T = 250) and at the --sweep values, each with the
detector weights that were best for that T_d on the development set. Writes
RUNS/<category>_<model>/tuning_study.json and prints one table. Resumable: measured rows are kept.
The test numbers are read here, after the choice; nothing chooses from them.
"""

import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging

from configs.common import override
from esm import evaluate
from esm import tune
from experiments.models import DATASETS, MODELS
# pylint: enable=g-import-not-at-top,wrong-import-position

_CATEGORY = flags.DEFINE_enum('category', None, sorted(DATASETS), 'CPU-scale category.')
_ROOT = flags.DEFINE_string('root', None, 'Folder holding mvtec_ad/ and mpdd/.')
_RUNS = flags.DEFINE_string('runs', None, 'Folder of the trained <category>_<model> workdirs.')
_SWEEP = flags.DEFINE_list('sweep', [], 'Extra test T_d values per sampler (beside chosen, paper).')
_MODELS = flags.DEFINE_list('models', ['esm', 'sgm'], 'Models to study.')
flags.mark_flags_as_required(['category', 'root', 'runs'])


def model_config(category: str, model: str):
  c = importlib.import_module(f'configs.cpu.{category}').get_config()
  return override(c, {**MODELS[model], 'data.root': os.path.join(_ROOT.value, DATASETS[category]),
                      'data.tfds_dir': os.path.join(_RUNS.value, 'tfds')})


def study_model(category: str, model: str) -> list:
  workdir = os.path.join(_RUNS.value, f'{category}_{model}')
  config = model_config(category, model)
  tuned = tune.load_tuned(workdir)
  if tuned is None:
    start, cpu = time.time(), time.process_time()
    tuned = tune.tune(config, workdir)
    logging.info('tuned %s in %.0f s wall, %.0f s CPU', workdir, time.time() - start,
                 time.process_time() - cpu)
  path = os.path.join(workdir, 'tuning_study.json')
  rows = json.load(open(path)) if os.path.exists(path) else []
  paper = config.sampling.t_d
  for method, choice in tuned['by_method'].items():
    if model == 'esm' and method == 'sgm':
      continue  # ESM's ε read through eq. 4: not one of the paper's methods
    wanted = sorted({choice['t_d'], paper} | {int(t) for t in _SWEEP.value})
    todo = [t for t in wanted if not any(r['method'] == method and r['t_d'] == t for r in rows)]
    if todo:
      rows += evaluate.sweep_tuning_candidates(
          config, workdir, dict(tuned, methods=[method], t_d_grid=[t for t in todo
                                                                  if t in tuned['t_d_grid']]))
      with open(path, 'w') as f:
        json.dump(rows, f, indent=1)
  for r in rows:
    r.update(model=model, chosen=tuned['by_method'][r['method']]['t_d'], paper=paper,
             overall=(r['method'] == tuned['method']))
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  print('| model | sampler | T_d | role | detectors (dev-best) | dev score | test image / pixel AUROC |')
  print('|---|---|---|---|---|---|---|')
  for model in _MODELS.value:
    for r in sorted(study_model(_CATEGORY.value, model), key=lambda r: (r['method'], r['t_d'])):
      role = ', '.join(name for name, t in (('chosen', r['chosen']), ('paper', r['paper']))
                       if t == r['t_d'])
      print(f"| {model} | {r['method']}{' (overall choice)' if r['overall'] and role.startswith('chosen') else ''} | "
            f"{r['t_d']} | {role or 'sweep'} | {'+'.join(r['detectors'])} | {r['dev_score']:.3f} | "
            f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f} |")


if __name__ == '__main__':
  app.run(main)
