"""esm/host_memory.py: with glibc's malloc set to keep freed memory, repeated XLA calls stop
page-faulting their buffers in anew."""

import os
import subprocess
import sys

import pytest

from esm import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Minor page faults of each of 20 calls whose 64 MiB output XLA allocates with malloc and frees
# when the array is dropped. Each side runs in a fresh process: the setting must precede XLA's
# threads.
_PROBE = """
import resource, sys
from esm import host_memory
if sys.argv[1] == 'reuse' and not host_memory.reuse_freed_memory():
  sys.exit('mallopt failed')
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(x)[::-1] * 2.0)
x = jnp.ones(1 << 24, jnp.float32)
faults = []
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _faults(mode: str) -> list[int]:
  out = subprocess.run([sys.executable, '-c', _PROBE, mode], cwd=REPO, capture_output=True,
                       text=True, check=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  return [int(v) for v in out.stdout.split()]


def _glibc() -> bool:
  return sys.platform.startswith('linux') and 'glibc' in (os.confstr('CS_GNU_LIBC_VERSION') or '')


def test_freed_xla_buffers_are_reused_without_page_faults():
  if not _glibc():
    pytest.skip('glibc only')
  pages = (1 << 24) * 4 // os.sysconf('SC_PAGE_SIZE')
  default, reuse = _faults('default'), _faults('reuse')
  # glibc's default: a block this large is mmap'd and munmap'd, so every call faults it all in.
  assert min(default[-5:]) >= 0.9 * pages, default
  # Kept in the heap: once the heap has grown to the working set, calls fault (almost) nothing.
  assert max(reuse[-5:]) <= 0.05 * pages, reuse


def test_reuse_freed_memory_is_a_no_op_off_linux(monkeypatch):
  monkeypatch.setattr(sys, 'platform', 'darwin')
  assert host_memory.reuse_freed_memory() is False
