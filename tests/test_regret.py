"""experiments/regret.py end to end on the tiny synthetic category: every stage, resumed."""

import dataclasses
import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments'))
import regret  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = {
    'data.dataset': 'synthetic', 'data.image_size': 16, 'data.synthetic_size': 32,
    'data.synthetic_num_train': 16, 'data.synthetic_num_test': 8, 'data.val_fraction': 0.25,
    'model.ch': 8, 'model.ch_mult': (1,), 'model.num_res_blocks': 1, 'model.attn_resolutions': (),
    'model.num_groups': 4, 'train.num_steps': 2, 'train.batch_size': 4, 'train.warmup_steps': 0,
    'train.ckpt_every': 2, 'eval.batch_size': 4, 'features.model': 'none',
    'detect.weights': (0.0, 1.0, 1.0, 1.0), 'sampling.t_d': 2, 'sampling.snapshot_steps': (0,),
    'tune.t_d_fractions': (0.008,), 'tune.methods': ('esm',), 'tune.sigma_floors': ('constant',),
    'tune.folds': 2, 'tune.defects_per_image': 2, 'tune.bootstrap': 50,
}


@pytest.mark.slow
def test_every_stage_writes_its_files_and_resumes(tmp_path):
  runs = regret.make_runs(str(tmp_path / 'root'), str(tmp_path / 'runs'), ['synthetic/object'],
                          ['esm'], ['0'], TINY)
  for stage in ('difficulty', 'train', 'tune', 'evaluate', 'table'):
    regret.run_stage(stage, runs, str(tmp_path / 'runs'))
  [run] = runs
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
  text = open(tmp_path / 'runs' / 'regret.md').read()
  assert '(a) new rule' in text and 'z-score (no model)' in text
  assert f"{run.name}, (a) new rule: {new['criterion']['reason']}" in text
  wall = {k: f"{v['wall_s']:.0f}" for k, v in timing.items()}
  assert f"| {run.name} | {wall['train']} | {wall['tune']} |" in text
  # A rerun of every stage finds its files and redoes nothing.
  start = time.time()
  for stage in ('train', 'tune', 'evaluate'):
    regret.run_stage(stage, runs, str(tmp_path / 'runs'))
  assert json.load(open(run.path('timing.json'))) == timing
  assert time.time() - start < 30
