"""Regret of label-free tuning on real categories at CPU scale (docs/results.md, "Tuning regret").

  python3 experiments/regret.py --stage=STAGE --root=../shared/data --runs=RUNS

For each category (--categories, dataset/category; bottle and pill develop the rule, metal_plate is
only reported), model (--models: ESM, SGM) and seed (--seeds), with configs/cpu/, in
RUNS/<dataset>_<category>/<model>_s<seed>, one --stage per command:
  difficulty  (no model) the model-free z-score on the development set and on the legacy painted
            one.
  train     --mode=train (a finished run is skipped, an interrupted one resumes); timing.json.
  tune      the noise-aware rule (tuned.json, tuning_scores.npz), each of VARIANTS of it on its
            development scores (variants/<name>.json; --variants picks some), and the legacy rule
            on the legacy set (legacy_tuned.json: full-contrast painted defects, 2 per image, ties
            to fewer NFE).
  evaluate  the test split at every candidate point of every tuning (sampler, floor, T_d) and the
            default, every detector subset from the same maps (S_Cos only at the points a rule
            chose and the default, unless --features_at=all), and the model-free baselines
            (z-score, DINO patch kNN; DIR/baselines/, fitted there if training did not): per test
            image its score and the pixel pairs a bootstrap needs (test/*.npz, esm/resample.py);
            the chosen and the untuned points first.
  redecide  the noise-aware rule and the --variants decided again from the development scores the
            tune stage saved (tune_progress/), their JSON rewritten: after a change to the rule's
            code. A choice that moved is logged; evaluate then scores its point.
  table     test image and pixel AUROC at (a) the new rule's choice, (b) the legacy rule's, (b')
            the legacy rule on the new development set, (c) the untuned default (the config's T_d
            with every available detector), (c') the paper's T_d of the category scaled to the
            config's T, with every available detector (none outside tables 6-8), (d) the best
            evaluated candidate on the test split (report only); regret (d) - chosen with a paired
            bootstrap CI over test images; the same for each variant and for SPLITS (the image
            AUROC at the image decision's candidate, the pixel AUROC at the pixel decision's: two
            operating points per image, or for 'apart' one point and two detector subsets); each
            choice minus each model-free baseline, with its CI;
            Kendall's τ between the development and the test ranking, and each candidate's
            development and test AUROC beside each other; the baselines; each rule's
            reason; tuning and training seconds; and over the seeds of each category and model,
            (a), (b), (c) and (c') minus each baseline, minus (c) and minus (c'), pooled, with
            their CIs. RUNS/regret.md and RUNS/regret.json.
  dev_area  (after evaluate) for each range of --areas (tune.defect_area), the first stage of
            tuning on the development set drawn with it and the rule's decision, beside each
            point's test AUROC (experiments/dev_area.py): RUNS/dev_area.md and dev_area.json.
Each stage skips what its files already hold, so a rerun resumes; --shard=K/N splits evaluate's
test points among N processes. Test labels are read in evaluate, table and dev_area only, after
every tuning's choice is written; dev_area's own decisions read the development set alone and are
only reported.
"""

import ast
import dataclasses
import json
import os
import re
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from absl import app
from absl import flags
from absl import logging

from configs.common import override
from configs.cpu.common import cpu_config
from datasets import catalog
from datasets import pipeline
from esm import baselines
from esm import choice
from esm import config as config_lib
from esm import detectors as det
from esm import dev_set
from esm import host_memory
from esm import metrics
from esm import parallel
from esm import resample
from esm import run as run_lib
from esm import scoring
from esm import train as train_lib
from esm import tune
from esm import tuned as tuned_lib
from experiments import dev_area
from experiments.models import MODELS, ROOT
# pylint: enable=g-import-not-at-top,wrong-import-position

