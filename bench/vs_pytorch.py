"""Train-step speed of our U-Net against diffusers' UNet2DModel (PyTorch) at the same shape, on CPU.

  python3 -m pip install -r requirements-bench.txt   # torch + diffusers, for this script only
  python3 bench/vs_pytorch.py [--cases=a,b] [--rounds=2] [--steps=10] [--threads=2]
                              [--baseline_src=DIR] [--esm] [--no_torch]
  python3 bench/vs_pytorch.py --compile_paper=1 [--baseline_src=DIR]

Each measurement runs in its own subprocess (one framework per process, `--threads` threads), and
the frameworks alternate within each round, so machine noise hits both alike. A measurement is the
median of `--steps` timed train steps after warm-up. Both sides run the same step: DSM loss on a
noised batch (uniform integer time, linear β schedule), backward, global-norm clipping at 1, Adam,
and an EMA update of the parameters. Ours is the project's own train step (esm/train.py, state
donated as in training); theirs is a plain PyTorch loop around UNet2DModel.

--baseline_src=DIR also times the JAX step of another source tree (e.g. `git archive <commit> | tar
-x -C DIR`) in the same rounds, for before/after ratios. --esm adds the CPU-scale study step
(configs/cpu/common.py model, 48², batch 16): the dual-stream ESM step against the single-stream
DSM step of the same U-Net, ours only. Prints one table; without torch the diffusers columns are
skipped with a message (exit 0).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# name: (image side, batch, base channels, channel multipliers, blocks per level, attention side,
#        GroupNorm groups)
CASES = {
    'a': (48, 16, 16, (1, 2, 2), 1, 12, 8),
    'b': (64, 8, 64, (1, 2, 2, 2), 2, 16, 32),
}


# ------------------------------------------------------------------------------------ JAX worker --

def _jax_config(case: str):
  from configs.default import get_default_config  # pylint: disable=g-import-not-at-top
  c = get_default_config()
  if case in ('esm48', 'dsm48'):  # configs/cpu/common.py: the CPU-scale study model and step
    size, batch, ch, mult, blocks, attn, groups = 48, 16, 16, (1, 2, 2), 1, 12, 8
    c.sde.num_steps, c.sde.beta_min, c.sde.beta_max = 250, 4e-4, 0.08
    c.train.lr, c.train.warmup_steps, c.train.ema_rate = 2e-3, 50, 0.99
    c.loss.kind = case[:3]
  else:
    size, batch, ch, mult, blocks, attn, groups = CASES[case]
    c.loss.kind = 'dsm'
  c.data.image_size, c.train.batch_size = size, batch
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = ch, mult, blocks, (attn,)
  m.num_groups, m.dropout = groups, 0.0
  return c


def jax_worker(case: str, steps: int, src: str):
  sys.path.insert(0, src)
  import jax  # pylint: disable=g-import-not-at-top
  # Later rounds load the step compiled by the first instead of compiling it again.
  jax.config.update('jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(),
                                                              'esm_vs_pytorch_xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from esm import train as train_lib  # pylint: disable=g-import-not-at-top
  from esm.models import dual_stream  # pylint: disable=g-import-not-at-top
  config = _jax_config(case)
  size, batch = config.data.image_size, config.train.batch_size
  _, model, _, loss_fn, tx = train_lib.build(config, size)
  state = train_lib.init_state(config, model, tx, size)
  step = jax.jit(train_lib.get_train_step_fn(loss_fn, tx, config.train.ema_rate),
                 donate_argnums=(0,))
  images = jax.random.uniform(jax.random.key(2), (batch, size, size, 3), minval=-1, maxval=1)
  rng = jax.random.key(3)
  t = time.perf_counter()
  compiled = step.lower(state, images, rng).compile()
  compile_s = time.perf_counter() - t
  for _ in range(2):  # warm-up
    state = compiled(state, images, rng)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state = compiled(state, images, rng)
    jax.block_until_ready(state.step)
    times.append(time.perf_counter() - t)
  assert np.isfinite(float(state.metric_sums['loss']))
  return {'params': dual_stream.count_params(model, size), 'times': times, 'batch': batch,
          'compile_s': compile_s}


def compile_worker(case: str, src: str):
  """Seconds to lower and to compile the paper-scale train step (configs/default.py model, 256²,
  ESM dual stream) at batch `case` (an integer), on this machine's backend."""
  sys.path.insert(0, src)
  import jax  # pylint: disable=g-import-not-at-top
  from configs.default import get_default_config  # pylint: disable=g-import-not-at-top
  from esm import train as train_lib  # pylint: disable=g-import-not-at-top
  config = get_default_config()
  size, batch = config.data.image_size, int(case)
  _, model, _, loss_fn, tx = train_lib.build(config, size)
  state = jax.eval_shape(lambda: train_lib.init_state(config, model, tx, size))
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jax.numpy.float32)
  step = jax.jit(train_lib.get_train_step_fn(loss_fn, tx, config.train.ema_rate), donate_argnums=(0,))
  t = time.perf_counter()
  lowered = step.lower(state, images, jax.random.key(3))
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  hlo_ops = sum(1 for l in compiled.as_text().splitlines() if ' = ' in l)
  return {'lower_s': lower_s, 'compile_s': compile_s, 'hlo_ops': hlo_ops}


