"""The benchmark report: results.json/.csv, report.md (paper-style tables) and figures/."""

import csv
import json
import math
import os
from typing import Any, Dict, List, Optional

import numpy as np
from absl import logging

from esm import files
from esm import metrics
from esm import plotting
from esm.detectors import DETECTORS

COLUMNS = ('category', 'image_auroc', 'pixel_auroc', 'aupro', 'pixel_ap', 'image_f1_max', 'nfe',
           'seconds_per_image', 'params', 'method', 't_d')


def _pct(value) -> str:
  """A metric in [0, 1] as the paper prints it (percent, one decimal), NaN as n/a."""
  return 'n/a' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{100 * value:.1f}'


def _json_safe(obj):
  if isinstance(obj, float) and math.isnan(obj):
    return None
  if isinstance(obj, dict):
    return {k: _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    return _json_safe(obj.item())
  return obj


def write_csv(path: str, header, rows) -> None:
  with files.atomic_path(path) as tmp:
    with open(tmp, 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(header)
      writer.writerows(rows)


def _mean(values) -> float:
  values = [v for v in values if v is not None and not math.isnan(v)]
  return float(np.mean(values)) if values else float('nan')


def settings(result: Dict[str, Any]) -> str:
  """Sampler, T_d and detector weights with where each came from (tuned, paper table, ...)."""
  source = result.get('settings_source', {})
  tag = lambda field: f" ({source[field]})" if field in source else ''
  weights = ', '.join(f'{w:g}' for w in result.get('weights', ()))
  floor = (f", floor {result['sigma_floor']}{tag('sampling.sigma_floor')}"
           if 'sigma_floor' in result else '')
  return (f"{result['method']}{tag('sampling.method')}, T_d {result['t_d']}{tag('sampling.t_d')}"
          f"{floor}, weights ({weights}){tag('detect.weights')}")


def results_table(results: List[Dict[str, Any]]) -> str:
  """Image/pixel AUROC per category with a mean row, as in paper tables 1-3, and the settings
  (with their source) that each row was measured with."""
  lines = ['| Category | image/pixel AUROC | AUPRO | NFE | s/image | settings |',
           '|---|---|---|---|---|---|']
  for r in results:
    lines.append(f"| {r['category']} | {_pct(r['image_auroc'])}/{_pct(r['pixel_auroc'])} | "
                 f"{_pct(r['aupro'])} | {r['nfe']} | {r['seconds_per_image']:.3f} | {settings(r)} |")
  if len(results) > 1:
    lines.append(f"| **Mean** | {_pct(_mean(r['image_auroc'] for r in results))}/"
                 f"{_pct(_mean(r['pixel_auroc'] for r in results))} | "
                 f"{_pct(_mean(r['aupro'] for r in results))} | | | |")
  return '\n'.join(lines)


def tuning_table(tuned: Dict[str, Any], sweep: Optional[List[Dict[str, Any]]]) -> str:
  """Development score per sampler and T_d (best detector subset each), and beside it the test
  AUROC of the same candidate when it was swept: for the reader, never for a choice."""
  best = {}
  for c in tuned['candidates']:
    key = (c['method'], c['t_d'])
    if key not in best or c['score'] > best[key]['score']:
      best[key] = c
  tested = {(r['method'], r['t_d']): r for r in sweep or []}
  lines = ['| sampler | T_d | best detectors (dev) | dev image / pixel AUROC | test image / pixel '
           'AUROC |', '|---|---|---|---|---|']
  for (method, t_d), c in sorted(best.items()):
    t = tested.get((method, t_d))
    chosen = ' **chosen**' if (method, t_d) == (tuned['method'], tuned['t_d']) else ''
    lines.append(f"| {method}{chosen} | {t_d} | {'+'.join(c['detectors'])} | "
                 f"{_pct(c['image_auroc'])} / {_pct(c['pixel_auroc'])} | "
                 + (f"{_pct(t['image_auroc'])} / {_pct(t['pixel_auroc'])} |" if t else '– |'))
  return '\n'.join(lines)


def ablation_table(result: Dict[str, Any]) -> str:
  """Every subset of the used detectors, as in paper table 5."""
  used = result['detectors']
  head = ' | '.join(DETECTORS[d].label for d in used)
  lines = [f'| {head} | image AUROC | pixel AUROC |', '|' + '---|' * (len(used) + 2)]
  for row in result['ablation']:
    marks = ' | '.join('x' if d in row['detectors'] else '' for d in used)
    lines.append(f"| {marks} | {_pct(row['image_auroc'])} | {_pct(row.get('pixel_auroc'))} |")
  return '\n'.join(lines)


def markdown(results: List[Dict[str, Any]]) -> str:
  parts = ['# Anomaly detection report', '', results_table(results), '']
  for r in results:
    parts += [f"## {r['dataset']} / {r['category']}", '',
              f"{settings(r)}, NFE = {r['nfe']}, parameters = {r['params']:,}, "
              f"checkpoint step {r['checkpoint_step']}, {r['num_test_images']} test images, "
              f"{r['seconds_per_image']:.3f} s/image (compilation {r['compile_seconds']:.1f} s excluded)",
              '', f"image AP {_pct(r['image_ap'])}, image F1-max {_pct(r['image_f1_max'])}, "
              f"pixel AP {_pct(r['pixel_ap'])}", '']
    for name, reason in r['unavailable_detectors'].items():
      parts.append(f'- {DETECTORS[name].label}: {reason}')
    parts += ['', '### Detector ablation', '', ablation_table(r), '']
  return '\n'.join(parts)


def tuning_section(result: Dict[str, Any], tuned: Dict[str, Any]) -> str:
  c = tuned['criterion']
  dev = tuned['dev_set']
  return '\n'.join([
      '### Label-free tuning (DIR/tuned.json)', '',
      f"Chosen on {dev['images']} development images ({dev['held_out_images']} held-out train/good "
      f"images, clean and with {dev['painted']} painted defects: {', '.join(dev['defect_kinds'])}), "
      f"{dev['folds']}-fold cross-fitted normalisation, by the {c['name']}: {tuned['method']}, "
      f"T_d = {tuned['t_d']}, weights {tuple(tuned['weights'])} (dev image {_pct(c['image_auroc'])}, "
      f"pixel {_pct(c['pixel_auroc'])}). Test columns, when present, come from eval.sweep_t_d and "
      'were never used for a choice.', '', tuning_table(tuned, result.get('t_d_sweep')), ''])


def write_tables(results: List[Dict[str, Any]], report_dir: str, extra: str = '') -> None:
  os.makedirs(report_dir, exist_ok=True)
  files.write_text(os.path.join(report_dir, 'results.json'),
                   json.dumps({r['category']: _json_safe(r) for r in results}, indent=2))
  write_csv(os.path.join(report_dir, 'results.csv'), COLUMNS,
            [['' if isinstance(r[c], float) and math.isnan(r[c]) else r[c] for c in COLUMNS]
             for r in results])
  files.write_text(os.path.join(report_dir, 'report.md'), markdown(results) + extra)
  logging.info('report written to %s\n%s', report_dir, results_table(results))


def write_combined(results: List[Dict[str, Any]], workdir: str) -> None:
  """One table over every evaluated category (paper tables 1-3)."""
  write_tables(results, os.path.join(workdir, 'report'))


def _image(x) -> np.ndarray:
  return plotting.to_uint8(x, -1.0, 1.0)


def write_category(result, report_dir, records, out, pixel_maps, scores, tuned=None) -> None:
  """Tables and figures of one category (with the tuning's, when DIR/tuned.json exists)."""
  write_tables([result], report_dir, tuning_section(result, tuned) if tuned else '')
  write_image_scores(os.path.join(report_dir, 'scores.csv'), records, out.labels, scores)
  fig_dir = os.path.join(report_dir, 'figures')
  os.makedirs(fig_dir, exist_ok=True)
  scale = max(1, 128 // pixel_maps.shape[1])
  map_range = (float(np.percentile(pixel_maps, 1)), float(np.percentile(pixel_maps, 99.9)))
  rows = []
  for idx in sorted(out.kept):
    r = records[idx]
    row = plotting.to_image(example_row(out.kept[idx], f"{r['defect_type']} {scores[idx]:.2f}",
                                        pixel_maps[idx], out.masks[idx], map_range, scale))
    plotting.save(row, os.path.join(fig_dir, f"example_{idx:04d}_{r['defect_type']}.png"))
    rows.append(row)
  if rows:
    plotting.save(plotting.stack_rows(rows), os.path.join(fig_dir, 'examples.png'))
  if out.trajectory is not None and len(out.trajectory['snapshots']):
    plotting.save(trajectory_figure(out.trajectory, scale), os.path.join(fig_dir, 'trajectory.png'))
  curves = {}
  if len(set(out.labels.tolist())) == 2:
    curves[f"image AUROC {_pct(result['image_auroc'])}"] = metrics.roc_curve(scores, out.labels)
  if out.masks.any() and not out.masks.all():
    curves[f"pixel AUROC {_pct(result['pixel_auroc'])}"] = metrics.roc_curve(
        pixel_maps.ravel(), out.masks.ravel())
  if tuned:
    plotting.save(tuning_figure(tuned, result.get('t_d_sweep')), os.path.join(fig_dir, 'tuning.png'))
  if curves:
    plotting.save(plotting.roc_plot(curves, f"ROC {result['category']} ({result['method']})"),
                  os.path.join(fig_dir, 'roc.png'))


def example_row(kept: Dict[str, np.ndarray], title: str, pixel_map, mask, map_range, scale: int):
  """Input, reconstruction, log10 σ²_0 (only for a model that predicts a variance), the anomaly
  map on the category's colour scale, and the ground-truth mask."""
  panels = [(_image(kept['input']), title, None), (_image(kept['x0_hat']), 'reconstruction', None)]
  var0 = kept['var0'].mean(-1)
  if np.isfinite(var0).all():  # an SGM sampler has no σ²_0: no panel rather than a blank one
    log_var0 = np.log10(np.maximum(var0, 1e-12))
    var_range = (float(log_var0.min()), float(log_var0.max()))
    panels.append((plotting.heatmap(log_var0, *var_range), 'log10 σ²₀', var_range))
  panels += [(plotting.heatmap(pixel_map, *map_range), 'anomaly map', map_range),
             ((mask * 255).astype(np.uint8), 'mask', None)]
  images, titles, ranges = zip(*panels)
  return plotting.image_row(images, titles, scale, ranges)


def tuning_figure(tuned, sweep):
  """Development image AUROC against T_d per sampler (solid), and the test sweep's (dashed, in the
  sampler's colour) beside it."""
  curves, styles = {}, {}
  for k, method in enumerate(tuned['methods']):
    rows = [c for c in tuned['candidates'] if c['method'] == method]
    grid = sorted({c['t_d'] for c in rows})
    curves[f'dev, {method}'] = (grid, [max(c['image_auroc'] for c in rows if c['t_d'] == t)
                                       for t in grid])
    styles[f'dev, {method}'] = {'color': f'C{k}'}
    tested = sorted((r['t_d'], r['image_auroc']) for r in sweep or [] if r['method'] == method)
    if tested:
      curves[f'test, {method}'] = tuple(zip(*tested))
      styles[f'test, {method}'] = {'color': f'C{k}', 'linestyle': '--'}
  return plotting.line_plot(curves, 'image AUROC against T_d', 'T_d', 'image AUROC', ylim=(0, 1),
                            integer_x=True, styles=styles)


def write_image_scores(path: str, records, labels, scores) -> None:
  """One row per test image, in example order: filename, defect type, label, image score."""
  write_csv(path, ['filename', 'defect_type', 'label', 'score'],
            [[r['filename'], r['defect_type'], int(label), f'{float(score):.8g}']
             for r, label, score in zip(records, labels, scores)])


def trajectory_figure(traj: Dict[str, np.ndarray], scale: int):
  """x_i along the denoising with the σ² (min, max) each step used, as in paper Fig. 3."""
  ranges = dict(zip(traj['steps'].tolist(), traj['var_range'].tolist()))
  panels, titles = [], []
  for step, snap in zip(traj['snapshot_steps'].tolist(), traj['snapshots']):
    rng = ranges.get(step) or ranges.get(min(ranges, key=lambda s: abs(s - step)))
    panels.append(_image(snap))
    titles.append(f't={step}, σ² {rng[0]:.2g}–{rng[1]:.2g}')
  return plotting.image_row(panels, titles, scale)
