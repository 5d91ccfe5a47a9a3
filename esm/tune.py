"""Label-free tuning (--mode=tune): T_d, the sampler and the detector weights from training images.

The development set is made from the held-out slice of train/good (data.val_fraction; the model
never trained on it) and nothing else: each held-out image once clean and tune.defects_per_image
times with a defect painted on it (datasets/synthetic.py, `paint_defect`), whose mask is exactly the
changed pixels. The test split is never read.

Every candidate (sampler x T_d) reconstructs the development set once; every non-empty subset of
the available detectors (equal weights) is then scored from the same maps, so weight candidates
cost no reconstruction and no compilation. Detectors that need a feature extractor (S_Cos: a ViT on
every input and reconstruction) join in a second stage, on each sampler's best first-stage T_d
only: on 2 CPU cores the ViT costs more than the reconstruction, and would multiply the tuning
time by the grid size. The maps are normalised by cross-fitting: the held-out
images are split into tune.folds folds by image, and the images of fold k (clean and painted) are
scored with statistics fitted on the clean images of the other folds, so no image both fits and
judges. Criterion: the mean of image and pixel AUROC over the pooled folds. Candidates within
tune.tie_tolerance of the best are ties, broken by fewer network evaluations, then the smaller T_d,
then fewer detectors. The choice, and every candidate with its development scores, go to
DIR/tuned.json; evaluation then uses it (esm/run.py). DIR/detector.json is written for the choice
too, so predict can follow tune directly.
"""

import dataclasses
import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
from absl import logging

from configs.common import override
from datasets import pipeline
from datasets import synthetic
from esm import detector_state
from esm import detectors as det
from esm import evaluate
from esm import files
from esm import metrics
from esm import parallel
from esm import sampling
from esm.errors import UserError
from esm.losses import LossConfig

TUNED_FILE = 'tuned.json'
CRITERION = 'mean of image and pixel AUROC on the development set (cross-fitted normalisation)'
TUNED_FIELDS = {'t_d': 'sampling.t_d', 'method': 'sampling.method', 'weights': 'detect.weights',
                'sigma_floor': 'sampling.sigma_floor'}


@dataclasses.dataclass(frozen=True)
class TuneConfig:
  """config.tune, typed and checked."""
  enabled: Optional[bool]  # None: on for the folder dataset only
  t_d_fractions: Tuple[float, ...]
  methods: Tuple[str, ...]  # () = every sampler the checkpoint supports
  sigma_floors: Tuple[str, ...]  # ESM^σ's per-step floors tried (sampling.sigma_floor)
  folds: int
  defects_per_image: int
  defect_kinds: Tuple[str, ...]
  tie_tolerance: float
  seed: int

  def __post_init__(self):
    if not self.t_d_fractions or not all(0 < f <= 1 for f in self.t_d_fractions):
      raise UserError(f'tune.t_d_fractions: expected fractions of T in (0, 1], got '
                      f'{self.t_d_fractions}')
    unknown = set(self.methods) - set(sampling.SAMPLERS)
    if unknown:
      raise UserError(f'tune.methods: unknown samplers {sorted(unknown)}; expected names from '
                      f'{tuple(sampling.SAMPLERS)}')
    if not self.sigma_floors or set(self.sigma_floors) - set(sampling.SIGMA_FLOORS):
      raise UserError(f'tune.sigma_floors: expected names from {sampling.SIGMA_FLOORS}, got '
                      f'{self.sigma_floors}')
    if self.folds < 2:
      raise UserError(f'tune.folds: expected at least 2 (cross-fitting), got {self.folds}')
    if self.defects_per_image < 1:
      raise UserError(f'tune.defects_per_image: expected at least 1, got {self.defects_per_image}')
    unknown = set(self.defect_kinds) - set(synthetic.PAINTED_DEFECTS)
    if not self.defect_kinds or unknown:
      raise UserError(f'tune.defect_kinds: expected names from {synthetic.PAINTED_DEFECTS}, got '
                      f'{self.defect_kinds}')
    if not 0 <= self.tie_tolerance < 1:
      raise UserError(f'tune.tie_tolerance: expected [0, 1), got {self.tie_tolerance}')

  @classmethod
  def from_config(cls, tune_cfg) -> 'TuneConfig':
    return cls(enabled=tune_cfg.enabled, t_d_fractions=tuple(float(f) for f in tune_cfg.t_d_fractions),
               methods=tuple(tune_cfg.methods), sigma_floors=tuple(tune_cfg.sigma_floors),
               folds=int(tune_cfg.folds),
               defects_per_image=int(tune_cfg.defects_per_image),
               defect_kinds=tuple(tune_cfg.defect_kinds),
               tie_tolerance=float(tune_cfg.tie_tolerance), seed=int(tune_cfg.seed))

  def is_enabled(self, dataset: str) -> bool:
    return dataset == 'folder' if self.enabled is None else bool(self.enabled)


