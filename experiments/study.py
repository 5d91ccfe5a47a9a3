"""The real-data study at CPU scale: ESM vs ESM^σ vs SGM, the ambiguous choices, T_d and detectors.

  python3 experiments/study.py --category=bottle --root=../shared/data --workdir=/tmp/study
  python3 experiments/study.py --category=metal_plate --root=../shared/data --workdir=/tmp/study

Stages (--stages, default all, each resumable: finished trainings and evaluations are skipped):
  train   ESM (dual stream, eq. 10) and SGM (single stream, DSM) with the same backbone, steps and
          batch (configs/cpu/); on the development category also ESM with var_param='direct'.
  select  development category only (bottle): the ambiguous readings of the paper ("Choices where
          the paper is ambiguous" in docs/method.md) are chosen on the development set of
          --mode=tune (esm/dev_set.py: TRAINING images only), scored and chosen by its rule.
          Test labels are never looked at. The choices go to WORKDIR/choices.json; other
          categories reuse them (metal_plate is only reported, never tuned on).
  report  the test split: SGM, ESM, ESM^σ (both time labellings) with all detectors incl. DINO
          S_Cos, the detector ablation, T_d swept over five values (without S_Cos, to fit the CPU
          budget; the T_d of the paper's table reuses the main run's S_U+S_KL+S_RE score), the
          efficiency, and one figure (input, reconstruction, heatmap per method).
Prints one markdown table per stage; WORKDIR/<category>/study.md holds them all.
"""

import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from absl import app
from absl import flags
from absl import logging

from configs.common import override
from esm import config as config_lib
from esm import dev_set
from esm import evaluate as evaluate_lib
from esm import host_memory
from esm import plotting
from esm import run as run_lib
from esm import scoring
from esm import tune
from esm import validate
from experiments.models import DATASETS, MODELS, ROOT
# pylint: enable=g-import-not-at-top,wrong-import-position

DEV_CATEGORY = 'bottle'
DEV_MODELS = ('esm', 'sgm', 'esm_direct')  # trained on the development category
NO_COS = {'features.model': 'none', 'detect.weights': (0.0, 1.0, 1.0, 1.0)}


def base_config(category: str, root: str):
  c = importlib.import_module(f'configs.cpu.{category}').get_config()
  c.data.root = os.path.join(root, DATASETS[category])
  return c


def model_dir(workdir: str, category: str, model: str) -> str:
  return os.path.join(workdir, f'{category}_{model}')


# --- stage: train ---------------------------------------------------------------------------------

def train_models(base, workdir: str, category: str, models) -> dict:
  seconds = {}
  for name in models:
    cfg = override(base, MODELS[name])
    t = time.time()
    logging.info('=== training %s/%s', category, name)
    if not run_lib.run(cfg, model_dir(workdir, category, name), 'train'):
      raise SystemExit(f'{category}/{name}: preempted; rerun the stage to resume')
    seconds[name] = time.time() - t
  return seconds


# --- the development set (training images only: esm/dev_set.py, as --mode=tune builds it) --------

def make_dev_set(base) -> dev_set.DevSet:
  return tune.development_set(config_lib.from_configdict(base))[0]


def dev_score(config_dict, model_wd: str, dev: dev_set.DevSet) -> dict:
  """Development image and pixel AUROC of one reading, with every available detector but S_Cos
  (cross-fitted normalisation, as tuning scores a candidate)."""
  config = config_lib.from_configdict(config_dict)
  rows = dev_set.score_candidate(scoring.Scorer(config, model_wd), dev, stage=1)
  return max(rows, key=lambda r: len(r['detectors']))


# --- evaluation cases ---------------------------------------------------------------------------

