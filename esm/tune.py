"""--mode=tune: label-free tuning of T_d, the sampler and the detector weights on training images.

Every candidate point (sampler x ESM^σ floor x T_d, the configured default among them) reconstructs
the development set (esm/dev_set.py) once; every non-empty subset of the available detectors
(each at its configured weight, detectors.subset_weights) is then scored from the same maps, so weight candidates cost no reconstruction.
Detectors that need a feature extractor (S_Cos: a ViT on every input and reconstruction) join in a
second stage at few points only: on 2 CPU cores the ViT costs more than the reconstruction. Under
tune.rule='noise_aware' (esm/choice.py) stage 1 chooses the sampler, floor and T_d, and stage 2,
at that point and the default's, the detectors; under 'legacy', stage 2 runs at each sampler's
best T_d. The test split is never read. The choice, the noise it saw and every candidate go to
DIR/tuned.json, their per-image development scores to DIR/tuning_scores.npz (esm/tuned.py), and
the choice's DIR/detector.json is written too, so predict can follow tune directly.
"""

import dataclasses
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from datasets import pipeline
from esm import choice as choice_lib
from esm import detector_state
from esm import detectors as det
from esm import dev_defects
from esm import dev_set
from esm import parallel
from esm import sampling
from esm import scoring
from esm import tuned as tuned_lib
from esm import workdir as workdir_lib
from esm.config import Config
from esm.errors import UserError

Point = Tuple[str, int, Optional[str]]  # (sampler, T_d, ESM^σ floor or None)
KEPT = ('t_d', 'weights', 'image_auroc', 'pixel_auroc', 'score', 'sigma_floor')


def t_d_grid(fractions, num_steps: int, default: Optional[int] = None) -> List[int]:
  """The T_d candidates: each fraction of T, rounded, at least 1, and the default, ascending."""
  grid = {max(1, min(num_steps, round(f * num_steps))) for f in fractions}
  return sorted(grid | ({default} if default else set()))


def supported_methods(config: Config, requested=()) -> List[str]:
  """The samplers a checkpoint of this config can run (those that read σ²_θ need two streams)."""
  names = requested or tuple(sampling.SAMPLERS)
  return [n for n in names if config.loss.dual_stream or not sampling.SAMPLERS[n].needs_variance]


def _floors(config: Config, method: str) -> Tuple[Optional[str], ...]:
  if not sampling.SAMPLERS[method].reads_sigma_floor:
    return (None,)
  floors = tuple(config.tune.sigma_floors)
  own = config.sampling.sigma_floor
  return floors if own in floors or method != config.sampling.method else floors + (own,)


def default_point(config: Config) -> Point:
  s = config.sampling
  return (s.method, s.t_d, s.sigma_floor if s.sampler.reads_sigma_floor else None)


def point_of(c: Dict[str, Any]) -> Point:
  return (c['method'], c['t_d'], c.get('sigma_floor'))


def default_detectors(config: Config, method: str, features: bool) -> List[str]:
  """The config's weighted detectors that `method` can use, with or without a feature extractor."""
  variance = sampling.SAMPLERS[method].needs_variance
  weights = config.detect.weights_by_name()
  return [n for n, d in det.DETECTORS.items() if weights[n] != 0.0
          and d.unavailable_reason(variance, features) is None]


def score_points(config: Config, workdir: str, dev: dev_set.DevSet, restored, feature_fn,
                 points: Sequence[Point], stage: int):
  """(rows, evidence) of every detector subset at each point; stage 2 adds the feature detectors."""
  rows, evidence = [], []
  base = tuned_lib.progress_base(restored.params, dev_set.arrays(dev))
  for method, t_d, floor in points:
    weights = det.subset_weights(config.detect.weights, [
        n for n, d in det.DETECTORS.items() if stage == 2 or not d.needs_features])
    cfg = tuned_lib.candidate_config(config, {
        'method': method, 't_d': t_d, 'weights': weights,
        'sigma_floor': floor or config.sampling.sigma_floor})
    key = tuned_lib.progress_key(base, cfg, stage)
    saved = tuned_lib.load_progress(workdir, key)
    if saved:
      r, e = saved[0], dev_set.evidence_from_arrays(saved[1])
      logging.info('tune: %s T_d=%d%s read from %s', method, t_d, f' floor={floor}' if floor else '',
                   tuned_lib.PROGRESS_DIR)
    else:
      scorer = scoring.Scorer(cfg, workdir, restored=restored,
                              feature_fn=feature_fn if stage == 2 else None)
      r, e = dev_set.score_candidate(scorer, dev, stage)
      if r:
        tuned_lib.save_progress(workdir, key, r, dev_set.evidence_arrays(e))
    if r:
      top = max(r, key=lambda c: c['score'])
      logging.info('tune: %s T_d=%d%s best %s: image %.3f pixel %.3f', method, t_d,
                   f' floor={floor}' if floor else '', '+'.join(top['detectors']),
                   top['image_auroc'], top['pixel_auroc'])
    rows += r
    evidence += e
  return rows, evidence