STAGES = ('train', 'tune', 'redecide', 'evaluate', 'table', 'difficulty', 'dev_area')
LEGACY = {'tune.rule': 'legacy', 'tune.defects_per_image': 2}
# Variants of the noise-aware rule's guards and tie order (esm/choice.py RuleOptions), each on the
# same development scores: variants/<name>.json.
VARIANTS = {
    'guarded': choice.RuleOptions(band_guard=True, family_guard=True, prefer='winner'),
    'no_band_guard': choice.RuleOptions(family_guard=True, prefer='winner'),
    'nearest': choice.RuleOptions(family_guard=True),
    'no_guards': choice.RuleOptions(prefer='winner'),
    'choice_point': choice.RuleOptions(stage2_reference='choice_point'),
    'choice': choice.RuleOptions(stage2_reference='choice'),
    'image_only': choice.RuleOptions(metric='image'),
    'pixel_only': choice.RuleOptions(metric='pixel'),
    'features_everywhere': choice.RuleOptions(stage2_points='all'),
    'margin_1se': choice.RuleOptions(detector_margin_se=1.0),
    # the detector subset at the first stage's point on one metric (the 'apart' role)
    'image_detectors': choice.RuleOptions(stage2_metric='image', stage2_reference='choice_point'),
    'map_detectors': choice.RuleOptions(stage2_metric='pixel', stage2_reference='choice_point'),
}
# Roles that read each metric at its own choice: the image score at the image decision's
# candidate, the pixel map at the pixel decision's (two operating points per image; one for
# 'apart', whose two decisions share the first stage's point and differ in detectors only).
SPLITS = {'split': ('image_only', 'pixel_only'), 'legacy_split': ('legacy_image', 'legacy_pixel'),
          'apart': ('image_detectors', 'map_detectors')}
# The legacy rule on the new set's candidates: role -> the metric it ranks by (None: their score).
LEGACY_PICKS = {'legacy_rule': None, 'legacy_image': 'image', 'legacy_pixel': 'pixel'}
POOLED_ROLES = ('new', 'legacy', 'default', 'paper')  # the roles the over-seeds table pools
REFERENCES = ('default', 'paper')  # the untuned points every pooled role is compared with
ROLES = ('new', *VARIANTS, 'split', 'apart', 'legacy', 'legacy_rule', 'legacy_split', 'default',
         'paper', 'best')
LABELS = {'new': '(a) new rule', 'legacy': '(b) legacy rule',
          'legacy_rule': "(b') legacy rule, new set", 'default': '(c) untuned default',
          'paper': "(c') the paper's T_d, untuned",
          'best': '(d) best on test', **{v: f'(a) variant {v}' for v in VARIANTS},
          'split': '(a) split: image_only / pixel_only',
          'apart': '(a) apart: image_detectors / map_detectors, one point',
          'legacy_split': "(b') split: the legacy rule on each metric, new set"}
METRICS = choice.METRICS
RESAMPLES = 2000
DEVELOPMENT = ('bottle', 'pill')  # the categories a rule or default may be chosen on


def parse_shard(text: str) -> Optional[Tuple[int, int]]:
  """K/N -> (K, N), or None where text is not K/N with 0 <= K < N."""
  match = re.fullmatch(r'(\d+)/(\d+)', text)
  if match is None or int(match[1]) >= int(match[2]):
    return None
  return int(match[1]), int(match[2])


_STAGE = flags.DEFINE_enum('stage', None, STAGES, 'The stage to run.')
_RUNS = flags.DEFINE_string('runs', None, 'Folder of the runs and the tables.')
_CATEGORIES = flags.DEFINE_list(
    'categories', ['mvtec_ad/bottle', 'mvtec_ad/pill', 'mpdd/metal_plate'], 'dataset/category list.')
_MODELS = flags.DEFINE_list('models', ['esm', 'sgm'], 'Models: esm, sgm.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (config.seed) of each model.')
_OVERRIDES = flags.DEFINE_multi_string('override', [], 'A config field of every run: field=literal.')
_FEATURES_AT = flags.DEFINE_enum('features_at', 'choices', ['choices', 'all'],
                                 'Test points that get S_Cos (a ViT pass each).')
_VARIANTS = flags.DEFINE_list('variants', list(VARIANTS),
                              'tune: the VARIANTS to run (features_everywhere runs S_Cos at every '
                              'candidate point, the costliest).')
_SHARD = flags.DEFINE_string('shard', '0/1', 'evaluate: K/N takes every N-th test point from the '
                              'K-th, so that N processes split the stage.')
_AREAS = flags.DEFINE_list('areas', [f'{low}:{high}' for low, high in dev_area.AREAS],
                           'dev_area: ranges of tune.defect_area, low:high fractions of the image.')
flags.mark_flags_as_required(['stage', 'root', 'runs'])
flags.register_validator('shard', lambda text: parse_shard(text) is not None,
                         '--shard: K/N with 0 <= K < N')
flags.register_validator('variants', lambda names: set(names) <= set(VARIANTS),
                         f'--variants: names of VARIANTS ({", ".join(VARIANTS)})')


@dataclasses.dataclass(frozen=True)
class Run:
  dataset: str
  category: str
  model: str
  seed: int
  workdir: str
  config_dict: Any

  @property
  def name(self) -> str:
    return f'{self.category} {self.model} s{self.seed}'

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def config(self, changes=None) -> config_lib.Config:
    typed = config_lib.from_configdict(self.config_dict)
    return config_lib.with_fields(typed, changes) if changes else typed


