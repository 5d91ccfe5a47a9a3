"""The development set of label-free tuning, its cross-fitted scoring, its model-free difficulty,
and the legacy choice rule.

The development set is made from train/good alone: the held-out slice (data.val_fraction,
data.min_val_images; the model never trained on it), each image once clean and
tune.defects_per_image times with a defect of the families of esm/dev_defects.py painted on it, at
its stored size, the texture sources and per-pixel statistics coming from the training slice.
Copy j of held-out image k is cell c = k * defects_per_image + j: family c mod F, strength
(c div F) mod S, drawn from the seed (tune.seed, k, j), so each defect is reproducible on its own.
A candidate's maps are normalised by cross-fitting: the held-out images are split into tune.folds
folds by image, and the images of fold k (clean and painted) are scored with statistics fitted
on the clean images of the other folds, so no image both fits and judges.

tune.rule='legacy' keeps the earlier set and rule: tune.defect_kinds painted at model resolution
at full contrast, the mean of pooled image and pixel AUROC, ties within tune.tie_tolerance to
fewer NFE (`make_painted_dev_set`, `choose`).
"""

import dataclasses
from typing import Any, Dict, List, Sequence, Tuple

import jax
import numpy as np
from absl import logging

from datasets.folder import resize_rgb
from esm import baselines
from esm import defects
from esm import detectors as det
from esm import dev_defects
from esm import metrics
from esm import preprocess
from esm import resample
from esm.config import TuneConfig
from esm.errors import UserError
from esm.image_set import ImageSet
from esm.scoring import Scorer

CRITERION = ('mean rank over the development families of image and pixel AUROC (cross-fitted '
             'normalisation), with a paired bootstrap over source images')
LEGACY_CRITERION = 'mean of image and pixel AUROC on the development set (cross-fitted normalisation)'


@dataclasses.dataclass
class DevSet:
  """The development set: held-out clean images and painted copies, as an ImageSet."""
  data: ImageSet
  labels: np.ndarray  # [N] 0 clean, 1 painted
  masks: np.ndarray  # [N,H,W] uint8
  source: np.ndarray  # [N] index of the held-out image each one comes from
  folds: np.ndarray  # [N] cross-fitting fold (by source image)
  kinds: List[str]  # 'good', or the family (the painted kind under the legacy rule)
  families: np.ndarray  # [N] str: 'good' or the family
  strengths: np.ndarray  # [N] float: the target strength (0 for clean, NaN under the legacy rule)
  mean_z: np.ndarray  # [N] float: the painted change in standard deviations (0 for clean)


def _image_set(images, masks, labels, source, kinds, size, batch) -> ImageSet:
  records = [{'filename': f'dev/{s:04d}_{kind}', 'defect_type': kind, 'label': y}
             for s, kind, y in zip(source, kinds, labels)]

  def load(i: int) -> Dict[str, np.ndarray]:
    return {'image': images[i], 'mask': masks[i], 'label': np.int32(labels[i])}

  return ImageSet(len(images), True, records, size, batch, load)


def _folds(num: int, tc: TuneConfig) -> np.ndarray:
  if num < tc.folds:
    raise UserError(f'tune: {num} held-out train/good images for {tc.folds} folds; raise '
                    'data.val_fraction or data.min_val_images (and retrain) or lower tune.folds')
  return np.random.default_rng([tc.seed, 0xF0]).permutation(num) % tc.folds


