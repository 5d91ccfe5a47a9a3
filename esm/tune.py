"""--mode=tune: label-free tuning of T_d, the sampler and the detector weights on training images.

Every candidate (sampler x T_d) reconstructs the development set (esm/dev_set.py) once; every
non-empty subset of the available detectors (equal weights) is then scored from the same maps, so
weight candidates cost no reconstruction and no compilation. Detectors that need a feature
extractor (S_Cos: a ViT on every input and reconstruction) join in a second stage, on each
sampler's best first-stage T_d only: on 2 CPU cores the ViT costs more than the reconstruction,
and would multiply the tuning time by the grid size. The test split is never read. The choice,
and every candidate with its development scores, go to DIR/tuned.json (esm/tuned.py), and the
choice's DIR/detector.json is written too, so predict can follow tune directly.
"""

import time
from typing import Any, Dict, List

from absl import logging

from datasets import pipeline
from esm import detector_state
from esm import detectors as det
from esm import dev_set
from esm import parallel
from esm import sampling
from esm import scoring
from esm import tuned as tuned_lib
from esm.config import Config


def t_d_grid(fractions, num_steps: int) -> List[int]:
  """The T_d candidates: each fraction of T, rounded, at least 1, without repeats, ascending."""
  return sorted({max(1, min(num_steps, round(f * num_steps))) for f in fractions})


def supported_methods(config: Config, requested=()) -> List[str]:
  """The samplers a checkpoint of this config can run (those that read σ²_θ need two streams)."""
  names = requested or tuple(sampling.SAMPLERS)
  return [n for n in names if config.loss.dual_stream or not sampling.SAMPLERS[n].needs_variance]


def score_grid(config: Config, workdir: str, dev: dev_set.DevSet,
               restored: scoring.EmaParams) -> List[Dict[str, Any]]:
  """Development scores of every candidate: each sampler (and ESM^σ floor) at each T_d of the grid
  with the detectors that need no features, then the feature detectors at each sampler's best."""
  tc = config.tune
  feature_fn = scoring.get_features(config, {n: 1.0 for n in det.DETECTOR_NAMES})
  plain = tuple(0.0 if d.needs_features else 1.0 for d in det.DETECTORS.values())

  def run_candidate(method, t_d, stage, floor=None):
    weights = plain if stage == 1 else (1.0,) * len(det.DETECTORS)
    cfg = tuned_lib.candidate_config(config, {
        'method': method, 't_d': t_d, 'weights': weights,
        'sigma_floor': floor or config.sampling.sigma_floor})
    scorer = scoring.Scorer(cfg, workdir, restored=restored,
                            feature_fn=feature_fn if stage == 2 else None)
    rows = dev_set.score_candidate(scorer, dev, stage)
    if rows:
      top = max(rows, key=lambda r: r['score'])
      logging.info('tune: %s T_d=%d%s best %s: image %.3f pixel %.3f', method, t_d,
                   f' floor={floor}' if floor else '', '+'.join(top['detectors']),
                   top['image_auroc'], top['pixel_auroc'])
    return rows

  methods = supported_methods(config, tc.methods)
  floors = lambda m: tc.sigma_floors if sampling.SAMPLERS[m].reads_sigma_floor else (None,)
  candidates = [row for m in methods for floor in floors(m)
                for t_d in t_d_grid(tc.t_d_fractions, config.sde.num_steps)
                for row in run_candidate(m, t_d, 1, floor)]
  if feature_fn is not None:
    for method in methods:
      best = dev_set.choose([c for c in candidates if c['method'] == method], tc.tie_tolerance)
      candidates += run_candidate(method, best['t_d'], 2, best.get('sigma_floor'))
  return candidates


def tuning_record(config: Config, dev: dev_set.DevSet, candidates: List[Dict[str, Any]],
                  checkpoint_step: int) -> Dict[str, Any]:
  """The content of DIR/tuned.json: the choice, each sampler's best, the set and every candidate."""
  tc = config.tune
  methods = supported_methods(config, tc.methods)
  chosen = dev_set.choose(candidates, tc.tie_tolerance)
  by_method = {m: dev_set.choose([c for c in candidates if c['method'] == m], tc.tie_tolerance)
               for m in methods}
  kept = ('t_d', 'weights', 'image_auroc', 'pixel_auroc', 'score', 'sigma_floor')
  return {
      't_d': chosen['t_d'], 'method': chosen['method'], 'weights': chosen['weights'],
      # the floor only where the chosen sampler reads it; otherwise the config's stays
      **({'sigma_floor': chosen['sigma_floor']} if 'sigma_floor' in chosen else {}),
      'criterion': {'name': dev_set.CRITERION, 'tie_tolerance': tc.tie_tolerance,
                    'image_auroc': chosen['image_auroc'], 'pixel_auroc': chosen['pixel_auroc'],
                    'score': chosen['score']},
      'by_method': {m: {k: c[k] for k in kept if k in c} for m, c in by_method.items()},
      'dev_set': {'held_out_images': int(dev.source.max() + 1), 'images': int(len(dev.labels)),
                  'painted': int(dev.labels.sum()), 'defect_kinds': list(tc.defect_kinds),
                  'folds': tc.folds, 'seed': tc.seed},
      't_d_grid': t_d_grid(tc.t_d_fractions, config.sde.num_steps), 'methods': methods,
      'sigma_floors': list(tc.sigma_floors), 'checkpoint_step': checkpoint_step,
      'candidates': candidates,
  }


def tune(config: Config, workdir: str) -> Dict[str, Any]:
  """Runs every candidate on the development set and writes DIR/tuned.json and the choice's
  DIR/detector.json; returns tuned.json's content."""
  start = time.time()
  val = pipeline.get_eval_data(config.data, 'val', global_batch_size=config.eval.batch_size)
  dev = dev_set.make_dev_set(val, config.tune)
  restored = scoring.restore_ema_params(config, workdir, parallel.make_mesh())
  candidates = score_grid(config, workdir, dev, restored)
  tuned = tuning_record(config, dev, candidates, restored.step)
  tuned_lib.write(workdir, tuned)
  # The detector state of the choice, so predict, the API and export can follow tune directly.
  scorer = scoring.Scorer(tuned_lib.candidate_config(config, tuned), workdir, restored=restored)
  detector_state.fit_and_save(scorer.config, workdir, scorer, scorer.fit_normalisation(val))
  logging.info('tune: chose %s T_d=%d weights %s (dev image %.3f, pixel %.3f) from %d '
               'candidates in %.0f s; written to %s', tuned['method'], tuned['t_d'],
               tuple(tuned['weights']), tuned['criterion']['image_auroc'],
               tuned['criterion']['pixel_auroc'], len(candidates), time.time() - start,
               tuned_lib.path(workdir))
  return tuned
