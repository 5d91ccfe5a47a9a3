"""One 3x3 convolution's forward pass, input gradient and weight gradient: XLA:CPU with its own
options, with the train step's (esm.train.CPU_STEP_OPTIONS: convolutions kept out of YNNPACK), and
PyTorch's when torch is installed (requirements-bench.txt).

  python3 bench/conv_gradients.py [--batch=8] [--side=64] [--channels=128] [--repeats=5]

Each cell is the median CPU time of `--repeats` calls after two warm-up calls (bench/
train_step_cases.py timed), in milliseconds, with one thread (XLA's Eigen and PyTorch's intra-op
pools are both set to one), so other load on the machine changes it little. PyTorch runs in its
own subprocess. Prints one table.
"""

import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from bench import machine
from bench.train_step_cases import timed
# pylint: enable=g-import-not-at-top,wrong-import-position

_BATCH = flags.DEFINE_integer('batch', 8, 'Batch.')
_SIDE = flags.DEFINE_integer('side', 64, 'Feature-map side.')
_CHANNELS = flags.DEFINE_integer('channels', 128, 'Input and output channels.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per cell (median).')
_TORCH_WORKER = flags.DEFINE_boolean('torch_worker', False, 'Internal: time PyTorch, print JSON.')
PARTS = ('forward', 'input gradient', 'weight gradient')
ONE_THREAD = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'


def cpu_ms(fn, repeats: int) -> float:
  return 1e3 * statistics.median(timed(fn, repeats)['cpu'])


def jax_row(options: dict, n: int, side: int, ch: int, repeats: int) -> dict:
  """{part: ms} of XLA's convolution parts compiled with `options`."""
  import jax  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (n, side, side, ch))
  w = jax.random.normal(jax.random.key(1), (3, 3, ch, ch)) * 0.05
  dy = jax.random.normal(jax.random.key(2), (n, side, side, ch))

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  # Every array is an argument: a captured one would be a constant that XLA folds.
  fns = {'forward': (conv, (x, w)),
         'input gradient': (lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[0], (x, w, dy)),
         'weight gradient': (lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[1], (x, w, dy))}
  out = {}
  for part, (fn, args) in fns.items():
    compiled = jax.jit(fn).lower(*args).compile(options or None)
    out[part] = cpu_ms(lambda c=compiled, a=args: jax.block_until_ready(c(*a)), repeats)
  return out


def torch_row(n: int, side: int, ch: int, repeats: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import grad  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  x, dy = torch.randn(n, ch, side, side), torch.randn(n, ch, side, side)
  w = torch.randn(ch, ch, 3, 3) * 0.05
  with torch.no_grad():
    fns = {'forward': lambda: torch.nn.functional.conv2d(x, w, padding=1),
           'input gradient': lambda: grad.conv2d_input(x.shape, w, dy, padding=1),
           'weight gradient': lambda: grad.conv2d_weight(x, w.shape, dy, padding=1)}
    return {part: cpu_ms(fn, repeats) for part, fn in fns.items()}


def torch_subprocess(n: int, side: int, ch: int, repeats: int) -> dict:
  env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
  cmd = [sys.executable, os.path.abspath(__file__), '--torch_worker', f'--batch={n}',
         f'--side={side}', f'--channels={ch}', f'--repeats={repeats}']
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
  if out.returncode or not lines:
    print(f'# PyTorch row skipped: {(out.stderr.strip().splitlines() or ["no output"])[-1]}')
    return {}
  return json.loads(lines[-1])


def main(argv):
  del argv
  n, side, ch, repeats = _BATCH.value, _SIDE.value, _CHANNELS.value, _REPEATS.value
  if _TORCH_WORKER.value:
    print(json.dumps(torch_row(n, side, ch, repeats)))
    return
  # One Eigen thread, as a flag of this process's XLA client (created below, on first use).
  os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), ONE_THREAD]).strip()
  print(machine.header(), flush=True)
  from esm import train as train_lib  # pylint: disable=g-import-not-at-top
  rows = {"XLA's own options": jax_row({}, n, side, ch, repeats),
          "the train step's (esm.train.CPU_STEP_OPTIONS)": jax_row(
              train_lib.CPU_STEP_OPTIONS, n, side, ch, repeats)}
  theirs = torch_subprocess(n, side, ch, repeats)
  if theirs:
    rows['PyTorch'] = theirs
  print(f'# 3x3 convolution, {n}x{side}²x{ch} -> {ch}, one thread; CPU ms per call, median of '
        f'{repeats}; {time.strftime("%Y-%m-%d %H:%M")}')
  print('| compiled with | ' + ' | '.join(PARTS) + ' | sum |')
  print('|---|' + '---|' * (len(PARTS) + 1))
  for name, row in rows.items():
    print(f'| {name} | ' + ' | '.join(f'{row[p]:.0f}' for p in PARTS) +
          f' | {sum(row.values()):.0f} |')


if __name__ == '__main__':
  app.run(main)
