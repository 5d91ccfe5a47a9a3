"""ESM vs ESM^σ vs SGM over training budgets and seeds, with paired bootstrap intervals.

  python3 experiments/evidence.py --root=../shared/data --workdir=/tmp/evidence
  python3 experiments/evidence.py --root=../shared/data --workdir=/tmp/evidence --stages=report

Every job is a `main.py` command on a configs/cpu/ model; --workers of them run at once, each on
--threads CPU threads (on 2 cores, two one-thread jobs train about 1.2x faster in total than one
two-thread job). A job whose output exists is skipped, and an interrupted training resumes from its
checkpoint, so rerunning the same command continues where it stopped.

Stages (--stages, default all):
  train   each model (esm: eq. 10; sgm: DSM, single stream; hybrid: ours, DSM ε + eq. 10 σ²) and seed,
          to the largest --budgets step for seed 0 (a checkpoint at every budget: the learning rate
          is constant after warm-up, so the step-k checkpoint is a k-step training) and to
          --seed_budget for the other seeds.
  tune    `--mode=tune` on each checkpoint (held-out training images only, esm/tune.py), once with
          ESM^σ's constant per-step floor and once, for ESM^σ only, with the β_i floor.
  eval    `--mode=eval` on the test split for each method the model supports, each at its own
          tuned T_d and detector weights: esm, esm_sigma_const and esm_sigma_beta (both readings of
          ESM^σ; the report's esm_sigma is the one the development set prefers), and sgm (for a
          dual-stream model: its ε read through eq. 4).
  report  WORKDIR/evidence.md: the budget curve (seed 0), mean ± sd over seeds, paired bootstrap 95%
          intervals of image-AUROC differences pooled over seeds, and the development-set choices.
Test labels are read only by the report, after every choice is made.
"""

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from absl import app
from absl import flags
from absl import logging

from esm import metrics
# pylint: enable=g-import-not-at-top,wrong-import-position

_ROOT = flags.DEFINE_string('root', None, 'Folder holding mvtec_ad/ and mpdd/.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (resumable).')
_STAGES = flags.DEFINE_list('stages', ['train', 'tune', 'eval', 'report'], 'Stages to run.')
_CATEGORIES = flags.DEFINE_list('categories', ['bottle', 'metal_plate'], 'CPU-scale categories.')
_MODELS = flags.DEFINE_list('models', ['esm', 'sgm'], 'Models: esm, sgm, hybrid; model@cat1+cat2 '
                            'trains that model on those categories only.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds (--config.seed).')
_BUDGETS = flags.DEFINE_list('budgets', ['400', '1600'], 'Steps evaluated on seed 0.')
_SEED_BUDGET = flags.DEFINE_integer('seed_budget', None, 'Steps of every seed (default: largest '
                                    'budget); the seed table and the intervals use it.')
_WORKERS = flags.DEFINE_integer('workers', 2, 'Jobs run at once.')
_THREADS = flags.DEFINE_integer('threads', 1, 'CPU threads per job.')
_RESAMPLES = flags.DEFINE_integer('resamples', 2000, 'Bootstrap resamples.')
flags.mark_flags_as_required(['root', 'workdir'])

DATASETS = {'bottle': 'mvtec_ad', 'metal_plate': 'mpdd'}
MODELS = {'esm': ['--config.loss.kind=esm'],
          'sgm': ['--config.loss.kind=dsm', '--config.sampling.method=sgm'],
          'hybrid': ['--config.loss.kind=hybrid']}
FLOORS = ('constant', 'beta')  # ESM^σ's per-step lower bound: sigma_min_var, or β_i
DUAL_METHODS = ('esm', 'esm_sigma_const', 'esm_sigma_beta', 'sgm')
# Differences reported with an interval: (a, b) as model/method names.
COMPARISONS = (('esm/esm', 'sgm/sgm'), ('esm/esm_sigma', 'esm/esm'), ('esm/esm_sigma', 'sgm/sgm'),
               ('esm/esm_sigma_beta', 'esm/esm_sigma_const'), ('esm/sgm', 'sgm/sgm'),
               ('hybrid/esm', 'sgm/sgm'), ('hybrid/esm', 'esm/esm'), ('hybrid/sgm', 'sgm/sgm'))


FLOOR_OF = {'esm_sigma_const': 'constant', 'esm_sigma_beta': 'beta'}
SAMPLER_OF = {'esm_sigma_const': 'esm_sigma', 'esm_sigma_beta': 'esm_sigma'}
REPORTED = ('esm', 'esm_sigma', 'esm_sigma_const', 'esm_sigma_beta', 'sgm')


