"""Data-parallel train-step throughput: 1 process x 1 device, 1 process x N devices, N processes.

  python3 bench/scaling.py [--devices=2] [--cases=1x1,1x2,2x1] [--per_device_batch=8]
                           [--image_size=32] [--steps=10] [--dtypes=float32,bfloat16]
                           [--model=tiny|default]

Prints one markdown table of images/s; scaling efficiency is images/s divided by (devices x the
first case's images/s per device), so 100% is perfect weak scaling. Every case runs in its own
subprocess on this machine's platform; on CPU, 'N devices' are --xla_force_host_platform_device_count=N slices of the same
cores, and 'N processes' are joined by jax.distributed over localhost (gloo collectives), which is
the multi-host code path of esm/parallel.py without a cluster. The per-device batch is fixed (weak
scaling), as in a real scale-out. Random images replace the data pipeline: this measures the step
and its gradient all-reduce, not the loader (bench/data_pipeline.py measures that).
"""

import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from absl import app
from absl import flags

from bench import machine
from configs import common
from configs.default import get_default_config
from esm import config as config_lib
from esm import parallel
from esm import train as train_lib
from esm.models import utils as mutils
# pylint: enable=g-import-not-at-top,wrong-import-position

_WORKER = flags.DEFINE_boolean('worker', False, 'Internal: run as one process of a case.')
_DEVICES = flags.DEFINE_integer('devices', 2, 'N of the default cases.')
_CASES = flags.DEFINE_list('cases', [], 'comma list of PROCESSESxDEVICES (default 1x1,1xN,Nx1 for '
                           'N=--devices)')
_PER_DEVICE_BATCH = flags.DEFINE_integer('per_device_batch', 8, 'Images per device.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 32, 'Image side.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (median).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], 'comma list: float32,bfloat16')
_DTYPE = flags.DEFINE_string('dtype', 'float32', "Internal: the worker's one dtype.")
_MODEL = flags.DEFINE_enum('model', 'tiny', ['tiny', 'default'], 'Model size.')
_COORDINATOR = flags.DEFINE_string('coordinator', '', 'Internal: jax.distributed coordinator.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1, "Internal: the case's processes.")
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, "Internal: this worker's process index.")


def worker() -> None:
  """One process of a case: time `steps` train steps over the mesh of every process's devices."""
  config = get_default_config()
  if _MODEL.value == 'tiny':
    common.set_tiny_model(config)
  config.model.dtype = _DTYPE.value
  config.parallel.coordinator = _COORDINATOR.value
  config.parallel.num_processes = _NUM_PROCESSES.value
  config.parallel.process_id = _PROCESS_ID.value
  config = config_lib.from_configdict(config)
  parallel.initialise(config.parallel)
  size, global_batch = _IMAGE_SIZE.value, _PER_DEVICE_BATCH.value * jax.device_count()
  mesh = parallel.make_mesh()
  built = mutils.build(config, size)
  state = jax.device_put(mutils.init_state(config, built, size), parallel.replicated(mesh))
  step = jax.jit(train_lib.get_train_step_fn(built.loss_fn, 0.999),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh), None),
                 out_shardings=parallel.replicated(mesh), donate_argnums=(0,))
  local = np.random.default_rng(jax.process_index()).uniform(
      -1, 1, (global_batch // jax.process_count(), size, size, 3)).astype(np.float32)
  images = parallel.shard_batch(mesh, local)
  rng = jax.random.key(0)
  t = time.perf_counter()
  state = step(state, images, rng)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(_STEPS.value):
    t = time.perf_counter()
    state = step(state, images, rng)
    int(state.step)  # the training loop also reads one scalar per step
    times.append(time.perf_counter() - t)
  seconds = float(np.median(times))
  stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
  if jax.process_index() == 0:
    print('RESULT ' + json.dumps({
        'peak_gb': stats.get('peak_bytes_in_use', float('nan')) / 2**30,
        'processes': jax.process_count(), 'devices': jax.device_count(),
        'platform': jax.devices()[0].platform, 'global_batch': global_batch,
        'compile_s': compile_s, 'step_s': seconds, 'img_s': global_batch / seconds}), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run_case(dtype: str, processes: int, devices_per_process: int) -> dict:
  xla_flags = os.environ.get('XLA_FLAGS', '')
  if devices_per_process > 1:
    xla_flags += f' --xla_force_host_platform_device_count={devices_per_process}'
  env = dict(os.environ, XLA_FLAGS=xla_flags.strip(), JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
  base = [sys.executable, os.path.abspath(__file__), '--worker', f'--steps={_STEPS.value}',
          f'--per_device_batch={_PER_DEVICE_BATCH.value}', f'--image_size={_IMAGE_SIZE.value}',
          f'--dtype={dtype}', f'--model={_MODEL.value}', f'--num_processes={processes}']
  coordinator = f'localhost:{_free_port()}' if processes > 1 else ''
  procs = [subprocess.Popen(base + [f'--coordinator={coordinator}', f'--process_id={i}'], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  outs = [p.communicate() for p in procs]
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f'case {processes}x{devices_per_process} failed:\n{err[-3000:]}')
  line = next(l for l in outs[0][0].splitlines() if l.startswith('RESULT '))
  print(f'{processes}x{devices_per_process} {dtype}: {line}', file=sys.stderr, flush=True)
  return json.loads(line[len('RESULT '):])


def main(argv):
  del argv
  if _WORKER.value:
    worker()
    return
  print(machine.header(), flush=True)
  n = _DEVICES.value
  cases = [tuple(int(v) for v in c.split('x'))
           for c in _CASES.value or ['1x1', f'1x{n}', f'{n}x1']]
  rows = []
  for dtype in _DTYPES.value:
    for p, d in cases:
      rows.append((dtype, f'{p} process{"es" if p > 1 else ""} x {d} device{"s" if d > 1 else ""}',
                   run_case(dtype, p, d)))
  base = {}
  for dtype, _, r in rows:
    base.setdefault(dtype, r['img_s'] / r['devices'])
  platform = rows[0][2]['platform']
  print(f'# data-parallel scaling, {_MODEL.value} model, {_IMAGE_SIZE.value}² images, '
        f'{_PER_DEVICE_BATCH.value} images per device, {platform}, {os.cpu_count()} cores, '
        f'median of {_STEPS.value} steps')
  print('| dtype | case | global batch | compile (s) | step (s) | images/s | scaling efficiency | '
        'peak device memory (GiB) |')
  print('|---|---|---|---|---|---|---|---|')
  for dtype, name, r in rows:
    efficiency = r['img_s'] / (r['devices'] * base[dtype])
    print(f"| {dtype} | {name} | {r['global_batch']} | {r['compile_s']:.1f} | {r['step_s']:.3f} | "
          f"{r['img_s']:.1f} | {efficiency:.0%} | "
          f"{'n/a' if r['peak_gb'] != r['peak_gb'] else format(r['peak_gb'], '.1f')} |")


if __name__ == '__main__':
  app.run(main)
