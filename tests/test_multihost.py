"""Two processes on one CPU machine, joined by jax.distributed over localhost (gloo collectives).

The same main.py runs as 2 processes of 1 CPU device each and as 1 process of 2 CPU devices on the
same global batch. Training losses, parameters and evaluation (per-image scores and metrics) must
agree, only process 0 may write, and the 2-process checkpoint of step 4 must resume in 1 process to
the same step-6 state as the uninterrupted 1-process run.
"""

import csv
import functools
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, RESUME_FROM = 6, 4
# 16 train images, 4 held out (val); 8 test images. An eval batch of 6 pads both splits (4 -> 6,
# 8 -> 12), and with 2 processes one process gets nothing but padding in the last test batch.
# A one-level U-Net of 8 channels, SGM sampling and S_RE alone: what is tested is the distribution,
# and compilation (once per process) is most of this test's time.
OVERRIDES = [
    'data.dataset=synthetic', 'data.category=object', 'data.image_size=16', 'data.synthetic_size=32',
    'data.synthetic_num_train=16', 'data.synthetic_num_test=8', 'data.val_fraction=0.25',
    'model.ch=8', 'model.ch_mult=(1,)', 'model.num_res_blocks=1', 'model.attn_resolutions=()',
    'model.num_groups=4', 'train.batch_size=4', 'train.warmup_steps=0', 'train.lr=1e-3',
    'train.log_every=1', f'train.ckpt_every={RESUME_FROM}', f'train.num_steps={STEPS}',
    'sampling.method=sgm', 'sampling.t_d=4', 'eval.batch_size=6',
    'sampling.snapshot_steps=(4,2,0)', 'features.model=none', 'detect.weights=(0,0,0,1)',
    'eval.figures_per_type=1',
]
TIMEOUT = 900  # seconds per run; on an idle 2-core machine each takes under a minute


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _command(cache, workdir, mode, *extra):
  return [sys.executable, 'main.py', '--config=configs/demo.py', f'--workdir={workdir}',
          f'--mode={mode}', *(f'--config.{o}' for o in OVERRIDES),
          f'--config.data.root={cache}/synthetic', f'--config.data.tfds_dir={cache}/tfds', *extra]


def _env(num_devices: int):
  flags = os.environ.get('XLA_FLAGS', '')
  if num_devices > 1:
    flags += f' --xla_force_host_platform_device_count={num_devices}'
  # gloo is JAX's CPU collective library across processes (the default; named so it stays so).
  return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS='cpu',
              JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')


def _start(cmd, env, log_path):
  """Starts a process whose output goes to a file: a full pipe would stall it mid-collective."""
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  proc.log_path = log_path
  return proc


def _finish(procs):
  """Waits for every process; returns their logs; fails with the tail of any that failed."""
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = []
  for p in procs:
    with open(p.log_path) as f:
      logs.append(f.read())
    assert p.returncode == 0, logs[-1][-4000:]
  return logs


def _start_two_processes(cache, workdir, mode):
  port = _free_port()
  return [_start(_command(cache, workdir, mode, f'--config.parallel.coordinator=localhost:{port}',
                          '--config.parallel.num_processes=2', f'--config.parallel.process_id={i}'),
                 _env(1), f'{workdir}.process{i}.log') for i in range(2)]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['loss']) for r in map(json.loads, f)]