def models_of(category: str) -> List[str]:
  """The --models entries that run on `category`."""
  chosen = []
  for entry in _MODELS.value:
    model, _, only = entry.partition('@')
    if not only or category in only.split('+'):
      chosen.append(model)
  return chosen


def methods_of(model: str, reported: bool = False) -> Sequence[str]:
  if model == 'sgm':
    return ('sgm',)
  return REPORTED if reported else DUAL_METHODS


class Job(NamedTuple):
  name: str
  done: str  # this file exists once the job has finished
  args: Callable[[], List[str]]  # main.py arguments, built when the job starts (reads its inputs)
  deps: Sequence[str] = ()  # `done` files of the jobs that must finish first
  prepare: Optional[Callable[[], None]] = None


# --- layout -------------------------------------------------------------------------------------

def run_dir(category: str, model: str, seed: int) -> str:
  return os.path.join(_WORKDIR.value, category, f'{model}_s{seed}')


def train_dir(category, model, seed) -> str:
  return os.path.join(run_dir(category, model, seed), 'train')


def step_dir(category, model, seed, step, leaf: str) -> str:
  return os.path.join(run_dir(category, model, seed), f'step{step}', leaf)


def checkpoint_of(category, model, seed, step) -> str:
  return os.path.join(train_dir(category, model, seed), 'checkpoints', str(step))


def base_args(category: str, model: str, seed: int) -> List[str]:
  return [f'--config=configs/cpu/{category}.py',
          f'--config.data.root={os.path.join(_ROOT.value, DATASETS[category])}',
          f'--config.data.tfds_dir={os.path.join(_WORKDIR.value, "tfds")}',
          f'--config.seed={seed}', *MODELS[model]]


def view_of(category, model, seed, step, leaf) -> Callable[[], None]:
  """A workdir holding only the step-`step` checkpoint of the training run, so that tune and eval
  (which read the newest checkpoint) see that budget and write their files apart."""
  def prepare():
    view = step_dir(category, model, seed, step, leaf)
    target = os.path.join(view, 'checkpoints', str(step))
    if not os.path.exists(target):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.copytree(checkpoint_of(category, model, seed, step), target + '.tmp')
      os.rename(target + '.tmp', target)
  return prepare


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


# --- jobs ---------------------------------------------------------------------------------------

def budgets_of(seed: int) -> List[int]:
  budgets = sorted(int(b) for b in _BUDGETS.value)
  return budgets if seed == 0 else [_SEED_BUDGET.value or budgets[-1]]


def train_job(category, model, seed) -> Job:
  budgets = budgets_of(seed)
  # Checkpoints at every budget and at least as often as the config's own ckpt_every, so that a
  # killed training loses at most that many steps.
  config = importlib.import_module(f'configs.cpu.{category}').get_config()
  every = math.gcd(*budgets, int(config.train.ckpt_every))
  args = base_args(category, model, seed) + [
      '--mode=train', f'--workdir={train_dir(category, model, seed)}',
      f'--config.train.num_steps={budgets[-1]}', f'--config.train.ckpt_every={every}',
      f'--config.train.keep={budgets[-1] // every + 1}']
  return Job(f'train {category}/{model}/s{seed} to {budgets[-1]}',
             checkpoint_of(category, model, seed, budgets[-1]), lambda: args)


def tune_jobs(category, model, seed, step) -> List[Job]:
  jobs = []
  floors = FLOORS if model != 'sgm' else FLOORS[:1]
  for floor in floors:
    leaf = f'tune_{floor}'
    # one floor per tune, so that both readings keep their own tuned.json
    extra = [f'--config.sampling.sigma_floor={floor}', f'--config.tune.sigma_floors=("{floor}",)']
    if floor != 'constant':
      extra.append('--config.tune.methods=("esm_sigma",)')  # only ESM^σ reads the floor
    args = base_args(category, model, seed) + [
        '--mode=tune', f'--workdir={step_dir(category, model, seed, step, leaf)}', *extra]
    jobs.append(Job(f'tune {category}/{model}/s{seed}/step{step} floor={floor}',
                    os.path.join(step_dir(category, model, seed, step, leaf), 'tuned.json'),
                    lambda args=args: args, deps=(checkpoint_of(category, model, seed, step),),
                    prepare=view_of(category, model, seed, step, leaf)))
  return jobs


def tuned_path(category, model, seed, step, floor='constant') -> str:
  return os.path.join(step_dir(category, model, seed, step, f'tune_{floor}'), 'tuned.json')


