"""Train-step speed of our U-Net against diffusers' UNet2DModel (PyTorch) at the same shape, on CPU.

  python3 -m pip install -r requirements-bench.txt   # torch + diffusers, for this script only
  python3 bench/vs_pytorch.py [--cases=a,b] [--rounds=2] [--steps=10] [--threads=2]
                              [--baseline_src=DIR] [--esm] [--no_torch]
  python3 bench/vs_pytorch.py --profile=a [--steps=5] [--baseline_src=DIR]
  python3 bench/vs_pytorch.py --compile_paper=1 [--baseline_src=DIR]

Each measurement runs in its own subprocess (one framework per process, `--threads` threads), and
the frameworks alternate within each round, so machine noise hits both alike. A measurement is the
median of `--steps` timed train steps after warm-up. Both sides run the same step: DSM loss on a
noised batch (uniform integer time, linear β schedule), backward, global-norm clipping at 1, Adam,
and an EMA update of the parameters. Ours is the project's own train step (esm/train.py, state
donated as in training); theirs is a plain PyTorch loop around UNet2DModel. Our process is set up
as main.py sets it up: glibc's malloc keeps freed memory for reuse (esm/host_memory.py).

--baseline_src=DIR also times the JAX step of another source tree (e.g. `git archive <commit> | tar
-x -C DIR`) in the same rounds, for before/after ratios; a tree without esm/host_memory.py runs
with glibc's defaults, as it did. --esm adds the CPU-scale study step
(configs/cpu/common.py model, 48², batch 16): the dual-stream ESM step against the single-stream
DSM step of the same U-Net, ours only. Prints one table; without torch the diffusers columns are
skipped with a message (exit 0).
"""

import argparse
import json
import os
import re
import resource
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
  if case in ('esm48', 'dsm48', 'esm48v'):  # the CPU-scale study model, from its own config
    from configs.cpu.common import cpu_config  # pylint: disable=g-import-not-at-top
    c = cpu_config('mvtec_ad', 'bottle', 63)
    c.loss.kind = case[:3]  # esm48v: the ESM step with the two streams as one vmapped U-Net
    return c
  from configs.default import get_default_config  # pylint: disable=g-import-not-at-top
  c = get_default_config()
  size, batch, ch, mult, blocks, attn, groups = CASES[case]
  c.loss.kind = 'dsm'
  c.data.image_size, c.train.batch_size = size, batch
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = ch, mult, blocks, (attn,)
  m.num_groups, m.dropout = groups, 0.0
  return c


class _Step:
  """The model, loss, initial state and jitted train step of `config`, through whichever API the
  imported source tree has: esm.models.utils (since commit 08c8d24) or esm.train (older trees,
  e.g. dd5c0b8 as --baseline_src)."""

  def __init__(self, config, size: int, vmapped: bool = False):
    from esm import train as train_lib  # pylint: disable=g-import-not-at-top
    try:
      from esm.models import utils as mutils  # pylint: disable=g-import-not-at-top
    except ImportError:
      mutils = None
    self._config, self._size, self._train_lib, self._mutils = config, size, train_lib, mutils
    if mutils is not None:
      self._built = mutils.build(config, size)
      self.sde, self.model, self.loss_fn = self._built.sde, self._built.model, self._built.loss_fn
    else:
      self.sde, self.model, _, self.loss_fn, self._tx = train_lib.build(config, size)
    if vmapped:
      self.loss_fn = _vmapped_dual_loss(self.model, self.sde)

  def init_state(self):
    if self._mutils is not None:
      return self._mutils.init_state(self._config, self._built, self._size)
    return self._train_lib.init_state(self._config, self.model, self._tx, self._size)

  def jitted(self):
    """The train step, jitted with the state donated as in training."""
    import jax  # pylint: disable=g-import-not-at-top
    ema = self._config.train.ema_rate
    fn = (self._train_lib.get_train_step_fn(self.loss_fn, ema) if self._mutils is not None else
          self._train_lib.get_train_step_fn(self.loss_fn, self._tx, ema))
    return jax.jit(fn, donate_argnums=(0,))

  def count_params(self) -> int:
    from esm.models import dual_stream  # pylint: disable=g-import-not-at-top
    count = self._mutils.count_params if self._mutils is not None else dual_stream.count_params
    return count(self.model, self._size)


