"""The U-Net shapes bench/vs_pytorch.py times in both frameworks, and its one timing loop.

Imports neither JAX nor PyTorch: each worker process loads only its own framework.
"""

import resource
import time

# name: (image side, batch, base channels, channel multipliers, blocks per level, attention side,
#        GroupNorm groups)
CASES = {
    'a': (48, 16, 16, (1, 2, 2), 1, 12, 8),
    'b': (64, 8, 64, (1, 2, 2, 2), 2, 16, 32),
}


def timed(step_once, steps: int) -> dict:
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
