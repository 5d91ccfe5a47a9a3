"""The noise-aware choice rule (esm/choice.py) and the resampling it stands on (esm/resample.py)."""

import numpy as np
import pytest
import scipy.stats

from esm import choice
from esm import metrics
from esm import resample

FAMILIES = ('a', 'b', 'c')
ENTRIES = tuple((f, m) for f in FAMILIES for m in choice.METRICS)


def _candidates(t_ds, detectors=None, nfe=None):
  return [{'method': 'esm', 't_d': t, 'nfe': (nfe or t_ds)[k],
           'detectors': (detectors or [['re']] * len(t_ds))[k]} for k, t in enumerate(t_ds)]


def _table(point, noise, seed=0, num_resamples=400):
  """A table whose resamples scatter around `point` [C, E] by `noise` (shared by all candidates
  in part, as paired resamples are)."""
  point = np.asarray(point, np.float64)
  rng = np.random.default_rng(seed)
  common = rng.normal(0, noise, (num_resamples, 1, point.shape[1]))
  own = rng.normal(0, noise, (num_resamples,) + point.shape)
  return choice.ScoreTable(ENTRIES, point, np.clip(point + common + own, 0, 1))


def _choose(table, candidates, default=0, kept=None, like=None, grid=None, tol=0.005, **options):
  kept = list(range(len(ENTRIES))) if kept is None else kept
  like = [True] * len(candidates) if like is None else like
  return choice.choose(table, candidates, default, tol, kept, like, t_d_grid=grid,
                       options=choice.RuleOptions(**options))


def test_a_clear_winner_beyond_the_noise_is_chosen():
  table = _table([[0.70] * 6, [0.90] * 6, [0.75] * 6], noise=0.01)
  out = _choose(table, _candidates([25, 6, 50]), grid=[6, 25, 50])
  assert out['index'] == 1 and out['leader'] == 1 and out['band'] == [1]
  assert out['reason'].startswith('best')


def test_a_tie_within_one_se_goes_to_the_default():
  table = _table([[0.80] * 6, [0.81] * 6, [0.60] * 6], noise=0.05)
  out = _choose(table, _candidates([25, 6, 50]), grid=[6, 25, 50, 100, 200, 400])
  assert out['leader'] == 1 and set(out['band']) == {0, 1}
  assert out['index'] == 0 and 'tie band' in out['reason']
  assert out['se'][0] > 0.01  # the band is the SE, not the 0.005 tolerance


def test_ties_without_the_default_go_nearest_it_or_to_the_bootstrap_winner_then_fewer_nfe():
  table = _table([[0.50] * 6, [0.90] * 6, [0.90] * 6, [0.899] * 6], noise=0.01)
  grid = [3, 6, 12, 25, 50, 100, 200, 400, 800]
  out = _choose(table, _candidates([25, 12, 6, 3]), grid=grid, prefer='winner')
  assert set(out['band']) == {1, 2, 3}
  wins = {i: out['wins'][i] for i in out['band']}
  assert out['index'] == max(wins, key=lambda i: (wins[i], -i))
  # Equal evidence for every tied candidate: fewer NFE decides.
  same = choice.ScoreTable(ENTRIES, np.array([[0.5] * 6, [0.9] * 6, [0.9] * 6]),
                           np.array([[[0.5] * 6, [0.9] * 6, [0.9] * 6]] * 50))
  assert _choose(same, _candidates([25, 12, 6]), prefer='winner')['index'] == 2
  # By default the tie nearest the default's T_d (25) goes first.
  out = _choose(table, _candidates([25, 12, 6, 3]), grid=grid)
  assert out['index'] == 1 and 'nearest the default' in out['reason']