def preferred_floor(category, model, seed, step) -> str:
  """ESM^σ's floor with the higher development score (ties: the paper's reading, 'constant')."""
  scores = {f: read_json(tuned_path(category, model, seed, step, f))['by_method']['esm_sigma']
            ['score'] for f in FLOORS}
  return 'beta' if scores['beta'] > scores['constant'] else 'constant'


def method_settings(category, model, seed, step, method) -> Dict[str, str]:
  """sampling.method, sampling.sigma_floor, sampling.t_d and detect.weights for `method`, as the
  development set chose them."""
  floor = FLOOR_OF.get(method)
  sampler = SAMPLER_OF.get(method, method)
  chosen = read_json(tuned_path(category, model, seed, step, floor or 'constant'))['by_method'][sampler]
  return {'sampling.method': sampler, 'sampling.sigma_floor': floor or 'constant',
          'sampling.t_d': str(chosen['t_d']),
          'detect.weights': '(' + ','.join(str(float(w)) for w in chosen['weights']) + ')'}


def eval_job(category, model, seed, step, method) -> Job:
  view = step_dir(category, model, seed, step, method)

  def args():
    settings = method_settings(category, model, seed, step, method)
    return base_args(category, model, seed) + [
        '--mode=eval', f'--workdir={view}', '--config.tune.enabled=False',
        *[f'--config.{k}={v}' for k, v in settings.items()]]
  floors = FLOORS if model != 'sgm' else FLOORS[:1]
  return Job(f'eval {category}/{model}/s{seed}/step{step} {method}',
             os.path.join(view, 'report', 'results.json'), args,
             deps=tuple(tuned_path(category, model, seed, step, f) for f in floors),
             prepare=view_of(category, model, seed, step, method))


def all_jobs(stages) -> List[Job]:
  jobs = []
  for seed in (int(s) for s in _SEEDS.value):  # seed 0 (the budget curve) of every category first
    for category in _CATEGORIES.value:
      for model in models_of(category):
        if 'train' in stages:
          jobs.append(train_job(category, model, seed))
        for step in budgets_of(seed):
          if 'tune' in stages:
            jobs += tune_jobs(category, model, seed, step)
          if 'eval' in stages:
            jobs += [eval_job(category, model, seed, step, m) for m in methods_of(model)]
  return jobs


def run_jobs(jobs: List[Job]) -> None:
  """Runs the jobs in list order as their dependencies allow, --workers at a time; a failed job's
  dependants are skipped (rerun after fixing the cause)."""
  env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen='
                                   f'{"true" if _THREADS.value > 1 else "false"} '
                                   f'intra_op_parallelism_threads={_THREADS.value}').strip())
  pending = [j for j in jobs if not os.path.exists(j.done)]
  failed, running = [], {}
  logs = os.path.join(_WORKDIR.value, 'logs')
  os.makedirs(logs, exist_ok=True)
  logging.info('%d of %d jobs to run', len(pending), len(jobs))
  while pending or running:
    for job, (proc, started) in list(running.items()):
      if proc.poll() is not None:
        del running[job]
        ok = proc.returncode == 0 and os.path.exists(job.done)
        logging.info('%s %s after %.0f s', 'done' if ok else f'FAILED (rc {proc.returncode})',
                     job.name, time.time() - started)
        if not ok:
          failed.append(job.done)
    blocked = [j for j in pending if any(d in failed for d in j.deps)]
    for job in blocked:
      logging.warning('skipping %s: a job it needs failed', job.name)
      failed.append(job.done)
    pending = [j for j in pending if j not in blocked]
    ready = [j for j in pending if all(os.path.exists(d) for d in j.deps)]
    while ready and len(running) < _WORKERS.value:
      job = ready.pop(0)
      pending.remove(job)
      if job.prepare:
        job.prepare()
      log = os.path.join(logs, job.name.replace(' ', '_').replace('/', '-') + '.log')
      logging.info('start %s (log %s)', job.name, log)
      with open(log, 'a') as out:
        proc = subprocess.Popen([sys.executable, 'main.py', *job.args()], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)
      running[job] = (proc, time.time())
    if not ready and not running and pending:
      raise RuntimeError(f'{len(pending)} jobs wait for outputs no job makes: {pending[0].name}')
    time.sleep(2)
  if failed:
    raise SystemExit(f'{len(failed)} jobs failed or were skipped; see {logs}')


# --- report -------------------------------------------------------------------------------------

class Row(NamedTuple):
  image: float
  pixel: float
  t_d: int
  weights: tuple
  labels: np.ndarray
  scores: np.ndarray