@functools.lru_cache(maxsize=None)
def _params(workdir, step):
  """The checkpoint's parameters as numpy, restored onto this process's single device."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                 item_handlers=ocp.StandardCheckpointHandler())
  meta = manager.item_metadata(step)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  tree = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  manager.close()
  return tuple(np.asarray(x) for x in jax.tree.leaves(tree['params']))


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _report(workdir):
  with open(os.path.join(workdir, 'report', 'results.json')) as f:
    result = json.load(f)['object']
  with open(os.path.join(workdir, 'report', 'scores.csv')) as f:
    rows = list(csv.DictReader(f))
  return result, rows


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """train_eval as 2 processes x 1 device and as 1 process x 2 devices (side by side), then the
  2-process checkpoint of step 4 resumed to step 6 in 1 process."""
  base = tmp_path_factory.mktemp('multihost')
  cache = str(base / 'cache')
  _prepare_data(cache)  # once, here: the two runs below would otherwise both write the cache
  two, one, resumed = (str(base / name) for name in ('two_processes', 'one_process', 'resumed'))
  procs = _start_two_processes(cache, two, 'train_eval') + [
      _start(_command(cache, one, 'train_eval'), _env(2), f'{one}.log')]
  logs = _finish(procs)
  shutil.copytree(two, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', str(STEPS)))
  logs += _finish([_start(_command(cache, resumed, 'train'), _env(2), f'{resumed}.log')])
  return {'two': two, 'one': one, 'resumed': resumed, 'logs': logs}


def _prepare_data(cache):
  from configs.default import get_default_config  # pylint: disable=g-import-not-at-top
  from datasets import pipeline  # pylint: disable=g-import-not-at-top
  data = get_default_config().data
  for override in OVERRIDES:
    key, value = override.split('=')
    section, field = key.split('.')
    if section == 'data':
      data[field] = type(data[field])(value)
  data.root, data.tfds_dir = f'{cache}/synthetic', f'{cache}/tfds'
  pipeline.prepare_dataset(data)


@pytest.mark.slow
def test_only_process_0_writes(runs):
  p0, p1 = runs['logs'][:2]
  assert 'process 0 of 2' in p0 and 'process 1 of 2' in p1
  assert 'report written to' in p0 and 'report written to' not in p1
  # Both processes writing metrics would duplicate every step.
  assert [s for s, _ in _losses(runs['two'])] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices(runs):
  two, one = _losses(runs['two']), _losses(runs['one'])
  assert [s for s, _ in two] == [s for s, _ in one]
  np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-5)
  for step in (RESUME_FROM, STEPS):
    diff = _max_diff(_params(runs['two'], step), _params(runs['one'], step))
    assert diff < 1e-5, f'parameters differ by up to {diff:.3g} at step {step}'


@pytest.mark.slow
def test_evaluation_gathers_every_example_once_in_order(runs):
  (result_two, rows_two), (result_one, rows_one) = _report(runs['two']), _report(runs['one'])
  assert result_two['num_test_images'] == len(rows_two) == 8
  assert [r['filename'] for r in rows_two] == [r['filename'] for r in rows_one]
  assert len({r['filename'] for r in rows_two}) == 8
  # The label column comes from the gathered batches, the defect type from the ordered records.
  assert all(int(r['label']) == int(r['defect_type'] != 'good') for r in rows_two)
  scores_two = np.array([float(r['score']) for r in rows_two])
  scores_one = np.array([float(r['score']) for r in rows_one])
  np.testing.assert_allclose(scores_two, scores_one, rtol=1e-4, atol=1e-6)
  for key in ('image_auroc', 'pixel_auroc', 'aupro', 'pixel_ap', 'image_f1_max', 'image_ap'):
    assert result_two[key] == pytest.approx(result_one[key], abs=1e-6), key


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs):
  assert f'resuming from step {RESUME_FROM}' in runs['logs'][3]
  resumed, one = _losses(runs['resumed']), _losses(runs['one'])
  assert [s for s, _ in resumed] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l in resumed], [l for _, l in one], rtol=1e-5)
  diff = _max_diff(_params(runs['resumed'], STEPS), _params(runs['one'], STEPS))
  assert diff < 1e-5, f'parameters differ by up to {diff:.3g} after resuming to step {STEPS}'


def test_process_id_outside_the_process_count_is_refused():
  from configs.default import get_default_config  # pylint: disable=g-import-not-at-top
  from esm.config import from_configdict  # pylint: disable=g-import-not-at-top
  from esm.errors import UserError  # pylint: disable=g-import-not-at-top
  cfg = get_default_config()
  cfg.parallel.coordinator, cfg.parallel.num_processes, cfg.parallel.process_id = 'localhost:1', 2, 2
  with pytest.raises(UserError, match='process_id=2'):
    from_configdict(cfg)