def t_d_grid(fractions, num_steps: int) -> List[int]:
  """The T_d candidates: each fraction of T, rounded, at least 1, without repeats, ascending."""
  return sorted({max(1, min(num_steps, round(f * num_steps))) for f in fractions})


def supported_methods(config, requested=()) -> List[str]:
  """The samplers a checkpoint of this config can run (those that read σ²_θ need two streams)."""
  dual = LossConfig.from_config(config.loss).dual_stream
  names = requested or tuple(sampling.SAMPLERS)
  return [n for n in names if dual or not sampling.SAMPLERS[n].needs_variance]


@dataclasses.dataclass
class DevSet:
  """The development set: held-out clean images and painted copies, as an EvalData."""
  data: pipeline.EvalData
  labels: np.ndarray  # [N] 0 clean, 1 painted
  masks: np.ndarray  # [N,H,W] uint8
  source: np.ndarray  # [N] index of the held-out image each one comes from
  folds: np.ndarray  # [N] cross-fitting fold (by source image)
  kinds: List[str]


def make_dev_set(config, tc: TuneConfig) -> DevSet:
  """Paints tc.defects_per_image defects on every held-out train/good image (model resolution)."""
  val = pipeline.get_eval_data(config.data, 'val', global_batch_size=config.eval.batch_size)
  n = val.num_examples
  if n < tc.folds:
    raise UserError(f'tune: {n} held-out train/good images for {tc.folds} folds; raise '
                    'data.val_fraction (and retrain) or lower tune.folds')
  rng = np.random.default_rng(tc.seed)
  images, masks, labels, source, kinds = [], [], [], [], []
  for k in range(n):
    clean = val.load(k)['image']
    img255 = (clean + 1.0) * 127.5
    images.append(clean)
    masks.append(np.zeros(clean.shape[:2], np.uint8))
    labels.append(0)
    source.append(k)
    kinds.append('good')
    for j in range(tc.defects_per_image):
      kind = tc.defect_kinds[(k * tc.defects_per_image + j) % len(tc.defect_kinds)]
      bad, mask = synthetic.paint_defect(img255, kind, rng)
      images.append((bad / 127.5 - 1.0).astype(np.float32))
      masks.append(mask.astype(np.uint8))
      labels.append(1)
      source.append(k)
      kinds.append(kind)
  fold_of_image = rng.permutation(n) % tc.folds
  records = [{'filename': f'dev/{s:04d}_{kind}', 'defect_type': kind, 'label': y}
             for s, kind, y in zip(source, kinds, labels)]

  def load(i: int) -> Dict[str, np.ndarray]:
    return {'image': images[i], 'mask': masks[i], 'label': np.int32(labels[i])}

  data = pipeline.EvalData(len(images), True, records, config.data.image_size,
                           config.eval.batch_size, load)
  source = np.asarray(source)
  logging.info('tune: development set of %d held-out images, each clean and with %d painted '
               'defects (%s), %d folds', n, tc.defects_per_image, ', '.join(tc.defect_kinds),
               tc.folds)
  return DevSet(data, np.asarray(labels), np.stack(masks), source, fold_of_image[source], kinds)