class Cases:
  """Evaluations of one category, one JSON line each in WORKDIR/<category>/study.jsonl."""

  def __init__(self, workdir: str, category: str):
    self.dir = os.path.join(workdir, category)
    os.makedirs(self.dir, exist_ok=True)
    self.path = os.path.join(self.dir, 'study.jsonl')
    self.rows = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          row = json.loads(line)
          self.rows[row['case']] = row

  def panels_path(self, case: str) -> str:
    return os.path.join(self.dir, 'panels', case.replace('/', '_').replace(' ', '_') + '.npz')

  def run(self, case: str, config, model_wd: str, *, figure: bool = False) -> dict:
    """Evaluates one case (or returns its stored row); with figure, also stores the kept examples'
    input, reconstruction and combined map."""
    if case in self.rows and (not figure or os.path.exists(self.panels_path(case))):
      logging.info('case %s: done before', case)
      return self.rows[case]
    key = json.dumps([model_wd, config.to_dict()], sort_keys=True, default=list)
    same = next((r for r in self.rows.values() if r.get('key') == key), None)
    if same is not None and not figure:  # another name for a configuration evaluated before
      row = dict(same, case=case)
      self._append(row)
      return row
    typed = config_lib.from_configdict(config)
    validate.validate_config(typed, 'eval')
    t = time.time()
    ev = evaluate_lib.evaluate_outputs(typed, model_wd)
    row = dict(ev.result, case=case, wall_seconds=time.time() - t,
               sigma_time=config.sampling.sigma_time, var_source=config.sampling.var_source,
               re_kind=config.detect.re_kind, var_param=config.model.var_param,
               split=config.data.dataset, key=key)
    if figure:
      idx = sorted(ev.outputs.kept)
      os.makedirs(os.path.dirname(self.panels_path(case)), exist_ok=True)
      np.savez_compressed(
          self.panels_path(case), index=np.asarray(idx),
          input=np.stack([ev.outputs.kept[i]['input'] for i in idx]),
          x0_hat=np.stack([ev.outputs.kept[i]['x0_hat'] for i in idx]),
          map=ev.pixel_maps[idx], mask=ev.outputs.masks[idx],
          defect_type=np.asarray([ev.records[i]['defect_type'] for i in idx]),
          scale=np.percentile(ev.pixel_maps, [1.0, 99.9]))
    if case not in self.rows:
      self._append(row)
    self.rows[case] = row
    logging.info('case %s: image AUROC %.4f, pixel AUROC %.4f (%.0f s)', case, row['image_auroc'],
                 row['pixel_auroc'], row['wall_seconds'])
    return row


  def add(self, row: dict) -> None:
    """Stores a row measured elsewhere (a T_d sweep)."""
    self._append(row)

  def _append(self, row: dict) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps(row, default=float) + '\n')
    self.rows[row['case']] = row


def select(base, workdir: str) -> dict:
  """Chooses the ambiguous readings on the development set, one at a time, in a fixed order, by
  tuning's choice rule (ties go to the first option, the default reading)."""
  dev = make_dev_set(base)
  no_cos = override(base, NO_COS)
  esm_wd = model_dir(workdir, base.data.category, 'esm')
  table = []

  def compare(what: str, options: dict, wd_of=lambda name: esm_wd) -> str:
    rows = {name: dict(dev_score(override(no_cos, changes), wd_of(name), dev), option=name)
            for name, changes in options.items()}
    choice = dev_set.choose(list(rows.values()), base.tune.tie_tolerance)['option']
    for name, row in rows.items():
      table.append((what, name, row, name == choice))
    return choice

  ch = {}
  ch['sigma_time'] = compare('sigma_time', {
      t: {'sampling.method': 'esm_sigma', 'sampling.sigma_time': t} for t in ('literal', 'matched')})
  sigma = {'sampling.method': 'esm_sigma', 'sampling.sigma_time': ch['sigma_time']}
  ch['method'] = compare('method', {'esm': {'sampling.method': 'esm'}, 'esm_sigma': sigma})
  method = {'sampling.method': ch['method'], 'sampling.sigma_time': ch['sigma_time']}
  ch['var_source'] = compare('var_source', {
      v: dict(method, **{'sampling.var_source': v}) for v in ('i1', 't_d', 'mean')})
  chosen = dict(method, **{'sampling.var_source': ch['var_source']})
  ch['re_kind'] = compare('re_kind', {
      r: dict(chosen, **{'detect.re_kind': r}) for r in ('squared', 'absolute')})
  chosen['detect.re_kind'] = ch['re_kind']
  direct_wd = model_dir(workdir, base.data.category, 'esm_direct')
  if os.path.isdir(os.path.join(direct_wd, 'checkpoints')):
    ch['var_param'] = compare(
        'var_param', {v: dict(chosen, **{'model.var_param': v}) for v in ('scaled', 'direct')},
        wd_of=lambda v: esm_wd if v == 'scaled' else direct_wd)
  else:
    logging.warning('%s: not trained; model.var_param stays scaled (not compared)', direct_wd)
    ch['var_param'] = 'scaled'

  with open(os.path.join(workdir, 'choices.json'), 'w') as f:
    json.dump(ch, f, indent=1)
  lines = ['| choice | option | dev image AUROC | dev pixel AUROC | chosen |', '|---|---|---|---|---|']
  lines += [f"| {w} | {n} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {'yes' if c else ''} |"
            for w, n, r, c in table]
  return ch, '\n'.join(lines)


