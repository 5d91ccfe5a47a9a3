"""Threshold-free detection metrics: AUROC, AUPRO, average precision and F1-max.

All four are exact rank statistics (ties averaged the way scikit-learn does) computed from one sort
per class, so pixel metrics over a whole test split (about 1.3e8 pixels) cost two sorts and one
vectorised binary search, never a Python loop over thresholds:

  * negatives and positives are sorted separately on the host with numpy. numpy's SIMD sort of
    float32 keys is several times faster than XLA:CPU's comparator sort (bench/metrics.py measures
    both), and a single-key sort needs no payload;
  * a jitted JAX core then binary-searches every positive score among the sorted negatives. Each
    metric is a sum over positives of a function of (#negatives below, #negatives tied,
    #positives at or above), so no merged curve is ever materialised;
  * sums are reduced in chunks of 256 on the device and the few chunk sums are added on the host
    (AUROC exactly, in integers; the others in float64), so nothing is copied to float64.

A metric whose labels hold only one class, or no element at all, is NaN (the report prints n/a).
Scores containing NaN also give NaN, with a warning.

AUPRO follows the MVTec AD evaluation: connected components (8-connectivity, per image) of the
ground-truth masks are the regions; PRO at a threshold is the mean over regions of the fraction of
region pixels at or above it; FPR is over all defect-free pixels of the split; the PRO-FPR curve is
integrated with the trapezoid rule up to `fpr_limit` (interpolating at the limit) and divided by it.
"""

import dataclasses
import functools
import math
import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

_CHUNK = 256  # device-side partial-sum length; chunk sums are added on the host
_STRUCTURE_8 = np.zeros((3, 3, 3), bool)
_STRUCTURE_8[1] = True  # 8-connected within an image, never across images


@dataclasses.dataclass(frozen=True)
class PixelLabels:
  """Ground truth of a pixel split, prepared once and reused for every score map (ablation).

  Attributes:
    defect: bool [n], flattened masks (True = defective pixel).
    region_weight: float32 [num_pos], for each defective pixel in flat order 1 / (K * |region|),
      where K is the number of connected regions; the weights sum to 1.
    num_regions: K.
    shape: the mask shape [N, H, W]; maps must have as many pixels.
  """
  defect: np.ndarray
  region_weight: np.ndarray
  num_regions: int
  shape: tuple[int, ...]

  @property
  def num_pos(self) -> int:
    return int(self.region_weight.shape[0])


def prepare_pixel_labels(masks: np.ndarray) -> PixelLabels:
  """Labels the connected defect regions of masks [N, H, W] (nonzero = defect) once, on the host."""
  masks = np.asarray(masks)
  if masks.ndim == 2:
    masks = masks[None]
  if masks.ndim != 3:
    raise ValueError(f'masks must be [N, H, W], got shape {masks.shape}')
  defect = masks.astype(bool, copy=False)
  regions, num_regions = scipy.ndimage.label(defect, structure=_STRUCTURE_8)
  pos_region = regions.reshape(-1)[defect.reshape(-1)]
  del regions
  area = np.bincount(pos_region, minlength=num_regions + 1).astype(np.float64)
  table = np.zeros(num_regions + 1, np.float32)
  if num_regions:
    table[1:] = 1.0 / (num_regions * area[1:])
  return PixelLabels(defect=defect.reshape(-1), region_weight=table[pos_region],
                     num_regions=int(num_regions), shape=tuple(masks.shape))


