"""The U-Net stream and the dual-stream network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs.default import get_default_config
from esm.config import from_configdict
from esm.errors import UserError
from esm.models import dual_stream
from esm.models import utils as mutils
from esm.models.layers import sinusoidal_embedding
from esm.sde import get_sde

SIZE = 16


@pytest.fixture(scope='module')
def tiny():
  config = from_configdict(common.set_tiny_model(get_default_config()))
  model = mutils.create_model(config, SIZE)
  params = mutils.init_params(model, jax.random.key(0), SIZE)
  net_fn = dual_stream.get_net_fn(model, get_sde(config.sde))
  return config, model, params, net_fn


@pytest.mark.slow
def test_output_shapes_and_finite_variance(tiny):
  _, _, params, net_fn = tiny
  x = jax.random.normal(jax.random.key(1), (2, SIZE, SIZE, 3))
  out = jax.jit(net_fn)(params, x, jnp.array([1, 1000]))
  assert out.eps.shape == x.shape and out.log_var.shape == x.shape
  assert out.eps.dtype == jnp.float32 and bool(jnp.isfinite(out.log_var).all())


@pytest.mark.slow
def test_streams_share_no_parameters_and_eps_ignores_the_variance_stream(tiny):
  _, _, params, net_fn = tiny
  assert set(params) == {'eps_stream', 'var_stream'}
  x = jax.random.normal(jax.random.key(2), (2, SIZE, SIZE, 3))
  # Make the zero-initialised output convs non-zero so that both outputs depend on their inputs.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)
  i = jnp.array([10, 500])
  grads = jax.jit(jax.grad(lambda p: jnp.sum(net_fn(p, x, i).eps ** 2)))(params)
  var_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads['var_stream']))
  eps_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads['eps_stream']))
  assert var_norm == 0.0 and eps_norm > 0.0
  grads = jax.jit(jax.grad(lambda p: jnp.sum(net_fn(p, x, i).log_var)))(params)
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads['eps_stream'])) == 0.0


def test_single_stream_for_dsm():
  config = common.set_tiny_model(get_default_config())
  config.loss.kind = 'dsm'
  model = mutils.create_model(from_configdict(config), SIZE)
  params = jax.eval_shape(lambda: mutils.init_params(model, jax.random.key(0), SIZE))
  assert set(params) == {'eps_stream'}
  dual_model = mutils.create_model(from_configdict(common.set_tiny_model(get_default_config())), SIZE)
  dual = mutils.count_params(dual_model, SIZE)
  assert 2 * mutils.count_params(model, SIZE) == dual


def test_variance_parameterisations():
  ab = jnp.array([0.9])
  v = jnp.zeros((1, 2, 2, 3))
  np.testing.assert_allclose(jnp.exp(dual_stream.variance_from_raw(v, ab, 'scaled', 12.0)), 0.1, rtol=1e-5)
  np.testing.assert_allclose(jnp.exp(dual_stream.variance_from_raw(v, ab, 'direct', 12.0)), 1.0)
  huge = dual_stream.variance_from_raw(jnp.full((1, 1, 1, 1), 1e30), ab, 'direct', 12.0)
  assert float(huge.max()) <= 12.0 and bool(jnp.isfinite(huge).all())


@pytest.mark.slow
def test_paper_scale_parameter_count_without_allocation():
  config = from_configdict(get_default_config())
  model = mutils.create_model(config, 256)
  n = mutils.count_params(model, 256)
  # Paper table 4: 0.98 GB of float32 parameters for the two streams.
  assert 0.9e9 < 4 * n < 1.1e9


def _attention_blocks(config, size: int) -> dict:
  """AttnBlock name -> the feature-map side it sees, for one stream applied to size² inputs."""
  model = mutils.create_model(config, size)
  x = jnp.zeros((1, size, size, 3))
  _, state = jax.eval_shape(lambda: model.init_with_output(
      {'params': jax.random.key(0)}, x, jnp.zeros((1,)), False, capture_intermediates=True))
  calls = state['intermediates']['eps_stream']
  return {name: calls[name]['__call__'][0].shape[1] for name in calls if name.startswith('AttnBlock')}


def test_crop_trained_unet_attends_at_the_crops_levels_on_whole_images():
  """attn_resolutions are sides of the training crop: on a whole 16² image the blocks that saw
  the 8² crop's 4² level attend at 8², and the parameter tree is the crop's."""
  config = common.set_tiny_model(get_default_config())
  config.model.attn_resolutions = (4,)
  config.data.train_crop = 8
  crop = _attention_blocks(from_configdict(config), 8)
  whole = _attention_blocks(from_configdict(config), SIZE)
  assert sorted(crop) == sorted(whole) and len(crop) == 4  # one down, two up, one in the middle
  assert sorted(crop.values()) == [4, 4, 4, 4] and sorted(whole.values()) == [8, 8, 8, 8]
  config.data.train_crop = 0  # without crops the sides are the input's own: no 4² level at 16²
  assert sorted(_attention_blocks(from_configdict(config), SIZE).values()) == [8]


def test_image_size_must_divide_by_the_downsampling():
  config = from_configdict(get_default_config())
  with pytest.raises(UserError, match='not divisible'):
    mutils.create_model(config, 100)


def test_time_embedding():
  emb = sinusoidal_embedding(jnp.array([0.0, 0.5]), 9)
  assert emb.shape == (2, 9)
  np.testing.assert_allclose(emb[0, :4], 0.0)  # sin(0)
  np.testing.assert_allclose(emb[0, 4:8], 1.0)  # cos(0)


@pytest.mark.slow
@pytest.mark.parametrize('shape,features', [((2, 5, 7, 3), 4), ((1, 4, 4, 6), 6)])
def test_upsample_conv_is_a_conv_of_the_upsampled_input(shape, features):
  """UpsampleConv (the conv on the low-resolution grid) against nn.Conv on upsample_nearest(x), with
  the same parameters: equal outputs and gradients, on non-square sizes and C_in != C_out."""
  from esm.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), shape)
  fast = layers.UpsampleConv(features)
  params = fast.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
  plain = layers.conv(features, 3, jnp.float32)
  assert jax.tree.map(jnp.shape, plain.init(jax.random.key(1), layers.upsample_nearest(x))) == \
      jax.tree.map(jnp.shape, params)
  w = jax.random.normal(jax.random.key(3), (shape[0], 2 * shape[1], 2 * shape[2], features))
  loss_fast = lambda p, x: jnp.sum(fast.apply(p, x) * w)
  loss_plain = lambda p, x: jnp.sum(plain.apply(p, layers.upsample_nearest(x)) * w)
  np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, layers.upsample_nearest(x)),
                             atol=1e-5)
  for got, want in zip(jax.tree.leaves(jax.grad(loss_fast, (0, 1))(params, x)),
                       jax.tree.leaves(jax.grad(loss_plain, (0, 1))(params, x))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_attention_is_single_head_dot_product_attention():
  from esm.models import layers  # pylint: disable=g-import-not-at-top
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 9, 5)) for i in range(3))
  want = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]
  np.testing.assert_allclose(layers.attention(q, k, v), want, atol=1e-6)
