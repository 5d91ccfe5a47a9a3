"""The noise-aware choice rule of label-free tuning, on a table of bootstrap AUROCs.

Each candidate (sampler, ESM^σ floor, T_d, detector subset) has, on every entry (a development
family and a metric: image or pixel AUROC), its AUROC on the development set and in each of
tune.bootstrap resamples of the source images (a painted copy is drawn with its clean image;
esm/resample.py). The rule, in order:
  1. Entries the model-free z-score solves (>= SOLVED) or that every candidate scores at chance
     (AUROC - 0.5 <= 2 SE for all) carry no ranking information and leave the criterion; under
     RuleOptions.metric only that metric's entries stay. With none left, the default is kept.
  2. A candidate whose detector subset or ESM^σ floor is not the default's is eligible only when
     it beats the default by more than RuleOptions.detector_margin_se standard errors
     (DETECTOR_MARGIN_SE, 2, by default). The one this holds back furthest ahead of the default,
     when that lead exceeds its noise (max(1 SE, tune.tie_tolerance)) and the choice's lead, is
     named in the decision (held_back, and a clause of the reason).
  3. The leader has the best mean rank over the entries (families combined by rank, not pooled).
  4. Its ties: candidates whose difference to the leader (the mean over the entries of their
     AUROC differences, paired over resamples) is within max(1 SE, tune.tie_tolerance).
  5. Saturation guard: the leader scores >= SATURATED in most resamples: the set cannot tell
     candidates apart, and the default is kept. (RuleOptions.band_guard: also when the ties hold
     more than a third of the T_d grid, and more than one T_d.)
  6. Among the ties: the default, then the one nearest the default (its sampler and floor, then
     the T_d nearest the default's on a log scale), then the most frequent bootstrap winner, then
     fewer NFE (then the smaller T_d, fewer detectors). RuleOptions.prefer='winner' drops the
     nearness.
  7. Leave one family out: with each family's entries removed, steps 3-6 again, recorded; under
     RuleOptions.family_guard, if one of those choices falls outside the full band, the choice
     hangs on that family and the default is kept.
The rule runs twice (esm/tune.py): on every point without S_Cos, then on the detector subsets,
S_Cos among them, at the first stage's choice; RuleOptions.stage2_reference names the second
stage's reference: the config's default, whose point joins the pool ('default'); the first
stage's point with the default's detectors ('choice_point'); or the first stage's choice itself,
so that S_Cos enters only by beating it by step 2's margin ('choice'); RuleOptions.stage2_metric
decides the second stage on one metric's entries.
The defaults were chosen on bottle and pill by a rule written before the test results of the
variants existed (docs/results.md, "Tuning regret"); experiments/regret.py compares the variants.
"""

import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.stats

from esm import metrics
from esm import resample

SOLVED = 0.98
SATURATED = 0.995
T_D_BAND_SHARE = 1 / 3
DETECTOR_MARGIN_SE = 2.0
METRICS = ('image', 'pixel')
PREFERENCES = ('winner', 'nearest')
STAGE2_REFERENCES = ('default', 'choice_point', 'choice')
STAGE2_POINTS = ('choice', 'all')


