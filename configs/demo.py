"""The demo: a tiny dual-stream model on the embedded synthetic data, train then evaluate.

`python main.py --config=configs/demo.py --workdir=DIR` runs in minutes on a 2-core CPU and prints
the report table. The synthetic dataset is generated into the cache on first use.
"""

from configs import common
from configs.default import get_default_config


def get_config(arg=None):
  c = common.set_tiny_model(get_default_config())
  c.data.dataset = 'synthetic'
  c.data.category = arg or 'object'
  c.data.image_size = 32
  c.data.synthetic_size = 64
  c.sampling.t_d = 100
  # Chosen on a held-out synthetic set (synthetic_seed=1), not on the demo's test split: image
  # AUROC 1.00 for esm against 0.88 for esm_sigma (literal) and 0.72 (matched); docs/benchmarks.md.
  c.sampling.method = 'esm'
  # The demo's figures in docs/benchmarks.md were measured with the readings that were the defaults
  # then; the library defaults (t_d, absolute) were later chosen on real images (docs/method.md).
  c.sampling.var_source = 'i1'
  c.detect.re_kind = 'squared'
  c.eval.batch_size = 16
  c.train.num_steps = 600
  c.train.batch_size = 16
  c.train.lr = 2e-3  # a tiny model on a few minutes' budget: far above the paper's 2e-5
  c.train.warmup_steps = 100
  c.train.ema_rate = 0.99
  c.train.log_every = 100
  c.train.ckpt_every = 500
  c.features.model = 'none'  # pretrained DINO is optional for the demo (see docs/method.md)
  c.baselines.methods = ('zscore',)  # the kNN baseline needs the ViT
  c.detect.weights = (0.0, 1.0, 1.0, 1.0)
  return c
