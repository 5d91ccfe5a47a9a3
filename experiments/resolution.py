"""Resolution at CPU cost: the 48² and 64² models against larger inputs and crop training
(docs/results.md).

  python3 experiments/resolution.py --root=../shared/data --workdir=RUNS
  python3 experiments/resolution.py --root=../shared/data --workdir=RUNS --stages=report

Every job is a `main.py` command on configs/cpu/<category>.py with a variant's overrides (VARIANTS),
--workers at once on --threads each, resumable as experiments/jobs.py describes:
  train   --mode=train, the config's budget (1600 steps).
  eval    --mode=eval at the untuned defaults (configs/cpu's T_d, every detector) and at each other
          operating point of --points (POINTS: eval-time overrides, or 'tuned': --mode=tune's
          choice, tuned first; each in its own folder holding a copy of the final checkpoint),
          with the z-score baseline at the variant's own resolution; report/evidence.npz keeps
          what the bootstrap needs.
  report  WORKDIR/resolution.md: per category, variant and model, test image / pixel AUROC and
          AUPRO (mean ± sd over seeds), training and evaluation time, and paired bootstrap 95%
          intervals over test images, pooled over seeds: against the z-score at the same resolution
          (image and pixel AUROC), and against the --reference variant of the same model at the same
          point (its default point for the reference's other points; image AUROC, and pixel AUROC at
          the same resolution: at different resolutions they count different pixels); image AUROC
          per defect type.
No test label is read before the report; nothing is chosen here.
"""

import importlib
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from absl import app
from absl import flags

from configs.cpu.common import T_SCALE
from datasets import catalog
from esm import evaluate
from esm import metrics
from esm import resample
from esm import tuned as tuned_lib
from experiments.evidence_layout import read_json
from experiments.jobs import Job, copy_of_checkpoint, read_times, run_jobs
from experiments.models import AT_48, DATASETS, MODELS, ROOT
# pylint: enable=g-import-not-at-top,wrong-import-position

