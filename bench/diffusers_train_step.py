"""The PyTorch side of bench/vs_pytorch.py: diffusers' UNet2DModel at a case's shape, timed and
profiled. Needs torch and diffusers (requirements-bench.txt)."""

import time

import diffusers
import torch
from torch.profiler import ProfilerActivity, profile

from bench.train_step_cases import CASES, timed


def torch_step(case: str):
  """(step function, parameter count) of the diffusers model configured to the case's shape: DSM
  loss on a noised batch (uniform integer time, linear β schedule), backward, global-norm clipping
  at 1, Adam and an EMA update, as a plain PyTorch loop."""
  size, batch, ch, mult, blocks, attn, groups = CASES[case]
  chans = tuple(ch * m for m in mult)
  sides = [size // 2 ** i for i in range(len(mult))]
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(
      sample_size=size, in_channels=3, out_channels=3, block_out_channels=chans,
      layers_per_block=blocks, norm_num_groups=groups,
      attention_head_dim=chans[sides.index(attn)],  # one head, as ours
      down_block_types=tuple('AttnDownBlock2D' if s == attn else 'DownBlock2D' for s in sides),
      up_block_types=tuple('AttnUpBlock2D' if s == attn else 'UpBlock2D' for s in reversed(sides)))
  model.train()
  params = [p for p in model.parameters()]
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.Adam(params, lr=2e-5)
  alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
  x0 = torch.rand(batch, 3, size, size) * 2 - 1

  def step():
    i = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(x0)
    ab = alpha_bar[i].view(-1, 1, 1, 1)
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    loss = torch.mean((model(x, i).sample - noise) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1 - 0.9999)  # pylint: disable=protected-access
    return loss

  return step, sum(p.numel() for p in params)


def torch_worker(case: str, steps: int, threads: int) -> dict:
  """The timed train steps (train_step_cases.timed) of one case on `threads` threads."""
  torch.set_num_threads(threads)
  step, n_params = torch_step(case)
  batch = CASES[case][1]
  return {'params': n_params, 'batch': batch, **timed(step, steps),
          'versions': f'torch {torch.__version__}, diffusers {diffusers.__version__}'}


def _torch_category(name: str) -> str:
  rules = [('convolution_backward', 'conv backward (input + weight gradient)'),
           ('convolution', 'conv forward'), ('group_norm', 'GroupNorm'),
           ('attention', 'attention'), ('bmm', 'attention'), ('softmax', 'attention'),
           ('upsample', 'up/down-sampling'), ('avg_pool', 'up/down-sampling'),
           ('Adam', 'loss, optimiser, EMA, state'), ('lerp', 'loss, optimiser, EMA, state'),
           ('_foreach', 'loss, optimiser, EMA, state'), ('norm', 'loss, optimiser, EMA, state'),
           ('addcdiv', 'loss, optimiser, EMA, state'), ('zero_grad', 'loss, optimiser, EMA, state'),
           ('cat', 'skip concatenation'), ('copy', 'layout copies/transposes'),
           ('silu', 'SiLU'), ('mm', 'dense (time embedding)')]
  for key, cat in rules:
    if key in name:
      return cat
  return 'other elementwise, autograd and framework'


def torch_profile_worker(case: str, steps: int, threads: int) -> dict:
  """Self CPU time of the PyTorch step's aten ops by category (torch.profiler)."""
  torch.set_num_threads(threads)
  step, _ = torch_step(case)
  for _ in range(3):
    step()
  t = time.perf_counter()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  wall = (time.perf_counter() - t) / steps
  cats = {}
  for ev in prof.key_averages():
    if ev.key.startswith('aten::') or '#' in ev.key:  # ops and optimizer steps; no double count
      k = _torch_category(ev.key)
      cats[k] = cats.get(k, 0.0) + ev.self_cpu_time_total / 1e3 / steps
  return {'ms': cats, 'wall_ms': wall * 1e3}
