"""model.scan_streams and model.scan_blocks: the same network as the default layout, with the
parameters moved by convert_params / convert_state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs.default import get_default_config
from esm.config import from_configdict
from esm import train as train_lib
from esm.models import dual_stream
from esm.models import unet
from esm.models import utils as mutils

SIZE = 16


def _config(scan_streams=False, scan_blocks=False, micro=False):
  """Two blocks per level; tiny (ch 16, levels (1, 2), attention at 8²) or micro (ch 8, one
  level, no attention: blocks 0-1 down and 2-4 up form runs)."""
  c = (common.set_micro_model if micro else common.set_tiny_model)(get_default_config())
  c.model.num_res_blocks = 2
  c.model.scan_streams, c.model.scan_blocks = scan_streams, scan_blocks
  c.model.dropout = 0.0  # dropout masks follow the layout (each scan splits the dropout key)
  return from_configdict(c)


def _perturbed(params, seed=0):
  """Non-zero everywhere (the output convs start at zero, which would hide a wrong layout)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, p.shape)
                                      for p, k in zip(leaves, keys)])


@pytest.fixture(scope='module')
def reference():
  config = _config()
  model = mutils.create_model(config, SIZE)
  params = _perturbed(mutils.init_params(model, jax.random.key(0), SIZE))
  x = jax.random.normal(jax.random.key(1), (2, SIZE, SIZE, 3))
  t = jnp.array([0.1, 0.7])
  return model, params, x, t


def _close(a, b, tol=1e-5):
  """Trees equal up to float32 rounding: ‖a - b‖ <= tol ‖a‖ over all leaves together (leaf by
  leaf, the gradients that are zero in exact arithmetic would be compared to their noise)."""
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(tree)])
  a, b = flat(a), flat(b)
  assert a.shape == b.shape and np.linalg.norm(a - b) <= tol * np.linalg.norm(a), (
      np.linalg.norm(a - b), np.linalg.norm(a))


def _apply(model, params, x, t):
  return model.apply({'params': params}, x, t, False)


def test_the_runs_of_identical_blocks():
  # Blocks 0-1 (level 0, 16 -> 16 twice) form a run, 3-4 (level 1: 16 -> 32, then 32 -> 32) do
  # not; 2 is the down-sampling block, 5 and 6 the middle ones. On the way up, the (h, skip)
  # channels of level 1 are (32+32, 32+32, 32+16) for blocks 7-9, each followed by attention
  # (AttnBlock 3-5), and those of level 0 (32+16, 16+16, 16+16) for blocks 11-13.
  cfg = _config().model.unet
  assert unet.scanned_runs(cfg, SIZE) == ['Blocks_0-1', 'Blocks_12-13', 'Blocks_7-8_3-4']
  assert unet._runs(16, [0, 0], 16, True) == [[0, 1]]
  assert unet._runs(16, [0, 0], 32, True) == [[0], [1]]
  assert unet._runs(32, [32, 32, 16], 32, True) == [[0, 1], [2]]
  assert unet._runs(32, [32, 32, 16], 32, False) == [[0], [1], [2]]


@pytest.mark.slow
def test_scanned_model_equals_the_default_one_with_converted_parameters(reference):
  model, params, x, t = reference
  config = _config(scan_streams=True, scan_blocks=True)
  scanned = mutils.create_model(config, SIZE)
  moved = dual_stream.convert_params(params, scanned.config, SIZE)
  # The converted tree is exactly the scanned model's own tree (so a converted checkpoint restores).
  own = jax.eval_shape(lambda: mutils.init_params(scanned, jax.random.key(0), SIZE))
  assert jax.tree.structure(moved) == jax.tree.structure(own)
  assert [a.shape for a in jax.tree.leaves(moved)] == [a.shape for a in jax.tree.leaves(own)]
  # Outputs, and gradients moved back to the default layout: the default model's (one compilation
  # per model: the outputs ride along as the auxiliary value).
  def outputs_and_grads(m, p):
    loss = lambda p: (lambda out: (sum(jnp.sum(o * o) for o in out), out))(_apply(m, p, x, t))
    return jax.jit(jax.grad(loss, has_aux=True))(p)
  g_want, want = outputs_and_grads(model, params)
  g_got, got = outputs_and_grads(scanned, moved)
  _close(want, got)
  g_got = dual_stream.canonical_params(g_got)
  assert jax.tree.structure(g_got) == jax.tree.structure(g_want)
  _close(g_want, g_got)
  # And back again: the same values, bit for bit.
  back = dual_stream.canonical_params(moved)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, back)


@pytest.mark.slow
def test_a_converted_train_state_takes_the_same_step():
  config, scanned_config = _config(micro=True), _config(True, True, micro=True)
  built, built_s = mutils.build(config, SIZE), mutils.build(scanned_config, SIZE)
  state = mutils.init_state(config, built, SIZE)
  state = state.replace(params=_perturbed(state.params))
  moved = mutils.convert_state(state, scanned_config, SIZE)
  own = mutils.abstract_state(scanned_config, built_s, SIZE)
  assert jax.tree.structure(moved.replace(tx=own.tx)) == jax.tree.structure(own)  # tx is static
  images = jax.random.uniform(jax.random.key(4), (2, SIZE, SIZE, 3), minval=-1, maxval=1)
  step = lambda b: jax.jit(train_lib.get_train_step_fn(b.loss_fn, config.train.ema_rate))
  after = step(built)(state, images, jax.random.key(5))
  after_s = mutils.convert_state(step(built_s)(moved, images, jax.random.key(5)), config, SIZE)
  _close(after.metric_sums['loss'], after_s.metric_sums['loss'])
  _close((after.params, after.opt_state), (after_s.params, after_s.opt_state))
