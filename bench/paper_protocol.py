"""The paper's protocol on one H200 in one call: bottle at 256², trained, evaluated four ways.

  bash bench/gpu.sh --plan=paper_protocol [--dry-run] [--xla=PRESET] [--budget_s=S]
  python3 bench/paper_protocol.py --estimate   # the plan's FLOPs and H200 time estimate (any machine)

Trains ESM with configs/gpu/paper_protocol.py for its planned epochs through esm.train.train, or
until a wall-clock deadline that leaves the evaluations their reserve (`--budget_s` minus
`--eval_reserve_s`; the trainer's SIGTERM path saves the checkpoint and stops). From that one
checkpoint it evaluates ESM, ESM^σ and ESM's ε through eq. 4 (sampling.method sgm) with
esm.evaluate, which also reports the model-free z-score baseline (esm/baselines.py, fitted by
training) on the same test split. Prints one table: image and pixel AUROC, training img/s,
compilation time, s per test image and MFU: analytic FLOPs (esm/models/flops.py) / time / the
H200's 989 TFLOP/s dense bf16 peak (NVIDIA's data sheet for the SXM part; KINDS.md measured
769-798 TFLOP/s for an 8192³ matrix product). `--xla` picks XLA options for compiling the train
step (bench/gpu_common.py XLA_PRESETS); their effect on the GPU's compilation time is not measured
yet. `--dry-run` (bench/gpu.sh) runs the same path with a micro model on synthetic 16² images on
CPU.
"""

import collections
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from absl import logging

from bench.gpu_common import H200_BF16_PEAK, XLA_PRESETS, run_evals, steady_images_per_second
from bench.paper_plan import MEASURED_IMG_S, estimate, plan_config, train_until, trained_steps
from configs.gpu import paper_protocol
from datasets import pipeline
from esm import config as config_lib
from esm import host_memory
from esm import sampling
from esm import train as train_lib
from esm.models import flops
from esm.models import utils as mutils
# pylint: enable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string('workdir', '/tmp/esm_gpu_work', 'checkpoints and data cache')
_OUT = flags.DEFINE_string('out', '/tmp/esm_gpu', 'where paper_protocol.json goes')
_DATA_ROOT = flags.DEFINE_string('data_root', '', 'folder holding mvtec_ad/bottle')
_XLA = flags.DEFINE_enum('xla', 'default', list(XLA_PRESETS),
                         'XLA options for the train step (bench/gpu_common.py XLA_PRESETS)')
_BUDGET_S = flags.DEFINE_float('budget_s', 500.0, 'wall-clock budget of the whole run (a 9-minute '
                               'call less the wheel installation and exit)')
_EVAL_RESERVE_S = flags.DEFINE_float('eval_reserve_s', 120.0, 'kept for the evaluations: '
                                     'training stops at budget_s minus this')
_ESTIMATE = flags.DEFINE_boolean('estimate', False, 'print the plan estimate and exit')
_DRY_RUN = flags.DEFINE_boolean('dry_run', False, 'a micro model on CPU: the same code path')

EVALS = (('ESM', 'esm', 'literal'), ('ESM^σ', 'esm_sigma', 'literal'),
         ('ESM ε, eq. 4 (SGM sampler)', 'sgm', 'literal'))
# Paper table 1, bottle, image / pixel AUROC.
PAPER_BOTTLE = {'esm': (1.000, 0.984), 'esm_sigma': (1.000, 0.982)}


class CompileLog:
  """Seconds of XLA compilation per jitted function, from jax's monitoring events."""

  EVENT = '/jax/core/compile/backend_compile_duration'

  def __init__(self):
    self.seconds = collections.defaultdict(float)
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event, duration, **kwargs):
    if event == self.EVENT:
      self.seconds[str(kwargs.get('fun_name', ''))] += duration

  def of(self, name: str) -> float:
    return sum(s for f, s in self.seconds.items() if name in f)


def check_compiler_options(options: dict) -> None:
  """Fails at once on an option name this jaxlib does not know (XLA renames them)."""
  if options:
    jax.jit(lambda x: x + 1).lower(jnp.zeros(2)).compile(dict(options))



def zscore_row(result: dict) -> dict:
  """The z-score baseline's row, from an evaluation's result (it scores the same test split)."""
  row = result['baselines']['zscore']
  return {'name': row['label'], 'method': 'zscore', 't_d': 0, 'nfe': 0,
          'image_auroc': row['image_auroc'], 'pixel_auroc': row['pixel_auroc'],
          'aupro': row['aupro'], 'seconds_per_image': row['seconds_per_image'],
          'compile_seconds': math.nan}


def sampling_flops_per_image(config, method: str, nfe: int) -> float:
  """Network FLOPs of one reconstruction: NFE forward passes of the streams that run (a sampler
  that reads no σ² leaves the variance stream to XLA's dead-code removal, unless it is scanned)."""
  size = config.data.image_size
  model_cfg = mutils.create_model(config, size).config
  variance = sampling.SAMPLERS[method].needs_variance or model_cfg.scan_streams
  return nfe * (2 if variance else 1) * flops.unet_forward_flops(model_cfg.unet, size)


