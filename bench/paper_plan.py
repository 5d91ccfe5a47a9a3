"""The paper-protocol plan (bench/paper_protocol.py) without flags, so that tests import it: its
config, its H200 estimate, and training to a deadline."""

import os
import signal
import threading
import time

from bench.gpu_common import XLA_PRESETS
from bench.gpu_configs import shrink_for_dry_run
from configs import common
from configs import mvtec
from configs.gpu import paper_protocol
from esm import config as config_lib
from esm import train as train_lib
from esm import validate
from esm.checkpoint import Checkpointer
from esm.models import flops
from esm.models import utils as mutils

# The one-block paper-scale model on an H200, bf16, batch 32 (docs/benchmarks.md, "One H200"):
# 107 img/s inside the training loop, 135 img/s for the step alone (bench/gpu_step.py).
MEASURED_IMG_S = (107.0, 135.0)
PLANNED_TRAIN_S = 360.0  # what the plan gives training: 6 of the call's 9 minutes


def estimate(config, num_train: int) -> dict:
  """The plan's training FLOPs and its H200 time, scaled by FLOPs from MEASURED_IMG_S."""
  size = config.data.image_size
  model_cfg = mutils.create_model(config, size).config
  per_image = flops.train_flops_per_image(model_cfg, size)
  one_block = common.override(mvtec.get_config('bottle'), {'model.num_res_blocks': 1})
  reference = flops.train_flops_per_image(
      mutils.create_model(config_lib.from_configdict(one_block), 256).config, 256)
  img_s = tuple(r * reference / per_image for r in MEASURED_IMG_S)
  images = config.train.num_epochs * num_train
  return {'train_flops_per_image': per_image, 'reference_flops_per_image': reference,
          'estimated_img_s': img_s, 'planned_images': images,
          'estimated_train_s': (images / img_s[1], images / img_s[0]),
          'epochs_in_planned_time': PLANNED_TRAIN_S * img_s[0] / num_train}


def dry_run_config(workdir: str):
  """The plan at micro size on synthetic 16² images: the code path, in well under a minute."""
  c = shrink_for_dry_run(paper_protocol.get_config('bottle'), workdir)
  c.train.num_epochs, c.train.batch_size = 2, 4
  return c


def train_until(config, workdir: str, deadline: float) -> bool:
  """esm.train.train, stopped at time.time() = deadline through the trainer's preemption path
  (SIGTERM: checkpoint after the current step, then return). True if it ran to the end."""
  done = threading.Event()

  def notify():  # again each second: a notice before the trainer installs its handler is lost
    if not done.wait(max(0.0, deadline - time.time())):
      while not done.is_set():
        os.kill(os.getpid(), signal.SIGTERM)
        done.wait(1.0)

  previous = signal.signal(signal.SIGTERM, lambda *_: None)  # notices outside the trainer: ignored
  notifier = threading.Thread(target=notify, daemon=True)
  notifier.start()
  try:
    finished = train_lib.train(config, workdir) is not None
  finally:
    done.set()
    notifier.join()
    signal.signal(signal.SIGTERM, previous)
  return finished


def trained_steps(workdir: str) -> int:
  checkpoints = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=1)
  try:
    return int(checkpoints.latest_step() or 0)
  finally:
    checkpoints.close()

def plan_config(dry_run: bool, workdir: str, data_root: str, xla: str) -> config_lib.Config:
  if dry_run:
    c = dry_run_config(workdir)
  else:
    c = paper_protocol.get_config('bottle')
    c.data.root = os.path.join(data_root, 'mvtec_ad')
  c.train.compiler_options = dict(XLA_PRESETS[xla])
  config = config_lib.from_configdict(c)
  validate.validate_config(config, 'train_eval')
  return config


