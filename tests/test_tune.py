"""Label-free tuning: the development set, the choice, tuned.json, and that no test label leaks."""

import dataclasses
import json
import os
import random
import shutil
import types

import numpy as np
import pytest
from PIL import Image

from configs import common
from configs.default import get_default_config
from esm import choice
from esm import defects
from esm import detectors as det
from esm import dev_set
from esm import resample
from esm import run
from esm import tune
from esm import tuned as tuned_lib
from esm.config import from_configdict, with_fields
from esm.errors import UserError
from tests.helpers import runs
from tests.helpers.shared_data import shared_data_dir


@pytest.mark.parametrize('kind', defects.PAINTED_DEFECTS)
def test_painted_defect_mask_is_exactly_the_changed_pixels(kind):
  rng = np.random.default_rng(0)
  img = np.random.default_rng(1).uniform(60, 200, (32, 32, 3)).astype(np.float32)
  bad, mask = defects.paint_defect(img, kind, rng)
  assert mask.any() and bad.shape == img.shape
  assert np.array_equal(mask, np.any(np.abs(bad - img) > 0.5, axis=-1))


def test_grid_and_tie_rule():
  assert tune.t_d_grid((0.005, 0.01, 0.025, 0.1, 0.3), 250) == [1, 2, 6, 25, 75]
  assert tune.t_d_grid((0.001, 0.002), 100) == [1]
  assert tune.t_d_grid((0.01, 0.1), 250, 41) == [2, 25, 41]  # the default is always a candidate
  rows = [{'score': 0.900, 'nfe': 50, 't_d': 50, 'detectors': ['re']},
          {'score': 0.897, 'nfe': 25, 't_d': 25, 'detectors': ['u', 're']},
          {'score': 0.800, 'nfe': 6, 't_d': 6, 'detectors': ['re']}]
  assert dev_set.choose(rows, 0.005)['t_d'] == 25  # a tie with the best: fewer NFE wins
  assert dev_set.choose(rows, 0.0)['t_d'] == 50


def test_bad_tune_fields_are_named():
  for field, value in (('tune.t_d_fractions', (0.0,)), ('tune.methods', ('ddim',)),
                       ('tune.sigma_floors', ('none',)), ('tune.sigma_floors', ()),
                       ('tune.folds', 1), ('tune.defect_kinds', ('smudge',)),
                       ('tune.rule', 'best'), ('tune.families', ('blur',)), ('tune.families', ()),
                       ('tune.strengths', (0.0,)), ('tune.bootstrap', 10),
                       ('tune.defect_area', (0.2, 0.1)), ('tune.defect_area', (0.0, 0.1))):
    with pytest.raises(UserError, match=field):
      from_configdict(common.override(get_default_config(), {field: value}))


def test_supported_methods_follow_the_model():
  c = get_default_config()
  assert tune.supported_methods(from_configdict(c)) == ['sgm', 'esm', 'esm_sigma']
  c.loss.kind = 'dsm'
  assert tune.supported_methods(from_configdict(c)) == ['sgm']


TUNE_OVERRIDES = {'tune.t_d_fractions': (0.002, 0.004), 'tune.methods': ('sgm', 'esm'),
                  'tune.folds': 2, 'tune.defects_per_image': 2}
WEIGHTS = (1.0, 0.5, 1.0, 1.0)  # S_U at half weight: every subset holding it keeps 0.5


@pytest.fixture(scope='module')
def tuned_run(tmp_path_factory):
  base = tmp_path_factory.mktemp('tune')
  cfg = runs.config('micro', str(base / 'cache'),  # 8 steps of the smallest U-Net
                    {**TUNE_OVERRIDES, 'detect.weights': WEIGHTS})
  workdir = str(base / 'run')
  run.run(cfg, workdir, 'train')
  run.run(cfg, workdir, 'tune')
  with open(os.path.join(workdir, 'detector.json')) as f:
    state = json.load(f)  # read now: the eval tests below rewrite it
  return cfg, workdir, state


