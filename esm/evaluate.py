"""--mode=eval: score the test split with a Scorer (esm/scoring.py), measure, write the report.

The normalisation is fitted on the held-out train/good images, which also give DIR/detector.json's
thresholds (esm/detector_state.py); the test split is reconstructed once, and every detector subset
(the ablation) is scored from the same maps.
"""

import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
from absl import logging

from datasets import pipeline
from esm import baselines
from esm import detector_state
from esm import detectors as det
from esm import metrics
from esm import parallel
from esm import report
from esm import resample
from esm import scoring
from esm import tuned as tuned_lib
from esm.config import Config

EVIDENCE_FILE = 'evidence.npz'  # in the report folder: esm/resample.py save_evidence's format
METHOD_ENTRY = 'model'  # the evaluated method's entry in it; the baselines go by their names


def _figure_indices(records: List[Dict[str, Any]], per_type: int) -> List[int]:
  by_type: Dict[str, List[int]] = {}
  for k, r in enumerate(records):
    by_type.setdefault(r['defect_type'], []).append(k)
  return sorted(i for idx in by_type.values() for i in idx[:per_type])


@dataclasses.dataclass
class Evaluation:
  """One evaluation: the result row plus the per-image outputs the report and figures use."""
  result: Dict[str, Any]
  records: List[Dict[str, Any]]  # test records, in example order
  outputs: scoring.SplitOutputs
  pixel_maps: np.ndarray  # [N,H,W] combined anomaly maps
  scores: np.ndarray  # [N] image scores
  state: Dict[str, Any]  # DIR/detector.json: what predict, the API and export read


def evaluate(config: Config, workdir: str, report_dir: Optional[str] = None) -> Dict[str, Any]:
  """--mode=eval: evaluates the latest checkpoint on the test split and writes the report (default
  workdir/report/) and DIR/detector.json; returns the result row. With DIR/tuned.json the report
  shows the development curve and, with eval.sweep_t_d, the test AUROC of every tuning candidate
  beside it (for the reader only)."""
  ev = evaluate_outputs(config, workdir)
  ev.result['settings_source'] = tuned_lib.settings_source(config, workdir)
  ev.result['baselines'], baseline_outputs = evaluate_baselines(config, workdir, ev.outputs)
  tuned = tuned_lib.load(workdir)
  if tuned is not None and config.eval.sweep_t_d:
    ev.result['t_d_sweep'] = sweep_tuning_candidates(config, workdir, tuned)
  if jax.process_index() == 0:
    report_dir = report_dir or os.path.join(workdir, 'report')
    report.write_category(ev.result, report_dir, ev.records, ev.outputs, ev.pixel_maps, ev.scores,
                          tuned=tuned)
    if ev.outputs.masks.any():
      write_evidence(os.path.join(report_dir, EVIDENCE_FILE), ev,
                     {METHOD_ENTRY: (ev.pixel_maps, ev.scores), **baseline_outputs})
  return ev.result


def write_evidence(path: str, ev: Evaluation, outputs: Dict[str, Tuple[np.ndarray, np.ndarray]]):
  """Per entry (the method, each baseline): its image scores and the pixel pairs of its maps
  against the test masks, which a paired bootstrap over test images needs (esm/resample.py)."""
  names = list(outputs)
  resample.save_evidence(path, [[n] for n in names], [outputs[n][1] for n in names],
                         [resample.pixel_pairs(outputs[n][0], ev.outputs.masks) for n in names],
                         ev.outputs.labels)


def evaluate_baselines(config: Config, workdir: str, outputs: scoring.SplitOutputs):
  """The model-free baselines on the same test split, with the same metrics; a baseline trained
  before this workdir had one is fitted now, on the training images. Returns the result rows and
  each available baseline's (pixel maps, image scores)."""
  baselines.fit_missing(config, workdir, lambda: pipeline.get_eval_data(
      config.data, 'train', global_batch_size=config.eval.batch_size))
  test = pipeline.get_eval_data(config.data, 'test', global_batch_size=config.eval.batch_size)
  context = baselines.make_context(config)
  pixel_labels = metrics.prepare_pixel_labels(outputs.masks) if test.has_masks else None
  rows, maps_and_scores = {}, {}
  for name, why in baselines.available(config).items():
    if why:
      rows[name] = {'label': baselines.BASELINES[name].label, 'unavailable': why}
      logging.warning('baseline %s: %s', name, why)
      continue
    start = time.time()
    pixel_maps, scores = baselines.score_image_set(name, baselines.load_state(workdir, name), test,
                                                   context)
    maps_and_scores[name] = (pixel_maps, scores)
    image_m = metrics.ranking_metrics(scores, outputs.labels)
    pixel_m = metrics.pixel_metrics(pixel_maps, pixel_labels) if pixel_labels is not None else {}
    rows[name] = {'label': baselines.BASELINES[name].label, 'image_auroc': image_m['auroc'],
                  'pixel_auroc': pixel_m.get('auroc', float('nan')),
                  'aupro': pixel_m.get('aupro', float('nan')),
                  'seconds_per_image': (time.time() - start) / max(test.num_examples, 1)}
    logging.info('baseline %s: image AUROC %.4f, pixel AUROC %.4f', name, rows[name]['image_auroc'],
                 rows[name]['pixel_auroc'])
  return rows, maps_and_scores


