"""esm/metrics.py against scikit-learn and against a plain per-threshold AUPRO reference."""

import math

import numpy as np
import pytest
import scipy.ndimage
from sklearn import metrics as skm

from esm import metrics


def _tied_data(n, seed, pos_rate=0.3, levels=7):
  """Scores on a few levels (many ties), positives shifted up."""
  rng = np.random.default_rng(seed)
  labels = rng.random(n) < pos_rate
  scores = (rng.integers(0, levels, n) + labels * rng.integers(0, 3, n)).astype(np.float32) / 3
  return scores, labels


def _f1_max_reference(scores, labels):
  precision, recall, _ = skm.precision_recall_curve(labels, scores)
  f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
  return float(f1.max())


@pytest.mark.parametrize('n,seed,levels', [(200, 0, 7), (256, 1, 3), (37, 2, 50), (180, 3, 1000)])
def test_ranking_metrics_equal_sklearn(n, seed, levels):
  scores, labels = _tied_data(n, seed, levels=levels)
  got = metrics.ranking_metrics(scores, labels)
  assert got['auroc'] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-6)
  assert got['average_precision'] == pytest.approx(
      skm.average_precision_score(labels, scores), abs=1e-6)
  assert got['f1_max'] == pytest.approx(_f1_max_reference(scores, labels), abs=1e-6)
  assert metrics.auroc(scores, labels) == got['auroc']
  assert metrics.average_precision(scores, labels) == got['average_precision']
  assert metrics.f1_max(scores, labels) == got['f1_max']


def test_auroc_larger_split_with_ties_equals_sklearn():
  scores, labels = _tied_data(5000, 4, pos_rate=0.05, levels=20)
  assert metrics.auroc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores),
                                                        abs=1e-6)


def test_signed_zeros_tie_and_infinities_rank():
  scores = np.array([-0.0, 0.0, np.inf, -np.inf, 0.0, -0.0, np.inf, 1.0], np.float32)
  labels = np.array([1, 0, 1, 0, 0, 1, 0, 1], bool)
  finite = np.nan_to_num(scores, posinf=1e30, neginf=-1e30)  # same ranks; sklearn rejects inf
  assert metrics.auroc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, finite))
  assert metrics.average_precision(scores, labels) == pytest.approx(
      skm.average_precision_score(labels, finite))


@pytest.mark.parametrize('labels', [np.zeros(6, bool), np.ones(6, bool)])
def test_single_class_is_nan(labels):
  scores = np.arange(6, dtype=np.float32)
  assert all(math.isnan(v) for v in metrics.ranking_metrics(scores, labels).values())
  fpr, tpr = metrics.roc_curve(scores, labels)
  assert fpr.size == 0 and tpr.size == 0


def test_empty_and_nan_scores_are_nan():
  assert math.isnan(metrics.auroc(np.zeros(0, np.float32), np.zeros(0, bool)))
  assert math.isnan(metrics.auroc(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1])))


def test_roc_curve_points_lie_on_the_exact_curve():
  scores, labels = _tied_data(240, 5, levels=200)
  fpr, tpr = metrics.roc_curve(scores, labels, max_points=20)
  assert fpr.size <= 20
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  ref_fpr, ref_tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
  ref = set(zip(np.round(ref_fpr, 6), np.round(ref_tpr, 6)))
  assert all((round(float(a), 6), round(float(b), 6)) in ref for a, b in zip(fpr, tpr))


# --- AUPRO ----------------------------------------------------------------------------------------
def _reference_aupro(maps, masks, fpr_limit):
  """Per-threshold PRO/FPR, straight from the definition, then a trapezoid cut at the limit."""
  regions = _region_images(masks)
  fprs, pros = [0.0], [0.0]
  good = ~masks
  for t in np.unique(maps)[::-1]:
    above = maps >= t
    fprs.append((above & good).sum() / good.sum())
    pros.append(np.mean([above[img][region].mean() for img, region in regions]))
  fprs, pros = np.array(fprs), np.array(pros)
  keep = fprs <= fpr_limit
  area = np.trapezoid(pros[keep], fprs[keep])
  last = np.flatnonzero(keep)[-1]
  if fprs[last] < fpr_limit and last + 1 < fprs.size:
    x0, x1, y0, y1 = fprs[last], fprs[last + 1], pros[last], pros[last + 1]
    y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    area += (fpr_limit - x0) * (y0 + y_limit) / 2
  return area / fpr_limit