@dataclasses.dataclass(frozen=True)
class RuleOptions:
  """Variants of the rule's guards and tie order (the module docstring's steps)."""
  band_guard: bool = False  # step 5: a tie band over a third of the T_d grid keeps the default
  family_guard: bool = False  # step 7: a choice that hangs on one family keeps the default
  # step 6 after the default: 'nearest' (the default's sampler and floor, then the T_d nearest the
  # default's on a log scale, then the winner) or 'winner' (bootstrap winner, then fewer NFE)
  prefer: str = 'nearest'
  # the second (S_Cos) stage's reference (module docstring): 'default', 'choice_point' or
  # 'choice'; the last two keep the first stage's T_d, so S_Cos cannot undo it
  stage2_reference: str = 'default'
  # where the second stage runs: 'choice' (the first stage's choice, and the reference's point) or
  # 'all' (every point of the first stage, the second decision among all of them: S_Cos can move T_d)
  stage2_points: str = 'choice'
  # the entries' metric: None (image and pixel AUROC together) or one of METRICS, which decides
  # that metric's reading alone (experiments/regret.py's split roles pair the two decisions)
  metric: Optional[str] = None
  # step 2's margin, in standard errors of the difference to the default
  detector_margin_se: float = DETECTOR_MARGIN_SE
  # the second stage's metric, where it differs from `metric`: the detector subset at the first
  # stage's point decided on one metric's entries (experiments/regret.py's 'apart' role pairs the
  # image score's subset with the map's, at one operating point)
  stage2_metric: Optional[str] = None

  def __post_init__(self):
    if self.prefer not in PREFERENCES:
      raise ValueError(f'RuleOptions.prefer: expected one of {PREFERENCES}, got {self.prefer!r}')
    if self.stage2_reference not in STAGE2_REFERENCES:
      raise ValueError(f'RuleOptions.stage2_reference: expected one of {STAGE2_REFERENCES}, got '
                       f'{self.stage2_reference!r}')
    if self.stage2_points not in STAGE2_POINTS:
      raise ValueError(f'RuleOptions.stage2_points: expected one of {STAGE2_POINTS}, got '
                       f'{self.stage2_points!r}')
    if self.stage2_points == 'all' and self.stage2_reference != 'default':
      raise ValueError("RuleOptions.stage2_points='all' decides among every point against the "
                       "default: it needs stage2_reference='default'")
    for name in ('metric', 'stage2_metric'):
      if getattr(self, name) not in (None, *METRICS):
        raise ValueError(f'RuleOptions.{name}: expected None or one of {METRICS}, got '
                         f'{getattr(self, name)!r}')
    if not self.detector_margin_se >= 0:
      raise ValueError('RuleOptions.detector_margin_se: expected a number of standard errors >= 0, '
                       f'got {self.detector_margin_se!r}')


@dataclasses.dataclass(frozen=True)
class ScoreTable:
  """AUROC of each candidate on each entry: on the set (point) and in every resample."""
  entries: Tuple[Tuple[str, str], ...]  # (family, metric)
  point: np.ndarray  # [C, E]
  resampled: np.ndarray  # [R, C, E]


def build_table(image_scores: np.ndarray, pairs: Sequence[resample.PixelPairs], labels, families,
                source, family_names: Sequence[str], num_resamples: int, seed: int) -> ScoreTable:
  """ScoreTable of candidates' per-image scores [C, N] and pixel pairs; an entry's images are the
  clean ones and the family's painted ones."""
  labels, families = np.asarray(labels), np.asarray(families)
  weights = np.concatenate([np.ones((1, labels.size)),
                            resample.group_counts(source, num_resamples, seed)])
  entries, columns = [], []
  for family in family_names:
    selected = weights * ((labels == 0) | (families == family))
    entries += [(family, 'image'), (family, 'pixel')]
    with np.errstate(invalid='ignore', divide='ignore'):  # a resample without the family: NaN
      columns.append(np.stack([metrics.weighted_auroc(s, labels, selected)
                               for s in image_scores], 1))
    columns.append(np.stack([resample.pixel_auroc(p, selected) for p in pairs], 1))
  table = np.stack(columns, -1)  # [R + 1, C, E]
  return ScoreTable(tuple(entries), table[0], table[1:])


def informative_entries(table: ScoreTable, model_free: Dict[str, Dict[str, float]],
                        only: Optional[str] = None):
  """(kept entry indices, {'family/metric': why it left}) by step 1; with `only`
  (RuleOptions.metric), an informative entry of the other metric leaves too."""
  kept, left = [], {}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)
    se = np.nanstd(table.resampled, axis=0)
  for e, (family, metric) in enumerate(table.entries):
    free = model_free.get(family, {}).get(f'{metric}_auroc', float('nan'))
    if not np.all(np.isfinite(table.point[:, e])):
      left[f'{family}/{metric}'] = 'no painted image of this family'
    elif free >= SOLVED:
      left[f'{family}/{metric}'] = f'solved without a model (z-score AUROC {free:.3f} >= {SOLVED})'
    elif np.all(table.point[:, e] - 0.5 <= 2 * se[:, e]):
      left[f'{family}/{metric}'] = 'every candidate at chance (AUROC - 0.5 <= 2 SE)'
    elif only is not None and metric != only:
      left[f'{family}/{metric}'] = f'RuleOptions.metric={only!r}'
    else:
      kept.append(e)
  return kept, left