def make_runs(root: str, runs: str, categories, models, seeds, overrides) -> List[Run]:
  out = []
  for spec in categories:
    dataset, category = spec.split('/')
    for model in models:
      for seed in seeds:
        c = override(cpu_config(dataset, category), {
            **MODELS[model], 'seed': int(seed), 'data.root': os.path.join(root, dataset),
            'data.tfds_dir': os.path.join(runs, 'tfds')})
        c = override(c, overrides)
        out.append(Run(dataset, category, model, int(seed),
                       os.path.join(runs, f'{dataset}_{category}', f'{model}_s{seed}'), c))
  return out


def read_json(path: str):
  return json.load(open(path)) if os.path.exists(path) else None


def write_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(path + '.tmp', path)


UNFINISHED = ' (unfinished)'  # timing.json: the seconds an interrupted stage has spent so far
UNFINISHED_EVERY_S = 30.0


def timed(run: Run, key: str, fn) -> None:
  """fn(), with its wall and CPU seconds added to timing.json under key; fn() returning False
  (a preempted training, its checkpoint saved) ends the stage, and a rerun resumes it. While fn
  runs, its seconds so far are written every UNFINISHED_EVERY_S under key + UNFINISHED, so that a
  stage killed and resumed reports the time of every attempt, not only the last one's."""
  path = run.path('timing.json')
  before = (read_json(path) or {}).get(key + UNFINISHED, {'wall_s': 0.0, 'cpu_s': 0.0})
  wall, cpu = time.time(), time.process_time()

  def save(name: str) -> None:  # one writer at a time: the recorder thread, then this one
    timing = read_json(path) or {}
    timing.pop(key + UNFINISHED, None)
    timing[name] = {'wall_s': round(before['wall_s'] + time.time() - wall, 1),
                    'cpu_s': round(before['cpu_s'] + time.process_time() - cpu, 1)}
    write_json(path, timing)

  stop = threading.Event()

  def record():
    while not stop.wait(UNFINISHED_EVERY_S):
      save(key + UNFINISHED)

  recorder = threading.Thread(target=record, daemon=True)
  recorder.start()
  finished = False
  try:
    finished = fn() is not False
  finally:
    stop.set()
    recorder.join()
    save(key if finished else key + UNFINISHED)
  if not finished:
    raise SystemExit(f'{run.workdir}: preempted; rerun the stage to resume')


def stage_train(run: Run) -> None:
  if 'train' not in (read_json(run.path('timing.json')) or {}):
    timed(run, 'train', lambda: run_lib.run(run.config_dict, run.workdir, 'train'))


def stage_tune(run: Run, variants=tuple(VARIANTS)) -> None:
  """The new rule, then its variants (stage 1's scores read back, S_Cos perhaps scored anew), then
  the legacy rule, which scores a development set of its own: the cheap decisions first."""
  if tuned_lib.load(run.workdir) is None:
    timed(run, 'tune', lambda: tune.tune(run.config(), run.workdir, keep_progress=True))
  for name in variants:
    if read_json(variant_path(run, name)) is None:
      timed(run, f'tune_{name}', lambda: write_json(variant_path(run, name), tune.run_tuning(
          run.config(), run.workdir, keep_progress=True, options=VARIANTS[name])[0]))
  if read_json(run.path('legacy_tuned.json')) is None:
    timed(run, 'tune_legacy', lambda: write_json(run.path('legacy_tuned.json'), tune.run_tuning(
        run.config(LEGACY), run.workdir, keep_progress=True)[0]))


def stage_redecide(run: Run, variants=tuple(VARIANTS)) -> None:
  """The docstring's redecide: each existing decision of the noise-aware rule taken again."""
  done = tunings(run)
  for role in [r for r in ('new', *variants) if r in done]:
    again = tune.run_tuning(run.config(), run.workdir, keep_progress=True,
                            options=VARIANTS.get(role, choice.RuleOptions()))[0]
    before, after = (tune.point_of(t) + (tuple(t['weights']),) for t in (done[role], again))
    if before != after:
      logging.warning('regret: %s of %s moved from %s to %s; run evaluate', role, run.name,
                      before, after)
    if role == 'new':
      tuned_lib.write(run.workdir, again)
    else:
      write_json(variant_path(run, role), again)


def variant_path(run: Run, name: str) -> str:
  return run.path('variants', name + '.json')


def tunings(run: Run) -> Dict[str, Dict[str, Any]]:
  """Role -> tuned.json content of each tuning of the run that exists (new, legacy, variants)."""
  out = {'new': tuned_lib.load(run.workdir), 'legacy': read_json(run.path('legacy_tuned.json')),
         **{name: read_json(variant_path(run, name)) for name in VARIANTS}}
  return {role: t for role, t in out.items() if t is not None}


