"""Training metrics: DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard.

Only process 0 writes. TensorBoard event files come from tensorboardX, which needs no TensorFlow;
when it is not installed only the JSON lines are written.
"""

import json
import os
from typing import Dict

import jax
from absl import logging


class MetricWriter:

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._enabled = jax.process_index() == 0
    self._tb = None
    if not self._enabled:
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      logging.warning('tensorboardX is not installed: metrics go to %s only', self.path)

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (written after the checkpoint a resumed run starts from), so that
    after a resume every step appears exactly once. The file is rewritten atomically."""
    if not self._enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      if record.get('step', 0) <= step:
        kept.append(json.dumps(record) + '\n')
    if len(kept) != len(lines):
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self._enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
      f.flush()
      os.fsync(f.fileno())
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()

  def write_throughput(self, step: int, images_per_second: float, seconds: float) -> None:
    """DIR/throughput.jsonl: training speed per logging interval (the first includes compilation)."""
    if not self._enabled:
      return
    with open(os.path.join(os.path.dirname(self.path), 'throughput.jsonl'), 'a') as f:
      f.write(json.dumps({'step': int(step), 'images_per_second': float(images_per_second),
                          'seconds': float(seconds)}) + '\n')

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
