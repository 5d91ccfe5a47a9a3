"""Where experiments/evidence.py's runs live and what each model is evaluated with.

WORKDIR/<category>/<model>_s<seed>/train holds a training run; .../step<k>/<leaf> a view of its
step-k checkpoint in which one tune or one evaluation writes its files.
"""

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence

from experiments.models import is_single_stream

FLOORS = ('constant', 'beta')  # ESM^σ's per-step lower bound: sigma_min_var, or β_i
DUAL_METHODS = ('esm', 'esm_sigma_const', 'esm_sigma_beta', 'sgm')
FLOOR_OF = {'esm_sigma_const': 'constant', 'esm_sigma_beta': 'beta'}
SAMPLER_OF = {'esm_sigma_const': 'esm_sigma', 'esm_sigma_beta': 'esm_sigma'}
REPORTED = ('esm', 'esm_sigma', 'esm_sigma_const', 'esm_sigma_beta', 'sgm')


def methods_of(model: str, reported: bool = False) -> Sequence[str]:
  if is_single_stream(model):
    return ('sgm',)
  return REPORTED if reported else DUAL_METHODS


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The runs of one evidence workdir, as the command line names them."""
  workdir: str
  categories: Sequence[str]
  models: Sequence[str]  # model or model@cat1+cat2 entries
  seeds: Sequence[str]
  budgets: Sequence[str]  # steps evaluated on seed 0
  seed_budget: Optional[int] = None  # steps of every seed; None: the largest budget

  def models_of(self, category: str) -> List[str]:
    """The --models entries that run on `category`."""
    chosen = []
    for entry in self.models:
      model, _, only = entry.partition('@')
      if not only or category in only.split('+'):
        chosen.append(model)
    return chosen

  def budgets_of(self, seed: int) -> List[int]:
    budgets = sorted(int(b) for b in self.budgets)
    return budgets if seed == 0 else [self.seed_budget or budgets[-1]]

  def run_dir(self, category: str, model: str, seed: int) -> str:
    return os.path.join(self.workdir, category, f'{model}_s{seed}')

  def train_dir(self, category, model, seed) -> str:
    return os.path.join(self.run_dir(category, model, seed), 'train')

  def step_dir(self, category, model, seed, step, leaf: str) -> str:
    return os.path.join(self.run_dir(category, model, seed), f'step{step}', leaf)

  def checkpoint_of(self, category, model, seed, step) -> str:
    return os.path.join(self.train_dir(category, model, seed), 'checkpoints', str(step))

  def tuned_path(self, category, model, seed, step, floor='constant') -> str:
    return os.path.join(self.step_dir(category, model, seed, step, f'tune_{floor}'), 'tuned.json')

  def preferred_floor(self, category, model, seed, step) -> str:
    """ESM^σ's floor with the higher development score (ties: the paper's reading, 'constant')."""
    scores = {f: read_json(self.tuned_path(category, model, seed, step, f))['by_method']
              ['esm_sigma']['score'] for f in FLOORS}
    return 'beta' if scores['beta'] > scores['constant'] else 'constant'

  def method_settings(self, category, model, seed, step, method) -> Dict[str, str]:
    """sampling.method, sampling.sigma_floor, sampling.t_d and detect.weights for `method`, as the
    development set chose them."""
    floor = FLOOR_OF.get(method)
    sampler = SAMPLER_OF.get(method, method)
    chosen = read_json(self.tuned_path(category, model, seed, step,
                                       floor or 'constant'))['by_method'][sampler]
    return {'sampling.method': sampler, 'sampling.sigma_floor': floor or 'constant',
            'sampling.t_d': str(chosen['t_d']),
            'detect.weights': '(' + ','.join(str(float(w)) for w in chosen['weights']) + ')'}