def _key(point) -> str:
  return '_'.join(str(p) for p in point if p is not None)


def paper_point(run: Run, config) -> Optional[tune.Point]:
  """The default point at the paper's T_d of the category (tables 6-8, of T = 1000, scaled to the
  config's T), or None for a category the paper does not tune."""
  t_d = catalog.scaled_paper_t_d(run.dataset, run.category, config.sde.num_steps)
  if t_d is None:
    return None
  method, _, floor = tune.default_point(config)
  return method, t_d, floor


def untuned_points(run: Run, config) -> Dict[str, tune.Point]:
  """Role of REFERENCES -> its point: the default and, where the paper has one, the paper's T_d."""
  points = {'default': tune.default_point(config), 'paper': paper_point(run, config)}
  return {role: p for role, p in points.items() if p is not None}


def test_points(run: Run, features_at: str) -> List[Tuple[tune.Point, bool]]:
  """(point, with S_Cos) of every candidate point of every tuning and the untuned points; S_Cos
  at every point (features_at='all') or at the choices and the untuned points ('choices'). The
  choices and the untuned points come first, so that an evaluate stopped early has every role's."""
  config, done = run.config(), tunings(run)
  untuned = set(untuned_points(run, config).values())
  points = {tune.point_of(c) for t in done.values() for c in t['candidates']} | untuned
  chosen = ({tune.point_of(t) for t in done.values()} | untuned
            | {tune.point_of(legacy_pick(done['new']['candidates'], config.tune.tie_tolerance, m))
               for m in LEGACY_PICKS.values()})
  return [(p, features_at == 'all' or p in chosen)
          for p in sorted(points, key=lambda p: (p not in chosen, str(p)))]


def evaluate_point(run, config, point, features, restored, feature_fn, val, test) -> None:
  method, t_d, floor = point
  weights = det.subset_weights(config.detect.weights, [
      n for n, d in det.DETECTORS.items() if features or not d.needs_features])
  cfg = tuned_lib.candidate_config(config, {'method': method, 't_d': t_d, 'weights': weights,
                                            'sigma_floor': floor or config.sampling.sigma_floor})
  scorer = scoring.Scorer(cfg, run.workdir, restored=restored,
                          feature_fn=feature_fn if features else None)
  scorer.fit_normalisation(val)
  out = scorer.run_split(test, what=f'regret {run.name} {_key(point)}')
  subsets, scores, pairs = [], [], []
  for subset, maps, s in det.iter_ablation(scorer.detect_cfg, scorer.image_size,
                                           scorer.normalise(out.maps), scorer.selection.used,
                                           stats=scorer.stats):
    subsets.append(list(subset))
    scores.append(s)
    pairs.append(resample.pixel_pairs(maps, out.masks))
  resample.save_evidence(run.path('test', _key(point) + '.npz'), subsets, scores, pairs, out.labels)


def evaluate_baselines(run: Run, config, test) -> None:
  """Each model-free baseline of config (DIR/baselines/, the same state evaluation's report uses;
  one trained before the workdir had it is fitted now, as evaluation does) on the test split:
  test/<baseline>.npz."""
  train_lib.fit_baselines(config, run.workdir)
  todo = {n: st for n, st in baselines.load_fitted(config, run.workdir).items()
          if not os.path.exists(run.path('test', n + '.npz'))}
  if not todo:
    return
  context = baselines.make_context(config, names=list(todo))
  masks, labels = [], []
  for batch in test.batches():
    masks.append(batch['mask'][batch['valid']])
    labels.append(batch['label'][batch['valid']])
  masks, labels = np.concatenate(masks), np.concatenate(labels)
  for name, state in todo.items():
    maps, scores = baselines.score_image_set(name, state, test, context)
    resample.save_evidence(run.path('test', name + '.npz'), [[name]], [scores],
                           [resample.pixel_pairs(maps, masks)], labels)


def _has_features(path: str) -> bool:
  """Whether an evaluated point's evidence holds S_Cos (a point evaluated without it, and later
  chosen or named untuned, is evaluated again with it)."""
  return any('cos' in subset for subset in resample.load_evidence(path))