def _bucket(n: int) -> int:
  """Padded length: few distinct shapes (few compilations) at under 12.5% extra memory."""
  if n <= _CHUNK:
    return _CHUNK
  step = 1 << max(8, n.bit_length() - 4)
  return -(-n // step) * step


def _padded_sorted(values: np.ndarray, select: np.ndarray, count: int) -> np.ndarray:
  """values[select] sorted ascending in a +inf-padded buffer of length _bucket(count)."""
  buf = np.empty(_bucket(count), np.float32)
  np.compress(select, values, out=buf[:count])
  buf[:count] += np.float32(0.0)  # -0.0 -> +0.0 so that both zeros tie, as in a float compare
  buf[:count].sort()
  buf[count:] = np.inf
  return buf


def _chunk_sums(x: jax.Array) -> jax.Array:
  return x.reshape(-1, _CHUNK).sum(axis=1)


def _search_counts(neg: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """For each pos[j]: (#neg < pos[j], #neg <= pos[j], #pos < pos[j]), by one branchless search.

  Both inputs are sorted and free of NaN and -0.0, so plain comparisons give the sort order. One
  fused loop replaces three jnp.searchsorted calls (a third of their compile time).
  """
  steps = max(neg.shape[0], pos.shape[0]).bit_length()

  def body(i, carry):
    below, at_or_below, first = carry
    step = jnp.left_shift(1, steps - 1 - i)

    def advance(count, table, accept):
      cand = count + step
      probe = table[jnp.minimum(cand, table.shape[0]) - 1]
      return jnp.where((cand <= table.shape[0]) & accept(probe), cand, count)

    return (advance(below, neg, lambda a: a < pos), advance(at_or_below, neg, lambda a: a <= pos),
            advance(first, pos, lambda a: a < pos))

  zeros = jnp.zeros(pos.shape, jnp.int32)
  return jax.lax.fori_loop(0, steps, body, (zeros, zeros, zeros))


@functools.partial(jax.jit, static_argnames=('with_pro',))
def _rank_core(neg, pos, pos_weight, num_neg, num_pos, cut_value, cut_rank, *, with_pro: bool):
  """Per-positive rank statistics reduced to chunk sums (see the module docstring).

  Args:
    neg: float32 [Bn] sorted negative scores, +inf padded beyond num_neg.
    pos: float32 [Bp] sorted positive scores, +inf padded beyond num_pos.
    pos_weight: float32 [Bp] AUPRO region weights aligned with pos, 0 in the padding.
    num_neg, num_pos: int32 true counts.
    cut_value, cut_rank: AUPRO cut, the negative score u' whose group crosses the FPR limit and
      the number of negatives <= u'.
    with_pro: whether to compute the AUPRO sums.
  """
  valid = jnp.arange(pos.shape[0], dtype=jnp.int32) < num_pos
  below, at_or_below, first = _search_counts(neg, pos)
  at_or_below = jnp.minimum(at_or_below, num_neg)  # a +inf positive also passes the padding
  # Mann-Whitney: twice (#neg below + half #neg tied), exact in 16-bit halves.
  twice_u = jnp.where(valid, below + at_or_below, 0).astype(jnp.uint32)
  out = {'u_lo': _chunk_sums(twice_u & 0xFFFF), 'u_hi': _chunk_sums(twice_u >> 16)}
  tp = (num_pos - first).astype(jnp.float32)  # positives scoring >= this one
  fp = (num_neg - below).astype(jnp.float32)  # negatives scoring >= this one
  out['precision'] = _chunk_sums(jnp.where(valid, tp / (tp + fp), 0.0))
  out['f1_max'] = jnp.max(jnp.where(valid, 2.0 * tp / (num_pos + tp + fp), 0.0))
  if with_pro:
    # Trapezoids between negative groups above the cut, summed per positive pixel.
    steps = (jnp.maximum(at_or_below - cut_rank, 0) + jnp.maximum(below - cut_rank, 0))
    out['pro_area'] = _chunk_sums(pos_weight * steps.astype(jnp.float32))
    out['pro_above_cut'] = _chunk_sums(jnp.where(pos > cut_value, pos_weight, 0.0))
    out['pro_at_cut'] = _chunk_sums(jnp.where(pos >= cut_value, pos_weight, 0.0))
  return out


@dataclasses.dataclass(frozen=True)
class _Split:
  neg: np.ndarray  # padded sorted negatives
  pos: np.ndarray  # padded sorted positives
  pos_weight: Optional[np.ndarray]  # padded weights aligned with pos, or None
  num_neg: int
  num_pos: int


def _split(scores: np.ndarray, defect: np.ndarray,
           region_weight: Optional[np.ndarray] = None) -> Optional[_Split]:
  """Sorted per-class scores, or None when a metric is undefined (NaN)."""
  scores = np.ascontiguousarray(scores, dtype=np.float32).reshape(-1)
  defect = np.asarray(defect).reshape(-1).astype(bool, copy=False)
  if scores.shape != defect.shape:
    raise ValueError(f'scores and labels differ in size: {scores.shape} vs {defect.shape}')
  if scores.size >= 1 << 30:  # counts stay below 2^31 in int32
    raise ValueError(f'at most 2^30 scores per metric call, got {scores.size}')
  num_pos = int(np.count_nonzero(defect))
  num_neg = scores.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return None
  if np.isnan(scores).any():
    logging.warning('metrics: scores contain NaN; the metric is NaN')
    return None
  neg = _padded_sorted(scores, ~defect, num_neg)
  weight = None
  if region_weight is None:
    pos = _padded_sorted(scores, defect, num_pos)
  else:
    pos_scores = scores[defect] + np.float32(0.0)
    order = np.argsort(pos_scores, kind='stable')
    pos = np.full(_bucket(num_pos), np.inf, np.float32)
    pos[:num_pos] = pos_scores[order]
    weight = np.zeros(_bucket(num_pos), np.float32)
    weight[:num_pos] = np.asarray(region_weight, np.float32)[order]
  return _Split(neg, pos, weight, num_neg, num_pos)


def _pro_cut(split: _Split, fpr_limit: float) -> tuple[float, int]:
  """(u', #neg <= u'): the negative score whose tie group the FPR limit falls in."""
  n = split.num_neg
  idx = math.ceil(n * (1.0 - fpr_limit)) - 1
  if idx < 0:
    return -np.inf, 0  # the limit covers every negative: no cut
  value = split.neg[idx]
  return float(value), int(np.searchsorted(split.neg[:n], value, side='right'))


def _evaluate(split: Optional[_Split], fpr_limit: Optional[float] = None) -> dict[str, float]:
  """All metrics of one split, as Python floats."""
  keys = ('auroc', 'average_precision', 'f1_max') + (('aupro',) if fpr_limit is not None else ())
  if split is None:
    return {k: math.nan for k in keys}
  with_pro = fpr_limit is not None
  cut_value, cut_rank = _pro_cut(split, fpr_limit) if with_pro else (0.0, 0)
  weight = split.pos_weight if with_pro else np.zeros((1,), np.float32)
  out = jax.device_get(_rank_core(
      split.neg, split.pos, weight, np.int32(split.num_neg), np.int32(split.num_pos),
      np.float32(cut_value), np.int32(cut_rank), with_pro=with_pro))
  n, p = split.num_neg, split.num_pos
  twice_u = (int(out['u_hi'].astype(np.uint64).sum()) << 16) + int(
      out['u_lo'].astype(np.uint64).sum())
  result = {
      'auroc': twice_u / (2 * n * p),
      'average_precision': float(out['precision'].astype(np.float64).sum()) / p,
      'f1_max': float(out['f1_max']),
  }
  if with_pro:
    area = float(out['pro_area'].astype(np.float64).sum()) / (2 * n)
    pro_hi = float(out['pro_above_cut'].astype(np.float64).sum())
    pro_lo = float(out['pro_at_cut'].astype(np.float64).sum())
    if cut_rank > 0:
      # Partial trapezoid of the group u' from its upper end up to the limit.
      fpr_hi = (n - cut_rank) / n
      fpr_lo = (n - np.searchsorted(split.neg[:n], cut_value, side='left')) / n
      width = min(max(fpr_limit - fpr_hi, 0.0), fpr_lo - fpr_hi)
      pro_at_limit = pro_hi + (pro_lo - pro_hi) * width / (fpr_lo - fpr_hi)
      area += width * (pro_hi + pro_at_limit) / 2
    result['aupro'] = area / fpr_limit
  return result


def auroc(scores, labels) -> float:
  """Area under the ROC curve (= scikit-learn roc_auc_score, ties averaged); NaN if one class."""
  return _evaluate(_split(scores, labels))['auroc']


def average_precision(scores, labels) -> float:
  """sum_n (R_n - R_{n-1}) P_n over distinct thresholds (= scikit-learn average_precision_score)."""
  return _evaluate(_split(scores, labels))['average_precision']


def f1_max(scores, labels) -> float:
  """Largest F1 over all thresholds (score >= threshold is a detection)."""
  return _evaluate(_split(scores, labels))['f1_max']


def ranking_metrics(scores, labels) -> dict[str, float]:
  """auroc, average_precision and f1_max from one sort (image-level metrics)."""
  return _evaluate(_split(scores, labels))


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
  """Normalised area under the PRO curve up to fpr_limit; maps and masks are [N, H, W]."""
  labels = masks if isinstance(masks, PixelLabels) else prepare_pixel_labels(masks)
  return pixel_metrics(maps, labels, fpr_limit)['aupro']


def pixel_metrics(maps, labels, fpr_limit: float = 0.3) -> dict[str, float]:
  """auroc, aupro, average_precision and f1_max of score maps [N, H, W] from one sort per class.

  Args:
    maps: float scores [N, H, W] (numpy or JAX), higher = more anomalous.
    labels: PixelLabels from prepare_pixel_labels (reuse it across maps), or masks [N, H, W].
    fpr_limit: the AUPRO integration limit in (0, 1].
  """
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f'fpr_limit must be in (0, 1], got {fpr_limit}')
  if not isinstance(labels, PixelLabels):
    labels = prepare_pixel_labels(labels)
  maps = np.asarray(maps, dtype=np.float32)
  if maps.size != math.prod(labels.shape):
    raise ValueError(f'maps shape {maps.shape} does not match masks shape {labels.shape}')
  start = time.perf_counter()
  result = _evaluate(_split(maps, labels.defect, labels.region_weight), fpr_limit)
  if labels.num_regions == 0:
    result['aupro'] = math.nan
  logging.info('pixel metrics of %d pixels (%d regions) in %.1fs', maps.size, labels.num_regions,
               time.perf_counter() - start)
  return result


def roc_curve(scores, labels, max_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """Exact ROC vertices (fpr, tpr), ascending, at most max_points of them, for a plot.

  The points are a subset of the exact curve's vertices, spread evenly over both classes' ranks,
  plus the end points (0, 0) and (1, 1). Empty arrays when the curve is undefined (one class).
  """
  split = _split(scores, labels)
  if split is None:
    return np.zeros((0,), np.float32), np.zeros((0,), np.float32)
  neg, pos = split.neg[:split.num_neg], split.pos[:split.num_pos]
  half = max((max_points - 2) // 2, 1)
  thresholds = np.unique(np.concatenate([
      neg[np.linspace(0, neg.size - 1, min(half, neg.size)).astype(np.int64)],
      pos[np.linspace(0, pos.size - 1, min(half, pos.size)).astype(np.int64)]]))[::-1]
  fpr = (neg.size - np.searchsorted(neg, thresholds, side='left')) / neg.size
  tpr = (pos.size - np.searchsorted(pos, thresholds, side='left')) / pos.size
  fpr = np.concatenate([[0.0], fpr, [1.0]]).astype(np.float32)
  tpr = np.concatenate([[0.0], tpr, [1.0]]).astype(np.float32)
  return fpr, tpr


# --- uncertainty of an AUROC difference -----------------------------------------------------------

def bootstrap_counts(labels, num_resamples: int, seed: int = 0) -> np.ndarray:
  """[num_resamples, N] int: how often each image is drawn in each stratified resample (the
  defective and the good images are each resampled with replacement to their own count, so every
  resample has both classes)."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  counts = np.zeros((num_resamples, labels.size), np.int64)
  for cls in (0, 1):
    idx = np.flatnonzero(labels == cls)
    if idx.size:
      counts[:, idx] = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size), num_resamples)
  return counts


def bootstrap_weights(labels, num_resamples: int, seed: int = 0) -> np.ndarray:
  """[1 + num_resamples, N] image multiplicities: the images as they are (a row of ones), then
  bootstrap_counts' stratified resamples."""
  labels = np.asarray(labels)
  return np.concatenate([np.ones((1, labels.size)), bootstrap_counts(labels, num_resamples, seed)])


def with_interval(values, level: float = 0.95) -> list[float]:
  """[estimate, lo, hi] of a statistic over bootstrap_weights' rows: its value on the images as
  they are and the percentile interval of its resamples."""
  tail = (1.0 - level) / 2
  return [float(values[0])] + np.quantile(values[1:], [tail, 1.0 - tail]).tolist()


def weighted_auroc(scores, labels, weights) -> np.ndarray:
  """AUROC of `scores` [N] with image multiplicities `weights` [B, N] (one row per resample);
  ties count one half, as in roc_auc_score on the repeated images. Returns [B]."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  weights = np.atleast_2d(np.asarray(weights, np.float64))
  _, group = np.unique(scores, return_inverse=True)  # groups of tied scores, ascending
  onehot = np.zeros((scores.size, group.max() + 1))
  onehot[np.arange(scores.size), group] = 1.0
  neg = (weights * ~labels) @ onehot  # [B, G] negative weight per score group
  pos = (weights * labels) @ onehot
  below = np.cumsum(neg, axis=1) - neg
  wins = np.sum(pos * (below + 0.5 * neg), axis=1)
  return wins / (pos.sum(axis=1) * neg.sum(axis=1))


def paired_bootstrap_auroc_difference(scores_a, scores_b, labels, *, num_resamples: int = 2000,
                                      seed: int = 0, level: float = 0.95) -> dict[str, float]:
  """Mean image AUROC of method a minus method b, with a paired bootstrap percentile interval.

  scores_a, scores_b: [N] or [S, N] (S seeds of each method, scored on the same N test images);
  each resample draws the same images for both methods and every seed, and the difference is that
  of the seed-mean AUROCs (pooled over seeds). Returns difference, lo, hi, and the fraction of
  resamples in which a is not better (a one-sided bootstrap p-value for 'a > b').
  """
  a, b = np.atleast_2d(scores_a), np.atleast_2d(scores_b)
  labels = np.asarray(labels)
  if a.shape[1] != labels.size or b.shape[1] != labels.size:
    raise ValueError(f'scores {a.shape}, {b.shape} do not match {labels.size} labels')
  if len(np.unique(labels)) != 2:
    return {'difference': math.nan, 'lo': math.nan, 'hi': math.nan, 'p_not_better': math.nan}
  mean_auroc = lambda s, w: np.mean([weighted_auroc(x, labels, w) for x in s], axis=0)
  weights = bootstrap_weights(labels, num_resamples, seed)
  diffs = mean_auroc(a, weights) - mean_auroc(b, weights)
  difference, lo, hi = with_interval(diffs, level)
  return {'difference': difference, 'lo': lo, 'hi': hi,
          'p_not_better': float(np.mean(diffs[1:] <= 0))}