def _vmapped_dual_loss(model, sde):
  """The ESM loss with ScoreNet's two U-Nets evaluated as one U-Net vmapped over the two streams'
  stacked parameters (the parameter tree and the function are ScoreNet's; dropout masks would
  differ, the CPU-scale model has no dropout)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from esm.losses import get_loss_fn  # pylint: disable=g-import-not-at-top
  from esm.models.dual_stream import variance_from_raw  # pylint: disable=g-import-not-at-top
  try:
    from esm.models.dual_stream import NetOutput  # pylint: disable=g-import-not-at-top
  except ImportError:  # trees before commit 08c8d24
    from esm.losses import NetOutput  # pylint: disable=g-import-not-at-top
  from esm.models.unet import UNet  # pylint: disable=g-import-not-at-top
  cfg = model.config
  unet = UNet(cfg.unet)

  def net_fn(params, x, i, *, train=False, rng=None):
    i = jnp.broadcast_to(jnp.asarray(i, jnp.int32), (x.shape[0],))
    rngs = {'dropout': rng} if train else {}
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params['eps_stream'],
                           params['var_stream'])
    out = jax.vmap(lambda p: unet.apply({'params': p}, x, sde.time(i), train, rngs=rngs))(stacked)
    return NetOutput(out[0], variance_from_raw(out[1], sde.alpha_bar[i], cfg.var_param,
                                               cfg.log_var_bound))

  return get_loss_fn(net_fn, sde, 'esm')


def _as_main_does(src: str):
  """The tree at `src` on the path, and its host-memory setting applied as main.py applies it,
  before XLA starts (trees before commit 9844b86 have none: measured as they ran)."""
  sys.path.insert(0, src)
  try:
    from esm import host_memory  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  host_memory.reuse_freed_memory()


def _timed(step_once, steps: int) -> dict:
  """Two warm-up calls of step_once, then `steps` timed ones: wall and CPU seconds of each, and the
  kernel time and minor page faults per step over them (getrusage), where memory that the process
  returns to the system and touches again shows up."""
  for _ in range(2):
    step_once()
  times, cpu = [], []
  before = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(steps):
    t, c = time.perf_counter(), time.process_time()
    step_once()
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  after = resource.getrusage(resource.RUSAGE_SELF)
  return {'times': times, 'cpu': cpu, 'sys_s': (after.ru_stime - before.ru_stime) / steps,
          'minflt': (after.ru_minflt - before.ru_minflt) / steps}


def jax_worker(case: str, steps: int, src: str):
  _as_main_does(src)
  import jax  # pylint: disable=g-import-not-at-top
  # Later rounds load the step compiled by the first instead of compiling it again.
  jax.config.update('jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(),
                                                              'esm_vs_pytorch_xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  import numpy as np  # pylint: disable=g-import-not-at-top
  config = _jax_config(case)
  size, batch = config.data.image_size, config.train.batch_size
  parts = _Step(config, size, vmapped=case == 'esm48v')
  state, step = parts.init_state(), parts.jitted()
  images = jax.random.uniform(jax.random.key(2), (batch, size, size, 3), minval=-1, maxval=1)
  rng = jax.random.key(3)
  t = time.perf_counter()
  compiled = step.lower(state, images, rng).compile()
  compile_s = time.perf_counter() - t

  def step_once():
    nonlocal state
    state = compiled(state, images, rng)
    jax.block_until_ready(state.step)

  timed = _timed(step_once, steps)
  assert np.isfinite(float(state.metric_sums['loss']))
  return {'params': parts.count_params(), 'batch': batch, 'compile_s': compile_s, **timed}


def compile_worker(case: str, src: str):
  """Seconds to lower and to compile the paper-scale train step (configs/default.py model, 256²,
  ESM dual stream) at batch `case` (an integer), on this machine's backend."""
  sys.path.insert(0, src)
  import jax  # pylint: disable=g-import-not-at-top
  from configs.default import get_default_config  # pylint: disable=g-import-not-at-top
  config = get_default_config()
  size, batch = config.data.image_size, int(case)
  parts = _Step(config, size)
  state = jax.eval_shape(parts.init_state)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jax.numpy.float32)
  step = parts.jitted()
  t = time.perf_counter()
  lowered = step.lower(state, images, jax.random.key(3))
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  hlo_ops = sum(1 for l in compiled.as_text().splitlines() if ' = ' in l)
  return {'lower_s': lower_s, 'compile_s': compile_s, 'hlo_ops': hlo_ops}


