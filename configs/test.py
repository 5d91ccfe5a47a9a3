"""The tests' config: a small U-Net on 16² synthetic images for a few steps (seconds on CPU).

  python3 main.py --config=configs/test.py --workdir=DIR        # 'tiny': the demo's U-Net
  python3 main.py --config=configs/test.py:micro --workdir=DIR  # 'micro': 1 level, 8 channels

Tests change what they test as overrides, and put the synthetic set in their own folders.
"""

from configs import common
from configs.default import get_default_config

MODELS = {'tiny': common.set_tiny_model, 'micro': common.set_micro_model}


def get_config(arg=None):
  variant = (arg or 'tiny').strip()
  if variant not in MODELS:
    raise ValueError(f'configs/test.py: unknown variant {variant!r}; one of {sorted(MODELS)}')
  c = MODELS[variant](get_default_config())
  c.data.dataset = 'synthetic'
  c.data.category = 'object'
  c.data.image_size = 16
  c.data.synthetic_size = 32
  c.data.synthetic_num_train = 16
  c.data.synthetic_num_test = 8
  c.data.val_fraction = 0.25
  c.train.num_steps = 8
  c.train.batch_size = 4
  c.train.warmup_steps = 0
  c.train.lr = 1e-3
  c.train.log_every = 1
  c.train.ckpt_every = 5
  c.sampling.method = 'esm_sigma'
  c.sampling.t_d = 4
  c.sampling.snapshot_steps = (4, 2, 0)
  c.eval.batch_size = 4
  c.eval.figures_per_type = 1
  c.features.model = 'none'
  c.baselines.methods = ('zscore',)  # the kNN baseline needs the ViT
  c.detect.weights = (0, 1, 1, 1)
  return c
