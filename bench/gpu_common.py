"""What the single-GPU runs share (bench/gpu_run.py, bench/paper_protocol.py): the peak they
measure MFU against, the training speed from a workdir, and evaluations under a time budget."""

import json
import os
import time

from esm import config as config_lib
from esm import evaluate as evaluate_lib

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H200 SXM (NVIDIA's data sheet)
# XLA options for the train step's compilation (train.compiler_options; DebugOptions names of
# jaxlib 0.10-0.11, checked there: an unknown name is an error).
XLA_PRESETS = {
    'default': {},
    'autotune_1': {'xla_gpu_autotune_level': 1},  # autotune on uninitialised buffers, no checks
    'no_autotune': {'xla_gpu_autotune_level': 0},  # cuDNN/cuBLAS heuristics, no autotuning
}


def steady_images_per_second(workdir: str) -> float:
  """Training speed without the first logging interval (which holds the compilation)."""
  with open(os.path.join(workdir, 'throughput.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  steady = rows[1:] or rows
  seconds = sum(r['seconds'] for r in steady)
  images = sum(r['images_per_second'] * r['seconds'] for r in steady)
  return images / max(seconds, 1e-9)


def run_evals(config, wd: str, evals, start: float, budget_s: float) -> list:
  """Evaluates the trained model with each sampler in turn while the wall-clock budget allows."""
  rows = []
  for name, method, sigma_time in evals:
    elapsed = time.time() - start
    # Budget the next evaluation by the last one: its compilation, plus sampling scaled by NFE.
    need = 0.0
    if rows:
      last = rows[-1]
      sampling_s = (last['wall_seconds'] - last['compile_seconds']) * 2 * config.sampling.t_d / last['nfe']
      need = 1.2 * (last['compile_seconds'] + (sampling_s if method == 'esm_sigma' else sampling_s / 2))
    if elapsed + need > budget_s:
      print(f'# skipped {name}: {elapsed:.0f} s used, about {need:.0f} s needed, budget '
            f'{budget_s:.0f} s', flush=True)
      continue
    cfg = config_lib.with_fields(config, {'sampling.method': method,
                                          'sampling.sigma_time': sigma_time})
    t = time.time()
    result = evaluate_lib.evaluate(cfg, wd, report_dir=os.path.join(wd, f'report_{method}_{sigma_time}'))
    rows.append(dict(result, name=name, wall_seconds=time.time() - t))
  return rows
