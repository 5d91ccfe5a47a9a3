"""The development set of label-free tuning, its cross-fitted scoring, and the choice rule.

The development set is made from the held-out slice of train/good (data.val_fraction; the model
never trained on it) and nothing else: each held-out image once clean and tune.defects_per_image
times with a defect painted on it (esm/defects.py, `paint_defect`), whose mask is exactly the
changed pixels. A candidate's maps are normalised by cross-fitting: the held-out images are split
into tune.folds folds by image, and the images of fold k (clean and painted) are scored with
statistics fitted on the clean images of the other folds, so no image both fits and judges.
Criterion: the mean of image and pixel AUROC over the pooled folds. Candidates within
tune.tie_tolerance of the best are ties, broken by fewer network evaluations, then the smaller T_d,
then fewer detectors. esm/tune.py and experiments/ use this module alike.
"""

import dataclasses
from typing import Any, Dict, List

import numpy as np
from absl import logging

from esm import defects
from esm import detectors as det
from esm import metrics
from esm.config import TuneConfig
from esm.errors import UserError
from esm.image_set import ImageSet
from esm.scoring import Scorer

CRITERION = 'mean of image and pixel AUROC on the development set (cross-fitted normalisation)'


@dataclasses.dataclass
class DevSet:
  """The development set: held-out clean images and painted copies, as an ImageSet."""
  data: ImageSet
  labels: np.ndarray  # [N] 0 clean, 1 painted
  masks: np.ndarray  # [N,H,W] uint8
  source: np.ndarray  # [N] index of the held-out image each one comes from
  folds: np.ndarray  # [N] cross-fitting fold (by source image)
  kinds: List[str]


def make_dev_set(val: ImageSet, tc: TuneConfig) -> DevSet:
  """Paints tc.defects_per_image defects on every held-out train/good image of `val` (at model
  resolution)."""
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
      bad, mask = defects.paint_defect(img255, kind, rng)
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

  data = ImageSet(len(images), True, records, val.image_size, val.global_batch_size, load)
  source = np.asarray(source)
  logging.info('tune: development set of %d held-out images, each clean and with %d painted '
               'defects (%s), %d folds', n, tc.defects_per_image, ', '.join(tc.defect_kinds),
               tc.folds)
  return DevSet(data, np.asarray(labels), np.stack(masks), source, fold_of_image[source], kinds)


def score_candidate(scorer: Scorer, dev: DevSet, stage: int) -> List[Dict[str, Any]]:
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