# --- tune.rule = 'noise_aware' ---------------------------------------------------------------------
def _table(dev: dev_set.DevSet, evidence, tc) -> choice_lib.ScoreTable:
  return choice_lib.build_table(np.stack([e.image_scores for e in evidence]),
                                [e.pixels for e in evidence], dev.labels, dev.families,
                                dev.source, tc.families, tc.bootstrap, tc.seed)


def default_like(config: Config, rows, features: bool) -> List[bool]:
  """Whether each row has the default's detectors (for its sampler) and ESM^σ floor."""
  return [c['detectors'] == default_detectors(config, c['method'], features)
          and c.get('sigma_floor') in (None, config.sampling.sigma_floor) for c in rows]


def _default_flags(config: Config, rows, features: bool,
                   at: Optional[Point] = None) -> Tuple[int, List[bool]]:
  """(index of the reference candidate, default_like of every row): the row with the default's
  detectors at point `at` (the default point unless given). Where no subset there is the config's
  (S_Cos alone, in the first stage; another floor), the reference is its largest one."""
  own, flags = at or default_point(config), default_like(config, rows, features)
  there = [i for i, c in enumerate(rows) if point_of(c) == own]
  like = [i for i in there if flags[i]]
  return (like[0] if like else max(there, key=lambda i: len(rows[i]['detectors']))), flags


def decide(config, rows, evidence, dev, model_free, features: bool, options, pool=None,
           grid=None, at=None, reference=None):
  """The rule's decision with the default at point `at` (the default point unless given), or
  with candidate `reference` as the only default-like row."""
  table = _table(dev, evidence, config.tune)
  kept, left = choice_lib.informative_entries(table, model_free['families'], options.metric)
  if reference is None:
    default, flags = _default_flags(config, rows, features, at)
  else:
    default, flags = reference, [i == reference for i in range(len(rows))]
  decision = choice_lib.choose(table, rows, default, config.tune.tie_tolerance, kept, flags,
                               t_d_grid=grid, pool=pool, options=options)
  return dict(decision, default=default, kept=kept, left_out=left), table


def noise_aware_grid(config: Config) -> List[int]:
  """The noise-aware rule's T_d grid: tune.t_d_fractions of T, and the config's own T_d."""
  return t_d_grid(config.tune.t_d_fractions, config.sde.num_steps, config.sampling.t_d)


def first_stage_points(config: Config) -> List[Point]:
  """Every point of the first stage: each supported sampler and floor at each T_d of the grid,
  and the default's point."""
  grid = noise_aware_grid(config)
  points = [(m, t, f) for m in supported_methods(config, config.tune.methods)
            for f in _floors(config, m) for t in grid]
  return points + ([] if default_point(config) in points else [default_point(config)])