@pytest.mark.slow
def test_tune_writes_the_choice_the_noise_and_every_candidate(tuned_run):
  cfg, workdir, _ = tuned_run
  tuned = json.load(open(os.path.join(workdir, 'tuned.json')))
  # The grid, and the configured default (esm_sigma at T_d = 4) as a candidate of its own.
  assert tuned['t_d_grid'] == [2, 4] and tuned['methods'] == ['sgm', 'esm', 'esm_sigma']
  assert tuned['default'] == {'method': 'esm_sigma', 't_d': 4, 'sigma_floor': 'constant',
                              'id': tuned['default']['id']}
  # sgm on a dual-stream model: S_RE only (1 subset); esm and esm_sigma: S_U, S_KL, S_RE (7).
  assert len(tuned['candidates']) == 2 * 1 + 2 * 7 + 7
  dev = tuned['dev_set']
  assert (dev['held_out_images'], dev['images'], dev['painted']) == (4, 12, 8)
  assert sorted(dev['families']) == sorted(cfg.tune.families)
  for row in [dev['model_free']['all']] + list(dev['model_free']['families'].values()):
    assert 0.0 <= row['image_auroc'] <= 1.0 and 0.0 <= row['pixel_auroc'] <= 1.0
  c = tuned['criterion']
  assert c['rule'] == 'noise_aware' and c['reason'] and c['bootstrap'] == cfg.tune.bootstrap
  assert set(c['entries_used']) | set(c['entries_left_out']) == {
      f'{f}/{m}' for f in cfg.tune.families for m in ('image', 'pixel')}
  chosen = tuned['candidates'][c['id']]
  assert (tuned['method'], tuned['t_d'], tuned['weights']) == (chosen['method'], chosen['t_d'],
                                                               chosen['weights'])
  assert c['id'] in [b['id'] for b in c['band']] or c['reason'].startswith('default')
  for row in tuned['candidates']:
    assert set(row['families']) == set(cfg.tune.families)
    assert row['weights'] == [w if n in row['detectors'] else 0.0
                              for n, w in zip(det.DETECTOR_NAMES, WEIGHTS)]
  scores = np.load(os.path.join(workdir, 'tuning_scores.npz'))
  assert scores['image_scores'].shape == (len(tuned['candidates']), 12)
  assert scores['wins'].shape == (len(tuned['candidates']), 12, 12)


def test_the_legacy_rule_stays_callable(tuned_run, tmp_path):
  cfg, trained, _ = tuned_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns('report', 'tuned.json'))
  cfg = common.override(cfg, {'tune.rule': 'legacy', 'tune.t_d_fractions': (0.002,)})
  run.run(cfg, workdir, 'tune')
  tuned = json.load(open(os.path.join(workdir, 'tuned.json')))
  # Today's grid (without the default T_d = 4) and set: painted at full contrast.
  assert tuned['t_d_grid'] == [2] and len(tuned['candidates']) == 1 + 7
  assert tuned['criterion']['rule'] == 'legacy'
  assert tuned['dev_set']['painted'] == 4 * cfg.tune.defects_per_image
  best = dev_set.choose(tuned['candidates'], cfg.tune.tie_tolerance)
  assert (tuned['method'], tuned['t_d'], tuned['weights']) == (best['method'], best['t_d'],
                                                               best['weights'])
  # Tuning refuses a held-out slice the model was not trained without.
  with pytest.raises(UserError, match='held-out slice'):
    run.run(common.override(cfg, {'data.val_seed': 3}), workdir, 'tune')


@pytest.mark.slow
def test_eval_uses_tuned_values_unless_given_on_the_command_line(tuned_run):
  cfg, workdir, _ = tuned_run
  tuned = json.load(open(os.path.join(workdir, 'tuned.json')))
  run.run(cfg, workdir, 'eval')
  result = json.load(open(os.path.join(workdir, 'report', 'results.json')))['object']
  assert (result['method'], result['t_d'], result['weights']) == (
      tuned['method'], tuned['t_d'], tuned['weights'])
  assert set(result['settings_source'].values()) == {'tuned'}
  report = open(os.path.join(workdir, 'report', 'report.md')).read()
  assert 'Label-free tuning' in report and '(tuned)' in report
  with Image.open(os.path.join(workdir, 'report', 'figures', 'tuning.png')) as figure:
    assert figure.size == (560, 420)

  cfg = common.override(cfg, {'sampling.t_d': 3})
  run.run(cfg, workdir, 'eval', overridden={'sampling.t_d'})
  result = json.load(open(os.path.join(workdir, 'report', 'results.json')))['object']
  assert result['t_d'] == 3 and result['settings_source']['sampling.t_d'] == 'command line'
  assert result['settings_source']['sampling.method'] == 'tuned'


