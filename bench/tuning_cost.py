"""What --mode=tune costs at configs/cpu scale, against training, from measured unit costs.

Usage: python3 bench/tuning_cost.py [--categories=bottle:209:25,pill:267:41,metal_plate:54:12]
                                    [--batch 16] [--repeats 2]

In one process and interleaved (so load from other processes hits every unit alike), with the
CPU-scale model of configs/cpu/ at 48² (the step bench/ measures) and random weights (cost does
not depend on them), in process CPU seconds:
  * one train step at train.batch_size (ESM and DSM losses);
  * the scorer's reconstruct-and-detect per image and network call (esm at T_d = 6, which
    includes the sampler's and the detectors' work), and its compile time;
  * the ViT of S_Cos per image (both passes: input and reconstruction).
Then, for each category (name:train/good count:config T_d), the tuning cost of the noise-aware
and the legacy rule from the counts each one runs (held-out images, painted copies, the T_d grid,
samplers, ESM^σ floors, compilations, S_Cos points), against train.num_steps train steps. Prints
one table.
"""

import os
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from bench import machine
from configs.common import override
from configs.cpu.common import cpu_config
from datasets import pipeline
from esm import dev_defects
from esm import host_memory
from esm import parallel
from esm import scoring
from esm import train as train_lib
from esm import tune
from esm import tuned as tuned_lib
from esm.config import from_configdict, with_fields
from esm.image_set import ImageSet
from esm.models import utils as mutils
# pylint: enable=wrong-import-position


def cpu_seconds(fn):
  t = time.process_time()
  jax.block_until_ready(fn())
  return time.process_time() - t


def train_step_cost(config, batch: int, repeats: int) -> float:
  built = mutils.build(config, config.data.image_size)
  state = mutils.init_state(config, built, config.data.image_size)
  step = jax.jit(train_lib.get_train_step_fn(built.loss_fn, config.train.ema_rate))
  images = np.random.default_rng(0).uniform(-1, 1, (batch, 48, 48, 3)).astype(np.float32)
  compiled = train_lib.compile_step(step, state, images, jax.random.key(0))
  jax.block_until_ready(compiled(state, images, jax.random.key(0)))
  return min(cpu_seconds(lambda: compiled(state, images, jax.random.key(0)))
             for _ in range(repeats))


def scorer_cost(config, features: bool, t_d: int, batch: int, repeats: int):
  """(CPU s per image of one run_split at t_d, compile CPU s) of the ESM scorer."""
  cfg = tuned_lib.candidate_config(config, {
      'method': 'esm', 't_d': t_d, 'weights': (1.0 if features else 0.0, 1.0, 1.0, 1.0)})
  mesh = parallel.make_mesh()
  built = mutils.build(cfg, 48)
  params = jax.device_put(mutils.init_params(built.model, jax.random.key(0), 48),
                          parallel.replicated(mesh))
  scorer = scoring.Scorer(cfg, '', restored=scoring.EmaParams(params, 0))
  rng = np.random.default_rng(0)
  images = [rng.uniform(-1, 1, (48, 48, 3)).astype(np.float32) for _ in range(batch)]
  data = ImageSet(batch, False, [{}] * batch, 48, batch, lambda i: {
      'image': images[i], 'mask': np.zeros((48, 48), np.uint8), 'label': np.int32(0)})
  compile_s = cpu_seconds(lambda: scorer.run_split(data, what='bench').maps)
  run_s = min(cpu_seconds(lambda: scorer.run_split(data, what='bench').maps)
              for _ in range(repeats))
  return run_s / batch, compile_s - run_s


def paint_cost(repeats: int) -> float:
  """CPU s to paint one development defect (every family in turn) on a 256² image."""
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (256, 256, 3)).astype(np.uint8) for _ in range(8)]
  normal = dev_defects.make_normal(images, 48, num_textures=4)
  t = time.process_time()
  for k in range(repeats * len(dev_defects.FAMILIES)):
    dev_defects.paint(dev_defects.FAMILIES[k % 4], images[k % 8], normal, 2.0,
                      np.random.default_rng(k))
  return (time.process_time() - t) / (repeats * len(dev_defects.FAMILIES))


def tuning_counts(config, num_train: int, rule: str):
  """(image x network calls, compilations, S_Cos image passes) one tuning runs."""
  tc = config.tune
  held_out = pipeline.num_held_out(num_train, config.data.val_fraction, config.data.min_val_images)
  per_image = 2 if rule == 'legacy' else tc.defects_per_image
  images = held_out * (1 + per_image)
  grid = tune.t_d_grid(tc.t_d_fractions, config.sde.num_steps,
                       None if rule == 'legacy' else config.sampling.t_d)
  methods = tune.supported_methods(config, tc.methods)
  calls, points = 0, 0
  for m in methods:
    floors = len(tc.sigma_floors) if m == 'esm_sigma' else 1
    calls += floors * sum(t * (2 if m == 'esm_sigma' else 1) for t in grid) * images
    points += floors * len(grid)
  feature_points = len(methods) if rule == 'legacy' else 2
  return calls, points + feature_points, feature_points * images, images


_CATEGORIES = flags.DEFINE_string('categories', 'bottle:209:25,pill:267:41,metal_plate:54:12',
                                  'name:train/good images:T_d of each category, comma-separated')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch of the measured train steps and reconstructions.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timed repeats of each unit.')


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # as main.py, before XLA starts
  print(machine.header(), flush=True)
  base = cpu_config('mvtec_ad', 'bottle', image_size=48)  # DSM; ESM by its two fields
  esm, dsm = (from_configdict(override(base, o)) for o in (
      {'loss.kind': 'esm', 'sampling.method': 'esm'}, {}))
  step = {'esm': train_step_cost(esm, _BATCH.value, _REPEATS.value),
          'sgm': train_step_cost(dsm, _BATCH.value, _REPEATS.value)}
  t_d = 6
  per_image, compile_s = scorer_cost(esm, False, t_d, _BATCH.value, _REPEATS.value)
  with_vit, _ = scorer_cost(esm, True, t_d, _BATCH.value, _REPEATS.value)
  per_call, vit, paint = per_image / t_d, with_vit - per_image, paint_cost(_REPEATS.value)
  print(f'units (CPU s): train step {step["esm"]:.3f} (esm) {step["sgm"]:.3f} (dsm); per image and '
        f'network call {per_call:.4f}; S_Cos per image {vit:.3f}; compile per point '
        f'{compile_s:.1f}; painting per defect {paint:.3f}')
  print('| category | model | rule | dev images | image x calls | points | tune CPU s | '
        'train CPU s | tune / train |')
  print('|---|---|---|---|---|---|---|---|---|')
  for spec in _CATEGORIES.value.split(','):
    name, num_train, own_t_d = spec.split(':')
    for model, cfg in (('esm', esm), ('sgm', dsm)):
      cfg = with_fields(cfg, {'sampling.t_d': int(own_t_d)})
      train_s = step[model] * cfg.train.num_steps
      for rule in ('noise_aware', 'legacy'):
        calls, points, vit_images, images = tuning_counts(cfg, int(num_train), rule)
        cost = calls * per_call + points * compile_s + vit_images * vit + images * paint
        print(f'| {name} | {model} | {rule} | {images} | {calls} | {points} | {cost:.0f} | '
              f'{train_s:.0f} | {cost / train_s:.2f} |')


if __name__ == '__main__':
  app.run(main)