def noise_aware_candidates(config: Config, workdir: str, dev: dev_set.DevSet, restored,
                           model_free: Dict[str, Any], options: choice_lib.RuleOptions):
  """(rows, evidence, decision, table): stage 1 at every point, the rule on it; stage 2, with S_Cos,
  at the chosen point (and the default's under options.stage2_reference='default'; at every point
  under options.stage2_points='all'), the rule on the subsets there. Without a feature extractor
  there is no stage 2, unless options.stage2_metric asks for one on stage 1's subsets."""
  grid = noise_aware_grid(config)
  feature_fn = scoring.get_features(config, {n: 1.0 for n in det.DETECTOR_NAMES})
  points = first_stage_points(config)
  rows, evidence = score_points(config, workdir, dev, restored, None, points, 1)
  step1, table = decide(config, rows, evidence, dev, model_free, False, options, grid=grid)
  logging.info('tune: stage 1 chose %s (%s)', point_of(rows[step1['index']]), step1['reason'])
  if feature_fn is None and options.stage2_metric is None:
    return rows, evidence, dict(step1, stage1=None), table
  chosen, reference = point_of(rows[step1['index']]), options.stage2_reference
  if options.stage2_points == 'all':
    there = points
  else:
    there = ([chosen] if reference != 'default'
             else list(dict.fromkeys([chosen, default_point(config)])))
  if feature_fn is not None:
    more, more_evidence = score_points(config, workdir, dev, restored, feature_fn, there, 2)
    rows, evidence = rows + more, evidence + more_evidence
  pool = [i for i, c in enumerate(rows) if point_of(c) in there]
  if options.stage2_metric is not None:
    options = dataclasses.replace(options, metric=options.stage2_metric)
  step2, table = decide(config, rows, evidence, dev, model_free, feature_fn is not None, options,
                        pool=pool, at=chosen if reference == 'choice_point' else None,
                        reference=step1['index'] if reference == 'choice' else None)
  return rows, evidence, dict(step2, stage1=_brief(step1, rows)), table


def _brief(decision: Dict[str, Any], rows) -> Dict[str, Any]:
  """What tuned.json keeps of one decision: the choice, why, and the noise around it."""
  i, se, diff = decision['index'], decision.get('se', {}), decision.get('difference', {})
  band = [dict(_identity(rows, j), difference=diff.get(j), se=se.get(j))
          for j in decision.get('band', [])]
  return {'id': i, 'reason': decision['reason'], 'default': decision.get('default'),
          'leader': decision.get('leader'), 'se': se.get(i), 'difference': diff.get(i),
          'band': band, 'bootstrap_wins': decision.get('wins', {}).get(i),
          'saturated_share': decision.get('saturated_share'),
          't_d_in_band': decision.get('t_d_in_band'),
          'leave_one_family_out': decision.get('leave_one_family_out', {}),
          **({'held_back': dict(decision['held_back'],
                                **_identity(rows, decision['held_back']['id']))}
             if 'held_back' in decision else {})}


def _identity(rows, j: int) -> Dict[str, Any]:
  """Which candidate row j is: its id, sampler, T_d, detectors and (ESM^σ) floor."""
  row = rows[j]
  return {'id': j, 'method': row['method'], 't_d': row['t_d'], 'detectors': row['detectors'],
          **({'sigma_floor': row['sigma_floor']} if 'sigma_floor' in row else {})}


def _annotate(rows, table: choice_lib.ScoreTable, kept) -> None:
  """Each row's per-family development AUROCs, mean rank and mean AUROC over the kept entries."""
  ranks = choice_lib.mean_ranks(table.point, kept) if kept else np.full(len(rows), np.nan)
  for i, c in enumerate(rows):
    c['id'] = i
    c['families'] = {}
    for e, (family, metric) in enumerate(table.entries):
      c['families'].setdefault(family, {})[f'{metric}_auroc'] = float(table.point[i, e])
    c['mean_rank'] = float(ranks[i])
    c['criterion_auroc'] = float(np.mean(table.point[i, kept])) if kept else float('nan')