def chosen_overrides(choices: dict) -> dict:
  return {'sampling.sigma_time': choices['sigma_time'], 'sampling.var_source': choices['var_source'],
          'detect.re_kind': choices['re_kind'], 'model.var_param': choices['var_param']}


def sweep_values(t_d: int) -> list:
  return sorted({max(1, round(t_d * f)) for f in (0.25, 0.5, 1.0, 1.5, 2.0)})


def report(base, workdir: str, cases: Cases, choices: dict, figure_path: str,
           sweep_names=('SGM', 'ESM')) -> str:
  category = base.data.category
  esm_model = 'esm' if choices['var_param'] == 'scaled' else 'esm_direct'
  test = override(base, dict(chosen_overrides(choices), **{'eval.figures_per_type': 1}))
  wd = {'sgm': model_dir(workdir, category, 'sgm'), 'esm': model_dir(workdir, category, esm_model)}
  sgm_cfg = override(test, dict(MODELS['sgm'], **{'model.var_param': 'scaled'}))
  methods = {  # name -> (model, overrides)
      'SGM': ('sgm', {}),
      'ESM': ('esm', {'sampling.method': 'esm'}),
      'ESM^σ literal': ('esm', {'sampling.method': 'esm_sigma', 'sampling.sigma_time': 'literal'}),
      'ESM^σ matched': ('esm', {'sampling.method': 'esm_sigma', 'sampling.sigma_time': 'matched'}),
  }
  main = {}
  for name, (model, changes) in methods.items():
    cfg = override(sgm_cfg if model == 'sgm' else test, changes)
    main[name] = cases.run(f'test/{name}', cfg, wd[model], figure=True)

  _figure(cases, list(methods), figure_path)

  t_d0 = base.sampling.t_d
  sweep = {}
  sweep_methods = {name: methods[name] for name in sweep_names}
  for name, (model, changes) in sweep_methods.items():
    for t_d in sweep_values(t_d0):
      if t_d == t_d0:  # the main run's detectors without S_Cos: the same maps and weights
        no_cos = [a for a in main[name]['ablation'] if 'cos' not in a['detectors']]
        sweep[(name, t_d)] = max(no_cos, key=lambda a: len(a['detectors']))
        continue
      case = f'test/sweep/{name}/t_d={t_d}'
      if case not in cases.rows:
        cfg = config_lib.from_configdict(override(sgm_cfg if model == 'sgm' else test,
                                                  dict(NO_COS, **changes)))
        candidate = {'method': cfg.sampling.method, 't_d': t_d, 'weights': cfg.detect.weights}
        [row] = evaluate_lib.sweep(cfg, wd[model], [candidate])
        cases.add(dict(row, case=case))
      sweep[(name, t_d)] = cases.rows[case]

  return _tables(category, main, sweep, sweep_methods, t_d0)


