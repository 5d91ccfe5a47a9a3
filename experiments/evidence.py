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
import math
import os
import sys
from typing import Callable, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from experiments import evidence_report
from experiments.evidence_layout import FLOORS, Layout, methods_of
from experiments.jobs import Job, copy_of_checkpoint, run_jobs
from experiments.models import DATASETS, MODELS, ROOT, is_single_stream
# pylint: enable=g-import-not-at-top,wrong-import-position

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


def layout_of_flags() -> Layout:
  return Layout(_WORKDIR.value, tuple(_CATEGORIES.value), tuple(_MODELS.value),
                tuple(_SEEDS.value), tuple(_BUDGETS.value), _SEED_BUDGET.value)


def base_args(layout: Layout, category: str, model: str, seed: int) -> List[str]:
  return [f'--config=configs/cpu/{category}.py',
          f'--config.data.root={os.path.join(ROOT.value, DATASETS[category])}',
          f'--config.data.tfds_dir={os.path.join(layout.workdir, "tfds")}',
          f'--config.seed={seed}', *[f'--config.{k}={v}' for k, v in MODELS[model].items()]]


def view_of(layout: Layout, category, model, seed, step, leaf) -> Callable[[], None]:
  """A workdir holding only the step-`step` checkpoint of the training run: tune and eval there
  see that budget."""
  return copy_of_checkpoint(layout.checkpoint_of(category, model, seed, step),
                            layout.step_dir(category, model, seed, step, leaf))


# --- jobs ---------------------------------------------------------------------------------------

def train_job(layout: Layout, category, model, seed) -> Job:
  budgets = layout.budgets_of(seed)
  # Checkpoints at every budget and at least as often as the config's own ckpt_every, so that a
  # killed training loses at most that many steps.
  config = importlib.import_module(f'configs.cpu.{category}').get_config()
  every = math.gcd(*budgets, int(config.train.ckpt_every))
  args = base_args(layout, category, model, seed) + [
      '--mode=train', f'--workdir={layout.train_dir(category, model, seed)}',
      f'--config.train.num_steps={budgets[-1]}', f'--config.train.ckpt_every={every}',
      f'--config.train.keep={budgets[-1] // every + 1}']
  return Job(f'train {category}/{model}/s{seed} to {budgets[-1]}',
             layout.checkpoint_of(category, model, seed, budgets[-1]), lambda: args)


def tune_jobs(layout: Layout, category, model, seed, step) -> List[Job]:
  jobs = []
  floors = FLOORS[:1] if is_single_stream(model) else FLOORS
  for floor in floors:
    leaf = f'tune_{floor}'
    # one floor per tune, so that both readings keep their own tuned.json
    extra = [f'--config.sampling.sigma_floor={floor}', f'--config.tune.sigma_floors=("{floor}",)']
    if floor != 'constant':
      extra.append('--config.tune.methods=("esm_sigma",)')  # only ESM^σ reads the floor
    view = layout.step_dir(category, model, seed, step, leaf)
    args = base_args(layout, category, model, seed) + ['--mode=tune', f'--workdir={view}', *extra]
    jobs.append(Job(f'tune {category}/{model}/s{seed}/step{step} floor={floor}',
                    os.path.join(view, 'tuned.json'), lambda args=args: args,
                    deps=(layout.checkpoint_of(category, model, seed, step),),
                    prepare=view_of(layout, category, model, seed, step, leaf)))
  return jobs


def eval_job(layout: Layout, category, model, seed, step, method) -> Job:
  view = layout.step_dir(category, model, seed, step, method)

  def args():
    settings = layout.method_settings(category, model, seed, step, method)
    return base_args(layout, category, model, seed) + [
        '--mode=eval', f'--workdir={view}', '--config.tune.enabled=False',
        *[f'--config.{k}={v}' for k, v in settings.items()]]
  floors = FLOORS[:1] if is_single_stream(model) else FLOORS
  return Job(f'eval {category}/{model}/s{seed}/step{step} {method}',
             os.path.join(view, 'report', 'results.json'), args,
             deps=tuple(layout.tuned_path(category, model, seed, step, f) for f in floors),
             prepare=view_of(layout, category, model, seed, step, method))


def all_jobs(layout: Layout, stages) -> List[Job]:
  jobs = []
  for seed in (int(s) for s in layout.seeds):  # seed 0 (the budget curve) of every category first
    for category in layout.categories:
      for model in layout.models_of(category):
        if 'train' in stages:
          jobs.append(train_job(layout, category, model, seed))
        for step in layout.budgets_of(seed):
          if 'tune' in stages:
            jobs += tune_jobs(layout, category, model, seed, step)
          if 'eval' in stages:
            jobs += [eval_job(layout, category, model, seed, step, m) for m in methods_of(model)]
  return jobs


def main(argv):
  del argv
  stages = set(_STAGES.value)
  unknown = stages - {'train', 'tune', 'eval', 'report'}
  if unknown:
    raise app.UsageError(f'unknown stages {sorted(unknown)}')
  layout = layout_of_flags()
  jobs = all_jobs(layout, stages)
  if jobs:
    run_jobs(jobs, os.path.join(_WORKDIR.value, 'logs'), _WORKERS.value, _THREADS.value)
  if 'report' in stages:
    everything = all_jobs(layout, {'train', 'tune', 'eval'})
    finished = sum(os.path.exists(j.done) for j in everything)
    text = evidence_report.report(layout, finished, len(everything), _RESAMPLES.value)
    with open(os.path.join(_WORKDIR.value, 'evidence.md'), 'w') as f:
      f.write(text + '\n')
    print(text)


if __name__ == '__main__':
  app.run(main)