def noise_aware_record(config: Config, dev, rows, decision, table, model_free, step: int,
                       options: choice_lib.RuleOptions):
  """The content of DIR/tuned.json under the noise-aware rule."""
  tc = config.tune
  _annotate(rows, table, decision['kept'])
  chosen = rows[decision['index']]
  by_method, flags = {}, default_like(config, rows, False)
  for m in sorted({c['method'] for c in rows}, key=list(sampling.SAMPLERS).index):
    pool = [i for i, c in enumerate(rows) if c['method'] == m and c['stage'] == 1]
    own = [i for i in pool if flags[i] and rows[i]['t_d'] == config.sampling.t_d] or pool
    pick = choice_lib.choose(table, rows, own[0], tc.tie_tolerance, decision['kept'], flags,
                             pool=pool, options=options)['index']
    by_method[m] = {k: rows[pick][k] for k in KEPT if k in rows[pick]}
  own = default_point(config)
  return {
      't_d': chosen['t_d'], 'method': chosen['method'], 'weights': chosen['weights'],
      **({'sigma_floor': chosen['sigma_floor']} if 'sigma_floor' in chosen else {}),
      'criterion': {'name': dev_set.CRITERION, 'rule': 'noise_aware',
                    'options': dataclasses.asdict(options),
                    'tie_tolerance': tc.tie_tolerance, 'bootstrap': tc.bootstrap,
                    **_brief(decision, rows), 'stage1': decision.get('stage1'),
                    'entries_used': [f'{table.entries[e][0]}/{table.entries[e][1]}'
                                     for e in decision['kept']],
                    'entries_left_out': decision['left_out'],
                    'image_auroc': chosen['image_auroc'], 'pixel_auroc': chosen['pixel_auroc'],
                    'score': chosen['score'], 'criterion_auroc': chosen['criterion_auroc']},
      'default': {'method': own[0], 't_d': own[1], 'sigma_floor': own[2],
                  'id': decision['default']},
      'by_method': by_method,
      'dev_set': {**dev_set.summary(dev), 'defect_kinds': list(tc.defect_kinds),
                  'families_drawn': list(tc.families), 'strengths': list(tc.strengths),
                  'defect_area': list(tc.defect_area),
                  'defects_per_image': tc.defects_per_image, 'folds': tc.folds, 'seed': tc.seed,
                  'model_free': model_free},
      't_d_grid': noise_aware_grid(config),
      'methods': list(by_method), 'sigma_floors': list(tc.sigma_floors), 'checkpoint_step': step,
      'candidates': rows,
  }


def development_set(config: Config) -> Tuple[dev_set.DevSet, dev_defects.Normal]:
  """The development set of config's category: its held-out images at stored size, clean and with
  defects made from its training slice; and that slice's statistics (the `normal` it used)."""
  normal = dev_defects.make_normal(pipeline.source_images(config.data, 'train'),
                                   config.data.image_size)
  dev = dev_set.make_dev_set(pipeline.source_images(config.data, 'val'), normal, config.tune,
                             config.eval.batch_size)
  return dev, normal


def run_noise_aware(config: Config, workdir: str, restored,
                    options: choice_lib.RuleOptions) -> Tuple[Dict[str, Any], Any]:
  """(tuned.json content, per-candidate evidence) under the noise-aware rule."""
  dev, normal = development_set(config)
  model_free = dev_set.model_free(dev, normal.stats)
  rows, evidence, decision, table = noise_aware_candidates(config, workdir, dev, restored,
                                                           model_free, options)
  record = noise_aware_record(config, dev, rows, decision, table, model_free, restored.step,
                              options)
  return record, (dev, evidence)


# --- tune.rule = 'legacy' --------------------------------------------------------------------------
def legacy_candidates(config: Config, workdir: str, dev, restored):
  """Stage 1 at every sampler and T_d of the grid, stage 2 at each sampler's best."""
  tc = config.tune
  feature_fn = scoring.get_features(config, {n: 1.0 for n in det.DETECTOR_NAMES})
  methods = supported_methods(config, tc.methods)
  points = [(m, t, f) for m in methods for f in _floors(config, m)
            for t in t_d_grid(tc.t_d_fractions, config.sde.num_steps)]
  rows, evidence = score_points(config, workdir, dev, restored, None, points, 1)
  if feature_fn is not None:
    best = [point_of(dev_set.choose([c for c in rows if c['method'] == m], tc.tie_tolerance))
            for m in methods]
    more, more_evidence = score_points(config, workdir, dev, restored, feature_fn, best, 2)
    rows, evidence = rows + more, evidence + more_evidence
  return rows, evidence


def legacy_record(config: Config, dev, rows, step: int) -> Dict[str, Any]:
  """The content of DIR/tuned.json under the legacy rule."""
  tc = config.tune
  methods = supported_methods(config, tc.methods)
  chosen = dev_set.choose(rows, tc.tie_tolerance)
  by_method = {m: dev_set.choose([c for c in rows if c['method'] == m], tc.tie_tolerance)
               for m in methods}
  return {
      't_d': chosen['t_d'], 'method': chosen['method'], 'weights': chosen['weights'],
      **({'sigma_floor': chosen['sigma_floor']} if 'sigma_floor' in chosen else {}),
      'criterion': {'name': dev_set.LEGACY_CRITERION, 'rule': 'legacy',
                    'tie_tolerance': tc.tie_tolerance, 'image_auroc': chosen['image_auroc'],
                    'pixel_auroc': chosen['pixel_auroc'], 'score': chosen['score']},
      'by_method': {m: {k: c[k] for k in KEPT if k in c} for m, c in by_method.items()},
      'dev_set': {'held_out_images': int(dev.source.max() + 1), 'images': int(len(dev.labels)),
                  'painted': int(dev.labels.sum()), 'defect_kinds': list(tc.defect_kinds),
                  'folds': tc.folds, 'seed': tc.seed},
      't_d_grid': t_d_grid(tc.t_d_fractions, config.sde.num_steps), 'methods': methods,
      'sigma_floors': list(tc.sigma_floors), 'checkpoint_step': step,
      'candidates': [dict(c, id=i) for i, c in enumerate(rows)],
  }