def score_candidate(scorer: evaluate.Scorer, dev: DevSet, stage: int) -> List[Dict[str, Any]]:
  """Development AUROCs of every detector subset for one reconstruction (cross-fitted); in stage
  2 only the subsets with a feature detector (stage 1 scored the others on the same maps)."""
  floor = scorer.config.sampling.sigma_floor if scorer.recon.sampler.reads_sigma_floor else None
  what = f'tune {scorer.recon.method} T_d={scorer.recon.t_d}' + (f' floor={floor}' if floor else '')
  out = scorer.run_split(dev.data, what=what)
  used = scorer.selection.used
  n, size = dev.labels.shape[0], scorer.image_size
  needs_features = {n for n in used if det.DETECTORS[n].needs_features}
  subsets = [s for s in det.ablation_subsets(used) if stage == 1 or needs_features & set(s)]
  scores = {s: np.zeros(n, np.float32) for s in subsets}
  pixels = {s: np.zeros((n, size, size), np.float32) for s in subsets}
  equal = dataclasses.replace(scorer.detect_cfg, weights=(1.0,) * len(det.DETECTORS))
  for fold in np.unique(dev.folds):
    fit = (dev.folds != fold) & (dev.labels == 0)
    judge = np.flatnonzero(dev.folds == fold)
    stats = det.fit_normaliser({k: v[fit] for k, v in out.maps.items()})
    normed = det.normalise({k: v[judge] for k, v in out.maps.items()}, stats)
    for subset, p, s in det.iter_ablation(equal, size, normed, used):
      if subset in scores:
        scores[subset][judge], pixels[subset][judge] = s, p
  rows = []
  for subset in subsets:
    image_auroc = metrics.auroc(scores[subset], dev.labels)
    pixel_auroc = metrics.auroc(pixels[subset].ravel(), dev.masks.ravel())
    rows.append({'method': scorer.recon.method, 't_d': scorer.recon.t_d, 'nfe': scorer.recon.nfe,
                 'stage': stage, 'detectors': list(subset),
                 'weights': [1.0 if name in subset else 0.0 for name in det.DETECTOR_NAMES],
                 'image_auroc': image_auroc, 'pixel_auroc': pixel_auroc,
                 'score': 0.5 * (image_auroc + pixel_auroc),
                 **({'sigma_floor': floor} if floor else {})})
  return rows


def choose(candidates: List[Dict[str, Any]], tie_tolerance: float) -> Dict[str, Any]:
  """The best candidate by score; within tie_tolerance of it: fewer NFE, smaller T_d, fewer
  detectors, then the earlier candidate."""
  best = max(c['score'] for c in candidates)
  ties = [c for c in candidates if c['score'] >= best - tie_tolerance]
  return min(ties, key=lambda c: (c['nfe'], c['t_d'], len(c['detectors'])))