def test_a_non_default_detector_subset_must_beat_the_default_by_two_se():
  candidates = _candidates([25, 25], detectors=[['u', 're'], ['re']])
  like = [True, False]
  small = _table([[0.80] * 6, [0.83] * 6], noise=0.03)
  out = _choose(small, candidates, like=like)
  assert out['eligible'] == [0] and out['index'] == 0
  # The decision names what the margin held back when it led by more than 1 SE (here 1.7 SE).
  diff, se = choice._difference(small, range(len(ENTRIES)), [1], 0)
  lead = float(diff[0] / se[0])
  assert 1 < lead < 2
  assert out['held_back'] == {'id': 1, 'difference': pytest.approx(float(diff[0])),
                              'se': pytest.approx(float(se[0])), 'margin_se': 2.0}
  assert out['reason'].startswith('default') and (
      'candidate 1 (esm, T_d 25, re) leads the default by' in out['reason'])
  assert 'short of the 2-SE margin' in out['reason']
  large = _table([[0.70] * 6, [0.95] * 6], noise=0.01)
  out = _choose(large, candidates, like=like)
  assert out['index'] == 1 and 'held_back' not in out and 'margin' not in out['reason']
  # A lead within its noise (0.6 SE here), or a subset behind the default, is not named.
  for other in (0.81, 0.77):
    assert 'held_back' not in _choose(_table([[0.80] * 6, [other] * 6], noise=0.03), candidates,
                                      like=like)
  # RuleOptions.detector_margin_se sets the margin: the subset is eligible just below its lead.
  assert _choose(small, candidates, like=like, detector_margin_se=lead - 0.1)['eligible'] == [0, 1]
  assert _choose(small, candidates, like=like, detector_margin_se=lead + 0.1)['eligible'] == [0]
  with pytest.raises(ValueError, match='detector_margin_se'):
    choice.RuleOptions(detector_margin_se=-1.0)


def test_saturation_keeps_the_default():
  table = _table([[0.90] * 6, [0.999] * 6], noise=0.001)
  out = _choose(table, _candidates([25, 6]))
  assert out['index'] == 0 and 'saturated' in out['reason']


def test_a_band_over_a_third_of_the_t_d_grid_keeps_the_default():
  table = _table([[0.5] * 6, [0.80] * 6, [0.80] * 6, [0.80] * 6], noise=0.02)
  grid = [1, 3, 6, 12, 25, 50]
  out = _choose(table, _candidates([25, 1, 3, 6]), grid=grid, band_guard=True)
  assert len(out['t_d_in_band']) == 3 and out['index'] == 0 and 'T_d' in out['reason']
  # Without the guard the band decides: fewest NFE, or the T_d nearest the default's (25).
  assert _choose(table, _candidates([25, 1, 3, 6]), grid=grid, prefer='winner')['index'] == 1
  out = _choose(table, _candidates([25, 1, 3, 6]), grid=grid)
  assert out['index'] == 3 and 'nearest the default' in out['reason']


def test_nearest_prefers_the_default_sampler_and_floor_before_the_t_d():
  table = _table([[0.5] * 6, [0.80] * 6, [0.80] * 6], noise=0.02)
  candidates = _candidates([25, 20, 6])
  candidates[1]['method'] = 'esm_sigma'
  assert _choose(table, candidates)['index'] == 2
  with pytest.raises(ValueError, match='prefer'):
    choice.RuleOptions(prefer='closest')


def test_a_choice_that_hangs_on_one_family_keeps_the_default():
  # X (1) leads on rank by winning families a (by far) and b (barely); Y (2) wins c. Without a,
  # X and Y share the first rank and Y, with fewer NFE, would be chosen: outside X's band.
  point = [[0.60] * 6,
           [0.95, 0.95, 0.86, 0.86, 0.80, 0.80],
           [0.80, 0.80, 0.85, 0.85, 0.90, 0.90]]
  table = _table(point, noise=0.002)
  out = _choose(table, _candidates([25, 12, 6]), family_guard=True)
  assert out['leader'] == 1 and out['band'] == [1]
  assert out['index'] == 0 and 'hangs on family a' in out['reason']
  assert out['leave_one_family_out']['a'] == {'index': 2, 'in_band': False}
  out = _choose(table, _candidates([25, 12, 6]))  # without the guard it is recorded only
  assert out['index'] == 1 and out['leave_one_family_out']['a'] == {'index': 2, 'in_band': False}
  # A lead that every family agrees with stands.
  point[2][4:] = [0.78, 0.78]
  out = _choose(_table(point, noise=0.002), _candidates([25, 12, 6]), family_guard=True)
  assert out['index'] == 1, out['reason']


def test_a_metric_of_its_own_decides_on_that_metrics_entries_alone():
  # Candidate 1 leads on image AUROC, candidate 2 on pixel AUROC, both far beyond the noise.
  table = _table([[0.70, 0.70] * 3, [0.95, 0.60] * 3, [0.60, 0.95] * 3], noise=0.01)
  kept = list(range(len(ENTRIES)))
  image = choice.of_metric(table, kept, 'image')
  assert image == [0, 2, 4] and choice.of_metric(table, kept, None) == kept
  pick = lambda metric: _choose(table, _candidates([25, 6, 50]), grid=[6, 25, 50],
                                metric=metric)['index']
  assert (pick('image'), pick('pixel')) == (1, 2)
  with pytest.raises(ValueError, match='metric'):
    choice.RuleOptions(metric='aupro')


