"""Host memory: minor page faults per XLA call, glibc's default malloc against esm.host_memory's.

  python3 bench/host_memory.py [--calls=20] [--mib=64]

A jitted function whose output of --mib MiB XLA allocates with malloc and frees when the array is
dropped, called --calls times in a fresh process per side (the setting must precede XLA's threads).
Prints one table, the faults of the last five calls against the buffer's pages, and the check: with
glibc's default the buffer is mmap'd and faulted in anew at every call; with the settings main.py
makes (esm/host_memory.py) it stays in the heap and repeated calls fault almost nothing. Transparent
huge pages set to 'always' fault in 2 MiB at a time, so both counts shrink on such machines.
"""

import os
import subprocess
import sys

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

_CALLS = flags.DEFINE_integer('calls', 20, 'calls per side (the last five are reported)')
_MIB = flags.DEFINE_integer('mib', 64, 'size of the output buffer XLA allocates per call')

_PROBE = """
import resource, sys
from esm import host_memory
if sys.argv[1] == 'reuse' and not host_memory.reuse_freed_memory():
  sys.exit('mallopt failed')
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(x)[::-1] * 2.0)
x = jnp.ones(int(sys.argv[2]), jnp.float32)
faults = []
for _ in range(int(sys.argv[3])):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _faults(mode: str, num_floats: int) -> list[int]:
  out = subprocess.run([sys.executable, '-c', _PROBE, mode, str(num_floats), str(_CALLS.value)],
                       cwd=REPO, capture_output=True, text=True, check=True,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  return [int(v) for v in out.stdout.split()]


def _huge_pages() -> str:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return f.read().split('[')[1].split(']')[0]
  except (OSError, IndexError):
    return 'unknown'


def main(argv):
  del argv
  print(machine.header(), flush=True)
  num_floats = _MIB.value << 18  # float32: 4 bytes each
  pages = num_floats * 4 // os.sysconf('SC_PAGE_SIZE')
  default, reuse = _faults('default', num_floats), _faults('reuse', num_floats)
  print(f'| malloc | faults per call (last 5) | share of the {pages} pages |')
  print('|---|---|---|')
  for name, faults in (("glibc's default", default), ('esm.host_memory', reuse)):
    print(f'| {name} | {" ".join(map(str, faults[-5:]))} | {max(faults[-5:]) / pages:.3f} |')
  reused = max(reuse[-5:]) <= 0.05 * pages
  print(f'\ncheck: repeated calls fault at most 5% of the buffer with esm.host_memory: '
        f'{"ok" if reused else "FAILED"} (transparent huge pages: {_huge_pages()}; '
        f"glibc's default faults {min(default[-5:]) / pages:.0%} of it)")
  if not reused:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