def tune(config, workdir: str) -> Dict[str, Any]:
  """Runs every candidate on the development set and writes DIR/tuned.json; returns its content."""
  tc = TuneConfig.from_config(config.tune)
  start = time.time()
  dev = make_dev_set(config, tc)
  restored = evaluate.restore_ema_params(config, workdir, parallel.make_mesh())
  feature_fn = evaluate.get_features(config, {n: 1.0 for n in det.DETECTOR_NAMES})
  grid = t_d_grid(tc.t_d_fractions, config.sde.num_steps)
  methods = supported_methods(config, tc.methods)
  plain = tuple(0.0 if d.needs_features else 1.0 for d in det.DETECTORS.values())

  def run_candidate(method, t_d, stage, floor=None):
    weights = plain if stage == 1 else (1.0,) * len(det.DETECTORS)
    cfg = override(config, {'sampling.method': method, 'sampling.t_d': t_d,
                            'detect.weights': weights,
                            'sampling.sigma_floor': floor or config.sampling.sigma_floor})
    scorer = evaluate.Scorer(cfg, workdir, restored=restored,
                             feature_fn=feature_fn if stage == 2 else None)
    rows = score_candidate(scorer, dev, stage)
    if rows:
      top = max(rows, key=lambda r: r['score'])
      logging.info('tune: %s T_d=%d%s best %s: image %.3f pixel %.3f', method, t_d,
                   f' floor={floor}' if floor else '', '+'.join(top['detectors']),
                   top['image_auroc'], top['pixel_auroc'])
    return rows

  floors = lambda m: tc.sigma_floors if sampling.SAMPLERS[m].reads_sigma_floor else (None,)
  candidates = [row for m in methods for floor in floors(m) for t_d in grid
                for row in run_candidate(m, t_d, 1, floor)]
  if feature_fn is not None:
    for method in methods:
      best = choose([c for c in candidates if c['method'] == method], tc.tie_tolerance)
      candidates += run_candidate(method, best['t_d'], 2, best.get('sigma_floor'))
  chosen = choose(candidates, tc.tie_tolerance)
  by_method = {m: choose([c for c in candidates if c['method'] == m], tc.tie_tolerance)
               for m in methods}
  kept = ('t_d', 'weights', 'image_auroc', 'pixel_auroc', 'score', 'sigma_floor')
  tuned = {
      't_d': chosen['t_d'], 'method': chosen['method'], 'weights': chosen['weights'],
      # the floor only where the chosen sampler reads it; otherwise the config's stays
      **({'sigma_floor': chosen['sigma_floor']} if 'sigma_floor' in chosen else {}),
      'criterion': {'name': CRITERION, 'tie_tolerance': tc.tie_tolerance,
                    'image_auroc': chosen['image_auroc'], 'pixel_auroc': chosen['pixel_auroc'],
                    'score': chosen['score']},
      'by_method': {m: {k: c[k] for k in kept if k in c} for m, c in by_method.items()},
      'dev_set': {'held_out_images': int(dev.source.max() + 1), 'images': int(len(dev.labels)),
                  'painted': int(dev.labels.sum()), 'defect_kinds': list(tc.defect_kinds),
                  'folds': tc.folds, 'seed': tc.seed},
      't_d_grid': grid, 'methods': methods, 'sigma_floors': list(tc.sigma_floors),
      'checkpoint_step': restored.step,
      'candidates': candidates,
  }
  if jax.process_index() == 0:
    files.write_text(os.path.join(workdir, TUNED_FILE), json.dumps(tuned, indent=1))
  # The detector state of the choice, so predict, the API and export can follow tune directly.
  state = detector_state.fit_state(evaluate.candidate_config(config, chosen), workdir)
  if jax.process_index() == 0:
    detector_state.save_state(workdir, state)
  logging.info('tune: chose %s T_d=%d detectors %s (dev image %.3f, pixel %.3f) from %d '
               'candidates in %.0f s; written to %s', chosen['method'], chosen['t_d'],
               '+'.join(chosen['detectors']), chosen['image_auroc'], chosen['pixel_auroc'],
               len(candidates), time.time() - start, os.path.join(workdir, TUNED_FILE))
  return tuned


def load_tuned(workdir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(workdir, TUNED_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def apply_tuned(config, workdir: str, overridden=()) -> Dict[str, str]:
  """Sets sampling.t_d, sampling.method, detect.weights and (when the chosen sampler reads it)
  sampling.sigma_floor from DIR/tuned.json, except the fields given on the command line; returns
  where each comes from (tuned / command line / paper table / config)."""
  tuned = load_tuned(workdir)
  sources = {}
  for key, field in TUNED_FIELDS.items():
    section, name = field.split('.')
    if field in overridden:
      sources[field] = 'command line'
    elif tuned is not None and key in tuned:
      config[section][name] = tuple(tuned[key]) if key == 'weights' else tuned[key]
      sources[field] = 'tuned'
    elif key == 'sigma_floor':
      continue  # not tuned: the config's floor, which only ESM^σ reads
    elif field == 'sampling.t_d' and config.data.category in dict(config.sampling.t_d_by_category):
      sources[field] = 'paper table'
    else:
      sources[field] = 'config'
  return sources