def test_entries_that_carry_no_information_leave_the_criterion():
  point = np.array([[0.5, 0.52, 0.8, 0.9, 0.7, 0.7], [0.51, 0.5, 0.9, 0.8, 0.7, 0.8]])
  table = _table(point, noise=0.05)
  kept, left = choice.informative_entries(table, {'c': {'image_auroc': 0.99,
                                                        'pixel_auroc': 0.90}})
  assert kept == [2, 3, 5]
  assert set(left) == {'a/image', 'a/pixel', 'c/image'}
  assert 'solved without a model' in left['c/image'] and 'chance' in left['a/pixel']
  out = _choose(table, _candidates([25, 6]), kept=[])
  assert out['index'] == 0 and 'no development family' in out['reason']


def test_mean_ranks_combine_families_by_rank():
  values = np.array([[0.99, 0.60], [0.70, 0.70], [0.69, 0.65]])
  np.testing.assert_allclose(choice.mean_ranks(values[None], [0, 1])[0], [2.0, 1.5, 2.5])


def test_pixel_pairs_give_the_pixel_auroc_of_the_resampled_images():
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(5, 6, 6)).astype(np.float32)
  masks = np.zeros((5, 6, 6), np.uint8)
  masks[1, :2] = masks[3, 2:5, 1:4] = 1
  maps[masks == 1] += 1.0
  maps[0, 0, :3] = maps[1, 0, 0]  # ties across images
  pairs = resample.pixel_pairs(maps, masks)
  assert resample.pixel_auroc(pairs, np.ones(5))[0] == pytest.approx(
      metrics.auroc(maps.ravel(), masks.ravel()))
  counts = np.array([2, 1, 0, 3, 1])
  repeated = np.repeat(np.arange(5), counts)
  assert resample.pixel_auroc(pairs, counts)[0] == pytest.approx(
      metrics.auroc(maps[repeated].ravel(), masks[repeated].ravel()))


def _evidence(rng, labels, masks, signal: float, path: str) -> resample.Evidence:
  maps = rng.normal(size=masks.shape).astype(np.float32) + signal * masks
  scores = maps.reshape(len(labels), -1).max(axis=1)
  resample.save_evidence(path, [['x']], [scores], [resample.pixel_pairs(maps, masks)], labels)
  return resample.load_evidence(path)[('x',)]


def test_paired_difference_of_image_and_pixel_auroc(tmp_path):
  rng = np.random.default_rng(4)
  labels = np.array([0] * 20 + [1] * 20)
  masks = np.zeros((40, 8, 8), np.uint8)
  masks[20:, 2:5, 2:5] = 1
  good = [_evidence(rng, labels, masks, 3.0, str(tmp_path / f'g{k}.npz')) for k in range(2)]
  weak = [_evidence(rng, labels, masks, 0.3, str(tmp_path / f'w{k}.npz')) for k in range(2)]
  diff = resample.paired_difference(good, weak, 500)
  want = [np.mean([metrics.auroc(s, y) for s, _, y in good]) -
          np.mean([metrics.auroc(s, y) for s, _, y in weak]),
          np.mean([resample.pixel_auroc(p, np.ones(40))[0] for _, p, _ in good]) -
          np.mean([resample.pixel_auroc(p, np.ones(40))[0] for _, p, _ in weak])]
  np.testing.assert_allclose(diff[:, 0], want, rtol=1e-6)
  assert np.all(diff[:, 1] > 0) and np.all(diff[:, 1] <= diff[:, 0])
  assert np.all(diff[:, 0] <= diff[:, 2])
  np.testing.assert_allclose(resample.paired_difference(weak, weak, 100), 0.0)


def test_group_counts_draw_a_source_image_with_all_its_copies():
  groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
  counts = resample.group_counts(groups, 200, seed=1)
  assert counts.shape == (200, 12)
  for g in range(4):
    assert np.all(counts[:, groups == g] == counts[:, [3 * g]])
  np.testing.assert_array_equal(counts.sum(axis=1), np.full(200, 12))
  np.testing.assert_array_equal(counts, resample.group_counts(groups, 200, seed=1))


def test_kendall_tau_matches_scipy():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=12), rng.normal(size=12)
  b[:3] = b[3]  # ties
  assert resample.kendall_tau(a, b) == pytest.approx(scipy.stats.kendalltau(a, b).statistic)