def stage_evaluate(run: Run, features_at: str = 'choices',
                   shard: Tuple[int, int] = (0, 1)) -> None:
  """The test points still to do, or those of shard (k, n): every n-th of test_points from the
  k-th, a split that does not change as points are done; shard 0 also scores the baselines."""
  config = run.config()
  gb = config.eval.batch_size
  val = pipeline.get_eval_data(config.data, 'val', global_batch_size=gb)
  test = pipeline.get_eval_data(config.data, 'test', global_batch_size=gb)
  features = config.features.model != 'none'
  path = lambda point: run.path('test', _key(point) + '.npz')
  todo = [(p, f) for p, f in test_points(run, features_at)[shard[0]::shard[1]]
          if not os.path.exists(path(p)) or (f and features and not _has_features(path(p)))]
  if todo:
    restored = scoring.restore_ema_params(config, run.workdir, parallel.make_mesh())
    feature_fn = scoring.get_features(config, {n: 1.0 for n in det.DETECTOR_NAMES})
    for point, features in todo:
      evaluate_point(run, config, point, features, restored, feature_fn, val, test)
  if shard[0] == 0:
    evaluate_baselines(run, config, test)


# --- table -----------------------------------------------------------------------------------------
def load_evidence(run: Run) -> Dict[Tuple, resample.Evidence]:
  """(point, detectors) -> (image scores, pixel pairs, labels) of every evaluated candidate (not
  the one an evaluate running beside it is still writing)."""
  return {(name[:-4], subset): entry for name in sorted(os.listdir(run.path('test')))
          if name.endswith('.npz')
          for subset, entry in resample.load_evidence(run.path('test', name)).items()}


def _detectors_of(weights, available) -> Tuple[str, ...]:
  return tuple(n for n, w in zip(det.DETECTOR_NAMES, weights) if w and n in available)


def legacy_pick(candidates, tie_tolerance: float, metric=None) -> Dict[str, Any]:
  """The legacy rule (esm/dev_set.py choose) on the candidates' score, or on one metric's AUROC."""
  if metric is None:
    return dev_set.choose(candidates, tie_tolerance)
  return dev_set.choose([dict(c, score=c[f'{metric}_auroc']) for c in candidates], tie_tolerance)


def choices(run: Run, evidence, done) -> Dict[str, Tuple[Tuple, Tuple]]:
  """Role -> the evidence keys (image, pixel) of the candidates whose test AUROCs it reads: the
  one each rule chose (done: tunings(run)) for both metrics, each metric's own under SPLITS, and
  the default's."""
  config = run.config()
  at = lambda point: {d for (k, s) in evidence if k == _key(point) for d in s}
  key = lambda c: (_key(tune.point_of(c)), _detectors_of(c['weights'], at(tune.point_of(c))))
  single = {**{role: key(t) for role, t in done.items()},
            **{role: key(legacy_pick(done['new']['candidates'], config.tune.tie_tolerance, m))
               for role, m in LEGACY_PICKS.items()},
            **{role: (_key(p), _detectors_of(config.detect.weights, at(p)))
               for role, p in untuned_points(run, config).items()}}
  out = {role: (k, k) for role, k in single.items() if role in ROLES}
  out.update({role: (single[a], single[b]) for role, (a, b) in SPLITS.items()
              if a in single and b in single})
  return {role: ks for role, ks in out.items() if all(k in evidence for k in ks)}


def aurocs(entry, weights) -> Tuple[np.ndarray, np.ndarray]:
  scores, pairs, labels = entry
  return metrics.weighted_auroc(scores, labels, weights), resample.pixel_auroc(pairs, weights)


def picked(curves, keys) -> np.ndarray:
  """[2, 1 + R] test AUROCs of a role: image from keys[0]'s candidate, pixel from keys[1]'s."""
  return np.stack([curves[k][m] for m, k in enumerate(keys)])


def _choice_of(keys):
  return list(keys[0]) if keys[0] == keys[1] else dict(zip(METRICS, map(list, keys)))


def role_rows(curves, picks) -> Dict[str, Any]:
  """Per role: its test AUROCs, its regret against the best with a 95% interval, and its
  difference to the default with that difference's bootstrap SE."""
  rows = {}
  for m, metric in enumerate(METRICS):
    best = max(curves, key=lambda k: curves[k][m, 0])
    for role in [r for r in ROLES[:-1] if r in picks]:
      own = picked(curves, picks[role])[m]
      regret = curves[best][m] - own
      versus = own - picked(curves, picks['default'])[m]
      row = rows.setdefault(role, {'choice': _choice_of(picks[role]), 'auroc': [None, None]})
      row['auroc'][m] = float(own[0])
      row[f'{metric}_regret'] = metrics.with_interval(regret)
      row[f'{metric}_vs_default'] = [float(versus[0]), float(np.std(versus[1:]))]
    row = rows.setdefault('best', {'choice': {}, 'auroc': [None, None]})
    row['choice'][metric] = list(best)
    row['auroc'][m] = float(curves[best][m, 0])
  return rows


