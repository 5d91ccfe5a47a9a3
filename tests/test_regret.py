"""experiments/regret.py end to end on the tiny synthetic category: every stage, resumed."""

import dataclasses
import json
import os
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments'))
import regret  # pylint: disable=g-import-not-at-top,wrong-import-position
from esm import resample  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = {
    'data.dataset': 'synthetic', 'data.image_size': 16, 'data.synthetic_size': 32,
    'data.synthetic_num_train': 16, 'data.synthetic_num_test': 8, 'data.val_fraction': 0.25,
    'model.ch': 8, 'model.ch_mult': (1,), 'model.num_res_blocks': 1, 'model.attn_resolutions': (),
    'model.num_groups': 4, 'train.num_steps': 2, 'train.batch_size': 4, 'train.warmup_steps': 0,
    'train.ckpt_every': 2, 'eval.batch_size': 4, 'features.model': 'none',
    'detect.weights': (0.0, 1.0, 1.0, 1.0), 'sampling.t_d': 2, 'sampling.snapshot_steps': (0,),
    'tune.t_d_fractions': (0.004, 0.008), 'tune.methods': ('esm',), 'tune.sigma_floors': ('constant',),
    'tune.folds': 2, 'tune.defects_per_image': 2, 'tune.bootstrap': 50,
}


@pytest.mark.slow
def test_every_stage_writes_its_files_and_resumes(tmp_path):
  runs = regret.make_runs(str(tmp_path / 'root'), str(tmp_path / 'runs'), ['synthetic/object'],
                          ['esm'], ['0'], TINY)
  [run] = runs
  for stage in ('difficulty', 'train', 'tune', 'evaluate', 'table'):
    if stage == 'evaluate':  # shard 1 of 2 first: its share of the test points and no baseline
      regret.run_stage(stage, runs, str(tmp_path / 'runs'), shard=(1, 2))
      points = [regret._key(p) + '.npz' for p, _ in regret.test_points(run, 'choices')]
      assert len(points) > 1 and sorted(os.listdir(run.path('test'))) == sorted(points[1::2])
    if stage == 'table':  # what an evaluate running beside the table has not finished writing
      with open(run.path('test', 'esm_9.npz.tmp'), 'w') as f:
        f.write('half a file')
    regret.run_stage(stage, runs, str(tmp_path / 'runs'))
  for name in ('tuned.json', 'legacy_tuned.json', 'tuning_scores.npz', 'timing.json',
               '../difficulty.json'):
    assert os.path.exists(run.path(name)), name
  timing = json.load(open(run.path('timing.json')))
  assert set(timing) == {'train', 'tune', 'tune_legacy', *(f'tune_{v}' for v in regret.VARIANTS)}
  # Every variant of the rule decided on the development scores of the new rule's stage 1.
  new = json.load(open(run.path('tuned.json')))
  stage1 = lambda t: [(c['method'], c['t_d'], c['detectors'], c['image_auroc'], c['pixel_auroc'])
                      for c in t['candidates'] if c['stage'] == 1]
  for name, options in regret.VARIANTS.items():
    variant = json.load(open(regret.variant_path(run, name)))
    assert stage1(variant) == stage1(new)
    assert variant['criterion']['options'] == dataclasses.asdict(options)
  table = json.load(open(tmp_path / 'runs' / 'regret.json'))[run.name]
  # A split role reads each metric at that metric's own choice.
  assert table['split']['auroc'] == [table['image_only']['auroc'][0],
                                     table['pixel_only']['auroc'][1]]
  for role in ('new', *regret.VARIANTS, *regret.SPLITS, 'legacy', 'legacy_rule', 'default'):
    row = table[role]
    assert all(0.0 <= a <= 1.0 for a in row['auroc'])
    for metric in ('image', 'pixel'):
      point, lo, hi = row[f'{metric}_regret']
      assert lo <= point <= hi and point >= 0.0  # (d) is the best of the evaluated candidates
    for (point, lo, hi), own, floor in zip(row['minus_zscore'], row['auroc'],
                                           table['zscore']['auroc']):
      assert lo <= point <= hi and point == pytest.approx(own - floor)
  assert table['best']['auroc'][0] >= table['new']['auroc'][0]
  assert len(table['kendall_tau']) == 2 and 'zscore' in table
  # Each evaluated candidate carries its own development AUROCs beside its test AUROCs.
  dev = [[c['image_auroc'], c['pixel_auroc']] for c in new['candidates']]
  assert table['candidates'] and all(c['dev'] in dev and all(0.0 <= a <= 1.0 for a in c['test'])
                                     for c in table['candidates'])
  text = open(tmp_path / 'runs' / 'regret.md').read()
  assert '(a) new rule' in text and 'z-score (no model)' in text
  assert f"| {run.name} | {regret._choice(table['candidates'][0]['choice'])} | " in text
  assert f"{run.name}, (a) new rule: {new['criterion']['reason']}" in text
  wall = {k: f"{v['wall_s']:.0f}" for k, v in timing.items()}
  assert f"| {run.name} | {wall['train']} | {wall['tune']} |" in text
  # A rerun of every stage finds its files and redoes nothing.
  start = time.time()
  for stage in ('train', 'tune', 'evaluate'):
    regret.run_stage(stage, runs, str(tmp_path / 'runs'))
  assert json.load(open(run.path('timing.json'))) == timing
  assert time.time() - start < 30
  # A tune stage runs the variants it names and no other.
  for name in ('guarded', 'nearest'):
    os.remove(regret.variant_path(run, name))
  regret.run_stage('tune', runs, str(tmp_path / 'runs'), variants=('guarded',))
  assert os.path.exists(regret.variant_path(run, 'guarded'))
  assert not os.path.exists(regret.variant_path(run, 'nearest'))
  # redecide takes each saved decision again from the saved scores, and rewrites it.
  fresh = {path: json.load(open(path)) for path in (run.path('tuned.json'),
                                                    regret.variant_path(run, 'guarded'))}
  for path, tuned in fresh.items():
    regret.write_json(path, dict(tuned, criterion=dict(tuned['criterion'], reason='stale')))
  timing = json.load(open(run.path('timing.json')))
  regret.run_stage('redecide', runs, str(tmp_path / 'runs'), variants=('guarded', 'nearest'))
  assert {path: json.load(open(path)) for path in fresh} == fresh
  assert not os.path.exists(regret.variant_path(run, 'nearest'))
  assert json.load(open(run.path('timing.json'))) == timing

  # dev_area at the config's own area is tuning's first stage again; a larger area draws larger
  # regions; each point's test AUROCs are the evaluate stage's.
  default_area, large = tuple(run.config().tune.defect_area), (0.1, 0.4)
  regret.run_stage('dev_area', runs, str(tmp_path / 'runs'), areas=(default_area, large))
  own, wide = json.load(open(tmp_path / 'runs' / 'dev_area.json'))[run.name]
  assert (own['area'], wide['area']) == (list(default_area), list(large))
  stage1 = [c for c in new['candidates'] if c['stage'] == 1]
  assert [p['point'] for p in own['points']] == [[c['method'], c['t_d'], c.get('sigma_floor')]
                                                 for c in stage1]
  assert [p['dev_criterion'] for p in own['points']] == pytest.approx(
      [c['criterion_auroc'] for c in stage1])
  assert own['choice'] == new['criterion']['id']  # no S_Cos here: the first stage decides
  assert wide['region_mask_share'] > own['region_mask_share']
  point, detectors = table['default']['choice']
  default = next(p for p in own['points'] if regret._key(p['point']) == point
                 and p['detectors'] == detectors)
  assert default['test'] == pytest.approx(table['default']['auroc'])
  assert '| defect area |' in open(tmp_path / 'runs' / 'dev_area.md').read()