# --------------------------------------------------------------------------------------- profiles --

def _hlo_computations(text: str):
  """{computation name: [(instruction name, opcode, line)]} of an HLO module's text."""
  comps, cur = {}, None
  for line in text.splitlines():
    m = re.match(r'^(?:ENTRY )?%(\S+) .*\{$', line)
    if m:
      cur = m.group(1)
      comps[cur] = []
    elif line.startswith('}'):
      cur = None
    elif cur is not None:
      m = re.match(r'\s*(?:ROOT )?%(\S+) = \S+ (\S+?)\(', line)
      if m:
        comps[cur].append((m.group(1), m.group(2), line))
  return comps


def _jax_category(op: str, line: str, comps) -> str:
  """The part of the model or step an executed HLO instruction (or fusion) belongs to, from its
  opcodes and the op_name metadata (flax module paths; transpose(...) marks the backward pass)."""
  body = [i for c in re.findall(r'calls=%([\w.\-]+)', line) for i in comps.get(c, [])]
  ops = [op] + [b[1] for b in body]
  names = ' '.join(re.findall(r'op_name="([^"]*)"', ' '.join([line] + [b[2] for b in body])))
  if 'convolution' in ops:
    window = re.search(r'window=\{size=(\d+)x', ' '.join([line] + [b[2] for b in body]))
    if window and int(window.group(1)) > 3:
      return 'conv backward (weight gradient)'
    return 'conv backward (input gradient)' if 'transpose(' in names else 'conv forward'
  if set(b[1] for b in body or [(None, op)]) <= {'copy', 'transpose', 'bitcast', 'reshape',
                                                 'parameter'}:
    return 'layout copies/transposes'
  direction = ' (bwd)' if 'transpose(' in names else ' (fwd)'
  if 'GroupNorm' in names:
    return 'GroupNorm (+SiLU)' + direction
  if 'AttnBlock' in names:
    return 'attention' + direction
  if re.search(r'resize|avg_pool|reduce_window|Upsample|Downsample', names) or {
      'reduce-window', 'gather', 'scatter'} & set(ops):
    return 'up/down-sampling' + direction
  if 'concatenate' in names:
    return 'skip concatenation' + direction
  if 'ScoreNet' in names or 'UNet' in names:
    return 'other model elementwise' + direction
  if 'dot' in ops:
    return 'dense (time embedding)'
  return 'loss, optimiser, EMA, state'


def jax_profile_worker(case: str, steps: int, src: str):
  """Executed-op time of the train step by category (jax.profiler trace of `steps` steps)."""
  _as_main_does(src)
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  config = _jax_config(case)
  size, batch = config.data.image_size, config.train.batch_size
  parts = _Step(config, size)
  state = parts.init_state()
  images = jax.random.uniform(jax.random.key(2), (batch, size, size, 3), minval=-1, maxval=1)
  rng = jax.random.key(3)
  compiled = parts.jitted().lower(state, images, rng).compile()
  comps = _hlo_computations(compiled.as_text())
  instrs = {n: (op, line) for lst in comps.values() for n, op, line in lst}
  for _ in range(2):
    state = compiled(state, images, rng)
  jax.block_until_ready(state)
  trace_dir = tempfile.mkdtemp(prefix='esm_profile_')
  t = time.perf_counter()
  jax.profiler.start_trace(trace_dir)
  for _ in range(steps):
    state = compiled(state, images, rng)
  jax.block_until_ready(state)
  jax.profiler.stop_trace()
  wall = (time.perf_counter() - t) / steps
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))[-1]
  cats = {}
  with gzip.open(path) as f:
    for e in json.load(f)['traceEvents']:
      if e.get('ph') == 'X' and e['name'] in instrs:
        k = _jax_category(*instrs[e['name']], comps)
        cats[k] = cats.get(k, 0.0) + e['dur'] / 1e3 / steps
  return {'ms': cats, 'wall_ms': wall * 1e3}


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


def torch_profile_worker(case: str, steps: int):
  """Self CPU time of the PyTorch step's aten ops by category (torch.profiler)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=g-import-not-at-top
  step, _ = _torch_step(case)
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
  del torch
  return {'ms': cats, 'wall_ms': wall * 1e3}


# ---------------------------------------------------------------------------------- torch worker --

def _torch_step(case: str):
  """(step function, parameter count) of the diffusers model configured to the case's shape."""
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

  return step, sum(p.numel() for p in params)