# ---------------------------------------------------------------------------------- torch worker --

def torch_worker(case: str, steps: int):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
  size, batch, ch, mult, blocks, attn, groups = CASES[case]
  chans = tuple(ch * m for m in mult)
  sides = [size // 2 ** i for i in range(len(mult))]
  torch.manual_seed(0)
  model = UNet2DModel(
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

  for _ in range(2):  # warm-up
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return {'params': sum(p.numel() for p in params), 'times': times, 'batch': batch,
          'versions': f'torch {torch.__version__}, diffusers {__import__("diffusers").__version__}'}


# ----------------------------------------------------------------------------------------- driver --

def _run_worker(kind: str, case: str, steps: int, threads: int, src: str = REPO):
  env = dict(os.environ)
  # Thread counts of the child process only; this process never imports jax or torch.
  env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={kind}', f'--case={case}',
         f'--steps={steps}', f'--threads={threads}', f'--src={src}']
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=src)
  lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
  if out.returncode or not lines:
    sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
    raise RuntimeError(f'{kind} worker for case {case} failed (exit {out.returncode})')
  return json.loads(lines[-1][len('RESULT '):])


def _have_torch() -> bool:
  probe = subprocess.run([sys.executable, '-c', 'import torch, diffusers'], capture_output=True,
                         check=False)
  return probe.returncode == 0


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--cases', default='a,b')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--baseline_src', default='')
  p.add_argument('--esm', action='store_true')
  p.add_argument('--no_torch', action='store_true', help='JAX rows only')
  p.add_argument('--compile_paper', type=int, default=0,
                 help='instead: time lowering and compiling the paper-scale step at this batch')
  p.add_argument('--worker', default='')
  p.add_argument('--case', default='')
  p.add_argument('--src', default=REPO)
  args = p.parse_args()

  if args.worker:
    if args.worker == 'torch':
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(args.threads)
      res = torch_worker(args.case, args.steps)
    elif args.worker == 'compile':
      res = compile_worker(args.case, args.src)
    else:
      res = jax_worker(args.case, args.steps, args.src)
    print('RESULT ' + json.dumps(res), flush=True)
    return

  if args.compile_paper:
    srcs = [('ours', REPO)] + ([('before', args.baseline_src)] if args.baseline_src else [])
    rows = []
    for kind, src in srcs:
      res = _run_worker('compile', str(args.compile_paper), 0, args.threads, src)
      rows.append((kind, res))
      print(f'# {kind}: {res}', file=sys.stderr, flush=True)
    print(f'# paper-scale ESM train step (configs/default.py, 256², batch {args.compile_paper}), '
          f'XLA:CPU; {time.strftime("%Y-%m-%d %H:%M")}')
    print('| tree | lowering (s) | compilation (s) | HLO instructions after optimisation |')
    print('|---|---|---|---|')
    for kind, res in rows:
      print(f"| {kind} | {res['lower_s']:.1f} | {res['compile_s']:.1f} | {res['hlo_ops']} |")
    return

  torch_ok = not args.no_torch and _have_torch()
  if not torch_ok and not args.no_torch:
    print('torch and diffusers are not installed (pip install -r requirements-bench.txt): '
          'skipping the diffusers columns.')
  kinds = [('ours', REPO)] + ([('before', args.baseline_src)] if args.baseline_src else [])
  cases = [c for c in args.cases.split(',') if c]
  jobs = [(c, k, s) for c in cases for k, s in kinds] + (
      [(c, 'torch', None) for c in cases] if torch_ok else [])
  if args.esm:
    jobs += [(c, k, s) for c in ('dsm48', 'esm48') for k, s in kinds]
  results = {}
  for r in range(args.rounds):
    # Alternate the order between rounds as well: ours first in even rounds, theirs first in odd.
    order = jobs if r % 2 == 0 else list(reversed(jobs))
    for case, kind, src in order:
      if kind == 'torch':
        res = _run_worker('torch', case, args.steps, args.threads)
      else:
        res = _run_worker('jax', case, args.steps, args.threads, src)
      res['img_s'] = res['batch'] / statistics.median(res['times'])
      results.setdefault((case, kind), []).append(res)
      print(f'# round {r}: {case} {kind}: {res["img_s"]:.2f} img/s', file=sys.stderr, flush=True)

  med = lambda rs: statistics.median([x['img_s'] for x in rs])
  fmt = lambda rs: ', '.join(f"{x['img_s']:.2f}" for x in rs)
  versions = next((rs[0]['versions'] for (c, k), rs in results.items() if k == 'torch'), '')
  print(f'# train step, DSM loss + clip + Adam + EMA; {args.threads} threads, {os.cpu_count()} cores; '
        f'{args.rounds} rounds x median of {args.steps} steps; {versions}; '
        f'{time.strftime("%Y-%m-%d %H:%M")}')
  head = '| case | params ours / theirs | ours img/s |'
  if args.baseline_src:
    head += ' before img/s | ours / before |'
  if torch_ok:
    head += ' diffusers img/s | ours / diffusers |'
  print(head)
  print('|' + '---|' * (head.count('|') - 1))
  for c in cases:
    size, batch, ch, mult, blocks, attn, groups = CASES[c]
    ours = results[(c, 'ours')]
    name = (f'{size}², batch {batch}, ch {ch}, mult {mult}, {blocks} block(s), attention at '
            f'{attn}², groups {groups}')
    theirs = results.get((c, 'torch'))
    row = (f"| {name} | {ours[0]['params'] / 1e6:.2f} M / "
           f"{(theirs[0]['params'] / 1e6) if theirs else float('nan'):.2f} M | {fmt(ours)} |")
    if args.baseline_src:
      before = results[(c, 'before')]
      row += f' {fmt(before)} | {med(ours) / med(before):.2f} |'
    if theirs:
      row += f' {fmt(theirs)} | {med(ours) / med(theirs):.2f} |'
    print(row)
  if args.esm:
    print('\n| CPU-scale study step (48², batch 16) | ours img/s | ' +
          ('before img/s | ours / before |' if args.baseline_src else ''))
    print('|---|---|' + ('---|---|' if args.baseline_src else ''))
    for c, label in (('dsm48', 'single stream (DSM)'), ('esm48', 'dual stream (ESM)')):
      row = f'| {label} | {fmt(results[(c, "ours")])} |'
      if args.baseline_src:
        row += f' {fmt(results[(c, "before")])} | {med(results[(c, "ours")]) / med(results[(c, "before")]):.2f} |'
      print(row)
    for kind, _ in kinds:
      ratio = med(results[('dsm48', kind)]) / med(results[('esm48', kind)])
      print(f'{kind}: dual-stream step time / single-stream step time = {ratio:.2f}')


if __name__ == '__main__':
  main()
