"""ImageSet: an ordered set of images with labels, masks and records, batched for the device mesh.

What evaluation, tuning and predict score: a dataset split (datasets/pipeline.py), the development
set (esm/tune.py) or the caller's images (esm/detector.py). Examples are read by index with
`load`, on a few threads, and grouped into global batches padded to a multiple of the global batch
size; padding rows have valid=False and index=-1, so no example is dropped or counted twice. Each
process gets its slice of every global batch. No TFDS, grain or model code.
"""

import collections
import concurrent.futures
import dataclasses
import math
import os
from typing import Any, Callable, Dict, Iterator, List

import jax
import numpy as np

from esm import parallel

_THREADS = max(1, min(8, os.cpu_count() or 1))


@dataclasses.dataclass
class ImageSet:
  """An ordered, padded set of images. records (filename, defect_type, label) cover ALL examples."""
  num_examples: int
  has_masks: bool
  records: List[Dict[str, Any]]
  image_size: int
  global_batch_size: int
  load: Callable[[int], Dict[str, np.ndarray]]  # global index -> image f32, mask u8, label

  @property
  def num_batches(self) -> int:
    return math.ceil(self.num_examples / self.global_batch_size)

  def _element(self, index: int) -> Dict[str, np.ndarray]:
    if index >= self.num_examples:  # padding: never a real example
      size = self.image_size
      return {'image': np.zeros((size, size, 3), np.float32),
              'mask': np.zeros((size, size), np.uint8), 'label': np.int32(-1),
              'valid': np.bool_(False), 'index': np.int32(-1)}
    return {**self.load(index), 'valid': np.bool_(True), 'index': np.int32(index)}

  def batches(self) -> Iterator[Dict[str, np.ndarray]]:
    """This process's slice of every global batch: image, mask, label, valid, index."""
    local_batch = parallel.local_batch_size(self.global_batch_size)
    offset = jax.process_index() * local_batch
    indices = [b * self.global_batch_size + offset + row
               for b in range(self.num_batches) for row in range(local_batch)]
    rows = _read_ahead(self._element, indices, 2 * local_batch)
    for _ in range(self.num_batches):
      batch = [next(rows) for _ in range(local_batch)]
      yield {k: np.stack([r[k] for r in batch]) for k in batch[0]}


def _read_ahead(read: Callable[[int], Any], indices: List[int], window: int) -> Iterator[Any]:
  """read(i) for each index in order, computed on threads at most `window` ahead of the reader."""
  with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
    pending = collections.deque()
    todo = iter(indices)
    for i in todo:
      pending.append(pool.submit(read, i))
      if len(pending) >= window:
        break
    while pending:
      result = pending.popleft().result()
      for i in todo:
        pending.append(pool.submit(read, i))
        break
      yield result