def _folder_copy(src: str, dst: str, num_train: int, relabel_seed=None) -> None:
  """bottle as a folder dataset: the first num_train train images, and the test images either in
  their own folders or moved to random ones (and no masks)."""
  train = sorted(os.listdir(os.path.join(src, 'train', 'good')))[:num_train]
  os.makedirs(os.path.join(dst, 'train', 'good'))
  for name in train:
    shutil.copy(os.path.join(src, 'train', 'good', name), os.path.join(dst, 'train', 'good', name))
  types = sorted(os.listdir(os.path.join(src, 'test')))
  rng = random.Random(relabel_seed)
  for t in types:
    for name in sorted(os.listdir(os.path.join(src, 'test', t))):
      to = t if relabel_seed is None else rng.choice(types)
      os.makedirs(os.path.join(dst, 'test', to), exist_ok=True)
      shutil.copy(os.path.join(src, 'test', t, name), os.path.join(dst, 'test', to, f'{t}_{name}'))


@pytest.mark.slow
def test_relabelled_test_split_gives_an_identical_tuned_json(tmp_path):
  bottle = str(shared_data_dir('mvtec_ad', 'bottle'))
  _folder_copy(bottle, str(tmp_path / 'a' / 'bottle'), 24)
  _folder_copy(bottle, str(tmp_path / 'b' / 'bottle'), 24, relabel_seed=7)
  cfg = common.set_micro_model(get_default_config())
  cfg = common.override(cfg, {
      **TUNE_OVERRIDES, 'tune.methods': ('esm',), 'data.dataset': 'folder', 'data.category': 'bottle',
      'data.image_size': 16, 'data.val_fraction': 0.25, 'train.num_steps': 2, 'train.batch_size': 4,
      'train.warmup_steps': 0, 'eval.batch_size': 4, 'features.model': 'none',
      'detect.weights': (0.0, 1.0, 1.0, 1.0), 'sampling.snapshot_steps': (0,)})
  tuned = []
  for copy in ('a', 'b'):
    c = common.override(cfg, {'data.root': str(tmp_path / copy),
                              'data.tfds_dir': str(tmp_path / f'tfds_{copy}')})
    workdir = str(tmp_path / 'run')
    if copy == 'a':
      run.run(c, workdir, 'train')
    run.run(c, workdir, 'tune')
    tuned.append(open(os.path.join(workdir, 'tuned.json')).read())
  assert tuned[0] == tuned[1]


@pytest.mark.slow
def test_tune_writes_the_detector_state_of_its_choice(tuned_run):
  _, workdir, state = tuned_run
  tuned = json.load(open(os.path.join(workdir, 'tuned.json')))
  assert state['fields']['sampling.t_d'] == tuned['t_d']
  assert state['fields']['sampling.method'] == tuned['method']
  assert list(state['fields']['detect.weights']) == tuned['weights']


