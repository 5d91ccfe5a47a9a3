"""Host memory: freed blocks stay in the process for reuse (glibc malloc settings).

XLA:CPU allocates an executable's temporary buffer with malloc at every call and frees it after:
343 MB for the CPU-scale ESM train step. glibc serves a block that large from its own mmap (a thread
arena cannot hold it) and returns it with munmap, so every call page-faults the whole buffer in
again, about 84 thousand 4 KiB pages per step. With one arena, no mmap and no trimming, the freed
block stays in the heap and the next call reuses it (no faults per step: docs/benchmarks.md,
"Train-step speed against PyTorch/diffusers"); the price is a resident size that stays at its peak
instead of shrinking between calls.
"""

import ctypes
import sys

from absl import logging

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory for reuse; True if it did (Linux with glibc).

  Call it before the first JAX computation: a thread that has already allocated keeps the arena
  it chose, and XLA's threads start with the backend.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only, not musl)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  # One arena, so that large blocks come from the main heap; no mmap'd blocks, so that they stay
  # there when freed; and the heap's free top goes back to the system only above 2 GiB (the
  # largest value mallopt takes).
  done = all(mallopt(option, value) == 1 for option, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)))
  if not done:
    logging.warning('glibc mallopt refused a setting; host memory is returned to the system '
                    'after every XLA call (slower on CPU)')
  return done
