"""experiments/evidence.py's report: budget curves, seeds, paired bootstrap intervals, choices.

Test labels are read only here, after every choice is made.
"""

import math
import os
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from esm import metrics
from experiments.evidence_layout import FLOOR_OF, FLOORS, SAMPLER_OF, Layout, methods_of, read_json
from experiments.models import is_single_stream

# Differences reported with an interval: (a, b) as model/method names.
COMPARISONS = (('esm/esm', 'sgm/sgm'), ('esm/esm_sigma', 'esm/esm'), ('esm/esm_sigma', 'sgm/sgm'),
               ('esm/esm_sigma_beta', 'esm/esm_sigma_const'), ('esm/sgm', 'sgm/sgm'),
               ('hybrid/esm', 'sgm/sgm'), ('hybrid/esm', 'esm/esm'), ('hybrid/sgm', 'sgm/sgm'))


class Row(NamedTuple):
  image: float
  pixel: float
  t_d: int
  weights: tuple
  labels: np.ndarray
  scores: np.ndarray


def load_row(layout: Layout, category, model, seed, step, method) -> Optional[Row]:
  if method == 'esm_sigma':  # the reading the development set prefers
    if not all(os.path.exists(layout.tuned_path(category, model, seed, step, f)) for f in FLOORS):
      return None
    floor = layout.preferred_floor(category, model, seed, step)
    method = {v: k for k, v in FLOOR_OF.items()}[floor]
  view = layout.step_dir(category, model, seed, step, method)
  path = os.path.join(view, 'report', 'results.json')
  if not os.path.exists(path):
    return None
  result = read_json(path)[category]  # results.json: {category: result row}
  table = np.genfromtxt(os.path.join(view, 'report', 'scores.csv'), delimiter=',', names=True,
                        dtype=None, encoding='utf-8')
  return Row(result['image_auroc'], result['pixel_auroc'], result['t_d'],
             tuple(result.get('weights', ())), np.asarray(table['label']),
             np.asarray(table['score'], float))


def rows_at(layout: Layout, category, model, method, step, seeds) -> Dict[int, Row]:
  rows = {s: load_row(layout, category, model, s, step, method) for s in seeds}
  return {s: r for s, r in rows.items() if r is not None}


def fmt(x: float) -> str:
  return '–' if x is None or not np.isfinite(x) else f'{x:.3f}'


def dev_score(layout: Layout, category, model, seed, step, method) -> Optional[float]:
  """The development-set score (mean of image and pixel AUROC) the tuning gave `method`."""
  if method == 'esm_sigma':
    scores = [dev_score(layout, category, model, seed, step, m) for m in FLOOR_OF]
    return None if None in scores else max(scores)
  path = layout.tuned_path(category, model, seed, step, FLOOR_OF.get(method, 'constant'))
  if not os.path.exists(path):
    return None
  return read_json(path)['by_method'][SAMPLER_OF.get(method, method)]['score']


def budget_table(layout: Layout, category: str, development: bool) -> List[str]:
  """Seed 0 at each budget: the development score (what a budget is chosen on) or the test
  image / pixel AUROC."""
  budgets = layout.budgets_of(0)
  lines = ['| model / method | ' + ' | '.join(f'{b} steps' for b in budgets) + ' |',
           '|---|' + '---|' * len(budgets)]
  for model in layout.models_of(category):
    for method in methods_of(model, reported=True):
      cells = []
      for step in budgets:
        if development:
          cells.append(fmt(dev_score(layout, category, model, 0, step, method)))
        else:
          row = load_row(layout, category, model, 0, step, method)
          cells.append(f'{fmt(row.image)} / {fmt(row.pixel)} (T_d {row.t_d})' if row else '')
      lines.append(f'| {model} / {method} | ' + ' | '.join(cells) + ' |')
  return lines


def seed_table(layout: Layout, category: str, step: int, seeds) -> List[str]:
  lines = ['| model / method | seeds | image AUROC mean ± sd | pixel AUROC mean ± sd | T_d per seed |',
           '|---|---|---|---|---|']
  for model in layout.models_of(category):
    for method in methods_of(model, reported=True):
      rows = rows_at(layout, category, model, method, step, seeds)
      if not rows:
        continue
      img = np.array([r.image for r in rows.values()])
      pix = np.array([r.pixel for r in rows.values()])
      sd = lambda x: float(np.std(x, ddof=1)) if x.size > 1 else math.nan
      lines.append(f'| {model} / {method} | {len(rows)} | {fmt(img.mean())} ± {fmt(sd(img))} | '
                   f'{fmt(pix.mean())} ± {fmt(sd(pix))} | '
                   f'{", ".join(str(r.t_d) for r in rows.values())} |')
  return lines