def _fmt(v, spec: str) -> str:
  return 'n/a' if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(config, summary: dict) -> None:
  s = summary
  print(f"\n# {config.data.category} {config.data.image_size}², {s['steps']} of {s['planned_steps']} "
        f"steps x batch {config.train.batch_size} ({s['epochs']:.0f} of {config.train.num_epochs} "
        f"epochs of {s['num_train']} images), {config.model.dtype}, ch {config.model.ch}, "
        f"{config.model.num_res_blocks} block(s) per level, XLA options {s['compiler_options']}; "
        f"total {s['total_wall_s']:.0f} s")
  print(f"# training: {s['train_wall_s']:.0f} s, {s['train_images_per_s']:.1f} img/s, train step "
        f"compiled in {s['train_compile_s']:.1f} s, MFU {_fmt(s['mfu_train'], '.1%')} of "
        f"{H200_BF16_PEAK / 1e12:.0f} TFLOP/s ({s['train_flops_per_image'] / 1e12:.3f} TFLOP/image)")
  print('| method | T_d | NFE | image AUROC | pixel AUROC | AUPRO | paper image / pixel | '
        'train img/s | train compile s | s per test image | eval compile s | MFU train | '
        'MFU sampling |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in s['evals']:
    model = r['method'] != 'zscore'
    paper = PAPER_BOTTLE.get(r['method']) if config.data.category == 'bottle' else None
    print(f"| {r['name']} | {r['t_d'] if model else '-'} | {r['nfe'] if model else '-'} | "
          f"{r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {_fmt(r['aupro'], '.3f')} | "
          f"{f'{paper[0]:.3f} / {paper[1]:.3f}' if paper else '-'} | "
          f"{_fmt(s['train_images_per_s'], '.1f') if model else '-'} | "
          f"{_fmt(s['train_compile_s'], '.1f') if model else '-'} | {r['seconds_per_image']:.4f} | "
          f"{_fmt(r['compile_seconds'], '.1f')} | {_fmt(s['mfu_train'], '.1%') if model else '-'} | "
          f"{_fmt(r.get('mfu_sampling'), '.1%') if model else '-'} |")


def main(argv):
  del argv
  if _ESTIMATE.value:
    config = config_lib.from_configdict(paper_protocol.get_config('bottle'))
    print(json.dumps(estimate(config, num_train=188), indent=1))  # bottle: 209 - 21 held out
    return
  host_memory.reuse_freed_memory()  # as main.py, before XLA starts
  logging.set_verbosity(logging.INFO)
  start = time.time()
  compiles = CompileLog()
  config = plan_config(_DRY_RUN.value, _WORKDIR.value, _DATA_ROOT.value, _XLA.value)
  check_compiler_options(config.train.compiler_options)
  platform = jax.devices()[0].platform
  print(f'# devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({platform}); '
        f'jax {jax.__version__}', flush=True)
  num_train = pipeline.num_train_examples(config.data)
  plan = estimate(config, num_train)
  print(f"# plan: {plan['train_flops_per_image'] / 1e12:.4f} TFLOP per training image; on an "
        f"H200, by FLOPs from {MEASURED_IMG_S} img/s of the paper-scale one-block model: "
        f"{plan['estimated_img_s'][0]:.0f}-{plan['estimated_img_s'][1]:.0f} img/s, "
        f"{plan['estimated_train_s'][0]:.0f}-{plan['estimated_train_s'][1]:.0f} s of training",
        flush=True)

  wd = os.path.join(_WORKDIR.value, 'run')
  t = time.time()
  finished = train_until(config, wd, start + _BUDGET_S.value - _EVAL_RESERVE_S.value)
  train_wall = time.time() - t
  # No throughput line yet if the deadline came before the first log interval.
  has_log = os.path.exists(os.path.join(wd, 'throughput.jsonl'))
  img_s = steady_images_per_second(wd) if has_log else math.nan
  print(f'# training {"finished" if finished else "stopped at the deadline"} after {train_wall:.0f} '
        f's: {img_s:.1f} img/s', flush=True)

  rows = run_evals(config, wd, EVALS, start, _BUDGET_S.value)
  peak = H200_BF16_PEAK if platform == 'gpu' else math.nan
  for r in rows:
    r['mfu_sampling'] = (sampling_flops_per_image(config, r['method'], r['nfe']) /
                         r['seconds_per_image'] / peak)
  rows += [zscore_row(rows[0])] if rows else []
  steps = trained_steps(wd)
  summary = {'platform': platform, 'device_kind': jax.devices()[0].device_kind,
             'jax': jax.__version__, 'finished': finished, 'steps': steps,
             'planned_steps': train_lib.resolve_num_steps(config, num_train).train.num_steps,
             'num_train': num_train, 'epochs': steps * config.train.batch_size / num_train,
             'compiler_options': dict(config.train.compiler_options), 'train_wall_s': train_wall,
             'train_images_per_s': img_s, 'train_compile_s': compiles.of('train_step'),
             'train_flops_per_image': plan['train_flops_per_image'],
             'mfu_train': plan['train_flops_per_image'] * img_s / peak, 'estimate': plan,
             'total_wall_s': time.time() - start, 'evals': rows}
  with open(os.path.join(_OUT.value, 'paper_protocol.json'), 'w') as f:
    json.dump(summary, f, indent=1, default=float)
  print_table(config, summary)


if __name__ == '__main__':
  app.run(main)