def make_dev_set(held_out: Sequence[np.ndarray], normal: dev_defects.Normal, tc: TuneConfig,
                 global_batch_size: int) -> DevSet:
  """The development set of the held-out images (uint8, stored size; module docstring)."""
  size, folds = normal.size, _folds(len(held_out), tc)
  rows = []  # (image uint8, mask, label, source, family, strength, mean_z)
  for k, img in enumerate(held_out):
    clean, fg = resize_rgb(img, size), dev_defects.object_mask(img)
    rows.append((clean, np.zeros((size, size), bool), 0, k, 'good', 0.0, 0.0))
    for j in range(tc.defects_per_image):
      c = k * tc.defects_per_image + j
      family = tc.families[c % len(tc.families)]
      strength = tc.strengths[(c // len(tc.families)) % len(tc.strengths)]
      d = dev_defects.paint(family, img, normal, strength, np.random.default_rng([tc.seed, k, j]),
                            tc.defect_kinds, fg=fg, clean=clean, area=tc.defect_area)
      rows.append((d.image, d.mask, 1, k, family, strength, d.mean_z))
  images, masks, labels, source, families, strengths, mean_z = map(list, zip(*rows))
  images = [preprocess.to_float(im) for im in images]
  masks = [m.astype(np.uint8) for m in masks]
  data = _image_set(images, masks, labels, source, families, size, global_batch_size)
  logging.info('tune: development set of %d held-out images, each clean and with %d defects '
               '(families %s, strengths %s), %d folds', len(held_out), tc.defects_per_image,
               ', '.join(tc.families), tc.strengths, tc.folds)
  source = np.asarray(source)
  return DevSet(data, np.asarray(labels), np.stack(masks), source, folds[source], families,
                np.asarray(families), np.asarray(strengths, np.float64), np.asarray(mean_z))


def make_painted_dev_set(val: ImageSet, tc: TuneConfig) -> DevSet:
  """The legacy development set: tc.defects_per_image painted defects (esm/defects.py) on every
  held-out image of `val`, at model resolution and full contrast."""
  n = val.num_examples
  _folds(n, tc)  # the count check
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
  folds = rng.permutation(n) % tc.folds
  data = _image_set(images, masks, labels, source, kinds, val.image_size, val.global_batch_size)
  source, labels = np.asarray(source), np.asarray(labels)
  families = np.where(labels == 1, 'painted', 'good')
  return DevSet(data, labels, np.stack(masks), source, folds[source], kinds, families,
                np.where(labels == 1, np.nan, 0.0), np.zeros(len(labels)))


def summary(dev: DevSet) -> Dict[str, Any]:
  """What tuned.json records of the set: its counts and, per family, how many defects, how far
  from normal they sit and how much of the image their masks cover."""
  out = {'held_out_images': int(dev.source.max() + 1), 'images': int(len(dev.labels)),
         'painted': int(dev.labels.sum())}
  families = {}
  for f in sorted(set(dev.families[dev.labels == 1])):
    sel = dev.families == f
    families[f] = {'count': int(sel.sum()), 'mean_z': float(dev.mean_z[sel].mean()),
                   'mask_share': float(dev.masks[sel].mean())}
  return dict(out, families=families)


def _entry_aurocs(scores, pairs: resample.PixelPairs, dev: DevSet, painted) -> Dict[str, float]:
  """Image and pixel AUROC over the clean images and the painted ones selected by `painted`."""
  weights = ((dev.labels == 0) | painted).astype(np.float64)[None]
  return {'image_auroc': float(metrics.weighted_auroc(scores, dev.labels, weights)[0]),
          'pixel_auroc': float(resample.pixel_auroc(pairs, weights)[0])}


def model_free(dev: DevSet, stats: Dict[str, np.ndarray], batch_size: int = 64) -> Dict[str, Any]:
  """Image and pixel AUROC of the model-free z-score (esm/baselines.py) on the development set,
  per family and per family and strength, and over the whole set."""
  images = np.stack([dev.data.load(i)['image'] for i in range(dev.data.num_examples)])
  pad = -len(images) % batch_size  # one batch shape, one compilation
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  maps, scores = [], []
  for s in range(0, len(images), batch_size):
    m, sc = jax.device_get(baselines.zscore_score(stats, images[s:s + batch_size]))
    maps.append(np.asarray(m))
    scores.append(np.asarray(sc))
  n = len(dev.labels)
  maps, scores = np.concatenate(maps)[:n], np.concatenate(scores)[:n]
  pairs = resample.pixel_pairs(maps, dev.masks)
  out = {'all': _entry_aurocs(scores, pairs, dev, dev.labels == 1), 'families': {}}
  for f in sorted(set(dev.families[dev.labels == 1])):
    row = _entry_aurocs(scores, pairs, dev, dev.families == f)
    strengths = sorted(s for s in set(dev.strengths[dev.families == f]) if np.isfinite(s))
    row['by_strength'] = {f'{s:g}': _entry_aurocs(scores, pairs, dev, (dev.families == f)
                                                  & (dev.strengths == s)) for s in strengths}
    out['families'][f] = row
  logging.info('tune: model-free z-score on the development set: image %.3f, pixel %.3f (%s)',
               out['all']['image_auroc'], out['all']['pixel_auroc'],
               ', '.join(f"{f} {r['image_auroc']:.3f}/{r['pixel_auroc']:.3f}"
                         for f, r in out['families'].items()))
  return out


@dataclasses.dataclass(frozen=True)
class Evidence:
  """A candidate's per-image development scores: what the bootstrap resamples."""
  image_scores: np.ndarray  # [N]
  pixels: resample.PixelPairs


def arrays(dev: DevSet) -> List[np.ndarray]:
  """Every array that defines the development set, its images included (for progress keys)."""
  images = [dev.data.load(i)['image'] for i in range(dev.data.num_examples)]
  return [dev.labels, dev.masks, dev.source, dev.folds, dev.strengths, dev.mean_z] + images


def evidence_arrays(evidence: List[Evidence]) -> Dict[str, np.ndarray]:
  """Evidence of several candidates as stacked arrays, and back (evidence_from_arrays)."""
  return {'image_scores': np.stack([e.image_scores for e in evidence]),
          'wins': np.stack([e.pixels.wins for e in evidence]),
          'pos': np.stack([e.pixels.pos for e in evidence]),
          'neg': np.stack([e.pixels.neg for e in evidence])}


def evidence_from_arrays(a: Dict[str, np.ndarray]) -> List[Evidence]:
  return [Evidence(a['image_scores'][i], resample.PixelPairs(a['wins'][i], a['pos'][i], a['neg'][i]))
          for i in range(len(a['image_scores']))]


def score_candidate(scorer: Scorer, dev: DevSet,
                    stage: int) -> Tuple[List[Dict[str, Any]], List[Evidence]]:
  """Development AUROCs of every detector subset for one reconstruction (cross-fitted), and each
  one's per-image evidence; in stage 2 only the subsets with a feature detector (stage 1 scored
  the others on the same maps)."""
  floor = scorer.config.sampling.sigma_floor if scorer.recon.sampler.reads_sigma_floor else None
  what = f'tune {scorer.recon.method} T_d={scorer.recon.t_d}' + (f' floor={floor}' if floor else '')
  out = scorer.run_split(dev.data, what=what)
  used = scorer.selection.used
  n, size = dev.labels.shape[0], scorer.image_size
  needs_features = {n for n in used if det.DETECTORS[n].needs_features}
  subsets = [s for s in det.ablation_subsets(used) if stage == 1 or needs_features & set(s)]
  scores = {s: np.zeros(n, np.float32) for s in subsets}
  pixels = {s: np.zeros((n, size, size), np.float32) for s in subsets}
  for fold in np.unique(dev.folds):
    fit = (dev.folds != fold) & (dev.labels == 0)
    judge = np.flatnonzero(dev.folds == fold)
    stats = det.fit_stats({k: v[fit] for k, v in out.maps.items()}, scorer.detect_cfg, size)
    normed = det.normalise({k: v[judge] for k, v in out.maps.items()}, stats)
    for subset, p, s in det.iter_ablation(scorer.detect_cfg, size, normed, used, stats=stats):
      if subset in scores:
        scores[subset][judge], pixels[subset][judge] = s, p
  rows, evidence = [], []
  for subset in subsets:
    pairs = resample.pixel_pairs(pixels[subset], dev.masks)
    image_auroc = metrics.auroc(scores[subset], dev.labels)
    pixel_auroc = float(resample.pixel_auroc(pairs, np.ones(n))[0])
    rows.append({'method': scorer.recon.method, 't_d': scorer.recon.t_d, 'nfe': scorer.recon.nfe,
                 'stage': stage, 'detectors': list(subset),
                 'weights': list(det.subset_weights(scorer.detect_cfg.weights, subset)),
                 'image_auroc': image_auroc, 'pixel_auroc': pixel_auroc,
                 'score': 0.5 * (image_auroc + pixel_auroc),
                 **({'sigma_floor': floor} if floor else {})})
    evidence.append(Evidence(scores[subset], pairs))
  return rows, evidence


def choose(candidates: List[Dict[str, Any]], tie_tolerance: float) -> Dict[str, Any]:
  """The legacy rule: the best candidate by score; within tie_tolerance of it: fewer NFE, smaller
  T_d, fewer detectors, then the earlier candidate."""
  best = max(c['score'] for c in candidates)
  ties = [c for c in candidates if c['score'] >= best - tie_tolerance]
  return min(ties, key=lambda c: (c['nfe'], c['t_d'], len(c['detectors'])))
