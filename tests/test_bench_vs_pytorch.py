"""bench/vs_pytorch.py follows the project's API: it builds and lowers our train step (no compile,
no torch), so an API change that breaks the benchmark fails here rather than at measurement time."""

import mmap

import jax
import pytest

from bench import jax_train_step
from bench import train_step_cases


@pytest.mark.slow
@pytest.mark.parametrize('case', ['esm48', 'esm48v'])
def test_study_step_builds_and_lowers(case):
  config = jax_train_step.case_config(case)
  size, batch = config.data.image_size, config.train.batch_size
  parts = jax_train_step.TrainStep.create(config, vmapped=case == 'esm48v')
  assert parts.count_params() > 0
  state = jax.eval_shape(parts.init_state)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jax.numpy.float32)
  lowered = parts.jitted().lower(state, images, jax.random.key(0))
  assert 'convolution' in lowered.as_text()


def test_timed_counts_the_page_faults_of_memory_touched_anew():
  pages = 1024

  def step_once():  # a fresh anonymous mapping each call: every page faults on first touch
    with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
      if hasattr(mmap, 'MADV_NOHUGEPAGE'):  # with transparent huge pages, 2 MiB per fault
        m.madvise(mmap.MADV_NOHUGEPAGE)
      for i in range(pages):
        m[i * mmap.PAGESIZE] = 1

  timed = train_step_cases.timed(step_once, 3)
  assert len(timed['times']) == len(timed['cpu']) == 3
  assert timed['minflt'] >= pages and timed['sys_s'] >= 0