def run_rows(run: Run, evidence: Dict[Tuple, resample.Evidence]) -> Dict[str, Any]:
  """The table's numbers for one run from its evidence (load_evidence; not modified)."""
  evidence = dict(evidence)
  free = {n: evidence.pop((n, (n,))) for n in baselines.BASELINES if (n, (n,)) in evidence}
  labels = next(iter(evidence.values()))[2]
  weights = metrics.bootstrap_weights(labels, RESAMPLES)
  curves = {k: np.stack(aurocs(v, weights)) for k, v in evidence.items()}  # [2, 1 + R]
  done = tunings(run)
  picks = choices(run, evidence, done)
  rows = role_rows(curves, picks)
  for name, entry in free.items():
    floor = np.stack(aurocs(entry, weights))  # [2, 1 + R], the same resamples as the candidates
    rows[name] = {'auroc': floor[:, 0].tolist()}
    for role in [r for r in ROLES[:-1] if r in picks]:  # paired over the test images
      gap = picked(curves, picks[role]) - floor
      rows[role][f'minus_{name}'] = [metrics.with_interval(g) for g in gap]
  new = done['new']
  dev = [(c, (_key(tune.point_of(c)), tuple(c['detectors']))) for c in new['candidates']]
  dev = [(c, k) for c, k in dev if k in curves]
  rows['kendall_tau'] = [resample.kendall_tau([-c['mean_rank'] for c, _ in dev],
                                              [curves[k][m, 0] for _, k in dev]) for m in (0, 1)]
  rows['candidates'] = [{'choice': k, 'dev': [c['image_auroc'], c['pixel_auroc']],
                         'test': curves[k][:, 0].tolist()} for c, k in dev]
  rows['dev'] = {'model_free': new['dev_set']['model_free']['all'],
                 'left_out': new['criterion']['entries_left_out']}
  for role, t in done.items():
    if role in rows:
      rows[role]['reason'] = t['criterion'].get('reason', t['criterion']['rule'])
  rows['timing'] = read_json(run.path('timing.json'))
  return rows


def _fmt(x) -> str:
  return 'n/a' if x is None or x != x else f'{x:.3f}'


def _choice(key) -> str:
  return f"{key[0]} {'+'.join(key[1])}"


def markdown(table: Dict[str, Dict[str, Any]]) -> str:
  lines = ['| run | rule | choice | test image AUROC | image regret [95% CI] | test pixel AUROC | '
           'pixel regret [95% CI] |', '|---|---|---|---|---|---|---|']
  for name, rows in table.items():
    for role in ROLES:
      r = rows.get(role)
      if r is None:
        continue
      regret = lambda m: (f"{_fmt(r[m][0])} [{_fmt(r[m][1])}, {_fmt(r[m][2])}]" if m in r else '–')
      choice = ('; '.join(f'{m}: {_choice(c)}' for m, c in r['choice'].items())
                if isinstance(r['choice'], dict) else _choice(r['choice']))
      lines.append(f"| {name} | {LABELS[role]} | {choice} | {_fmt(r['auroc'][0])} | "
                   f"{regret('image_regret')} | {_fmt(r['auroc'][1])} | {regret('pixel_regret')} |")
    for free in [b for b in baselines.BASELINES if b in rows]:
      z = rows[free]['auroc']
      lines.append(f'| {name} | {baselines.BASELINES[free].label} | – | {_fmt(z[0])} | – | '
                   f'{_fmt(z[1])} | – |')
    tau = rows['kendall_tau']
    lines.append(f"| {name} | Kendall's τ, dev vs test | – | {_fmt(tau[0])} | – | "
                 f"{_fmt(tau[1])} | – |")
  lines += ['', '| rule | mean image regret | mean pixel regret | the same, development categories '
            f"({', '.join(DEVELOPMENT)}) | runs worse than (c) by > 1 test SE |",
            '|---|---|---|---|---|']
  mean = lambda got, m: _fmt(np.mean([r[f'{m}_regret'][0] for r in got])) if got else 'n/a'
  for role in ROLES[:-1]:
    got = [rows[role] for rows in table.values() if role in rows]
    dev = [rows[role] for name, rows in table.items()
           if role in rows and name.split()[0] in DEVELOPMENT]
    if got:
      worse = sum(any(r[f'{m}_vs_default'][0] < -r[f'{m}_vs_default'][1] for m in METRICS)
                  for r in got)
      lines.append(f"| {LABELS[role]} | {mean(got, 'image')} | {mean(got, 'pixel')} | "
                   f"{mean(dev, 'image')} / {mean(dev, 'pixel')} | {worse} of {len(got)} |")
  fitted = [b for b in baselines.BASELINES if any(b in rows for rows in table.values())]
  lines += ['', 'Each rule\'s choice minus each model-free baseline, test image / pixel AUROC '
            '[95% paired bootstrap CI]:', '',
            '| run | rule | ' + ' | '.join(baselines.BASELINES[b].label for b in fitted) + ' |',
            '|---|---|' + '---|' * len(fitted)]
  interval = lambda g: f'{g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}]'
  for name, rows in table.items():
    for role in [r for r in ROLES[:-1] if r in rows]:
      cells = [' / '.join(interval(g) for g in rows[role][f'minus_{b}'])
               if f'minus_{b}' in rows[role] else '–' for b in fitted]
      lines.append(f"| {name} | {LABELS[role]} | {' | '.join(cells)} |")
  lines += ['', 'Each evaluated candidate of the new rule, development against test AUROC, image / '
            'pixel:', '', '| run | candidate | development | test |', '|---|---|---|---|']
  for name, rows in table.items():
    lines += [f"| {name} | {_choice(c['choice'])} | {_fmt(c['dev'][0])} / {_fmt(c['dev'][1])} | "
              f"{_fmt(c['test'][0])} / {_fmt(c['test'][1])} |" for c in rows['candidates']]
  lines += ['', 'Why each rule chose what it did (tuned.json criterion.reason):', '']
  for name, rows in table.items():
    for role in [r for r in ROLES if 'reason' in rows.get(r, {})]:
      lines.append(f"- {name}, {LABELS[role]}: {rows[role]['reason']}")
  lines += ['', '| run | training s | tuning s, new rule | legacy rule | new / training | legacy / '
            'training |', '|---|---|---|---|---|---|']
  for name, rows in table.items():
    wall = {k: v['wall_s'] for k, v in (rows.get('timing') or {}).items()}
    if {'train', 'tune', 'tune_legacy'} <= set(wall):
      lines.append(f"| {name} | {wall['train']:.0f} | {wall['tune']:.0f} | "
                   f"{wall['tune_legacy']:.0f} | {wall['tune'] / wall['train']:.2f} | "
                   f"{wall['tune_legacy'] / wall['train']:.2f} |")
  return '\n'.join(lines)