@pytest.mark.slow
def test_esm_sigma_floor_is_tuned_and_applied(tuned_run, tmp_path):
  """Both ESM^σ floors are candidates; the choice goes to tuned.json and into evaluation."""
  cfg, trained, _ = tuned_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns('report', 'tuned.json'))
  cfg = common.override(cfg, {'tune.methods': ('esm_sigma',), 'tune.t_d_fractions': (0.004,)})
  run.run(cfg, workdir, 'tune')
  tuned = json.load(open(os.path.join(workdir, 'tuned.json')))
  assert tuned['sigma_floors'] == ['constant', 'beta']
  assert {c['sigma_floor'] for c in tuned['candidates']} == {'constant', 'beta'}
  best = tuned['candidates'][tuned['criterion']['id']]
  assert tuned['sigma_floor'] == best['sigma_floor'] == tuned['by_method']['esm_sigma']['sigma_floor']

  # eval.sweep_t_d adds the test AUROC of every (sampler, T_d); at the tuned choice it must be
  # the evaluation itself (same floor, weights and T_d).
  run.run(common.override(cfg, {'eval.sweep_t_d': True}), workdir, 'eval')
  result = json.load(open(os.path.join(workdir, 'report', 'results.json')))['object']
  assert result['sigma_floor'] == tuned['sigma_floor']
  assert result['settings_source']['sampling.sigma_floor'] == 'tuned'
  [row] = result['t_d_sweep']
  assert (row['method'], row['t_d']) == ('esm_sigma', tuned['t_d'])
  assert row['dev_score'] == tuned['by_method']['esm_sigma']['score']
  assert row['image_auroc'] == pytest.approx(result['image_auroc'], abs=1e-6)
  assert row['pixel_auroc'] == pytest.approx(result['pixel_auroc'], abs=1e-6)
  other = {'constant': 'beta', 'beta': 'constant'}[tuned['sigma_floor']]
  run.run(common.override(cfg, {'sampling.sigma_floor': other}), workdir, 'eval',
          overridden={'sampling.sigma_floor'})
  result = json.load(open(os.path.join(workdir, 'report', 'results.json')))['object']
  assert result['sigma_floor'] == other
  assert result['settings_source']['sampling.sigma_floor'] == 'command line'


class _Interrupted(Exception):
  pass


@pytest.mark.slow
def test_an_interrupted_tuning_resumes_from_the_points_it_finished(tuned_run, tmp_path,
                                                                  monkeypatch):
  cfg, trained, _ = tuned_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns(
      'report', 'tuned.json', 'tuning_scores.npz', 'detector.json'))
  reference = json.load(open(os.path.join(trained, 'tuned.json')))
  points = {(c['method'], c['t_d'], c.get('sigma_floor'), c['stage'])
            for c in reference['candidates']}
  score_candidate, calls = dev_set.score_candidate, []

  def interrupted_after_two(scorer, dev, stage):
    if len(calls) == 2:
      raise _Interrupted()
    calls.append(stage)
    return score_candidate(scorer, dev, stage)

  monkeypatch.setattr(dev_set, 'score_candidate', interrupted_after_two)
  with pytest.raises(_Interrupted):
    run.run(cfg, workdir, 'tune')
  progress = os.path.join(workdir, tuned_lib.PROGRESS_DIR)
  assert len(os.listdir(progress)) == 2 and not os.path.exists(tuned_lib.path(workdir))

  calls.clear()
  monkeypatch.setattr(dev_set, 'score_candidate',
                      lambda *a: calls.append(a[2]) or score_candidate(*a))
  run.run(cfg, workdir, 'tune')
  assert len(calls) == len(points) - 2  # the two finished points were read back
  assert not os.path.exists(progress)
  resumed = json.load(open(tuned_lib.path(workdir)))
  assert resumed['candidates'] == reference['candidates']
  assert resumed['criterion'] == reference['criterion']


def test_progress_keys_change_with_the_parameters_the_set_the_config_and_the_stage():
  cfg = from_configdict(runs.config('micro'))
  params, dev = {'w': np.ones(3, np.float32)}, [np.arange(4), np.zeros((2, 2))]
  base = tuned_lib.progress_base(params, dev)
  key = tuned_lib.progress_key(base, cfg, 1)
  assert key == tuned_lib.progress_key(tuned_lib.progress_base(params, dev), cfg, 1)
  assert key != tuned_lib.progress_key(base, cfg, 2)
  assert key != tuned_lib.progress_key(base, tuned_lib.candidate_config(
      cfg, {'method': 'esm', 't_d': cfg.sampling.t_d + 1, 'weights': cfg.detect.weights}), 1)
  assert base != tuned_lib.progress_base({'w': np.full(3, 2, np.float32)}, dev)
  assert base != tuned_lib.progress_base(params, [np.arange(4), np.ones((2, 2))])
  assert tuned_lib.progress_key(None, cfg, 1) is None  # a multi-host run saves nothing
  # The same data named another way, read by more workers into another cache, from another command
  # line: same points.
  elsewhere = with_fields(cfg, {
      'data.root': '../elsewhere/' + cfg.data.root, 'data.tfds_dir': '/tmp/other_tfds',
      'data.num_workers': cfg.data.num_workers + 1, 'data.cache_mb': cfg.data.cache_mb + 1,
      'compilation_cache_dir': '/tmp/cc',
      'predict.input_dir': '/tmp/in'})
  assert key == tuned_lib.progress_key(
      base, dataclasses.replace(elsewhere, command_line=('data.root',)), 1)