def interval_table(layout: Layout, category: str, step: int, seeds, resamples: int) -> List[str]:
  lines = ['| a − b (image AUROC) | seeds | difference | 95% CI | P(a ≤ b) |', '|---|---|---|---|---|']
  for a, b in COMPARISONS:
    (ma, ka), (mb, kb) = a.split('/'), b.split('/')
    if ma not in layout.models_of(category) or mb not in layout.models_of(category):
      continue
    ra = rows_at(layout, category, ma, ka, step, seeds)
    rb = rows_at(layout, category, mb, kb, step, seeds)
    common = sorted(set(ra) & set(rb))
    if not common:
      continue
    labels = ra[common[0]].labels
    result = metrics.paired_bootstrap_auroc_difference(
        np.stack([ra[s].scores for s in common]), np.stack([rb[s].scores for s in common]), labels,
        num_resamples=resamples)
    lines.append(f'| {a} − {b} | {len(common)} | {result["difference"]:+.3f} | '
                 f'[{result["lo"]:+.3f}, {result["hi"]:+.3f}] | {result["p_not_better"]:.3f} |')
  return lines


def choice_table(layout: Layout, category: str, step: int, seeds) -> List[str]:
  """What the development set chose: ESM^σ's floor and each method's detector weights."""
  lines = ['| model | seed | ESM^σ dev score const / β → floor | chosen method | '
           'weights (cos, u, kl, re) per method |', '|---|---|---|---|---|']
  for model in layout.models_of(category):
    for seed in seeds:
      path = layout.tuned_path(category, model, seed, step)
      if not os.path.exists(path):
        continue
      tuned = read_json(path)
      weights = '; '.join(f'{m}: ' + ','.join(f'{w:g}' for w in v['weights'])
                          for m, v in tuned['by_method'].items())
      floor = ''
      beta_path = layout.tuned_path(category, model, seed, step, 'beta')
      if not is_single_stream(model) and os.path.exists(beta_path):
        beta = read_json(beta_path)['by_method']['esm_sigma']
        floor = (f'{tuned["by_method"]["esm_sigma"]["score"]:.3f} / {beta["score"]:.3f} → '
                 f'{layout.preferred_floor(category, model, seed, step)}')
      lines.append(f'| {model} | {seed} | {floor} | {tuned["method"]} | {weights} |')
  return lines


def detector_table(layout: Layout, category: str, step: int, seeds) -> List[str]:
  """Development-set score (mean image/pixel AUROC) of the best detector subset with and without
  S_KL and S_Cos, at each method's chosen T_d; mean over seeds."""
  lines = ['| model / method | seeds | best with S_KL / without | best with S_Cos / without |',
           '|---|---|---|---|']
  for model in layout.models_of(category):
    tuned = [read_json(layout.tuned_path(category, model, s, step)) for s in seeds
             if os.path.exists(layout.tuned_path(category, model, s, step))]
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


def report(layout: Layout, finished: int, num_jobs: int, resamples: int) -> str:
  """WORKDIR/evidence.md's text, `finished` of the `num_jobs` jobs done."""
  seeds = [int(s) for s in layout.seeds]
  step = layout.budgets_of(1)[0]
  parts = ['# Evidence: ESM vs ESM^σ vs SGM at CPU scale', '',
           f'{finished} of {num_jobs} jobs finished (models {",".join(layout.models)}, seeds '
           f'{",".join(layout.seeds)}, budgets {",".join(layout.budgets)}); empty cells are pending.',
           '',
           'Image / pixel AUROC on the test split, each method at the T_d and detector weights its '
           'development set chose (held-out training images; esm/tune.py).', '']
  for category in layout.categories:
    parts += [f'## {category}', '',
              '### Budget curve on the development set (seed 0; mean of image and pixel AUROC)', '',
              *budget_table(layout, category, development=True), '',
              '### Budget curve on the test split (seed 0; image / pixel AUROC)', '',
              *budget_table(layout, category, development=False), '',
              f'### Seeds at {step} steps', '', *seed_table(layout, category, step, seeds), '',
              f'### Paired bootstrap over test images, pooled over seeds ({resamples} '
              'resamples)', '', *interval_table(layout, category, step, seeds, resamples), '',
              f'### Development-set choices at {step} steps', '',
              *choice_table(layout, category, step, seeds), '',
              f'### Detectors on the development set at {step} steps (ESM^σ: constant floor)', '',
              *detector_table(layout, category, step, seeds), '']
  return '\n'.join(parts)