def of_metric(table: ScoreTable, kept: Sequence[int], metric: Optional[str]) -> List[int]:
  """The kept entries of `metric` (all of them for None)."""
  return [e for e in kept if metric is None or table.entries[e][1] == metric]


def _mean(values: np.ndarray, entries: Sequence[int]) -> np.ndarray:
  with warnings.catch_warnings():  # a resample without any of the entries' families: NaN
    warnings.simplefilter('ignore', RuntimeWarning)
    return np.nanmean(values[..., entries], axis=-1)


def mean_ranks(values: np.ndarray, entries: Sequence[int]) -> np.ndarray:
  """Mean over entries of each candidate's rank (1 = highest AUROC, ties averaged): values
  [..., C, E] -> [..., C]."""
  ranks = scipy.stats.rankdata(-np.nan_to_num(values[..., entries], nan=0.5), axis=-2)
  return ranks.mean(axis=-1)


def _difference(table: ScoreTable, entries, pool, to: int):
  """(point difference [P], its SE [P]) of each pool member's mean AUROC minus candidate `to`'s."""
  point = _mean(table.point[pool], entries) - _mean(table.point[to], entries)
  resampled = _mean(table.resampled[:, pool], entries) - _mean(table.resampled[:, to], entries)[:, None]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)
    return point, np.nanstd(resampled, axis=0)


def _distance(c: Dict[str, Any], default: Dict[str, Any]) -> Tuple[int, float]:
  """How far c's point lies from the default's: another sampler or floor first, then |log T_d|."""
  other = c['method'] != default['method'] or c.get('sigma_floor') != default.get('sigma_floor')
  return int(other), abs(float(np.log(c['t_d'] / default['t_d'])))


def _preference(c: Dict[str, Any], index: int, is_default: bool, wins: float,
                nearest: Optional[Dict[str, Any]] = None):
  """Sort key of step 6 (nearest: the default's row, under RuleOptions.prefer='nearest')."""
  near = _distance(c, nearest) if nearest is not None else ()
  return (not is_default,) + near + (-wins, c['nfe'], c['t_d'], len(c['detectors']), index)


def _band(table, candidates, pool, default, tie_tolerance, entries, t_d_grid,
          options: RuleOptions):
  """Steps 3-6 on `pool`: the decision without the leave-one-family-out check."""
  ranks = mean_ranks(table.point[pool], entries)
  resampled = mean_ranks(table.resampled[:, pool], entries)
  best = resampled == resampled.min(axis=1, keepdims=True)
  wins = np.mean(best / best.sum(axis=1, keepdims=True), axis=0)  # a shared first place is split
  order = sorted(range(len(pool)), key=lambda k: (ranks[k],) + _preference(
      candidates[pool[k]], pool[k], pool[k] == default, wins[k]))
  leader = pool[order[0]]
  diff, se = _difference(table, entries, pool, leader)
  width = np.maximum(se, tie_tolerance)
  ties = [pool[k] for k in range(len(pool)) if diff[k] >= -width[k]]
  saturated = float(np.mean(_mean(table.resampled[:, leader], entries) >= SATURATED))
  spread = sorted({candidates[i]['t_d'] for i in ties})
  out = {'leader': leader, 'band': ties, 'saturated_share': saturated, 't_d_in_band': spread,
         'se': {pool[k]: float(se[k]) for k in range(len(pool))},
         'difference': {pool[k]: float(diff[k]) for k in range(len(pool))},
         'wins': {pool[k]: float(wins[k]) for k in range(len(pool))}}
  if saturated > 0.5:
    return dict(out, index=default, reason=f'default kept: saturated (the leader scores >= '
                f'{SATURATED} in {saturated:.0%} of resamples)')
  if (options.band_guard and t_d_grid
      and len(spread) > max(1, T_D_BAND_SHARE * len(t_d_grid))):
    return dict(out, index=default, reason=f'default kept: the tie band holds {len(spread)} of the '
                f'{len(t_d_grid)} T_d values')
  if default in ties:
    return dict(out, index=default, reason='default: within the tie band of the leader')
  nearest = candidates[default] if options.prefer == 'nearest' else None
  chosen = min(ties, key=lambda i: _preference(candidates[i], i, False, out['wins'][i], nearest))
  how = 'the one nearest the default' if nearest is not None else 'the bootstrap winner'
  return dict(out, index=chosen, reason=f"best: {len(ties)} tied, {how} (first in "
              f"{out['wins'][chosen]:.0%} of resamples), NFE {candidates[chosen]['nfe']}")


