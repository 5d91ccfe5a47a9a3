"""bench/vs_pytorch.py follows the project's API: it builds and lowers our train step (no compile,
no torch), so an API change that breaks the benchmark fails here rather than at measurement time."""

import os
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'bench'))
import vs_pytorch  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.slow
def test_study_step_builds_and_lowers():
  config = vs_pytorch._jax_config('esm48')
  size, batch = config.data.image_size, config.train.batch_size
  parts = vs_pytorch._Step(config, size)
  assert parts.count_params() > 0
  state = jax.eval_shape(parts.init_state)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jax.numpy.float32)
  lowered = parts.jitted().lower(state, images, jax.random.key(0))
  assert 'convolution' in lowered.as_text()


def test_timed_counts_the_page_faults_of_memory_touched_anew():
  import mmap  # pylint: disable=g-import-not-at-top
  pages = 1024

  def step_once():  # a fresh anonymous mapping each call: every page faults on first touch
    with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
      if hasattr(mmap, 'MADV_NOHUGEPAGE'):  # with transparent huge pages, 2 MiB per fault
        m.madvise(mmap.MADV_NOHUGEPAGE)
      for i in range(pages):
        m[i * mmap.PAGESIZE] = 1

  timed = vs_pytorch._timed(step_once, 3)
  assert len(timed['times']) == len(timed['cpu']) == 3
  assert timed['minflt'] >= pages and timed['sys_s'] >= 0