def torch_worker(case: str, steps: int):
  import torch  # pylint: disable=g-import-not-at-top
  step, n_params = _torch_step(case)
  batch = CASES[case][1]
  return {'params': n_params, 'batch': batch, **_timed(step, steps),
          'versions': f'torch {torch.__version__}, diffusers {__import__("diffusers").__version__}'}


# ----------------------------------------------------------------------------------------- driver --

_PIN = ''


def _run_worker(kind: str, case: str, steps: int, threads: int, src: str = REPO):
  env = dict(os.environ)
  # Thread counts of the child process only; this process never imports jax or torch.
  env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={kind}', f'--case={case}',
         f'--steps={steps}', f'--threads={threads}', f'--src={src}']
  if _PIN:  # every worker on the same single core: CPU time per step is robust to other load
    cmd = ['taskset', '-c', _PIN] + cmd
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
  p.add_argument('--esm_vmap', action='store_true',
                 help='with --esm: also the dual step with the streams as one vmapped U-Net')
  p.add_argument('--no_torch', action='store_true', help='JAX rows only')
  p.add_argument('--pin', default='', help='taskset CPU list for every worker, e.g. 1 (with '
                 '--threads=1): on a shared machine, compare CPU time per step instead of wall')
  p.add_argument('--profile', default='', help='instead: per-part time of one case, ours vs theirs')
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
    elif args.worker == 'torch_profile':
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(args.threads)
      res = torch_profile_worker(args.case, args.steps)
    elif args.worker == 'jax_profile':
      res = jax_profile_worker(args.case, args.steps, args.src)
    elif args.worker == 'compile':
      res = compile_worker(args.case, args.src)
    else:
      res = jax_worker(args.case, args.steps, args.src)
    print('RESULT ' + json.dumps(res), flush=True)
    return

  if args.profile:
    kinds = [('ours', 'jax_profile', REPO)] + (
        [('before', 'jax_profile', args.baseline_src)] if args.baseline_src else []) + (
        [('diffusers', 'torch_profile', REPO)] if not args.no_torch and _have_torch() else [])
    res = {k: _run_worker(w, args.profile, args.steps, args.threads, src) for k, w, src in kinds}
    cats = sorted({c for r in res.values() for c in r['ms']},
                  key=lambda c: -max(r['ms'].get(c, 0) for r in res.values()))
    print(f'# where the time goes, case {args.profile} ({" ".join(map(str, CASES[args.profile]))}); '
          f'ms per step, {args.steps} profiled steps; {time.strftime("%Y-%m-%d %H:%M")}')
    print('| part | ' + ' | '.join(f'{k} ms (share)' for k in res) + ' |')
    print('|---|' + '---|' * len(res))
    for c in cats:
      cells = []
      for r in res.values():
        v, tot = r['ms'].get(c), sum(r['ms'].values())
        cells.append(f'{v:.1f} ({v / tot:.0%})' if v else '')
      print(f'| {c} | ' + ' | '.join(cells) + ' |')
    print('| sum of op times | ' + ' | '.join(f"{sum(r['ms'].values()):.1f}" for r in res.values()) +
          ' |')
    print('| wall time per profiled step | ' + ' | '.join(f"{r['wall_ms']:.1f}" for r in res.values())
          + ' |')
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

  global _PIN
  _PIN = args.pin
  torch_ok = not args.no_torch and _have_torch()
  if not torch_ok and not args.no_torch:
    print('torch and diffusers are not installed (pip install -r requirements-bench.txt): '
          'skipping the diffusers columns.')
  kinds = [('ours', REPO)] + ([('before', args.baseline_src)] if args.baseline_src else [])
  cases = [c for c in args.cases.split(',') if c]
  jobs = [(c, k, s) for c in cases for k, s in kinds] + (
      [(c, 'torch', None) for c in cases] if torch_ok else [])
  esm_cases = ('dsm48', 'esm48') + (('esm48v',) if args.esm_vmap else ())
  if args.esm:
    jobs += [(c, k, s) for c in esm_cases for k, s in kinds]
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
      res['img_cpu_s'] = res['batch'] / statistics.median(res['cpu'])  # images per CPU second
      res['load'] = os.getloadavg()[0]  # the machine's 1-minute load average after the run
      results.setdefault((case, kind), []).append(res)
      print(f'# round {r}: {case} {kind}: {res["img_s"]:.2f} img/s (load {res["load"]:.1f})',
            file=sys.stderr, flush=True)

  med = lambda rs: statistics.median([x['img_s'] for x in rs])
  fmt = lambda rs: ', '.join(f"{x['img_s']:.2f}" for x in rs)
  versions = next((rs[0]['versions'] for (c, k), rs in results.items() if k == 'torch'), '')
  loads = [x['load'] for rs in results.values() for x in rs]
  print(f'# train step, DSM loss + clip + Adam + EMA; {args.threads} threads, {os.cpu_count()} cores; '
        f'{args.rounds} rounds x median of {args.steps} steps; {versions}; '
        f'{time.strftime("%Y-%m-%d %H:%M")}; load average {min(loads):.1f}-{max(loads):.1f}')
  head = '| case | params ours / theirs | ours img/s |'
  if args.baseline_src:
    head += ' before img/s | ours / before |'
  if torch_ok:
    head += ' diffusers img/s | ours / diffusers |'
  print(head)
  print('|' + '---|' * (head.count('|') - 1))
  cpu_rows = []
  for c in cases:
    size, batch, ch, mult, blocks, attn, groups = CASES[c]
    ours = results[(c, 'ours')]
    name = (f'{size}², batch {batch}, ch {ch}, mult {mult}, {blocks} block(s), attention at '
            f'{attn}², groups {groups}')
    theirs = results.get((c, 'torch'))
    their_params = f"{theirs[0]['params'] / 1e6:.2f} M" if theirs else '-'
    row = f"| {name} | {ours[0]['params'] / 1e6:.2f} M / {their_params} | {fmt(ours)} |"
    if args.baseline_src:
      before = results[(c, 'before')]
      row += f' {fmt(before)} | {med(ours) / med(before):.2f} |'
    if theirs:
      row += f' {fmt(theirs)} | {med(ours) / med(theirs):.2f} |'
    print(row)
    cpu_rows.append((name, ours, results.get((c, 'before')), theirs))
  medc = lambda rs: statistics.median([x['img_cpu_s'] for x in rs])
  print('\nThe same measurements as images per CPU-second of the process (less sensitive to other '
        'load):')
  print('| case | ours | before | ours / before | diffusers | ours / diffusers |')
  print('|---|---|---|---|---|---|')
  for name, ours, before, theirs in cpu_rows:
    cell = lambda rs: f"{medc(rs):.2f}" if rs else ''
    ratio = lambda rs: f"{medc(ours) / medc(rs):.2f}" if rs else ''
    print(f'| {name} | {cell(ours)} | {cell(before)} | {ratio(before)} | {cell(theirs)} | '
          f'{ratio(theirs)} |')
  if args.esm:
    print('\n| CPU-scale study step (48², batch 16) | ours img/s | ' +
          ('before img/s | ours / before |' if args.baseline_src else ''))
    print('|---|---|' + ('---|---|' if args.baseline_src else ''))
    labels = {'dsm48': 'single stream (DSM)', 'esm48': 'dual stream (ESM)',
              'esm48v': 'dual stream (ESM), streams vmapped (bench only)'}
    for c in esm_cases:
      label = labels[c]
      row = f'| {label} | {fmt(results[(c, "ours")])} |'
      if args.baseline_src:
        row += f' {fmt(results[(c, "before")])} | {med(results[(c, "ours")]) / med(results[(c, "before")]):.2f} |'
      print(row)
    for kind, _ in kinds:
      for c in esm_cases[1:]:
        ratio = med(results[('dsm48', kind)]) / med(results[(c, kind)])
        print(f'{kind}: {labels[c]} step time / single-stream step time = {ratio:.2f}')
  print('\nKernel time and minor page faults per timed step (median over rounds):')
  print('| case | tree | kernel ms per step | minor page faults per step |')
  print('|---|---|---|---|')
  for (c, kind), rs in results.items():
    print(f"| {c} | {'diffusers' if kind == 'torch' else kind} | "
          f"{statistics.median(x['sys_s'] for x in rs) * 1e3:.1f} | "
          f"{statistics.median(x['minflt'] for x in rs):.0f} |")


if __name__ == '__main__':
  main()
