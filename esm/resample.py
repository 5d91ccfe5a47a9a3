"""What a bootstrap over images needs of each image, and the AUROCs of a resample.

Pixel AUROC is a sum over pairs of images: for images i and j, wins[i, j] counts the pairs (a
defect pixel of i, a normal pixel of j) that the map orders correctly, ties one half. A resample
that draws image i w_i times then has pixel AUROC  w·wins·w / ((w·pos)(w·neg)),  exactly what the
AUROC of the repeated images' pixels would be, from a matrix of N² numbers per map instead of the
maps themselves. Image AUROC of a resample is esm/metrics.py weighted_auroc.
"""

import dataclasses
import json
import os
from typing import Dict, Sequence, Tuple

import numpy as np

from esm import metrics


@dataclasses.dataclass(frozen=True)
class PixelPairs:
  """Per-image pixel counts and pairwise wins of one set of maps."""
  wins: np.ndarray  # [N, N] float64: correctly ordered (defect pixel of i, normal pixel of j)
  pos: np.ndarray  # [N] defect pixels of each image
  neg: np.ndarray  # [N] normal pixels of each image


def pixel_pairs(maps: np.ndarray, masks: np.ndarray) -> PixelPairs:
  """PixelPairs of maps [N,H,W] against masks [N,H,W] (nonzero = defect)."""
  n = maps.shape[0]
  flat, defect = maps.reshape(n, -1).astype(np.float32), masks.reshape(n, -1) != 0
  owner = np.repeat(np.arange(n), defect.sum(axis=1))
  positives = flat[defect]
  wins = np.zeros((n, n))
  for j in range(n):
    neg = np.sort(flat[j][~defect[j]])
    below = np.searchsorted(neg, positives, side='left')
    tied = np.searchsorted(neg, positives, side='right') - below
    wins[:, j] = np.bincount(owner, weights=below + 0.5 * tied, minlength=n)
  return PixelPairs(wins, defect.sum(axis=1).astype(np.float64),
                    (~defect).sum(axis=1).astype(np.float64))


Evidence = Tuple[np.ndarray, PixelPairs, np.ndarray]  # image scores [N], pixel pairs, labels [N]


def save_evidence(path: str, names: Sequence[Sequence[str]], image_scores, pairs, labels) -> None:
  """What a bootstrap needs of several score sets of one test split, written atomically: entry k
  is named by the tuple names[k] (a detector subset, or one method's name)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path + '.tmp', 'wb') as f:
    np.savez_compressed(f, subsets=json.dumps([list(n) for n in names]),
                        image_scores=np.stack(image_scores),
                        wins=np.stack([p.wins for p in pairs]).astype(np.float32),
                        pos=np.stack([p.pos for p in pairs]), neg=np.stack([p.neg for p in pairs]),
                        labels=labels)
  os.replace(path + '.tmp', path)


def load_evidence(path: str) -> Dict[Tuple[str, ...], Evidence]:
  """save_evidence's entries: name tuple -> (image scores, pixel pairs, labels)."""
  out = {}
  with np.load(path) as z:
    for k, name in enumerate(json.loads(str(z['subsets']))):
      pairs = PixelPairs(z['wins'][k].astype(np.float64), z['pos'][k], z['neg'][k])
      out[tuple(name)] = (z['image_scores'][k], pairs, z['labels'])
  return out


def pixel_auroc(pairs: PixelPairs, weights: np.ndarray) -> np.ndarray:
  """Pixel AUROC [R] of each resample's image multiplicities weights [R, N] (a zero weight leaves
  an image out); NaN where a resample has no defect or no normal pixel."""
  w = np.atleast_2d(np.asarray(weights, np.float64))
  wins = np.einsum('ri,ij,rj->r', w, pairs.wins, w)
  total = (w @ pairs.pos) * (w @ pairs.neg)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(total > 0, wins / np.where(total > 0, total, 1.0), np.nan)


def pooled_aurocs(entries: Sequence[Evidence], weights: np.ndarray) -> np.ndarray:
  """[2, R] image and pixel AUROC of each resample's weights [R, N]: the mean over the entries
  (the seeds of one method, scored on the same test images)."""
  return np.mean([np.stack([metrics.weighted_auroc(s, y, weights), pixel_auroc(p, weights)])
                  for s, p, y in entries], axis=0)


def paired_difference(a: Sequence[Evidence], b: Sequence[Evidence], num_resamples: int,
                      seed: int = 0, level: float = 0.95) -> np.ndarray:
  """[2, 3]: image and pixel AUROC of a − b (each the mean over its entries) and its paired,
  class-stratified bootstrap interval over the test images, both metrics from the same resamples."""
  labels = a[0][2]
  weights = metrics.bootstrap_weights(labels, num_resamples, seed)
  diff = pooled_aurocs(a, weights) - pooled_aurocs(b, weights)
  lo, hi = np.nanquantile(diff[:, 1:], [(1 - level) / 2, (1 + level) / 2], axis=1)
  return np.stack([diff[:, 0], lo, hi], axis=1)


def group_counts(groups: np.ndarray, num_resamples: int, seed: int) -> np.ndarray:
  """[R, N] multiplicities of a bootstrap over groups: each resample draws the distinct groups
  with replacement, and every image of a drawn group comes with it (a development image's
  painted copies with their clean source image)."""
  ids, member = np.unique(np.asarray(groups), return_inverse=True)
  rng = np.random.default_rng(seed)
  drawn = rng.multinomial(ids.size, np.full(ids.size, 1.0 / ids.size), num_resamples)
  return drawn[:, member].astype(np.float64)


def kendall_tau(a, b) -> float:
  """Kendall's τ-b of two rankings (scores, higher first); NaN with fewer than two items."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.size < 2:
    return float('nan')
  da, db = np.sign(a[:, None] - a[None]), np.sign(b[:, None] - b[None])
  pairs = np.triu_indices(a.size, 1)
  da, db = da[pairs], db[pairs]
  denom = np.sqrt(np.sum(da != 0) * np.sum(db != 0))
  return float(np.sum(da * db) / denom) if denom > 0 else float('nan')