@pytest.mark.slow
def test_the_second_stage_at_every_point_decides_among_all_of_them(tuned_run, tmp_path):
  """RuleOptions(stage2_points='all'): S_Cos (here a random ViT) joins at every point of the
  first stage, and the choice is made among all of them against the default's detectors."""
  cfg, trained, _ = tuned_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns('report', 'tuned.json'))
  cfg = from_configdict(common.override(cfg, {
      'features.model': 'dino_vits16', 'features.weights': 'random', 'features.layers': (1, 0),
      'features.image_size': 32, 'tune.methods': ('sgm',)}))
  tuned, _ = tune.run_tuning(cfg, workdir, options=choice.RuleOptions(stage2_points='all'))
  rows = tuned['candidates']
  first = {tune.point_of(c) for c in rows if c['stage'] == 1}
  second = [c for c in rows if c['stage'] == 2]
  assert {tune.point_of(c) for c in second} == first and len(first) > 1
  assert {tune.point_of(c) for c in second if 'cos' in c['detectors']} == first
  assert tuned['criterion']['id'] in [b['id'] for b in tuned['criterion']['band']] or (
      tuned['criterion']['reason'].startswith('default'))
  assert rows[tuned['criterion']['default']]['stage'] == 2
  with pytest.raises(ValueError, match='stage2_points'):
    choice.RuleOptions(stage2_points='some')
  with pytest.raises(ValueError, match="stage2_reference='default'"):
    choice.RuleOptions(stage2_points='all', stage2_reference='choice')


def test_the_second_stage_reference_is_the_default_detectors_at_the_point_it_is_given():
  cfg = from_configdict(runs.config('micro'))
  full = tune.default_detectors(cfg, 'esm', True)
  method, t_d, floor = tune.default_point(cfg)
  rows = [{'method': m, 't_d': t, 'detectors': d, **({'sigma_floor': f} if f else {})}
          for m, t, f in ((method, t_d, floor), ('esm', 2, None)) for d in (['re'], full)]
  assert tune._default_flags(cfg, rows, True)[0] == 1  # the config's default point
  assert tune._default_flags(cfg, rows, True, at=('esm', 2, None))[0] == 3
  with pytest.raises(ValueError, match='stage2_reference'):
    choice.RuleOptions(stage2_reference='chosen')


def test_tuned_json_names_the_candidate_the_detector_margin_held_back():
  rows = [{'method': 'esm', 't_d': 12, 'detectors': ['u', 're']},
          {'method': 'esm_sigma', 't_d': 12, 'detectors': ['re'], 'sigma_floor': 'beta'}]
  decision = {'index': 0, 'reason': 'default: within the tie band of the leader', 'band': [0],
              'held_back': {'id': 1, 'difference': 0.05, 'se': 0.03, 'margin_se': 2.0}}
  brief = tune._brief(decision, rows)
  assert brief['held_back'] == {'id': 1, 'difference': 0.05, 'se': 0.03, 'margin_se': 2.0,
                                'method': 'esm_sigma', 't_d': 12, 'detectors': ['re'],
                                'sigma_floor': 'beta'}
  del decision['held_back']
  assert 'held_back' not in tune._brief(decision, rows)


