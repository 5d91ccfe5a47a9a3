"""bench/gpu.sh --dry-run: the single-GPU benchmarks' whole code paths, tiny, on CPU."""

import json
import os
import subprocess
import time

import pytest

from bench import paper_plan
from esm import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), ESM_GPU_WORKDIR=str(tmp_path / 'work'))
  out = subprocess.run(['bash', 'bench/gpu.sh', '--dry-run'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  table = [line for line in out.stdout.splitlines() if line.startswith('| ESM')]
  assert [line.split('|')[1].strip() for line in table] == ['ESM', 'ESM^σ literal']
  with open(tmp_path / 'gpu_results.json') as f:
    summary = json.load(f)
  assert summary['steps'] == 4 and summary['train_images_per_s'] > 0
  assert summary['train_flops_per_step'] > 0
  for row in summary['evals']:
    assert 0.0 <= row['image_auroc'] <= 1.0 and 0.0 <= row['pixel_auroc'] <= 1.0
    assert row['seconds_per_image'] > 0


@pytest.mark.slow
def test_paper_protocol_dry_run(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), ESM_GPU_WORKDIR=str(tmp_path / 'work'))
  out = subprocess.run(['bash', 'bench/gpu.sh', '--plan=paper_protocol', '--dry-run',
                        '--xla=autotune_1'], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  names = [line.split('|')[1].strip() for line in out.stdout.splitlines() if line.startswith('| ')]
  assert names[1:] == ['ESM', 'ESM^σ', 'ESM ε, eq. 4 (SGM sampler)', 'z-score (no model)']
  with open(tmp_path / 'paper_protocol.json') as f:
    summary = json.load(f)
  # 2 epochs of the 12 synthetic training images at batch 4, to the end: the deadline is far.
  assert summary['finished'] and summary['steps'] == summary['planned_steps'] == 6
  assert summary['epochs'] == 2.0 and summary['train_images_per_s'] > 0
  assert summary['compiler_options'] == {'xla_gpu_autotune_level': 1}
  assert summary['train_compile_s'] > 0 and summary['train_flops_per_image'] > 0
  assert [r['method'] for r in summary['evals']] == ['esm', 'esm_sigma', 'sgm', 'zscore']
  for row in summary['evals']:
    assert 0.0 <= row['image_auroc'] <= 1.0 and 0.0 <= row['pixel_auroc'] <= 1.0
    assert row['seconds_per_image'] > 0


@pytest.mark.slow
def test_paper_protocol_training_stops_at_its_deadline_with_a_checkpoint(tmp_path):
  config = paper_plan.plan_config(True, str(tmp_path), '', 'default')
  wd = str(tmp_path / 'run')
  # A deadline already past: the SIGTERM arrives before the first step, which still completes.
  assert not paper_plan.train_until(config, wd, deadline=time.time())
  assert paper_plan.trained_steps(wd) == 1 < 6  # of 2 epochs of 12 images at batch 4
  # The options reach XLA.
  config = config_lib.with_fields(config, {'train.compiler_options': {'xla_no_such_option': True}})
  with pytest.raises(Exception, match='xla_no_such_option'):
    paper_plan.train_until(config, str(tmp_path / 'run2'), deadline=time.time() + 600)


def test_paper_protocol_plan_trains_1000_epochs_in_6_minutes_by_its_estimate():
  config = config_lib.from_configdict(paper_plan.paper_protocol.get_config('bottle'))
  plan = paper_plan.estimate(config, num_train=188)
  assert config.train.num_epochs == 1000 and plan['planned_images'] == 188_000
  assert plan['estimated_train_s'][1] <= paper_plan.PLANNED_TRAIN_S
  assert config.sde.num_steps == 1000 and config.sampling.t_d == 100  # T and bottle's T_d (table 6)