# name -> config overrides on configs/cpu/<category>.py (64², the default). model.attn_resolutions
# are sides of the training input, so every variant attends at its last level.
VARIANTS = {
    '48': AT_48,
    '64': {'data.image_size': 64, 'model.attn_resolutions': (16,)},
    '96_ch12': {'data.image_size': 96, 'model.attn_resolutions': (24,), 'model.ch': 12,
                'model.num_groups': 4},  # 2.25x 64²'s pixels, 0.56x its width²: 2x its training
    # the 48² step, 4x the pixels at test
    '96_crop48': {'data.image_size': 96, 'data.train_crop': 48, 'model.attn_resolutions': (12,)},
    '128_crop64': {'data.image_size': 128, 'data.train_crop': 64, 'model.attn_resolutions': (16,)},
    '128_ch8': {'data.image_size': 128, 'model.attn_resolutions': (32,), 'model.ch': 8,
                'model.num_groups': 4},  # 4x 64²'s pixels, 0.25x its width²: 3x its training
}
# name -> category -> eval-time overrides on the trained run. 'paper_t_d': the paper's T_d of the
# category scaled to T = 250, the operating point of configs/cpu before T_d = 4. 'tuned': what
# train_eval gives, --mode=tune's choice (TUNED: a tune job runs first in the point's folder).
POINTS = {
    'default': lambda category: {},
    'paper_t_d': lambda category: {'sampling.t_d': catalog.scaled_paper_t_d(
        DATASETS[category], category, 1000 // T_SCALE)},
    'tuned': lambda category: {},
}
DEFAULT_POINT = 'default'
TUNED = 'tuned'

_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (resumable).')
_STAGES = flags.DEFINE_list('stages', ['train', 'eval', 'report'], 'Stages to run.')
_CATEGORIES = flags.DEFINE_list('categories', ['bottle', 'pill', 'metal_plate'], 'Categories.')
_VARIANTS = flags.DEFINE_list('variants', list(VARIANTS), f'Of {list(VARIANTS)}.')
_MODELS = flags.DEFINE_list('models', ['sgm', 'esm'], 'Of experiments/models.py MODELS.')
_POINTS = flags.DEFINE_list('points', [DEFAULT_POINT], f'Operating points, of {list(POINTS)}.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Training seeds (--config.seed).')
_OVERRIDES = flags.DEFINE_list('overrides', [], 'Extra field=value overrides for every job '
                               '(values without commas; for a short run: train.num_steps=8).')
_REFERENCE = flags.DEFINE_enum('reference', '48', list(VARIANTS),
                                'The variant every other one is paired with in the report.')
_WORKERS = flags.DEFINE_integer('workers', 2, 'Jobs run at once.')
_THREADS = flags.DEFINE_integer('threads', 1, 'CPU threads per job.')
_RESAMPLES = flags.DEFINE_integer('resamples', 2000, 'Bootstrap resamples.')
flags.mark_flags_as_required(['root', 'workdir'])


def run_dir(category: str, variant: str, model: str, seed: int) -> str:
  return os.path.join(_WORKDIR.value, category, variant, f'{model}_s{seed}')


def eval_dir(category: str, variant: str, model: str, seed: int, point: str) -> str:
  """The training run itself at the default point, else a folder of its own for the point."""
  workdir = run_dir(category, variant, model, seed)
  return workdir if point == DEFAULT_POINT else os.path.join(workdir, 'points', point)


def _flag(key: str, value) -> str:
  return f'--config.{key}={value}'


def extra_overrides() -> Dict[str, str]:
  return dict(o.split('=', 1) for o in _OVERRIDES.value)


def base_args(category: str, variant: str, model: str, seed: int, leave_out=()) -> List[str]:
  """main.py's arguments of a run; `leave_out`: config fields not to give on the command line."""
  overrides = {k: v for k, v in {**MODELS[model], **VARIANTS[variant], **extra_overrides()}.items()
               if k not in leave_out}
  return [f'--config=configs/cpu/{category}.py',
          _flag('data.root', os.path.join(ROOT.value, DATASETS[category])),
          _flag('data.tfds_dir', os.path.join(_WORKDIR.value, 'tfds')), _flag('seed', seed),
          _flag('baselines.methods', "('zscore',)"),
          *[_flag(k, v) for k, v in overrides.items()]]


def num_steps(category: str) -> int:
  steps = importlib.import_module(f'configs.cpu.{category}').get_config().train.num_steps
  given = extra_overrides().get('train.num_steps')
  return int(given or steps)


def jobs_of(category: str, variant: str, model: str, seed: int, stages, points) -> List[Job]:
  workdir = run_dir(category, variant, model, seed)
  name = f'{category}/{variant}/{model}/s{seed}'
  checkpoint = os.path.join(workdir, 'checkpoints', str(num_steps(category)))
  args = base_args(category, variant, model, seed)
  jobs = []
  if 'train' in stages:
    jobs.append(Job(f'train {name}', checkpoint,
                    lambda: args + [f'--workdir={workdir}', '--mode=train']))
  for point in points if 'eval' in stages else ():
    view = eval_dir(category, variant, model, seed, point)
    extra = [_flag(k, v) for k, v in POINTS[point](category).items()]
    prepare = None if view == workdir else copy_of_checkpoint(checkpoint, view)
    deps = (checkpoint,)
    if point == TUNED:  # evaluation then reads the point's DIR/tuned.json
      deps = (os.path.join(view, 'tuned.json'),)
      jobs.append(Job(f'tune {name}', deps[0],
                      lambda view=view: args + [f'--workdir={view}', '--mode=tune'],
                      deps=(checkpoint,), prepare=prepare))
    # Fields on the command line win over DIR/tuned.json: the tuned point's eval leaves them out.
    own = (base_args(category, variant, model, seed, tuned_lib.TUNED_FIELDS.values())
           if point == TUNED else args)
    jobs.append(Job(f'eval {name}' + ('' if point == DEFAULT_POINT else f' {point}'),
                    os.path.join(view, 'report', 'results.json'),
                    lambda view=view, extra=extra, own=own: own + [
                        f'--workdir={view}', '--mode=eval', '--config.tune.enabled=False', *extra],
                    deps=deps, prepare=prepare))
  return jobs


# --- report ------------------------------------------------------------------------------------

class Run:
  """One evaluated run: its result row, its evidence and its test records' defect types."""

  def __init__(self, workdir: str, category: str):
    report = os.path.join(workdir, 'report')
    self.result = read_json(os.path.join(report, 'results.json'))[category]
    self.evidence = resample.load_evidence(os.path.join(report, evaluate.EVIDENCE_FILE))
    table = np.genfromtxt(os.path.join(report, 'scores.csv'), delimiter=',', names=True,
                          dtype=None, encoding='utf-8')
    self.defect_types = np.asarray(table['defect_type'])


def load_runs(category, variant, model, seeds, point=DEFAULT_POINT) -> Dict[int, Run]:
  out = {}
  for seed in seeds:
    workdir = eval_dir(category, variant, model, seed, point)
    if os.path.exists(os.path.join(workdir, 'report', evaluate.EVIDENCE_FILE)):
      out[seed] = Run(workdir, category)
  return out


def _pm(values) -> str:
  values = [v for v in values if v == v]
  if not values:
    return 'n/a'
  return f'{np.mean(values):.3f}' + (f' ± {np.std(values):.3f}' if len(values) > 1 else '')


def _ci(row) -> str:
  return f'{row[0]:+.3f} [{row[1]:+.3f}, {row[2]:+.3f}]'


def category_tables(category: str, times, resamples: int) -> List[str]:
  seeds = [int(s) for s in _SEEDS.value]
  lines = [f'### {category}', '',
           '| variant | model | point | seeds | image AUROC | pixel AUROC | AUPRO | '
           'train s (CPU s) | eval s/image | − z-score, image | − z-score, pixel | '
           '− ref., image | − ref., pixel |', '|---' * 13 + '|']
  types: Dict[str, Dict[str, float]] = {}
  zscores = {}
  for variant, model, point in [(v, m, p) for v in _VARIANTS.value for m in _MODELS.value
                                for p in _POINTS.value]:
    runs = load_runs(category, variant, model, seeds, point)
    if not runs:
      continue
    label = f'{variant} {model}' + ('' if point == DEFAULT_POINT else f' {point}')
    rows = [r.result for r in runs.values()]
    first = next(iter(runs.values()))
    labels = first.evidence[(evaluate.METHOD_ENTRY,)][2]
    ours = [r.evidence[(evaluate.METHOD_ENTRY,)] for r in runs.values()]
    zscore = [r.evidence[('zscore',)] for r in runs.values()]
    zscores[variant] = rows[0]['baselines']['zscore']
    versus_z = resample.paired_difference(ours, zscore, resamples)
    reference = _REFERENCE.value
    ref = load_runs(category, reference, model, list(runs),
                    point if variant != reference else DEFAULT_POINT)
    versus_ref = ['', '']
    if (variant, point) != (reference, DEFAULT_POINT) and len(ref) == len(runs):
      theirs = [ref[s].evidence[(evaluate.METHOD_ENTRY,)] for s in runs]
      diff = resample.paired_difference(ours, theirs, resamples)
      same_side = VARIANTS[variant].get('data.image_size') == VARIANTS[reference].get(
          'data.image_size')
      versus_ref = [_ci(diff[0]), _ci(diff[1]) if same_side else '']
    train = [times.get(f'train {category}/{variant}/{model}/s{s}') for s in runs]
    train_s = ' / '.join(f"{t['wall_s']:.0f} ({t['cpu_s']:.0f})" for t in train if t) or 'n/a'
    lines.append(
        f"| {variant} | {model} | {point} | {len(runs)} | "
        f"{_pm([r['image_auroc'] for r in rows])} | "
        f"{_pm([r['pixel_auroc'] for r in rows])} | {_pm([r['aupro'] for r in rows])} | "
        f"{train_s} | {_pm([r['seconds_per_image'] for r in rows])} | {_ci(versus_z[0])} | "
        f"{_ci(versus_z[1])} | {' | '.join(versus_ref)} |")
    for kind in sorted(set(first.defect_types) - {'good'}):
      keep = ((first.defect_types == kind) | (labels == 0)).astype(np.float64)[None]
      types.setdefault(kind, {})[label] = float(np.mean(
          [metrics.weighted_auroc(s, y, keep)[0] for s, _, y in ours]))
      types[kind][f'{variant} z-score'] = float(metrics.weighted_auroc(
          zscore[0][0], labels, keep)[0])
  lines += ['', '| variant | z-score image AUROC | pixel AUROC | AUPRO |', '|---|---|---|---|']
  lines += [f"| {v} | {z['image_auroc']:.3f} | {z['pixel_auroc']:.3f} | {z['aupro']:.3f} |"
            for v, z in zscores.items()]
  if types:
    columns = sorted({c for row in types.values() for c in row})
    lines += ['', '| defect type (image AUROC against the good images) | ' + ' | '.join(columns)
              + ' |', '|---' * (len(columns) + 1) + '|']
    lines += [f'| {kind} | ' + ' | '.join(f"{row[c]:.3f}" if c in row else '' for c in columns)
              + ' |' for kind, row in sorted(types.items())]
  return lines + ['']


def report(resamples: int) -> str:
  times = read_times(os.path.join(_WORKDIR.value, 'logs'))
  lines = ['# Resolution at CPU cost', '',
           f'Operating points: {", ".join(_POINTS.value)}; {len(_SEEDS.value)} seed(s); '
           'intervals: paired, class-stratified '
           f'bootstrap over test images ({resamples} resamples), pooled over seeds; train s: wall '
           'and CPU seconds of --mode=train per seed; ref.: the '
           f'{_REFERENCE.value} variant at the same point (at the default point for its other '
           'points).', '']
  for category in _CATEGORIES.value:
    lines += category_tables(category, times, resamples)
  return '\n'.join(lines)


def main(argv):
  del argv
  stages = set(_STAGES.value)
  unknown = (stages - {'train', 'eval', 'report'}, set(_VARIANTS.value) - set(VARIANTS),
             set(_MODELS.value) - set(MODELS), set(_POINTS.value) - set(POINTS))
  if any(unknown):
    raise app.UsageError(
        f'unknown stages, variants, models or points: {[sorted(u) for u in unknown]}')
  jobs = [job for seed in (int(s) for s in _SEEDS.value) for category in _CATEGORIES.value
          for variant in _VARIANTS.value for model in _MODELS.value
          for job in jobs_of(category, variant, model, seed, stages, _POINTS.value)]
  if jobs:
    run_jobs(jobs, os.path.join(_WORKDIR.value, 'logs'), _WORKERS.value, _THREADS.value)
  if 'report' in stages:
    text = report(_RESAMPLES.value)
    with open(os.path.join(_WORKDIR.value, 'resolution.md'), 'w') as f:
      f.write(text + '\n')
    print(text)


if __name__ == '__main__':
  app.run(main)
