"""The bf16 train step alone: compile time and speed on the device, program size anywhere.

  python3 bench/gpu_step.py [--plan=P] [--layouts=L,..] [--xla=X,..]   # on the device
  python3 bench/gpu_step.py --hlo [--compile] [--plan=P] [--layouts=L,..]   # the CPU proxies

Random 256² inputs: no data loading, logging or checkpoints, unlike bench/gpu.sh. Plans: paper1
(the paper-scale U-Net with one block per level, batch 32: docs/benchmarks.md, "One H200") and
paper_protocol (configs/gpu/paper_protocol.py, batch 64). Layouts: default, scan_streams,
scan_blocks, both (model.scan_*; the same function). On the device, each layout and XLA preset
(bench/gpu_common.py XLA_PRESETS) is lowered, compiled and timed over 2 x 20 steps. With
--hlo, each layout's step is lowered for the CPU and measured: the StableHLO text's characters
and operations, and with --compile XLA:CPU's compilation (wall and process CPU seconds) and the
instructions of the optimised module: proxies for the GPU's compilation time. --remat=full|dots
measures a variant the model does not offer: every ResnetBlock under jax.checkpoint (flax's
nn.remat; 'dots' saves the matrix products, jax.checkpoint_policies.dots_with_no_batch_dims_saveable).
"""

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import numpy as np
from absl import app
from absl import flags

from bench.gpu_common import XLA_PRESETS
from bench.gpu_configs import gpu_config
from configs.gpu import paper_protocol
from esm import config as config_lib
from esm import host_memory
from esm import train as train_lib
from esm.models import layers
from esm.models import utils as mutils
# pylint: enable=g-import-not-at-top,wrong-import-position

SIZE, STEPS = 256, 20
LAYOUTS = {'default': (False, False), 'scan_streams': (True, False), 'scan_blocks': (False, True),
           'both': (True, True)}

_PLAN = flags.DEFINE_enum('plan', 'paper1', ['paper1', 'paper_protocol'], 'the model and batch')
_LAYOUTS = flags.DEFINE_list('layouts', ['default'], f'parameter layouts: {", ".join(LAYOUTS)}')
_XLA = flags.DEFINE_list('xla', ['default'], f'XLA presets: {", ".join(XLA_PRESETS)}')
_HLO = flags.DEFINE_boolean('hlo', False, 'measure the lowered program instead (CPU proxies)')
_COMPILE = flags.DEFINE_boolean('compile', False, 'with --hlo: also compile for the CPU')
_REMAT = flags.DEFINE_enum('remat', '', ['', 'full', 'dots'],
                           'every ResnetBlock under jax.checkpoint (a variant the model lacks)')


def plan_config(plan: str, layout: str):
  c = gpu_config('', 100, 32, res_blocks=1) if plan == 'paper1' else paper_protocol.get_config()
  c.model.scan_streams, c.model.scan_blocks = LAYOUTS[layout]
  return config_lib.from_configdict(c)


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def lowered_step(cfg, abstract: bool):
  built = mutils.build(cfg, SIZE)
  state = (mutils.abstract_state if abstract else mutils.init_state)(cfg, built, SIZE)
  step = jax.jit(train_lib.get_train_step_fn(built.loss_fn, cfg.train.ema_rate), donate_argnums=(0,))
  images = jax.ShapeDtypeStruct((cfg.train.batch_size, SIZE, SIZE, 3), np.float32)
  t = time.time()
  lowered = step.lower(state, images, jax.random.key(0))
  return lowered, state, time.time() - t


def hlo_row(plan: str, layout: str, compile_: bool) -> str:
  lowered, _, lower_s = lowered_step(plan_config(plan, layout), abstract=True)
  text = lowered.as_text()
  ops = sum(1 for line in text.splitlines() if ' = ' in line)
  row = f'| {plan} | {layout} | {lower_s:.1f} | {len(text):,} | {ops:,} |'
  if compile_:
    t, cpu = time.time(), _cpu_seconds()
    compiled = lowered.compile()
    wall, cpu = time.time() - t, _cpu_seconds() - cpu
    instructions = sum(1 for line in compiled.as_text().splitlines() if ' = ' in line)
    row += f' {wall:.1f} | {cpu:.1f} | {instructions:,} |'
  return row


def device_row(plan: str, layout: str, preset: str) -> str:
  cfg = plan_config(plan, layout)
  lowered, state, lower_s = lowered_step(cfg, abstract=False)
  t = time.time()
  compiled = lowered.compile(dict(XLA_PRESETS[preset]) or None)
  compile_s = time.time() - t
  batch = cfg.train.batch_size
  x = np.random.default_rng(0).uniform(-1, 1, (batch, SIZE, SIZE, 3)).astype(np.float32)
  key = jax.random.key(0)
  state = jax.block_until_ready(compiled(state, x, key))
  rates = []
  for _ in range(2):
    t = time.time()
    for _ in range(STEPS):
      state = compiled(state, x, key)
    jax.block_until_ready(state)
    rates.append(STEPS * batch / (time.time() - t))
  return (f'| {plan} | {layout} | {preset} | {lower_s:.1f} | {compile_s:.1f} | '
          f'{rates[0]:.1f}, {rates[1]:.1f} |')


def main(argv):
  del argv
  host_memory.reuse_freed_memory()
  if _REMAT.value:  # the U-Net looks layers.ResnetBlock up when it is called
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if _REMAT.value == 'dots' else None
    layers.ResnetBlock = nn.remat(layers.ResnetBlock, static_argnums=(3,), policy=policy)
  print(f'# {jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime("%Y-%m-%d")}; '
        f'load {os.getloadavg()[0]:.1f}{"; remat " + _REMAT.value if _REMAT.value else ""}',
        flush=True)
  if _HLO.value:
    print('| plan | layout | lowering s | StableHLO characters | StableHLO ops |' +
          (' XLA:CPU compile s | compile CPU s | optimised HLO instructions |' if _COMPILE.value else ''))
    print('|---|---|---|---|---|' + ('---|---|---|' if _COMPILE.value else ''), flush=True)
    for layout in _LAYOUTS.value:
      print(hlo_row(_PLAN.value, layout, _COMPILE.value), flush=True)
    return
  print('| plan | layout | XLA options | lowering s | compilation s | img/s (2 x 20 steps) |')
  print('|---|---|---|---|---|---|', flush=True)
  for layout in _LAYOUTS.value:
    for preset in _XLA.value:
      print(device_row(_PLAN.value, layout, preset), flush=True)


if __name__ == '__main__':
  app.run(main)