def test_pooled_rows_average_the_seeds_paired_against_the_baselines(monkeypatch):
  rng = np.random.default_rng(0)
  labels = np.repeat([0, 1], 6)
  masks = np.zeros((12, 4, 4))
  masks[labels == 1, :2, :2] = 1

  def entry(shift):
    maps = rng.normal(size=(12, 4, 4)) + shift * masks
    return labels * shift + rng.normal(size=12), resample.pixel_pairs(maps, masks), labels

  chosen, default, floor = ('p', ('re',)), ('q', ('re',)), ('zscore', ('zscore',))
  paper = ('r', ('re',))
  evidence = {s: {chosen: entry(2.0), default: entry(0.5), paper: entry(0.2), floor: entry(1.0)}
              for s in (0, 1)}
  runs = [regret.Run('d', 'cat', 'sgm', s, '/nowhere', None) for s in (0, 1)]
  monkeypatch.setattr(regret, 'tunings', lambda run: {})
  monkeypatch.setattr(regret, 'choices', lambda run, ev, done: {
      'new': (chosen, chosen), 'default': (default, default), 'paper': (paper, paper)})
  evidence_of = {r.name: evidence[r.seed] for r in runs}
  pooled = regret.pooled_rows(runs, evidence_of)['cat sgm']
  of = lambda key: [evidence[s][key] for s in (0, 1)]
  np.testing.assert_allclose(pooled['new']['minus_zscore'],
                             resample.paired_difference(of(chosen), of(floor), regret.RESAMPLES))
  np.testing.assert_allclose(pooled['new']['minus_default'],
                             resample.paired_difference(of(chosen), of(default), regret.RESAMPLES))
  np.testing.assert_allclose(pooled['new']['minus_paper'],
                             resample.paired_difference(of(chosen), of(paper), regret.RESAMPLES))
  np.testing.assert_allclose(pooled['paper']['minus_default'],
                             resample.paired_difference(of(paper), of(default), regret.RESAMPLES))
  assert pooled['seeds'] == [0, 1] and 'minus_default' not in pooled['default']
  assert 'minus_paper' not in pooled['paper'] and 'minus_paper' in pooled['default']
  # One seed gives that run's own paired differences.
  one = regret.pooled_rows(runs[:1], evidence_of)['cat sgm']
  assert one['seeds'] == [0]
  np.testing.assert_allclose(one['new']['minus_paper'], resample.paired_difference(
      [evidence[0][chosen]], [evidence[0][paper]], regret.RESAMPLES))
  text = regret.pooled_markdown(regret.pooled_rows(runs, evidence_of))
  assert '| cat sgm (0, 1) | (a) new rule |' in text and '| cat sgm (0, 1) | (c) untuned' in text
  assert "| cat sgm (0, 1) | (c') the paper's T_d" in text


