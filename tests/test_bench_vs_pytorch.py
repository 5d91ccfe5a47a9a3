"""bench/vs_pytorch.py follows the project's API: it builds and lowers our train step (no compile,
no torch), so an API change that breaks the benchmark fails here rather than at measurement time."""

import os
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'bench'))
import vs_pytorch  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_study_step_builds_and_lowers():
  config = vs_pytorch._jax_config('esm48')
  size, batch = config.data.image_size, config.train.batch_size
  parts = vs_pytorch._Step(config, size)
  assert parts.count_params() > 0
  state = jax.eval_shape(parts.init_state)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jax.numpy.float32)
  lowered = parts.jitted().lower(state, images, jax.random.key(0))
  assert 'convolution' in lowered.as_text()
