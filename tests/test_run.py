"""End to end through esm.run and main.py: resume equality, bf16 training, train_eval reports,
errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common
from configs.default import get_default_config
from esm import run
from esm import train as train_lib
from esm.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
    'data.dataset': 'synthetic', 'data.category': 'object', 'data.image_size': 16,
    'data.synthetic_size': 32, 'data.synthetic_num_train': 16, 'data.synthetic_num_test': 8,
    'data.val_fraction': 0.25, 'train.batch_size': 4, 'train.warmup_steps': 0, 'train.lr': 1e-3,
    'train.log_every': 1, 'train.ckpt_every': 5, 'sampling.t_d': 4, 'sampling.batch_size': 4,
    'sampling.snapshot_steps': (4, 2, 0), 'features.model': 'none', 'detect.weights': (0, 1, 1, 1),
    'eval.figures_per_type': 1, 'sampling.method': 'esm_sigma',
}


def tiny_config(cache: str, num_steps: int):
  c = common.set_tiny_model(get_default_config())
  for key, value in OVERRIDES.items():
    section, field = key.split('.')
    c[section][field] = value
  c.data.root = os.path.join(cache, 'synthetic')
  c.data.tfds_dir = os.path.join(cache, 'tfds')
  c.train.num_steps = num_steps
  return c


def _flags(cfg, workdir):
  args = [f'--config.{k}={v}' for k, v in OVERRIDES.items() if not isinstance(v, tuple)]
  args += [f'--config.{k}=({",".join(map(str, v))}{"," if len(v) == 1 else ""})'
           for k, v in OVERRIDES.items() if isinstance(v, tuple)]
  return [sys.executable, 'main.py', '--config=configs/demo.py', f'--workdir={workdir}', *args,
          f'--config.data.root={cfg.data.root}', f'--config.data.tfds_dir={cfg.data.tfds_dir}',
          f'--config.train.num_steps={cfg.train.num_steps}', '--config.model.ch=16',
          '--config.model.ch_mult=(1,2)', '--config.model.num_res_blocks=1',
          '--config.model.attn_resolutions=(8,)', '--config.model.num_groups=8',
          '--config.model.dropout=0.0', '--config.train.ema_rate=0.9999']


def _params(workdir):
  ckpt = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  tree = ckpt.restore(ckpt.latest_step())
  return ckpt.latest_step(), tree['params']


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['loss']) for r in map(json.loads, f)]


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """Thirty steps in one go, in this process."""
  base = tmp_path_factory.mktemp('run')
  cfg = tiny_config(str(base / 'cache'), 30)
  run.run(cfg, str(base / 'straight'), 'train')
  return base, cfg


def test_resume_in_a_new_process_equals_an_uninterrupted_run(straight):
  base, cfg = straight
  resumed = str(base / 'resumed')
  run.run(tiny_config(cfg.data.root.rsplit('/', 1)[0], 15), resumed, 'train')
  assert [s for s, _ in _losses(resumed)] == list(range(1, 16))
  out = subprocess.run(_flags(cfg, resumed) + ['--mode=train'], cwd=REPO, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resuming from step 15' in out.stderr
  step_a, params_a = _params(str(base / 'straight'))
  step_b, params_b = _params(resumed)
  assert step_a == step_b == 30
  for a, b in zip(*(jax_leaves(p) for p in (params_a, params_b))):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert _losses(resumed) == pytest.approx(_losses(str(base / 'straight')), rel=1e-6)


def test_loss_falls_on_the_synthetic_data(straight):
  base, _ = straight
  losses = [loss for _, loss in _losses(str(base / 'straight'))]
  assert len(losses) == 30
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# bf16 keeps 8 significant bits, so one rounding moves a value by up to 2^-8 ~ 0.004 of itself.
# The loss is a mean over 4 x 16 x 16 x 3 pixel terms, in which independent rounding errors mostly
# cancel: measured on this CPU, the largest per-step difference over the 20 steps was 8.1e-4. The
# bound, 0.01, is what a systematic error of ~2 roundings on the O(1) loss terms would give (a
# precision bug, not rounding noise), 12x the measured difference.
BF16_LOSS_TOLERANCE = 0.01
BF16_STEPS = 20


def _float_dtypes(tree):
  return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bfloat16_training_tracks_float32_with_float32_state(straight):
  """model.dtype='bfloat16' for 20 steps from the float32 run's initial state, on its data and
  noise: the losses stay close, and parameters, EMA and Adam state stay float32."""
  base, cfg = straight
  cfg16 = tiny_config(str(base / 'cache'), BF16_STEPS)
  cfg16.model.dtype = 'bfloat16'
  workdir = str(base / 'bfloat16')
  # The float32 run's initial state as a step-0 checkpoint (parameters do not depend on dtype).
  size = cfg.data.image_size
  _, model, _, _, tx = train_lib.build(cfg, size)
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), cfg16.train.keep)
  checkpointer.save(0, train_lib.init_state(cfg, model, tx, size), force=True)
  checkpointer.wait()
  checkpointer.close()
  state = run.train(cfg16, workdir)

  loss32 = np.array([l for _, l in _losses(str(base / 'straight'))[:BF16_STEPS]])
  loss16 = np.array([l for _, l in _losses(workdir)])
  assert len(loss16) == BF16_STEPS and np.isfinite(loss16).all(), loss16
  diff = np.abs(loss16 - loss32)
  # Same start, data and noise: identical losses would mean the dtype switch did nothing.
  assert diff.max() > 0, 'bf16 losses identical to float32: bfloat16 compute is not used'
  assert diff.max() < BF16_LOSS_TOLERANCE, (
      f'bf16 loss differs from float32 by up to {diff.max():.4g} (mean {diff.mean():.4g}, step '
      f'{int(diff.argmax()) + 1}); float32 losses {np.round(loss32, 4).tolist()}')
  print(f'bf16 vs float32 over {BF16_STEPS} steps: max |loss diff| {diff.max():.4g}, '
        f'mean {diff.mean():.4g}')
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_handlers=ocp.StandardCheckpointHandler())
  saved = manager.item_metadata(BF16_STEPS)  # the dtypes on disk, before any cast on restore
  manager.close()
  for name in ('params', 'ema_params', 'opt_state'):
    assert _float_dtypes(getattr(state, name)) == {jnp.dtype(jnp.float32)}, name
    assert _float_dtypes(saved[name]) == {jnp.dtype(jnp.float32)}, name


def test_train_eval_writes_every_report_file(straight):
  base, cfg = straight
  workdir = str(base / 'straight')
  run.run(cfg, workdir, 'train_eval')  # training is finished, so this only evaluates
  report = os.path.join(workdir, 'report')
  for name in ('results.json', 'results.csv', 'report.md', 'figures/examples.png',
               'figures/trajectory.png', 'figures/roc.png'):
    assert os.path.exists(os.path.join(report, name)), name
  result = json.load(open(os.path.join(report, 'results.json')))['object']
  for key in ('image_auroc', 'pixel_auroc', 'aupro', 'pixel_ap', 'image_f1_max'):
    assert 0.0 <= result[key] <= 1.0, (key, result[key])
  assert result['nfe'] == 8 and result['method'] == 'esm_sigma' and result['t_d'] == 4
  assert len(result['ablation']) == 7  # S_U, S_KL, S_RE: 2^3 - 1 subsets
  assert result['seconds_per_image'] > 0 and result['params'] > 0


def test_bad_config_is_one_line_error_without_traceback(tmp_path):
  out = subprocess.run([sys.executable, 'main.py', '--config=configs/demo.py',
                        f'--workdir={tmp_path}', '--config.sampling.t_d=1001', '--mode=eval'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith('error: sampling.t_d')
  assert 'Traceback' not in out.stderr


def test_predict_scores_a_folder_of_new_images(straight, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  base, cfg = straight
  folder = tmp_path / 'new'
  folder.mkdir()
  rng = np.random.default_rng(0)
  # Mixed sizes and modes: RGB, grayscale and RGBA.
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(folder / 'a.png')
  Image.fromarray(rng.integers(0, 255, (20, 24), np.uint8)).save(folder / 'b.png')
  Image.fromarray(rng.integers(0, 255, (16, 16, 4), np.uint8), 'RGBA').save(folder / 'c.png')
  workdir = str(base / 'straight')
  run.run(cfg, workdir, 'predict', input_dir=str(folder))
  with open(os.path.join(workdir, 'predict', 'scores.csv')) as f:
    rows = [line.strip().split(',') for line in f][1:]
  assert sorted(r[0] for r in rows) == ['a.png', 'b.png', 'c.png']
  assert all(r[3] in ('good', 'defect') and np.isfinite(float(r[1])) for r in rows)
  assert len(os.listdir(os.path.join(workdir, 'predict', 'heatmaps'))) == 3


def test_predict_on_an_empty_folder_is_a_clear_error(straight, tmp_path):
  from esm.errors import UserError  # pylint: disable=g-import-not-at-top
  base, cfg = straight
  with pytest.raises(UserError, match='empty|no image'):
    run.run(cfg, str(base / 'straight'), 'predict', input_dir=str(tmp_path))