def run_legacy(config: Config, workdir: str, restored, options=None) -> Tuple[Dict[str, Any], Any]:
  del options  # the legacy rule has no guards
  val = pipeline.get_eval_data(config.data, 'val', global_batch_size=config.eval.batch_size)
  dev = dev_set.make_painted_dev_set(val, config.tune)
  rows, evidence = legacy_candidates(config, workdir, dev, restored)
  return legacy_record(config, dev, rows, restored.step), (dev, evidence)


def check_held_out_slice(config: Config, workdir: str) -> None:
  """Tuning scores the held-out slice as images the model never saw: it must be the slice the
  workdir was trained without (data.val_fraction, data.val_seed, data.min_val_images)."""
  saved = (workdir_lib.load_saved_config(workdir) or {}).get('data')
  if not saved:
    return
  num = pipeline.prepare_dataset(config.data).info.splits['train'].num_examples
  trained = pipeline.split_train_val(num, saved['val_fraction'], saved['val_seed'],
                                     saved['min_val_images'])[1]
  if not np.array_equal(trained, pipeline.held_out_split(config.data, num)[1]):
    raise UserError(f'{workdir}: trained with another held-out slice of train/good '
                    f"(data.val_fraction={saved['val_fraction']}, data.val_seed="
                    f"{saved['val_seed']}, data.min_val_images={saved['min_val_images']} in its "
                    'config.json); tuning on this one would score images the model trained on')


def run_tuning(config: Config, workdir: str, restored=None, keep_progress: bool = False,
               options: choice_lib.RuleOptions = choice_lib.RuleOptions()):
  """(tuned.json content, (development set, per-candidate evidence)) of config.tune.rule, written
  nowhere: experiments/ compare rules on one checkpoint with it. keep_progress leaves every
  point's saved scores in DIR/tune_progress/, so another rule on the same points reads them;
  options: the noise-aware rule's variant (esm/choice.py)."""
  check_held_out_slice(config, workdir)
  restored = restored or scoring.restore_ema_params(config, workdir, parallel.make_mesh())
  run = run_legacy if config.tune.rule == 'legacy' else run_noise_aware
  out = run(config, workdir, restored, options)
  if not keep_progress:
    tuned_lib.clear_progress(workdir)  # the caller writes what it returns
  return out


def tune(config: Config, workdir: str, keep_progress: bool = False) -> Dict[str, Any]:
  """Runs every candidate on the development set and writes DIR/tuned.json, the per-image scores
  and the choice's DIR/detector.json; returns tuned.json's content (keep_progress: run_tuning)."""
  start = time.time()
  restored = scoring.restore_ema_params(config, workdir, parallel.make_mesh())
  tuned, (dev, evidence) = run_tuning(config, workdir, restored, keep_progress)
  tuned_lib.write(workdir, tuned)
  tuned_lib.write_scores(workdir, dev, dev_set.evidence_arrays(evidence))
  # The detector state of the choice, so predict, the API and export can follow tune directly.
  val = pipeline.get_eval_data(config.data, 'val', global_batch_size=config.eval.batch_size)
  scorer = scoring.Scorer(tuned_lib.candidate_config(config, tuned), workdir, restored=restored)
  detector_state.fit_and_save(scorer.config, workdir, scorer, scorer.fit_normalisation(val))
  logging.info('tune: chose %s T_d=%d weights %s (%s; dev image %.3f, pixel %.3f) from %d '
               'candidates in %.0f s; written to %s', tuned['method'], tuned['t_d'],
               tuple(tuned['weights']), tuned['criterion'].get('reason', tuned['criterion']['rule']),
               tuned['criterion']['image_auroc'], tuned['criterion']['pixel_auroc'],
               len(tuned['candidates']), time.time() - start, tuned_lib.path(workdir))
  return tuned