def load_row(category, model, seed, step, method) -> Optional[Row]:
  if method == 'esm_sigma':  # the reading the development set prefers
    if not all(os.path.exists(tuned_path(category, model, seed, step, f)) for f in FLOORS):
      return None
    floor = preferred_floor(category, model, seed, step)
    method = {v: k for k, v in FLOOR_OF.items()}[floor]
  view = step_dir(category, model, seed, step, method)
  path = os.path.join(view, 'report', 'results.json')
  if not os.path.exists(path):
    return None
  result = read_json(path)[category]  # results.json: {category: result row}
  table = np.genfromtxt(os.path.join(view, 'report', 'scores.csv'), delimiter=',', names=True,
                        dtype=None, encoding='utf-8')
  return Row(result['image_auroc'], result['pixel_auroc'], result['t_d'],
             tuple(result.get('weights', ())), np.asarray(table['label']),
             np.asarray(table['score'], float))


def rows_at(category, model, method, step, seeds) -> Dict[int, Row]:
  rows = {s: load_row(category, model, s, step, method) for s in seeds}
  return {s: r for s, r in rows.items() if r is not None}


def fmt(x: float) -> str:
  return '–' if x is None or not np.isfinite(x) else f'{x:.3f}'


def dev_score(category, model, seed, step, method) -> Optional[float]:
  """The development-set score (mean of image and pixel AUROC) the tuning gave `method`."""
  if method == 'esm_sigma':
    scores = [dev_score(category, model, seed, step, m) for m in FLOOR_OF]
    return None if None in scores else max(scores)
  path = tuned_path(category, model, seed, step, FLOOR_OF.get(method, 'constant'))
  if not os.path.exists(path):
    return None
  return read_json(path)['by_method'][SAMPLER_OF.get(method, method)]['score']


def budget_table(category: str, development: bool) -> List[str]:
  """Seed 0 at each budget: the development score (what a budget is chosen on) or the test
  image / pixel AUROC."""
  budgets = budgets_of(0)
  lines = ['| model / method | ' + ' | '.join(f'{b} steps' for b in budgets) + ' |',
           '|---|' + '---|' * len(budgets)]
  for model in models_of(category):
    for method in methods_of(model, reported=True):
      cells = []
      for step in budgets:
        if development:
          cells.append(fmt(dev_score(category, model, 0, step, method)))
        else:
          row = load_row(category, model, 0, step, method)
          cells.append(f'{fmt(row.image)} / {fmt(row.pixel)} (T_d {row.t_d})' if row else '')
      lines.append(f'| {model} / {method} | ' + ' | '.join(cells) + ' |')
  return lines


def seed_table(category: str, step: int, seeds) -> List[str]:
  lines = ['| model / method | seeds | image AUROC mean ± sd | pixel AUROC mean ± sd | T_d per seed |',
           '|---|---|---|---|---|']
  for model in models_of(category):
    for method in methods_of(model, reported=True):
      rows = rows_at(category, model, method, step, seeds)
      if not rows:
        continue
      img = np.array([r.image for r in rows.values()])
      pix = np.array([r.pixel for r in rows.values()])
      sd = lambda x: float(np.std(x, ddof=1)) if x.size > 1 else math.nan
      lines.append(f'| {model} / {method} | {len(rows)} | {fmt(img.mean())} ± {fmt(sd(img))} | '
                   f'{fmt(pix.mean())} ± {fmt(sd(pix))} | '
                   f'{", ".join(str(r.t_d) for r in rows.values())} |')
  return lines


def interval_table(category: str, step: int, seeds) -> List[str]:
  lines = ['| a − b (image AUROC) | seeds | difference | 95% CI | P(a ≤ b) |', '|---|---|---|---|---|']
  for a, b in COMPARISONS:
    (ma, ka), (mb, kb) = a.split('/'), b.split('/')
    if ma not in models_of(category) or mb not in models_of(category):
      continue
    ra, rb = rows_at(category, ma, ka, step, seeds), rows_at(category, mb, kb, step, seeds)
    common = sorted(set(ra) & set(rb))
    if not common:
      continue
    labels = ra[common[0]].labels
    result = metrics.paired_bootstrap_auroc_difference(
        np.stack([ra[s].scores for s in common]), np.stack([rb[s].scores for s in common]), labels,
        num_resamples=_RESAMPLES.value)
    lines.append(f'| {a} − {b} | {len(common)} | {result["difference"]:+.3f} | '
                 f'[{result["lo"]:+.3f}, {result["hi"]:+.3f}] | {result["p_not_better"]:.3f} |')
  return lines


