"""The stage dev_area of experiments/regret.py: does the size of the development defects decide
which T_d tuning asks for? (docs/results.md, "Tuning regret").

For a trained run and each range of region areas (tune.defect_area, fractions of the image): the
development set drawn with it, the first stage of tuning on it (every sampler and T_d of the grid,
no S_Cos) and the noise-aware rule's decision there (RuleOptions()); beside each point's
development AUROCs, its test image and pixel AUROC (from regret's evaluate stage: the same
detectors, S_RE alone for SGM), and Kendall's τ between the development criterion and each test
metric over the points. Nothing is chosen from the test split. Each point's development scores
are kept in the run's tune_progress/ (keyed by the set), so a rerun resumes.
"""

from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from esm import choice
from esm import dev_set
from esm import resample
from esm import tune
from esm.config import Config

REGION_FAMILIES = ('field', 'patch', 'cutpaste')  # the families whose size tune.defect_area sets
AREAS = ((0.003, 0.02), (0.02, 0.15), (0.08, 0.3))  # small, the default, large


def parse_area(text: str) -> Tuple[float, float]:
  low, high = (float(x) for x in text.split(':'))
  return low, high


def run_area(config: Config, workdir: str, restored,
             test_of: Callable[[tune.Point, Sequence[str]], List[float]]) -> Dict[str, Any]:
  """The first stage of tuning on the development set of config (its tune.defect_area), the rule's
  decision, and each point's test [image, pixel] AUROC from test_of(point, detectors)."""
  area = config.tune.defect_area
  dev, normal = tune.development_set(config)
  model_free = dev_set.model_free(dev, normal.stats)
  rows, scores = tune.score_points(config, workdir, dev, restored, None,
                                   tune.first_stage_points(config), 1)
  decision, table = tune.decide(config, rows, scores, dev, model_free, False, choice.RuleOptions(),
                                grid=tune.noise_aware_grid(config))
  kept = decision['kept']
  by_metric = {m: [e for e in kept if table.entries[e][1] == m] for m in choice.METRICS}
  points = []
  for i, c in enumerate(rows):
    points.append({
        'point': list(tune.point_of(c)), 'detectors': c['detectors'],
        'dev_criterion': float(np.mean(table.point[i, kept])) if kept else float('nan'),
        **{f'dev_{m}': float(np.mean(table.point[i, e])) if e else float('nan')
           for m, e in by_metric.items()},
        'test': test_of(tune.point_of(c), c['detectors'])})
  criterion = [p['dev_criterion'] for p in points]
  summary = dev_set.summary(dev)['families']
  return {
      'area': list(area), 'families': summary,
      'region_mask_share': float(np.mean([summary[f]['mask_share'] for f in REGION_FAMILIES
                                          if f in summary])),
      'model_free': model_free['all'], 'entries_left_out': decision['left_out'],
      'choice': decision['index'], 'leader': decision.get('leader', decision['index']),
      'band': decision['band'],
      'reason': decision['reason'], 'points': points,
      'kendall_tau': [resample.kendall_tau(criterion, [p['test'][m] for p in points])
                      for m in range(len(choice.METRICS))]}


def _t_d(result, i) -> int:
  return result['points'][i]['point'][1]


def markdown(results: Dict[str, List[Dict[str, Any]]]) -> str:
  lines = ['| run | defect area | region mask share | model-free pixel AUROC | leader T_d | band '
           '(T_d) | choice | best on test, image / pixel | τ image / pixel |',
           '|---|---|---|---|---|---|---|---|---|']
  for name, per_area in results.items():
    for r in per_area:
      test = np.array([p['test'] for p in r['points']])
      best = [_t_d(r, int(np.nanargmax(test[:, m]))) if np.isfinite(test[:, m]).any() else '–'
              for m in range(2)]
      lines.append(
          f"| {name} | {r['area'][0]:g}-{r['area'][1]:g} | {r['region_mask_share']:.3f} | "
          f"{r['model_free']['pixel_auroc']:.3f} | {_t_d(r, r['leader'])} | "
          f"{', '.join(str(t) for t in sorted({_t_d(r, i) for i in r['band']}))} | "
          f"{_t_d(r, r['choice'])} | {best[0]} / {best[1]} | "
          f"{r['kendall_tau'][0]:+.2f} / {r['kendall_tau'][1]:+.2f} |")
  lines += ['', 'Development criterion (mean AUROC over the entries used) at each T_d, and the test '
            'image / pixel AUROC there:', '']
  for name, per_area in results.items():
    t_ds = [p['point'][1] for p in per_area[0]['points']]
    lines += [f'{name}:', '', '| | ' + ' | '.join(f'T_d {t}' for t in t_ds) + ' |',
              '|---|' + '---|' * len(t_ds)]
    for r in per_area:
      lines.append(f"| area {r['area'][0]:g}-{r['area'][1]:g} | "
                   + ' | '.join(f"{p['dev_criterion']:.3f}" for p in r['points']) + ' |')
    lines.append('| test | ' + ' | '.join(f"{p['test'][0]:.3f} / {p['test'][1]:.3f}"
                                          for p in per_area[0]['points']) + ' |')
    lines.append('')
  return '\n'.join(lines)