def _tables(category, main, sweep, sweep_methods, t_d0) -> str:
  out = [f'### {category}: test split, T_d = {t_d0} (T = 250), all detectors incl. DINO S_Cos', '',
         '| method | image AUROC | pixel AUROC | AUPRO | params | NFE | s/image | eval wall (s) |',
         '|---|---|---|---|---|---|---|---|']
  for name, r in main.items():
    out.append(f"| {name} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
               f"{r['params'] / 1e6:.2f} M | {r['nfe']} | {r['seconds_per_image']:.2f} | "
               f"{r['wall_seconds']:.0f} |")
  out += ['', f'### {category}: detector ablation (image / pixel AUROC)', '']
  names = list(main)
  subsets = {tuple(a['detectors']) for r in main.values() for a in r['ablation']}
  out.append('| detectors | ' + ' | '.join(names) + ' |')
  out.append('|---|' + '---|' * len(names))
  for subset in sorted(subsets, key=lambda s: (len(s), s)):
    cells = []
    for n in names:
      a = next((a for a in main[n]['ablation'] if tuple(a['detectors']) == subset), None)
      cells.append(f"{a['image_auroc']:.3f} / {a.get('pixel_auroc', float('nan')):.3f}" if a else '–')
    out.append(f"| {'+'.join(subset)} | " + ' | '.join(cells) + ' |')
  out += ['', f'### {category}: AUROC against T_d (image / pixel; no S_Cos: S_U+S_KL+S_RE for '
          'ESM, S_RE for SGM)', '']
  t_ds = sorted({t for _, t in sweep})
  out.append('| method | ' + ' | '.join(f'T_d={t}' for t in t_ds) + ' |')
  out.append('|---|' + '---|' * len(t_ds))
  for name in sweep_methods:
    cells = [f"{sweep[(name, t)]['image_auroc']:.3f} / {sweep[(name, t)]['pixel_auroc']:.3f}"
             for t in t_ds]
    out.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(out)


def _figure(cases: Cases, methods: list, path: str) -> None:
  """Rows: the first examples of each defect type; columns: input, ground truth, then the
  reconstruction and the combined map of each method (colour scale per method: its maps' 1st to
  99.9th percentile over the test split)."""
  panels = {m: np.load(cases.panels_path(f'test/{m}')) for m in methods}
  first = panels[methods[0]]
  rows = []
  for k in range(len(first['index'])):
    tiles = [plotting.to_uint8(first['input'][k], -1, 1), first['mask'][k] * 255]
    titles, ranges = [str(first['defect_type'][k]), 'truth'], [None, None]
    for m in methods:
      p = panels[m]
      lo, hi = p['scale']
      tiles += [plotting.to_uint8(p['x0_hat'][k], -1, 1), plotting.heatmap(p['map'][k], lo, hi)]
      titles += [m, 'map']
      ranges += [None, (float(lo), float(hi))]
    rows.append(plotting.to_image(plotting.image_row(tiles, titles, 2, ranges)))
  plotting.save(plotting.stack_rows(rows), path)
  logging.info('figure: %s', path)


_CATEGORY = flags.DEFINE_enum('category', None, sorted(DATASETS), 'Category to study.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder of the study (resumable).')
_STAGES = flags.DEFINE_list('stages', ['train', 'select', 'report'], 'Stages to run.')
_FIGURE = flags.DEFINE_string('figure', '', 'Default docs/figures/study_<category>.png.')
_SWEEP = flags.DEFINE_list('sweep', ['SGM', 'ESM'], 'Methods whose AUROC is swept over T_d.')
flags.mark_flags_as_required(['category', 'root', 'workdir'])


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # as main.py, before XLA starts
  stages, workdir, category = _STAGES.value, _WORKDIR.value, _CATEGORY.value
  base = base_config(category, ROOT.value)
  dev = category == DEV_CATEGORY
  cases = Cases(workdir, category)
  sections = []
  if 'train' in stages:
    models = list(DEV_MODELS) if dev else ['esm', 'sgm']
    if not dev and os.path.exists(os.path.join(workdir, 'choices.json')):
      with open(os.path.join(workdir, 'choices.json')) as f:
        models = ['esm_direct' if json.load(f)['var_param'] == 'direct' else 'esm', 'sgm']
    train_models(base, workdir, category, models)
  choices_path = os.path.join(workdir, 'choices.json')
  if 'select' in stages and dev:
    _, table = select(base, workdir)
    sections.append(f'### {DEV_CATEGORY}: choices on the development set (training images only)\n\n'
                    + table)
  if 'report' in stages:
    if not os.path.exists(choices_path):
      raise SystemExit(f'{choices_path}: run the select stage on {DEV_CATEGORY} first')
    with open(choices_path) as f:
      choices = json.load(f)
    figure = _FIGURE.value or os.path.join('docs', 'figures', f'study_{category}.png')
    sections.append(report(base, workdir, cases, choices, figure, _SWEEP.value))
  text = '\n\n'.join(sections)
  with open(os.path.join(cases.dir, 'study.md'), 'a') as f:
    f.write(text + '\n\n')
  print(text)


if __name__ == '__main__':
  app.run(main)
