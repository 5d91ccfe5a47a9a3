"""The single-GPU run behind bench/gpu.sh: train bottle at 256² in bf16, evaluate ESM and ESM^σ.

  python3 bench/gpu_run.py --data_root=DIR_WITH_mvtec_ad --workdir=DIR --out=DIR [--steps=N] [--batch=B]
  python3 bench/gpu_run.py --dry_run --workdir=DIR --out=DIR  # the same code path, tiny, on CPU

Trains the paper-scale dual-stream U-Net (configs/mvtec.py:bottle, bf16 compute, float32
parameters) for a fixed number of steps through esm.run.train, then evaluates the checkpoint with
ESM and ESM^σ (both time labellings) through esm.evaluate, while a wall-clock budget allows. Prints
one table: AUROC, training images/s, sampling s/image and MFU (model FLOPs from XLA's cost
analysis of the train step / step time / peak bf16 FLOP/s). S_Cos is off: the DINO weights cannot
be carried to an offline GPU machine within its 64 MiB transfer limit (docs/benchmarks.md).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging

from bench import machine
from bench.gpu_common import H200_BF16_PEAK, run_evals, steady_images_per_second
from bench.gpu_configs import dry_run_config, gpu_config
from esm import config as config_lib
from esm import host_memory
from esm import train as train_lib
from esm.models import utils as mutils
from esm import validate
# pylint: enable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string('workdir', None, 'checkpoints, data cache and reports')
_OUT = flags.DEFINE_string('out', None, 'where gpu_results.json goes')
_DATA_ROOT = flags.DEFINE_string('data_root', '', 'folder holding mvtec_ad/bottle')
# Measured on an H200 (docs/benchmarks.md, 2026-11-30): with one residual block per level the
# paper-scale step compiles in about 150 s and trains at about 107 img/s at batch 32, so 300 steps
# and one ESM evaluation fit one 9-minute call (476 s); two blocks compile in about 247 s.
_STEPS = flags.DEFINE_integer('steps', 300, 'training steps')
_RES_BLOCKS = flags.DEFINE_integer('res_blocks', 1, 'residual blocks per U-Net level')
_BATCH = flags.DEFINE_integer('batch', 32, 'global batch size')
_BUDGET_S = flags.DEFINE_float('budget_s', 430.0,
                               'wall-clock budget: evaluations that would not fit are skipped')
_DRY_RUN = flags.DEFINE_boolean('dry_run', False, 'a tiny config on CPU: the same code path')
flags.mark_flags_as_required(['workdir', 'out'])

EVALS = (('ESM', 'esm', 'literal'), ('ESM^σ literal', 'esm_sigma', 'literal'),
         ('ESM^σ matched', 'esm_sigma', 'matched'))


def train_step_flops(config) -> float:
  """FLOPs of one train step, from XLA's cost analysis of the lowered step (no compilation)."""
  size = config.data.image_size
  built = mutils.build(config, size)
  state = mutils.abstract_state(config, built, size)
  images = jax.ShapeDtypeStruct((config.train.batch_size, size, size, 3), np.float32)
  step = jax.jit(train_lib.get_train_step_fn(built.loss_fn, config.train.ema_rate))
  traced = step.trace(state, images, jax.random.key(0))
  # The GPU backend has no cost model before compilation; XLA's CPU one counts the same HLO.
  cost = traced.lower(lowering_platforms=('cpu',)).cost_analysis()
  cost = cost if cost else traced.lower().compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # as main.py, before XLA starts
  logging.set_verbosity(logging.INFO)
  start = time.time()
  print(machine.header(), flush=True)

  if _DRY_RUN.value:
    config = dry_run_config(_WORKDIR.value)
  else:
    config = gpu_config(os.path.join(_DATA_ROOT.value, 'mvtec_ad'), _STEPS.value, _BATCH.value,
                        _RES_BLOCKS.value)
  config = config_lib.from_configdict(config)
  wd = os.path.join(_WORKDIR.value, 'run')
  validate.validate_config(config, 'train_eval')
  platform = jax.devices()[0].platform
  print(f'# devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({platform}); '
        f'jax {jax.__version__}', flush=True)

  t = time.time()
  train_lib.train(config, wd)
  train_wall = time.time() - t
  img_s = steady_images_per_second(wd)
  print(f'# trained {config.train.num_steps} steps in {train_wall:.0f} s: {img_s:.1f} img/s',
        flush=True)

  # The dry run skips the matched labelling: the same code path, one compilation less in CI.
  rows = run_evals(config, wd, EVALS[:2] if _DRY_RUN.value else EVALS, start, _BUDGET_S.value)

  flops = train_step_flops(config)
  peak = H200_BF16_PEAK if platform == 'gpu' else float('nan')
  mfu = flops / (config.train.batch_size / img_s) / peak
  print(f'# {flops / 1e12:.2f} TFLOP/step: MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s', flush=True)

  summary = {'platform': platform, 'device_kind': jax.devices()[0].device_kind,
             'jax': jax.__version__, 'steps': config.train.num_steps,
             'batch': config.train.batch_size, 'image_size': config.data.image_size,
             'params': rows[0]['params'] if rows else None, 'train_wall_s': train_wall,
             'train_images_per_s': img_s, 'train_flops_per_step': flops, 'mfu': mfu,
             'total_wall_s': time.time() - start, 'evals': rows}
  with open(os.path.join(_OUT.value, 'gpu_results.json'), 'w') as f:
    json.dump(summary, f, indent=1, default=float)
  print_table(config, rows, img_s, mfu, time.time() - start)


def print_table(config, rows, img_s: float, mfu: float, total_s: float) -> None:
  print(f'\n# {config.data.category} {config.data.image_size}², {config.train.num_steps} steps x batch '
        f'{config.train.batch_size}, {config.model.dtype}, S_U+S_KL+S_RE; total {total_s:.0f} s')
  print('| method | T_d | NFE | image AUROC | pixel AUROC | AUPRO | train img/s | sampling s/image | '
        'MFU (train) |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['name']} | {r['t_d']} | {r['nfe']} | {r['image_auroc']:.3f} | "
          f"{r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {img_s:.1f} | {r['seconds_per_image']:.3f} | "
          f"{'n/a' if np.isnan(mfu) else f'{mfu:.1%}'} |")


if __name__ == '__main__':
  app.run(main)