def choice_table(category: str, step: int, seeds) -> List[str]:
  """What the development set chose: ESM^σ's floor and each method's detector weights."""
  lines = ['| model | seed | ESM^σ dev score const / β → floor | chosen method | '
           'weights (cos, u, kl, re) per method |', '|---|---|---|---|---|']
  for model in models_of(category):
    for seed in seeds:
      path = tuned_path(category, model, seed, step)
      if not os.path.exists(path):
        continue
      tuned = read_json(path)
      weights = '; '.join(f'{m}: ' + ','.join(f'{w:g}' for w in v['weights'])
                          for m, v in tuned['by_method'].items())
      floor = ''
      if model != 'sgm' and os.path.exists(tuned_path(category, model, seed, step, 'beta')):
        beta = read_json(tuned_path(category, model, seed, step, 'beta'))['by_method']['esm_sigma']
        floor = (f'{tuned["by_method"]["esm_sigma"]["score"]:.3f} / {beta["score"]:.3f} → '
                 f'{preferred_floor(category, model, seed, step)}')
      lines.append(f'| {model} | {seed} | {floor} | {tuned["method"]} | {weights} |')
  return lines


def detector_table(category: str, step: int, seeds) -> List[str]:
  """Development-set score (mean image/pixel AUROC) of the best detector subset with and without
  S_KL and S_Cos, at each method's chosen T_d; mean over seeds."""
  lines = ['| model / method | seeds | best with S_KL / without | best with S_Cos / without |',
           '|---|---|---|---|']
  for model in models_of(category):
    tuned = [read_json(tuned_path(category, model, s, step)) for s in seeds
             if os.path.exists(tuned_path(category, model, s, step))]
    for method in (tuned[0]['by_method'] if tuned else ()):
      best = {}
      for t in tuned:
        t_d = t['by_method'][method]['t_d']
        mine = [c for c in t['candidates'] if c['method'] == method and c['t_d'] == t_d]
        for name in ('kl', 'cos'):
          for has in (True, False):
            scores = [c['score'] for c in mine if (name in c['detectors']) == has]
            best.setdefault((name, has), []).append(max(scores) if scores else math.nan)
      cell = lambda n: f'{fmt(np.mean(best[(n, True)]))} / {fmt(np.mean(best[(n, False)]))}'
      lines.append(f'| {model} / {method} | {len(tuned)} | {cell("kl")} | {cell("cos")} |')
  return lines


def report() -> str:
  seeds = [int(s) for s in _SEEDS.value]
  step = budgets_of(1)[0]
  jobs = all_jobs({'train', 'tune', 'eval'})
  finished = sum(os.path.exists(j.done) for j in jobs)
  parts = ['# Evidence: ESM vs ESM^σ vs SGM at CPU scale', '',
           f'{finished} of {len(jobs)} jobs finished (models {",".join(_MODELS.value)}, seeds '
           f'{",".join(_SEEDS.value)}, budgets {",".join(_BUDGETS.value)}); empty cells are pending.',
           '',
           'Image / pixel AUROC on the test split, each method at the T_d and detector weights its '
           'development set chose (held-out training images; esm/tune.py).', '']
  for category in _CATEGORIES.value:
    parts += [f'## {category}', '',
              '### Budget curve on the development set (seed 0; mean of image and pixel AUROC)', '',
              *budget_table(category, development=True), '',
              '### Budget curve on the test split (seed 0; image / pixel AUROC)', '',
              *budget_table(category, development=False), '',
              f'### Seeds at {step} steps', '', *seed_table(category, step, seeds), '',
              f'### Paired bootstrap over test images, pooled over seeds ({_RESAMPLES.value} '
              'resamples)', '', *interval_table(category, step, seeds), '',
              f'### Development-set choices at {step} steps', '', *choice_table(category, step, seeds),
              '', f'### Detectors on the development set at {step} steps (ESM^σ: constant floor)',
              '',
              *detector_table(category, step, seeds), '']
  return '\n'.join(parts)


def main(argv):
  del argv
  stages = set(_STAGES.value)
  unknown = stages - {'train', 'tune', 'eval', 'report'}
  if unknown:
    raise app.UsageError(f'unknown stages {sorted(unknown)}')
  jobs = all_jobs(stages)
  if jobs:
    run_jobs(jobs)
  if 'report' in stages:
    text = report()
    with open(os.path.join(_WORKDIR.value, 'evidence.md'), 'w') as f:
      f.write(text + '\n')
    print(text)


if __name__ == '__main__':
  app.run(main)
