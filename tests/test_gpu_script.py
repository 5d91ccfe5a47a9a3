"""bench/gpu.sh --dry-run: the single-GPU benchmark's whole code path, tiny, on CPU."""

import json
import os
import subprocess

import pytest

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