def _region_images(masks):
  """(image index, region mask) for every 8-connected defect region."""
  out = []
  for img, mask in enumerate(masks):
    labelled, k = scipy.ndimage.label(mask, structure=np.ones((3, 3)))
    out += [(img, labelled == r) for r in range(1, k + 1)]
  return out


def _defect_split(seed, levels):
  """3 images of 12x12: regions of different sizes (one diagonal, 8-connected only), ties."""
  rng = np.random.default_rng(seed)
  masks = np.zeros((3, 12, 12), bool)
  masks[0, 2:5, 2:6] = True
  masks[0, 8, 8] = masks[0, 9, 9] = True  # one region under 8-connectivity
  masks[1, 5:11, 1:4] = True
  masks[2, 0, 11] = True
  maps = rng.integers(0, levels, masks.shape) + masks * rng.integers(0, levels // 2 + 1,
                                                                     masks.shape)
  return maps.astype(np.float32), masks


@pytest.mark.parametrize('seed,levels,fpr_limit', [(0, 6, 0.3), (1, 40, 0.3), (2, 1000, 0.05),
                                                   (3, 1000, 1.0), (4, 3, 0.3)])
def test_aupro_equals_reference(seed, levels, fpr_limit):
  maps, masks = _defect_split(seed, levels)
  got = metrics.aupro(maps, masks, fpr_limit)
  assert got == pytest.approx(_reference_aupro(maps, masks, fpr_limit), abs=1e-3)


def test_pixel_metrics_reuse_labels_and_match_flat_metrics():
  maps, masks = _defect_split(5, 30)
  labels = metrics.prepare_pixel_labels(masks)
  assert labels.num_regions == 4
  assert labels.region_weight.sum() == pytest.approx(1.0)
  got = metrics.pixel_metrics(maps, labels)
  flat = metrics.ranking_metrics(maps.ravel(), masks.ravel())
  for key in flat:
    assert got[key] == pytest.approx(flat[key], abs=1e-7)
  assert got['aupro'] == pytest.approx(metrics.aupro(maps, masks), abs=1e-7)


def test_perfect_and_no_defect_maps():
  maps, masks = _defect_split(6, 10)
  perfect = metrics.pixel_metrics(masks.astype(np.float32), masks)
  assert perfect['auroc'] == 1.0 and perfect['aupro'] == pytest.approx(1.0)
  none = metrics.pixel_metrics(maps, np.zeros_like(masks))
  assert all(math.isnan(v) for v in none.values())


def test_paired_bootstrap_matches_a_slow_reference():
  """The vectorised weighted AUROC of every resample equals roc_auc_score on the repeated images."""
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  labels = np.r_[np.zeros(30, int), np.ones(20, int)]
  a = np.round(rng.normal(labels * 1.0, 1.0, (2, 50)), 1)  # two seeds, with ties
  b = np.round(rng.normal(labels * 0.5, 1.0, (2, 50)), 1)
  counts = metrics.bootstrap_counts(labels, 200, seed=3)
  assert (counts[:, labels == 1].sum(1) == 20).all() and (counts[:, labels == 0].sum(1) == 30).all()
  slow = []
  for c in counts:
    idx = np.repeat(np.arange(50), c)
    slow.append(np.mean([roc_auc_score(labels[idx], s[idx]) for s in a])
                - np.mean([roc_auc_score(labels[idx], s[idx]) for s in b]))
  fast = (np.mean([metrics.weighted_auroc(s, labels, counts) for s in a], axis=0)
          - np.mean([metrics.weighted_auroc(s, labels, counts) for s in b], axis=0))
  np.testing.assert_allclose(fast, slow, atol=1e-12)
  ci = metrics.paired_bootstrap_auroc_difference(a, b, labels, num_resamples=200, seed=3)
  full = np.mean([roc_auc_score(labels, s) for s in a]) - np.mean([roc_auc_score(labels, s) for s in b])
  assert ci['difference'] == pytest.approx(full, abs=1e-12)
  assert ci['lo'] == pytest.approx(np.quantile(slow, 0.025), abs=1e-12)
  assert ci['hi'] == pytest.approx(np.quantile(slow, 0.975), abs=1e-12)
  assert ci['lo'] < ci['difference'] < ci['hi']
