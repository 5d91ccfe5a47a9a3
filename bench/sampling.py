"""reconstruct() cost: sampler overhead over bare network forwards, compile time against T_d, s/image.

Usage: python3 bench/sampling.py [--image_size 64] [--batch 2] [--t_d 100] [--overhead_t_d 10]
                                [--compile_t_d 5,50] [--repeats 5]

The network is the project's U-Net (esm/models/dual_stream.py) at a CPU scale defined here (no CPU
model config exists yet): dual stream for esm / esm_sigma, single stream for sgm, randomly
initialised (the cost does not depend on the weights). For each method it reports:
  * net calls per image: NFE plus the σ²_0/σ²_in calls (one call on the 2B batch counts as 2);
  * the jitted bare forward run `calls` times in a row, then reconstruct with as many calls, side by
    side: at --overhead_t_d interleaved --repeats times (min), at --t_d (the paper's) once; the
    overhead is reconstruct / (calls x forward) - 1 in wall and in process CPU time, and s/image is
    wall time / batch;
  * trace (jaxpr) and XLA compile time at each T_d (esm also at --compile_t_d): it must be flat in
    T_d (one lax.scan, not an unrolled loop).
Prints one table.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import machine  # pylint: disable=g-import-not-at-top,wrong-import-position
from esm import host_memory  # pylint: disable=wrong-import-position
from esm import sampling  # pylint: disable=wrong-import-position
from esm.models import dual_stream  # pylint: disable=wrong-import-position
from esm.models import utils as mutils  # pylint: disable=wrong-import-position
from esm.models.unet import UNetConfig  # pylint: disable=wrong-import-position
from esm.sde import SDEConfig, VPSDE  # pylint: disable=wrong-import-position

_IMAGE_SIZE = flags.DEFINE_integer('image_size', 64, 'Image side.')
_BATCH = flags.DEFINE_integer('batch', 2, 'Images per reconstruct call.')
_T_D = flags.DEFINE_integer('t_d', 100, 'paper T_d of MVTec bottle')
_OVERHEAD_T_D = flags.DEFINE_integer('overhead_t_d', 10, 'T_d of the repeated overhead runs')
_COMPILE_T_D = flags.DEFINE_list('compile_t_d', [], 'extra T_d values compiled for esm only')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Interleaved repeats at --overhead_t_d.')

CPU_UNET = UNetConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0,
                      num_groups=8)


def timed(fn):
  """(wall, process CPU) seconds of fn(), blocked on its result. CPU time sums XLA's threads and
  barely moves with load from other processes, which makes wall time noisy on a shared machine."""
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - wall, time.process_time() - cpu


def build(dual, sde, image_size):
  """net_fn, random parameters, parameter count. Shapes come from eval_shape and values from numpy,
  because compiling the U-Net's init costs more CPU time than the whole benchmark."""
  model = dual_stream.ScoreNet(dual_stream.ScoreNetConfig(unet=CPU_UNET, dual=dual))
  shapes = jax.eval_shape(lambda: mutils.init_params(model, jax.random.key(0), image_size))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.05, s.shape), s.dtype), shapes)
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return dual_stream.get_net_fn(model, sde), params, n


def main(argv):
  del argv
  batch, image_size, t_d_paper, t_d_overhead = (_BATCH.value, _IMAGE_SIZE.value, _T_D.value,
                                                _OVERHEAD_T_D.value)
  host_memory.reuse_freed_memory()  # as main.py, before XLA starts
  print(machine.header(), flush=True)

  sde = VPSDE(SDEConfig())
  x0 = jax.random.uniform(jax.random.key(1), (batch, image_size, image_size, 3),
                          minval=-1.0, maxval=1.0)
  keys = sampling.image_keys(0, np.arange(batch))
  methods = ('sgm', 'esm', 'esm_sigma')
  nets, fwds, runs, rows = {}, {}, {}, {}
  for method in methods:
    dual = method != 'sgm'
    if dual not in nets:
      nets[dual] = build(dual, sde, image_size)
      net_fn, params, _ = nets[dual]
      labels = jnp.full((batch,), 50, jnp.int32)
      fwds[dual] = jax.jit(lambda p, x, net_fn=net_fn: net_fn(p, x, labels))
      jax.block_until_ready(fwds[dual](params, x0))
    net_fn, params, n_params = nets[dual]
    cfg = sampling.SamplingConfig(method=method)
    extra = {int(t) for t in _COMPILE_T_D.value} if method == 'esm' else set()
    for t_d in sorted({t_d_overhead, t_d_paper} | extra):
      fn = sampling.get_reconstruct_fn(net_fn, sde, cfg, t_d)
      t = time.perf_counter()
      lowered = fn.jitted.lower(params, x0, keys)
      trace_s = time.perf_counter() - t
      t = time.perf_counter()
      runs[method, t_d] = lowered.compile()
      rows[method, t_d] = dict(params=n_params, trace=trace_s, compile=time.perf_counter() - t,
                               nfe=fn.nfe, calls=fn.nfe + fn.extra_net_calls, loop=[], rec=[])

  # Side by side and interleaved, so that load from other processes hits both alike: the bare
  # forward `calls` times in a row (the ideal sampler), then the sampler with as many calls.
  def measure(method, t_d):
    dual = method != 'sgm'
    params, row = nets[dual][1], rows[method, t_d]
    def loop():
      for _ in range(row['calls']):
        out = fwds[dual](params, x0)
      return out
    row['loop'].append(timed(loop))
    row['rec'].append(timed(lambda: runs[method, t_d](params, x0, keys)))

  for _ in range(_REPEATS.value):
    for method in methods:
      measure(method, t_d_overhead)
  for method in methods:
    measure(method, t_d_paper)

  print_table(rows, methods)


def print_table(rows, methods) -> None:
  batch, size = _BATCH.value, _IMAGE_SIZE.value
  print(f'reconstruct on {jax.devices()[0].platform}, {batch}x{size}x{size}x3, '
        f'U-Net ch={CPU_UNET.ch} ch_mult={CPU_UNET.ch_mult} res_blocks={CPU_UNET.num_res_blocks} '
        f'attn={CPU_UNET.attn_resolutions}; times: min of {_REPEATS.value} at '
        f'T_d={_OVERHEAD_T_D.value}, 1 run at T_d={_T_D.value}')
  print('| method | params | T_d | NFE | net calls/img | calls x forward: wall / CPU (s) | '
        'reconstruct: wall / CPU (s) | overhead: wall / CPU | s/image (wall) | trace (s) | compile (s) |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for (method, t_d), r in sorted(rows.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])):
    if r['rec']:
      (lw, lc), (rw, rc) = (np.min(np.asarray(r[k]), axis=0) for k in ('loop', 'rec'))
      timing = (f"{lw:.2f} / {lc:.2f} | {rw:.2f} / {rc:.2f} | {100 * (rw / lw - 1):+.0f}% / "
                f"{100 * (rc / lc - 1):+.0f}% | {rw / batch:.3f}")
    else:
      timing = '- | - | - | -'
    print(f"| {method} | {r['params'] / 1e6:.2f}M | {t_d} | {r['nfe']} | {r['calls']} | "
          f"{timing} | {r['trace']:.2f} | {r['compile']:.2f} |")


if __name__ == '__main__':
  app.run(main)
