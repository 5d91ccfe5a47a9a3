"""The CPU-scale study (docs/results.md, "Real data at CPU scale"): one model in about 20 minutes on 2 cores.

Everything not listed here is the paper's setting. What changes, and why:
- 48² images and a small U-Net (configs/common.py set_cpu_model: ch 16, levels (1, 2, 2), one block
  per level, attention at 12²):
  the paper-scale model runs at well under 1 image/s on 2 cores, and this one at 64² at 6 img/s.
- T = 250 instead of 1000, with β_1, β_T scaled by 4 so that ᾱ follows the same curve
  (Σβ over the first T_d/4 steps equals Σβ over the first T_d steps at T = 1000). T_d from the
  paper's tables is scaled by 250/1000 accordingly; ESM^σ's per-step bounds σ²_min, σ²_max scale
  with β (σ²_max = β_T), ESM's clamp on the marginal σ²_θ does not.
- Label-free tuning (esm/tune.py) is on: train_eval trains, tunes T_d, the sampler and the
  detector weights on held-out training images, then evaluates with them.
- 1600 steps at batch 16 (136 epochs of bottle) with a large learning rate: a budget of minutes (an
  ESM model trains in about 7 minutes on 2 cores, at the 65-69 img/s that main.py measured on an
  idle 2-core AMD EPYC VM with AVX-512 on 2026-12-01, or in 11 minutes on one core; on a 2-core
  AMD EPYC VM with AVX2 only, main.py trained at 12.4-13.1 img/s, so about 35 minutes, with
  XLA's own options; on one thread there the train step's options took it from 6.6 to 9.5 img/s:
  docs/benchmarks.md, "Training throughput"), not the paper's 1000 epochs. Chosen on
  bottle's development set (docs/results.md, "What the evidence supports"): every sampler of
  the ESM and SGM models scored higher there at 1600 steps than at 400.
N_a and the blur σ are scaled with the image area and side by esm/detectors.py; DINO runs at 224².
"""

from configs import common
from configs.default import get_default_config

T_SCALE = 4  # T = 1000 / T_SCALE


def cpu_config(dataset: str, category: str, paper_t_d: int):
  c = common.set_cpu_model(get_default_config())
  c.data.dataset = dataset
  c.data.category = category
  c.data.image_size = 48

  c.sde.num_steps = 1000 // T_SCALE
  c.sde.beta_min *= T_SCALE
  c.sde.beta_max *= T_SCALE

  c.sampling.t_d = max(1, round(paper_t_d / T_SCALE))
  c.sampling.t_d_by_category = {category: c.sampling.t_d}  # the paper's table, scaled
  c.tune.enabled = True
  c.sampling.sigma_max_var = c.sde.beta_max  # σ²_max = β_T (section 4.2)
  # ESM^σ's per-step bounds are β-like and scale with β; ESM's clamp on the marginal σ²_θ
  # (sampling.esm_min_var) is 1-ᾱ-like, and ᾱ follows the same curve, so it stays.
  c.sampling.sigma_min_var *= T_SCALE
  c.sampling.snapshot_steps = (50, 40, 25, 20, 10, 5, 0)
  c.eval.batch_size = 16

  c.train.num_steps = 1600
  c.train.batch_size = 16
  c.train.lr = 2e-3
  c.train.warmup_steps = 50
  c.train.ema_rate = 0.99
  c.train.log_every = 50
  c.train.ckpt_every = 400
  return c
