"""The JAX side of bench/vs_pytorch.py: our train step at a case's shape, timed, profiled, compiled.

Each worker runs in its own process; the timing and profile workers set it up as main.py does:
glibc's malloc keeps freed memory for reuse (esm/host_memory.py), before XLA starts.
"""

import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bench.train_step_cases import CASES, timed
from configs.cpu.common import cpu_config
from configs.default import get_default_config
from esm import config as config_lib
from esm import host_memory
from esm import train as train_lib
from esm.losses import get_loss_fn
from esm.models import utils as mutils
from esm.models.dual_stream import NetOutput, variance_from_raw
from esm.models.unet import UNet


def case_config(case: str) -> config_lib.Config:
  """The config of a case: CASES' U-Net shapes with the DSM loss, or the CPU-scale model."""
  if case in ('esm48', 'dsm48', 'esm48v'):  # the CPU-scale model, from its own config
    c = cpu_config('mvtec_ad', 'bottle', image_size=48)
    c.loss.kind = case[:3]  # esm48v: the ESM step with the two streams as one vmapped U-Net
    return config_lib.from_configdict(c)
  c = get_default_config()
  size, batch, ch, mult, blocks, attn, groups = CASES[case]
  c.loss.kind = 'dsm'
  c.data.image_size, c.train.batch_size = size, batch
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = ch, mult, blocks, (attn,)
  m.num_groups, m.dropout = groups, 0.0
  return config_lib.from_configdict(c)


class TrainStep(NamedTuple):
  """The model, initial state and train step of `config`, built as esm/train.py builds them."""
  config: config_lib.Config
  built: mutils.Built

  @classmethod
  def create(cls, config, vmapped: bool = False) -> 'TrainStep':
    built = mutils.build(config, config.data.image_size)
    if vmapped:
      built = built._replace(loss_fn=vmapped_dual_loss(built.model, built.sde))
    return cls(config, built)

  def init_state(self):
    return mutils.init_state(self.config, self.built, self.config.data.image_size)

  def jitted(self):
    """The train step, jitted with the state donated as in training."""
    fn = train_lib.get_train_step_fn(self.built.loss_fn, self.config.train.ema_rate)
    return jax.jit(fn, donate_argnums=(0,))

  def count_params(self) -> int:
    return mutils.count_params(self.built.model, self.config.data.image_size)


def vmapped_dual_loss(model, sde):
  """The ESM loss with ScoreNet's two U-Nets evaluated as one U-Net vmapped over the two streams'
  stacked parameters (the parameter tree and the function are ScoreNet's; dropout masks would
  differ, the CPU-scale model has no dropout)."""
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


def _random_batch(config):
  size, batch = config.data.image_size, config.train.batch_size
  images = jax.random.uniform(jax.random.key(2), (batch, size, size, 3), minval=-1, maxval=1)
  return images, jax.random.key(3)


def compiled_step(parts: TrainStep, state, images, rng, xla_own: bool = False):
  """The case's train step compiled as training compiles it (train.step_compiler_options), or
  with XLA's own options."""
  if xla_own:
    return parts.jitted().lower(state, images, rng).compile()
  return train_lib.compile_step(parts.jitted(), state, images, rng)


def jax_worker(case: str, steps: int, xla_own: bool = False) -> dict:
  """Compile seconds and the timed train steps (train_step_cases.timed) of one case."""
  host_memory.reuse_freed_memory()
  # Later rounds load the step compiled by the first instead of compiling it again.
  jax.config.update('jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(),
                                                              'esm_vs_pytorch_xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  config = case_config(case)
  parts = TrainStep.create(config, vmapped=case == 'esm48v')
  state = parts.init_state()
  images, rng = _random_batch(config)
  t = time.perf_counter()
  compiled = compiled_step(parts, state, images, rng, xla_own)
  compile_s = time.perf_counter() - t

  def step_once():
    nonlocal state
    state = compiled(state, images, rng)
    jax.block_until_ready(state.step)

  measured = timed(step_once, steps)
  assert np.isfinite(float(state.metric_sums['loss']))
  return {'params': parts.count_params(), 'batch': config.train.batch_size,
          'compile_s': compile_s, **measured}


def compile_worker(case: str) -> dict:
  """Seconds to lower and to compile the paper-scale train step (configs/default.py model, 256²,
  ESM dual stream) at batch `case` (an integer), on this machine's backend."""
  config = get_default_config()
  size, batch = config.data.image_size, int(case)
  parts = TrainStep.create(config)
  state = jax.eval_shape(parts.init_state)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  step = parts.jitted()
  t = time.perf_counter()
  lowered = step.lower(state, images, jax.random.key(3))
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile(train_lib.step_compiler_options() or None)
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


def jax_profile_worker(case: str, steps: int) -> dict:
  """Executed-op time of the train step by category (jax.profiler trace of `steps` steps)."""
  host_memory.reuse_freed_memory()
  config = case_config(case)
  parts = TrainStep.create(config)
  state = parts.init_state()
  images, rng = _random_batch(config)
  compiled = compiled_step(parts, state, images, rng)
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
