"""Compile time and steady speed of the paper-scale bf16 train step alone, one block per level.

  python3 bench/gpu_step.py   # on the device (docs/benchmarks.md, "One H200")

Random 256² inputs at batch 32: no data loading, logging or checkpoints, unlike bench/gpu.sh.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from absl import app

from bench.gpu_configs import gpu_config
from esm import train as train_lib
from esm.models import utils as mutils
# pylint: enable=g-import-not-at-top,wrong-import-position

SIZE, BATCH, STEPS = 256, 32, 20


def main(argv):
  del argv
  cfg = gpu_config('', 100, BATCH, res_blocks=1)
  built = mutils.build(cfg, SIZE)
  state = mutils.init_state(cfg, built, SIZE)
  step = jax.jit(train_lib.get_train_step_fn(built.loss_fn, cfg.train.ema_rate), donate_argnums=(0,))
  x = np.random.default_rng(0).uniform(-1, 1, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
  key = jax.random.key(0)
  t = time.time()
  lowered = step.lower(state, x, key)
  t1 = time.time()
  compiled = lowered.compile()
  t2 = time.time()
  print(f'{jax.devices()[0].device_kind} jax {jax.__version__}: lower {t1 - t:.1f} s, '
        f'compile {t2 - t1:.1f} s', flush=True)
  state = jax.block_until_ready(compiled(state, x, key))
  for _ in range(2):
    t = time.time()
    for _ in range(STEPS):
      state = compiled(state, x, key)
    jax.block_until_ready(state)
    print(f'{STEPS} steps: {STEPS * BATCH / (time.time() - t):.1f} img/s', flush=True)


if __name__ == '__main__':
  app.run(main)