def test_paper_point_is_the_papers_t_d_scaled_to_the_configs_t():
  # configs/cpu runs T = 250: tables 6 and 8 give bottle 100, pill 164 and metal_plate 50 of 1000.
  runs = regret.make_runs('/data', '/runs', ['mvtec_ad/bottle', 'mvtec_ad/pill', 'mpdd/metal_plate'],
                          ['sgm'], ['0'], {})
  assert [regret.paper_point(r, r.config()) for r in runs] == [
      ('sgm', 25, None), ('sgm', 41, None), ('sgm', 12, None)]
  [synthetic] = regret.make_runs('/data', '/runs', ['synthetic/object'], ['esm'], ['0'], TINY)
  config = synthetic.config()
  assert regret.paper_point(synthetic, config) is None  # no paper table: (c') is not scored
  assert regret.untuned_points(synthetic, config) == {'default': regret.tune.default_point(config)}


def test_a_stage_killed_and_resumed_reports_the_time_of_both_attempts(tmp_path, monkeypatch):
  monkeypatch.setattr(regret, 'UNFINISHED_EVERY_S', 0.05)
  run = regret.Run('synthetic', 'object', 'esm', 0, str(tmp_path), {})

  def interrupted():
    time.sleep(0.3)  # a SIGKILL here would leave what the recorder wrote while it ran
    assert 'tune' + regret.UNFINISHED in json.load(open(run.path('timing.json')))
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    regret.timed(run, 'tune', interrupted)
  timing = json.load(open(run.path('timing.json')))
  assert set(timing) == {'tune' + regret.UNFINISHED}
  assert timing['tune' + regret.UNFINISHED]['wall_s'] >= 0.3
  with pytest.raises(SystemExit):  # a preempted attempt: still unfinished
    regret.timed(run, 'tune', lambda: time.sleep(0.2) or False)
  regret.timed(run, 'tune', lambda: time.sleep(0.2))
  timing = json.load(open(run.path('timing.json')))
  assert set(timing) == {'tune'} and timing['tune']['wall_s'] >= 0.7


def test_evaluate_scores_the_chosen_and_the_untuned_points_first(monkeypatch):
  [run] = regret.make_runs('/root', '/runs', ['synthetic/object'], ['esm'], ['0'], TINY)
  row = lambda t_d, score: {'method': 'esm', 't_d': t_d, 'nfe': t_d, 'detectors': ['re'],
                            'score': score, 'image_auroc': score, 'pixel_auroc': score}
  candidates = [row(t_d, 0.9 if t_d == 5 else 0.5) for t_d in (1, 3, 5, 7)]
  monkeypatch.setattr(regret, 'tunings', lambda _: {
      'new': {'method': 'esm', 't_d': 5, 'candidates': candidates}})
  ordered = regret.test_points(run, 'choices')
  # The rule's and the legacy picks' T_d 5 and the default's T_d 2 (TINY), S_Cos at those only.
  assert ordered == [(('esm', 2, None), True), (('esm', 5, None), True), (('esm', 1, None), False),
                     (('esm', 3, None), False), (('esm', 7, None), False)]
