"""The configs of the single-GPU run (bench/gpu_run.py) and its train step alone (bench/gpu_step.py)."""

import os

from configs import common
from configs import mvtec


def gpu_config(data_root: str, steps: int, batch: int, res_blocks: int = 1):
  c = mvtec.get_config('bottle')
  c.data.root = data_root
  c.model.num_res_blocks = res_blocks  # the paper's 2; 1 halves the compile time
  c.model.dtype = 'bfloat16'
  c.train.num_epochs = -1
  c.train.num_steps = steps
  c.train.batch_size = batch
  c.train.lr = 1e-4  # a short run: 5x the paper's 2e-5, with warm-up and clipping
  c.train.warmup_steps = 200
  c.train.ema_rate = 0.999
  c.train.log_every = 50
  c.train.ckpt_every = steps
  c.eval.batch_size = 32
  c.features.model = 'none'
  c.detect.weights = (0.0, 1.0, 1.0, 1.0)
  return c


def dry_run_config(workdir: str):
  """Micro model, 16² synthetic images: every stage of the real run in about a minute on CPU (the
  code path does not depend on the model's size; compiling does)."""
  return shrink_for_dry_run(gpu_config('', steps=4, batch=4), workdir)


def shrink_for_dry_run(c, workdir: str):
  """A GPU plan's config at micro size on 16² synthetic images under workdir, on CPU (float32)."""
  c = common.set_micro_model(c)
  c.data.dataset, c.data.category, c.data.image_size = 'synthetic', 'object', 16
  c.data.synthetic_size, c.data.synthetic_num_train, c.data.synthetic_num_test = 32, 16, 8
  c.data.val_fraction = 0.25
  c.data.root = os.path.join(workdir, 'data', 'synthetic')
  c.data.tfds_dir = os.path.join(workdir, 'data', 'tfds')
  c.model.dtype = 'float32'  # bf16 convolutions are slow on CPU; the GPU run uses bf16
  c.train.warmup_steps, c.train.log_every = 0, 1
  c.sampling.t_d_by_category = {}
  c.sampling.t_d, c.eval.batch_size, c.sampling.snapshot_steps = 4, 4, (4, 2, 0)
  return c
