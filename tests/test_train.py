"""The train step: NaN skipping, device-count invariance and resume equality."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esm import config as config_lib
from esm import metrics
from esm import train as train_lib
from esm.models import utils as mutils
from tests.helpers import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The dual-stream ESM model at its smallest (configs/test.py:micro): what these tests check does
# not depend on the model's size, and compilation is most of their time.
SIZE = runs.config('micro').data.image_size


def tiny_config(**changes) -> config_lib.Config:
  """configs/test.py:micro with dotted `changes`, typed as the library takes it."""
  return config_lib.from_configdict(runs.config('micro', changes=changes))


@pytest.fixture(scope='module')
def step_setup():
  config = tiny_config(**{'train.inject_nonfinite_step': 1})
  built = mutils.build(config, SIZE)
  state = mutils.init_state(config, built, SIZE)
  step = jax.jit(train_lib.get_train_step_fn(built.loss_fn, 0.5, inject_nonfinite_step=1))
  images = jax.random.uniform(jax.random.key(5), (4, SIZE, SIZE, 3), minval=-1, maxval=1)
  return state, step, images


@pytest.mark.slow
def test_non_finite_step_is_skipped_and_counted(step_setup):
  state, step, images = step_setup
  s1 = step(state, images, jax.random.key(0))
  assert int(s1.step) == 1 and int(s1.bad_steps) == 0
  s2 = step(s1, images, jax.random.key(0))  # step index 1 is poisoned
  assert int(s2.step) == 2 and int(s2.bad_steps) == 1 and int(s2.skipped_steps) == 1
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), (s1.params, s1.ema_params),
                      (s2.params, s2.ema_params))
  assert all(jax.tree.leaves(same))
  s3 = step(s2, images, jax.random.key(0))
  assert int(s3.bad_steps) == 0 and int(s3.skipped_steps) == 1
  assert int(s3.metric_count) == 2  # the skipped step is not in the logged means


_TWO_DEVICE_SCRIPT = textwrap.dedent('''
  import jax, numpy as np
  from esm import parallel, train as train_lib
  from esm.models import utils as mutils
  from esm.config import from_configdict
  from tests.helpers import runs
  assert jax.device_count() == 2
  config = from_configdict(runs.config('micro'))
  SIZE = config.data.image_size
  built = mutils.build(config, SIZE)
  step_fn = train_lib.get_train_step_fn(built.loss_fn, 0.9)
  rng = np.random.default_rng(0)
  batches = [rng.uniform(-1, 1, (4, SIZE, SIZE, 3)).astype(np.float32) for _ in range(2)]
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    step = jax.jit(step_fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh), None),
                   out_shardings=parallel.replicated(mesh))
    state = jax.device_put(mutils.init_state(config, built, SIZE), parallel.replicated(mesh))
    for b in batches:
      state = step(state, parallel.shard_batch(mesh, b), jax.random.key(3))
    results.append(jax.device_get(state))
  leaves = [jax.tree.leaves((r.params, r.metric_sums)) for r in results]
  err = max(float(np.max(np.abs(a - b))) for a, b in zip(*leaves))
  print('MAXERR', err)
''')


@pytest.mark.slow
def test_two_device_step_equals_one_device_step():
  flags = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _TWO_DEVICE_SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  err = float(out.stdout.split('MAXERR')[1])
  assert err < 1e-5, err


def test_batch_that_does_not_divide_over_devices_is_refused():
  from esm import validate  # pylint: disable=g-import-not-at-top
  from esm.errors import UserError  # pylint: disable=g-import-not-at-top
  if jax.device_count() > 1:
    config = tiny_config(**{'eval.batch_size': jax.device_count() + 1})
    with pytest.raises(UserError, match='eval.batch_size: .*multiple of'):
      validate.check_batches_split_over_devices(config)
  with pytest.raises(UserError, match='eval.batch_size: expected a positive integer'):
    tiny_config(**{'eval.batch_size': 0})


# bf16 keeps 8 significant bits, so one rounding moves a value by up to 2^-8 ~ 0.004 of itself.
# The loss is a mean over 4 x 16 x 16 x 3 pixel terms, in which independent rounding errors mostly
# cancel (measured: see the printed line). The bound, 0.01, is what a systematic error of ~2
# roundings on the O(1) loss terms would give: a precision bug, not rounding noise.
BF16_LOSS_TOLERANCE = 0.01
BF16_STEPS = 20


def _float_dtypes(tree):
  return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.slow
def test_bfloat16_training_tracks_float32_with_float32_state():
  """model.dtype='bfloat16' for 20 steps from the float32 run's initial state, on its data and
  noise: the losses stay close, and parameters, EMA and Adam state stay float32."""
  images = jax.random.uniform(jax.random.key(7), (BF16_STEPS, 4, SIZE, SIZE, 3), minval=-1,
                              maxval=1)
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    config = tiny_config(**{'model.dtype': dtype})
    built = mutils.build(config, SIZE)
    state = mutils.init_state(config, built, SIZE)  # parameters do not depend on dtype
    step = jax.jit(train_lib.get_train_step_fn(built.loss_fn, 0.9))
    sums = []
    for x in images:
      state = step(state, x, jax.random.key(3))
      sums.append(float(state.metric_sums['loss']))
    losses[dtype] = np.diff([0.0] + sums)  # the sums accumulate one loss per step
    for name in ('params', 'ema_params', 'opt_state'):
      assert _float_dtypes(getattr(state, name)) == {jnp.dtype(jnp.float32)}, (dtype, name)
  diff = np.abs(losses['bfloat16'] - losses['float32'])
  assert np.isfinite(losses['bfloat16']).all(), losses['bfloat16']
  # Same start, data and noise: identical losses would mean the dtype switch did nothing.
  assert diff.max() > 0, 'bf16 losses identical to float32: bfloat16 compute is not used'
  assert diff.max() < BF16_LOSS_TOLERANCE, (
      f'bf16 loss differs from float32 by up to {diff.max():.4g} (mean {diff.mean():.4g}, step '
      f'{int(diff.argmax()) + 1}); float32 losses {np.round(losses["float32"], 4).tolist()}')
  print(f'bf16 vs float32 over {BF16_STEPS} steps: max |loss diff| {diff.max():.4g}, '
        f'mean {diff.mean():.4g}')


@pytest.mark.slow
def test_esm_with_the_variance_pinned_to_one_minus_alpha_bar_is_sgm():
  """Sanity check of the ESM/SGM comparison: with stream 2 pinned so that σ²_θ = 1-ᾱ_i
  (log_var_bound ≈ 0, 'scaled'), eq. 10 gives ε the DSM gradient and eq. 3 is eq. 4; an ESM and an
  SGM model from the same initial ε parameters then train and reconstruct alike (no clipping,
  whose global norm would include the variance stream's gradients)."""
  from esm import sampling  # pylint: disable=g-import-not-at-top
  base = tiny_config(**{
      'train.grad_clip': 0.0, 'model.log_var_bound': 1e-6, 'sampling.esm_min_var': 0.0,
      'sampling.snapshot_steps': (0,)})  # x̂_0 only: reconstructions are compared
  rng = np.random.default_rng(0)
  batches = rng.uniform(-1, 1, (5, 4, SIZE, SIZE, 3)).astype(np.float32)
  test = rng.uniform(-1, 1, (8, SIZE, SIZE, 3)).astype(np.float32)
  test[4:, 4:10, 4:10] = 1.0  # four images with a bright square
  recon = {}
  for kind, method in (('esm', 'esm'), ('dsm', 'sgm')):
    config = config_lib.with_fields(base, {'loss.kind': kind, 'sampling.method': method})
    built = mutils.build(config, SIZE)
    state = mutils.init_state(config, built, SIZE)
    step = jax.jit(train_lib.get_train_step_fn(built.loss_fn, 0.9))
    for x in batches:
      state = step(state, x, jax.random.key(3))
    fn = sampling.get_reconstruct_fn(built.net_fn, built.sde, config.sampling, 5)
    recon[kind] = (state.params['eps_stream'], fn(state.ema_params, test,
                                                   sampling.image_keys(0, np.arange(8))).x0_hat)
  for a, b in zip(jax.tree.leaves(recon['esm'][0]), jax.tree.leaves(recon['dsm'][0])):
    np.testing.assert_allclose(a, b, atol=1e-6)  # the default bound (12) differs by 1.3e-5 here
  np.testing.assert_allclose(recon['esm'][1], recon['dsm'][1], atol=1e-5)
  labels = np.r_[np.zeros(4), np.ones(4)]
  s_re = {k: np.asarray(jnp.mean(jnp.abs(test - r[1]), axis=(1, 2, 3))) for k, r in recon.items()}
  assert abs(metrics.auroc(s_re['esm'], labels) - metrics.auroc(s_re['dsm'], labels)) <= 1e-3


def _ynn_convolutions(compiled) -> int:
  """How many of a compiled function's YNNPACK fusions hold a convolution."""
  text = compiled.as_text()
  bodies = dict(re.findall(r'^(?:ENTRY )?%(\S+) .*?\{\n(.*?)^\}', text, re.M | re.S))
  called = [c for line in text.splitlines() if '"__ynn_fusion"' in line
            for c in re.findall(r'calls=%([\w.\-]+)', line)]
  return sum(' convolution(' in bodies.get(c, '') for c in called)


def test_train_step_options_are_the_platforms_then_the_configs():
  assert train_lib.step_compiler_options({'xla_x': 1}, 'gpu') == {'xla_x': 1}
  assert train_lib.step_compiler_options(None, 'cpu') == train_lib.CPU_STEP_OPTIONS
  mine = {'xla_cpu_experimental_ynn_fusion_type': ''}
  assert train_lib.step_compiler_options(mine, 'cpu') == mine


def test_cpu_step_options_keep_convolution_gradients_out_of_ynnpack_with_the_same_values():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32))
  w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) * 0.1

  def loss(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(jax.nn.silu(y) ** 2)

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w)
  xla_own, ours = lowered.compile(), lowered.compile(train_lib.CPU_STEP_OPTIONS)
  assert _ynn_convolutions(xla_own) > 0 and _ynn_convolutions(ours) == 0
  for a, b in zip(xla_own(x, w), ours(x, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