def _painted_dev_set(n: int, side: int = 4):
  """(micro config, masks [n, side, side], development set, model-free AUROCs): n images of the
  config's first family, the second half painted in one corner, which no model-free detector
  solves."""
  cfg = from_configdict(runs.config('micro'))
  family = cfg.tune.families[0]
  labels = np.repeat([0, 1], n // 2)
  masks = np.zeros((n, side, side), np.uint8)
  masks[labels == 1, :2, :2] = 1
  dev = types.SimpleNamespace(labels=labels, families=np.where(labels == 1, family, 'good'),
                              source=np.arange(n) % (n // 2))
  return cfg, masks, dev, {'families': {family: {'image_auroc': 0.6, 'pixel_auroc': 0.6}}}


def test_a_given_reference_is_the_only_default_and_wins_a_tie():
  """decide(reference=i): candidate i alone is default-like, so when every candidate scores the
  same it is the choice, whatever the config's default."""
  cfg, masks, dev, model_free = _painted_dev_set(12)
  maps = np.random.default_rng(0).normal(size=masks.shape).astype(np.float32) + 2.0 * masks
  evidence = [dev_set.Evidence(maps.max(axis=(1, 2)), resample.pixel_pairs(maps, masks))] * 3
  method, t_d, floor = tune.default_point(cfg)
  rows = [{'method': method, 't_d': t, 'nfe': t, 'detectors': ['re'],
           **({'sigma_floor': floor} if floor else {})} for t in (t_d, 2 * t_d, 3 * t_d)]
  options = choice.RuleOptions()
  own, _ = tune.decide(cfg, rows, evidence, dev, model_free, False, options)
  given, _ = tune.decide(cfg, rows, evidence, dev, model_free, False, options, reference=2)
  assert (own['default'], own['index']) == (0, 0)
  assert (given['default'], given['index']) == (2, 2)


def test_a_second_stage_metric_picks_each_metrics_detectors_at_the_first_stages_point(monkeypatch):
  """RuleOptions.stage2_metric, here without a feature extractor: the first stage picks the point
  on both metrics, then the subsets there are decided on one metric's entries, so the image score
  and the map can take different detectors at one operating point."""
  cfg, masks, dev, model_free = _painted_dev_set(40)
  n, labels, family = len(masks), dev.labels, cfg.tune.families[0]
  rng = np.random.default_rng(0)
  noise = lambda: rng.normal(size=masks.shape).astype(np.float32)
  weak = lambda: dev_set.Evidence(rng.normal(size=n), resample.pixel_pairs(noise(), masks))
  by_image = dev_set.Evidence(2 * labels + rng.normal(size=n),  # ahead on images only
                              resample.pixel_pairs(noise(), masks))
  by_pixel = dev_set.Evidence(rng.normal(size=n), resample.pixel_pairs(noise() + 2 * masks, masks))
  method, t_d, floor = tune.default_point(cfg)
  full = tune.default_detectors(cfg, method, False)
  rows = [{'method': m, 't_d': t, 'nfe': t, 'detectors': d, 'stage': 1,
           **({'sigma_floor': f} if f else {})}
          for m, t, f, d in ((method, t_d, floor, ['re']), (method, t_d, floor, ['u']),
                             (method, t_d, floor, full), ('esm', 2 * t_d, None, full))]
  evidence = [by_image, by_pixel, weak(), weak()]
  monkeypatch.setattr(tune, 'score_points', lambda *args: (list(rows), list(evidence)))
  picked = {}
  for metric in choice.METRICS:
    options = choice.RuleOptions(stage2_metric=metric, stage2_reference='choice_point')
    out, _, decision, table = tune.noise_aware_candidates(cfg, '', dev, None, model_free, options)
    first = out[decision['stage1']['id']]
    assert first['t_d'] == t_d and tune.point_of(out[decision['index']]) == tune.point_of(first)
    assert {table.entries[e][1] for e in decision['kept']} == {metric}
    assert decision['left_out'][f'{family}/{"pixel" if metric == "image" else "image"}'] == (
        f'RuleOptions.metric={metric!r}')
    picked[metric] = out[decision['index']]['detectors']
  assert picked == {'image': ['re'], 'pixel': ['u']}
  with pytest.raises(ValueError, match='stage2_metric'):
    choice.RuleOptions(stage2_metric='aupro')
