"""Run time of the section 3.1 analysis (esm/analysis) at its default size, projected.

  python3 bench/analysis_time.py [--num_steps=100]

Runs the default score-error measurement (esm/analysis/score_error.py) with each model trained --num_steps steps in two chunks instead of the
default steps, and projects its wall and process CPU time to the default step count
(score_error.projected_seconds: the first chunk's compile cost plus the later chunk's seconds per step).
Prints both and the check that the default analysis fits in 3 minutes of process CPU, which bounds
the wall time on an otherwise idle 2-core machine and is less sensitive than it to other jobs.
"""

import dataclasses
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import machine  # pylint: disable=g-import-not-at-top,wrong-import-position
from esm.analysis import score_error  # pylint: disable=g-import-not-at-top,wrong-import-position

_NUM_STEPS = flags.DEFINE_integer('num_steps', 100, 'training steps per model (two chunks)')
_BUDGET_S = 180.0  # process CPU seconds of the default analysis


def main(argv):
  del argv
  print(machine.header(), flush=True)
  default = score_error.ScoreErrorConfig()
  train = dataclasses.replace(default.train, num_steps=_NUM_STEPS.value,
                              chunk=_NUM_STEPS.value // 2)
  result = score_error.measure_score_errors(dataclasses.replace(default, train=train))
  steps = default.train.num_steps
  wall = score_error.projected_seconds(result, steps)
  cpu = score_error.projected_seconds(result, steps, cpu=True)
  print(f'default analysis ({steps} training steps per model), projected from {_NUM_STEPS.value}: '
        f'wall {wall:.0f} s, process CPU {cpu:.0f} s; load average {os.getloadavg()[0]:.1f} '
        f'on {os.cpu_count()} CPUs')
  print(f'check: process CPU under {_BUDGET_S:.0f} s: {"ok" if cpu < _BUDGET_S else "FAILED"}')
  if cpu >= _BUDGET_S:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