def pooled_rows(runs: List[Run], evidence_of: Dict[str, Dict[Tuple, resample.Evidence]]
                ) -> Dict[str, Dict[str, Any]]:
  """Per category and model, over its seeds (one or more): each of POOLED_ROLES minus each
  model-free baseline and minus each of REFERENCES (but itself), test image and pixel AUROC
  averaged over the seeds, with a paired bootstrap 95% interval over the test images ([2, 3]
  each: value, low, high); evidence_of: run name -> load_evidence(run)."""
  groups: Dict[str, List[Run]] = {}
  for run in runs:
    groups.setdefault(f'{run.category} {run.model}', []).append(run)
  out = {}
  for name, group in groups.items():
    chosen: Dict[str, list] = {}
    free: Dict[str, list] = {}
    for run in group:
      evidence = evidence_of[run.name]
      picks = choices(run, evidence, tunings(run))
      for role in POOLED_ROLES:
        if role in picks:
          chosen.setdefault(role, []).append(evidence[picks[role][0]])
      for b in baselines.BASELINES:
        if (b, (b,)) in evidence:
          free.setdefault(b, []).append(evidence[(b, (b,))])
    if any(len(v) != len(group) for v in [*chosen.values(), *free.values()]):
      continue
    against = {**{f'minus_{b}': entries for b, entries in free.items()},
               **{f'minus_{r}': chosen.get(r) for r in REFERENCES}}
    out[name] = {'seeds': [r.seed for r in group]}
    for role, entries in chosen.items():
      out[name][role] = {k: resample.paired_difference(entries, other, RESAMPLES).tolist()
                         for k, other in against.items() if other and k != f'minus_{role}'}
  return out


def pooled_markdown(pooled: Dict[str, Dict[str, Any]]) -> str:
  fitted = [b for b in baselines.BASELINES
            if any(f'minus_{b}' in r.get('default', {}) for r in pooled.values())]
  lines = ["Over the seeds: each rule's choice minus each model-free baseline, (c) and (c'), "
           'test image / pixel AUROC averaged over the seeds [95% paired bootstrap CI over the '
           'test images]:', '',
           '| category, model (seeds) | rule | ' +
           ' | '.join(baselines.BASELINES[b].label for b in fitted) + ' | − (c) untuned default | '
           "− (c') the paper's T_d |", '|---|---|' + '---|' * (len(fitted) + 2)]
  interval = lambda g: f'{g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}]'
  for name, rows in pooled.items():
    for role in [r for r in POOLED_ROLES if r in rows]:
      cells = [' / '.join(interval(g) for g in rows[role][k]) if k in rows[role] else '–'
               for k in [f'minus_{b}' for b in fitted] + [f'minus_{r}' for r in REFERENCES]]
      seeds = ', '.join(map(str, rows['seeds']))
      lines.append(f"| {name} ({seeds}) | {LABELS[role]} | {' | '.join(cells)} |")
  return '\n'.join(lines)