def choose(table: ScoreTable, candidates: List[Dict[str, Any]], default: int,
           tie_tolerance: float, kept: Sequence[int], default_like: Sequence[bool],
           t_d_grid: Optional[Sequence[int]] = None, pool: Optional[Sequence[int]] = None,
           options: RuleOptions = RuleOptions()) -> Dict[str, Any]:
  """The decision of the rule (module docstring) among `pool` (default: every candidate);
  default_like[i]: candidate i has the default's detectors (for its sampler) and floor, so step 2
  does not apply to it. index is the chosen candidate, reason says why, band and se what noise
  the choice saw."""
  pool = list(range(len(candidates)) if pool is None else pool)
  kept = of_metric(table, kept, options.metric)
  if not kept:
    return {'index': default, 'reason': 'default kept: no development family carries ranking '
            'information', 'band': [default], 'eligible': [default], 'leave_one_family_out': {}}
  diff, se = _difference(table, kept, pool, default)
  eligible = [i for k, i in enumerate(pool)
              if i == default or default_like[i] or diff[k] > options.detector_margin_se * se[k]]
  out = _band(table, candidates, eligible, default, tie_tolerance, kept, t_d_grid, options)
  out['eligible'] = eligible
  out['leave_one_family_out'] = {}
  if out['index'] != default:
    out = _leave_one_family_out(out, table, candidates, default, tie_tolerance, kept, t_d_grid,
                                options)
  return _held_back(out, candidates, pool, diff, se, tie_tolerance, options.detector_margin_se)


def _leave_one_family_out(out, table, candidates, default, tie_tolerance, kept, t_d_grid,
                          options: RuleOptions) -> Dict[str, Any]:
  """Step 7 on a decision that left the default: recorded, and under family_guard enforced."""
  for family in sorted({table.entries[e][0] for e in kept}):  # recorded even when off
    rest = [e for e in kept if table.entries[e][0] != family]
    alone = (_band(table, candidates, out['eligible'], default, tie_tolerance, rest, t_d_grid,
                   options)['index'] if rest else default)
    out['leave_one_family_out'][family] = {'index': alone, 'in_band': alone in out['band']}
    if alone not in out['band'] and options.family_guard:
      return dict(out, index=default, reason=f'default kept: the choice hangs on family {family} '
                  f'(without it the rule picks candidate {alone}, outside the band)')
  return out


def _held_back(out, candidates, pool, diff, se, tie_tolerance: float,
               margin_se: float) -> Dict[str, Any]:
  """Step 2's effect, said: the ineligible candidate furthest ahead of the default, when its lead
  exceeds its noise and the choice's lead (held_back, and a clause of the reason); the decision
  unchanged."""
  lead = dict(zip(pool, diff))
  ahead = [k for k, i in enumerate(pool) if i not in out['eligible']
           and diff[k] > max(se[k], tie_tolerance, lead.get(out['index'], 0.0))]
  if not ahead:
    return out
  k = max(ahead, key=lambda k: diff[k])
  c = candidates[pool[k]]
  what = ', '.join([c['method'], f"T_d {c['t_d']}"] + (
      [f"floor {c['sigma_floor']}"] if c.get('sigma_floor') else []) + ['+'.join(c['detectors'])])
  held = {'id': pool[k], 'difference': float(diff[k]), 'se': float(se[k]), 'margin_se': margin_se}
  return dict(out, held_back=held, reason=(
      f"{out['reason']}; candidate {pool[k]} ({what}) leads the default by {diff[k]:.3f} "
      f"(SE {se[k]:.3f}), short of the {margin_se:g}-SE margin another detector subset or floor "
      'must clear'))
