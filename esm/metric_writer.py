"""Training metrics: DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard.

Only process 0 writes. TensorBoard event files come from tensorboardX, which needs no TensorFlow;
when it is not installed only the JSON lines are written.
"""

import json
import os
from typing import Dict

import jax
from absl import logging

from esm import files


def _truncate_jsonl(path: str, step: int) -> None:
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
    if record.get('step', 0) <= step:
      kept.append(json.dumps(record) + '\n')
  if kept != lines:  # also when the last line lost its newline: the next append would join it
    files.write_text(path, ''.join(kept), fsync=True)


class MetricWriter:

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._throughput_path = os.path.join(workdir, 'throughput.jsonl')
    self._enabled = jax.process_index() == 0
    self._tb = None
    if not self._enabled:
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  (optional)
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      logging.warning('tensorboardX is not installed: metrics go to %s only', self.path)

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (written after the checkpoint a resumed run starts from) from
    metrics.jsonl and throughput.jsonl, so that after a resume every step appears exactly once.
    A line cut short by a kill is dropped too. Each file is rewritten atomically."""
    if not self._enabled:
      return
    for path in (self.path, self._throughput_path):
      if os.path.exists(path):
        _truncate_jsonl(path, step)

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
    """DIR/throughput.jsonl: training speed per logging interval (compilation excluded)."""
    if not self._enabled:
      return
    with open(self._throughput_path, 'a') as f:
      f.write(json.dumps({'step': int(step), 'images_per_second': float(images_per_second),
                          'seconds': float(seconds)}) + '\n')

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