def stage_table(runs: List[Run], out_dir: str) -> str:
  runs = [r for r in runs if os.path.isdir(r.path('test'))]
  evidence_of = {r.name: load_evidence(r) for r in runs}
  table = {r.name: run_rows(r, evidence_of[r.name]) for r in runs}
  pooled = pooled_rows(runs, evidence_of)
  write_json(os.path.join(out_dir, 'regret.json'), {**table, 'over_seeds': pooled})
  text = markdown(table) + ('\n\n' + pooled_markdown(pooled) if pooled else '')
  with open(os.path.join(out_dir, 'regret.md'), 'w') as f:
    f.write(text + '\n')
  return text


def stage_difficulty(runs: List[Run]) -> str:
  """The model-free z-score on each category's development set, and on the legacy one: no model
  is needed, so it runs before (or without) training."""
  lines = ['| category | set | family | image AUROC | pixel AUROC |', '|---|---|---|---|---|']
  for run in {r.category: r for r in runs}.values():
    config = run.config()
    new, normal = tune.development_set(config)
    val = pipeline.get_eval_data(config.data, 'val', global_batch_size=config.eval.batch_size)
    legacy = dev_set.make_painted_dev_set(val, run.config(LEGACY).tune)
    out = {name: dev_set.model_free(d, normal.stats) for name, d in (('new', new), ('legacy', legacy))}
    write_json(os.path.join(os.path.dirname(run.workdir), 'difficulty.json'), out)
    for name, free in out.items():
      for family, r in [('all', free['all'])] + list(free['families'].items()):
        lines.append(f"| {run.category} | {name} | {family} | {_fmt(r['image_auroc'])} | "
                     f"{_fmt(r['pixel_auroc'])} |")
  return '\n'.join(lines)


def stage_dev_area(runs: List[Run], areas, out_dir: str) -> str:
  results = {}
  for run in runs:
    restored = scoring.restore_ema_params(run.config(), run.workdir, parallel.make_mesh())
    evidence = load_evidence(run)

    def test_of(point, detectors):
      entry = evidence.get((_key(point), tuple(detectors)))
      if entry is None:
        return [float('nan'), float('nan')]
      return [float(a[0]) for a in aurocs(entry, np.ones((1, len(entry[2]))))]

    results[run.name] = []
    for area in areas:
      logging.info('regret: dev_area of %s, defect area %s', run.name, area)
      results[run.name].append(dev_area.run_area(run.config({'tune.defect_area': tuple(area)}),
                                                 run.workdir, restored, test_of))
  write_json(os.path.join(out_dir, 'dev_area.json'), results)
  text = dev_area.markdown(results)
  with open(os.path.join(out_dir, 'dev_area.md'), 'w') as f:
    f.write(text + '\n')
  return text


def run_stage(stage: str, runs: List[Run], out_dir: str, features_at: str = 'choices',
              areas=dev_area.AREAS, variants=tuple(VARIANTS), shard=(0, 1)) -> None:
  if stage == 'dev_area':
    print(stage_dev_area(runs, areas, out_dir))
    return
  if stage in ('table', 'difficulty'):
    print(stage_table(runs, out_dir) if stage == 'table' else stage_difficulty(runs))
    return
  for run in runs:
    logging.info('regret: %s of %s', stage, run.name)
    if stage == 'evaluate':
      stage_evaluate(run, features_at, shard)
    elif stage == 'tune':
      stage_tune(run, variants)
    elif stage == 'redecide':
      stage_redecide(run, variants)
    else:
      stage_train(run)


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # as main.py, before XLA starts
  logging.set_verbosity(logging.INFO)
  overrides = {k: ast.literal_eval(v) for k, v in (o.split('=', 1) for o in _OVERRIDES.value)}
  runs = make_runs(ROOT.value, _RUNS.value, _CATEGORIES.value, _MODELS.value, _SEEDS.value,
                   overrides)
  run_stage(_STAGE.value, runs, _RUNS.value, _FEATURES_AT.value,
            [dev_area.parse_area(a) for a in _AREAS.value], _VARIANTS.value,
            parse_shard(_SHARD.value))


if __name__ == '__main__':
  app.run(main)