def sweep(config: Config, workdir: str, candidates: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """Test image and pixel AUROC of each candidate (a dict with method, t_d, weights and, for
  ESM^σ, sigma_floor: tuned.candidate_config's input), all from one restored checkpoint and one
  feature extractor, each normalised on the held-out images as evaluation is."""
  restored = scoring.restore_ema_params(config, workdir, parallel.make_mesh())
  feature_fn = scoring.get_features(config, {n: 1.0 for n in det.DETECTOR_NAMES})
  gb = config.eval.batch_size
  val = pipeline.get_eval_data(config.data, 'val', global_batch_size=gb)
  test = pipeline.get_eval_data(config.data, 'test', global_batch_size=gb)
  pixel_labels = None
  rows = []
  for candidate in candidates:
    method, t_d = candidate['method'], candidate['t_d']
    scorer = scoring.Scorer(tuned_lib.candidate_config(config, candidate), workdir,
                            restored=restored, feature_fn=feature_fn)
    scorer.fit_normalisation(val)
    out = scorer.run_split(test, what=f'sweep {method} T_d={t_d}')
    pixel_maps, scores = scorer.score(scorer.normalise(out.maps))
    if pixel_labels is None and test.has_masks:
      pixel_labels = metrics.prepare_pixel_labels(out.masks)
    rows.append({'method': method, 't_d': t_d, 'detectors': list(scorer.selection.used),
                 'image_auroc': metrics.auroc(scores, out.labels),
                 'pixel_auroc': (metrics.pixel_metrics(pixel_maps, pixel_labels)['auroc']
                                 if pixel_labels is not None else float('nan'))})
  return rows


def sweep_tuning_candidates(config: Config, workdir: str,
                            tuned: Dict[str, Any]) -> List[Dict[str, Any]]:
  """The sweep of every (sampler, T_d) of the tuning grid, with the detector weights of
  tuned.sweep_candidates and their development score. Read by no choice: report only."""
  candidates = tuned_lib.sweep_candidates(tuned)
  rows = sweep(config, workdir, candidates)
  for row, candidate in zip(rows, candidates):
    row.update(detectors=candidate['detectors'], dev_score=candidate['score'])
  return rows


def evaluate_outputs(config: Config, workdir: str) -> Evaluation:
  """Reconstructs and scores the held-out good images and the test split (writing DIR/detector.json
  from the held-out ones); measures."""
  scorer = scoring.Scorer(config, workdir)
  gb = config.eval.batch_size
  val_out = scorer.fit_normalisation(pipeline.get_eval_data(config.data, 'val', global_batch_size=gb))
  state = detector_state.fit_and_save(config, workdir, scorer, val_out)
  test = pipeline.get_eval_data(config.data, 'test', global_batch_size=gb)
  keep = _figure_indices(test.records, config.eval.figures_per_type)
  defective = [k for k, r in enumerate(test.records) if r['label'] == 1]
  out = scorer.run_split(test, keep=keep, trajectory_index=defective[0] if defective else None)
  normed = scorer.normalise(out.maps)
  pixel_maps, scores = scorer.score(normed)

  image_m = metrics.ranking_metrics(scores, out.labels)
  pixel_labels = metrics.prepare_pixel_labels(out.masks) if test.has_masks else None
  pixel_m = metrics.pixel_metrics(pixel_maps, pixel_labels) if pixel_labels is not None else {}
  ablation = []
  for subset, p, s in det.iter_ablation(scorer.detect_cfg, scorer.image_size, normed,
                                        scorer.selection.used, stats=scorer.stats):
    row = {'detectors': list(subset), 'image_auroc': metrics.auroc(s, out.labels)}
    if pixel_labels is not None:
      row['pixel_auroc'] = metrics.pixel_metrics(p, pixel_labels)['auroc']
    ablation.append(row)

  result = {
      'category': config.data.category,
      'dataset': config.data.dataset,
      'method': scorer.recon.method,
      't_d': scorer.recon.t_d,
      'nfe': scorer.recon.nfe,
      'image_auroc': image_m['auroc'],
      'pixel_auroc': pixel_m.get('auroc', float('nan')),
      'aupro': pixel_m.get('aupro', float('nan')),
      'pixel_ap': pixel_m.get('average_precision', float('nan')),
      'image_f1_max': image_m['f1_max'],
      'image_ap': image_m['average_precision'],
      'seconds_per_image': out.seconds / max(test.num_examples, 1),
      'compile_seconds': scorer.compile_seconds,
      'params': scorer.num_params,
      'checkpoint_step': scorer.checkpoint_step,
      'num_test_images': test.num_examples,
      'weights': list(scorer.detect_cfg.weights),
      **({'sigma_floor': config.sampling.sigma_floor}
         if scorer.recon.sampler.reads_sigma_floor else {}),
      'detectors': list(scorer.selection.used),
      'unavailable_detectors': dict(scorer.selection.unavailable),
      'ablation': ablation,
  }
  logging.info('%s/%s: image AUROC %.4f, pixel AUROC %.4f (%s, T_d=%d, NFE=%d)', result['dataset'],
               result['category'], result['image_auroc'], result['pixel_auroc'], result['method'],
               result['t_d'], result['nfe'])
  return Evaluation(result, test.records, out, pixel_maps, scores, state)
