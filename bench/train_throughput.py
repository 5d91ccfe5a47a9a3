"""Train-step throughput: images/s and achieved FLOP/s against a large 3x3 convolution's FLOP/s.

  python3 bench/train_throughput.py [--steps=20]

Prints one table. FLOPs come from XLA's cost analysis of the compiled step; the reference is a
large 3x3 convolution (forward) timed in the same run, so the ratio is robust to machine noise.
Peak RSS is the process maximum (resource.getrusage).
"""

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

from bench import machine  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import common  # pylint: disable=wrong-import-position
from configs import demo  # pylint: disable=wrong-import-position
from configs.default import get_default_config  # pylint: disable=wrong-import-position
from esm import config as config_lib  # pylint: disable=wrong-import-position
from esm import host_memory  # pylint: disable=wrong-import-position
from esm import train as train_lib  # pylint: disable=wrong-import-position
from esm.models import utils as mutils  # pylint: disable=wrong-import-position

_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per measurement (median).')


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan')))


def _time(fn, *args, steps: int) -> float:
  """Seconds per call, median of `steps` calls after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def conv_reference(steps: int):
  """FLOP/s of a large 3x3 convolution (NHWC, 128 -> 128 channels, 64², batch 16)."""
  x = jax.random.normal(jax.random.key(0), (16, 64, 64, 128))
  w = jax.random.normal(jax.random.key(1), (3, 3, 128, 128))
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  compiled = conv.lower(x, w).compile()
  flops = _flops(compiled)
  seconds = _time(compiled, x, w, steps=steps)
  return flops, seconds


def train_step_case(name: str, config, steps: int):
  config = config_lib.from_configdict(config)
  size, batch = config.data.image_size, config.train.batch_size
  built = mutils.build(config, size)
  state = mutils.init_state(config, built, size)
  step = jax.jit(train_lib.get_train_step_fn(built.loss_fn, config.train.ema_rate))
  images = jax.random.uniform(jax.random.key(2), (batch, size, size, 3), minval=-1, maxval=1)
  rng = jax.random.key(3)
  t = time.perf_counter()
  compiled = train_lib.compile_step(step, state, images, rng)
  compile_s = time.perf_counter() - t
  flops = _flops(compiled)
  # The step returns a new state; time it as a chain like the training loop does.
  state = compiled(state, images, rng)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state = compiled(state, images, rng)
    jax.block_until_ready(state.step)
    times.append(time.perf_counter() - t)
  seconds = float(np.median(times))
  return {'name': name, 'size': size, 'batch': batch, 'compile_s': compile_s, 'flops': flops,
          'seconds': seconds, 'img_s': batch / seconds, 'flop_s': flops / seconds}


def main(argv):
  del argv
  steps = _STEPS.value
  host_memory.reuse_freed_memory()  # as main.py, before XLA starts
  print(machine.header(), flush=True)

  cpu = common.set_cpu_model(get_default_config(), 48)
  cpu.train.batch_size = 16
  cases = [('demo (tiny, 32², dual)', demo.get_config()),
           ('cpu-scale (48², dual)', cpu)]
  conv_flops, conv_s = conv_reference(steps)
  conv_rate = conv_flops / conv_s
  rows = [train_step_case(name, cfg, steps) for name, cfg in cases]
  conv_flops2, conv_s2 = conv_reference(steps)  # again, to see drift within the run
  conv_rate = max(conv_rate, conv_flops2 / conv_s2)

  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'# train-step throughput, {jax.device_count()} {jax.devices()[0].platform} device(s), '
        f'{os.cpu_count()} cores; 3x3 conv reference {conv_rate / 1e9:.1f} GFLOP/s')
  print('| config | image | batch | compile (s) | step (s) | images/s | GFLOP/step | GFLOP/s | '
        'fraction of conv rate |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['name']} | {r['size']}² | {r['batch']} | {r['compile_s']:.1f} | {r['seconds']:.3f} | "
          f"{r['img_s']:.1f} | {r['flops'] / 1e9:.2f} | {r['flop_s'] / 1e9:.1f} | "
          f"{r['flop_s'] / conv_rate:.0%} |")
  print(f'| 3x3 conv 16x64²x128->128 | 64² | 16 | | {conv_s:.4f} | | {conv_flops / 1e9:.2f} | '
        f'{conv_rate / 1e9:.1f} | 100% |')
  print(f'\npeak RSS {rss_mb:.0f} MB')


if __name__ == '__main__':
  app.run(main)
