"""esm/models/flops.py against XLA's own cost analysis (CPU, float32)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from configs import common
from configs.default import get_default_config
from esm.config import from_configdict
from esm import train as train_lib
from esm.models import flops
from esm.models import layers
from esm.models import utils as mutils
from esm.models.unet import UNet, UNetConfig


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


@pytest.mark.parametrize('side,kernel,stride', [(16, 3, 1), (16, 3, 2), (15, 3, 2), (9, 1, 1)])
def test_convolution_counts_the_taps_inside_the_image_as_xla(side, kernel, stride):
  x, w = jnp.zeros((1, side, side, 5)), jnp.zeros((kernel, kernel, 5, 7))
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), 'SAME',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert _xla_flops(conv, x, w) == flops.conv_flops(side, 5, 7, kernel, stride)


def test_upsampling_conv_and_attention():
  # XLA also counts the tap sums and the bias (UpsampleConv), the softmax and GroupNorm (attention).
  for module, x, want in ((layers.UpsampleConv(7), jnp.zeros((1, 32, 32, 5)),
                           flops.upsample_conv_flops(32, 5, 7)),
                          (layers.AttnBlock(8), jnp.zeros((1, 8, 8, 64)), flops.attention_flops(8, 64))):
    params = module.init(jax.random.key(0), x)
    got = _xla_flops(lambda p, x, m=module: m.apply(p, x), params, x)
    assert 1.0 <= got / want < 1.05, (module, got, want)


@pytest.mark.parametrize('cfg,size', [
    (UNetConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8), 16),
    (UNetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), num_groups=8), 32),
    (UNetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8,
                resblock_type='ddpm'), 32),
    # trained on 16² crops, applied to a whole 32² image: level 1 attends, at 16²
    (UNetConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8,
                attn_side=16), 32),
])
def test_unet_forward_is_xla_count_less_the_elementwise_work(cfg, size):
  model = UNet(cfg)
  x, t = jnp.zeros((1, size, size, 3)), jnp.zeros((1,))
  params = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, x, t, False)['params'])
  got = _xla_flops(lambda p, x, t: model.apply({'params': p}, x, t, False), params, x, t)
  # A missing block or attention would be at least 5% of these models.
  assert 1.0 <= got / flops.unet_forward_flops(cfg, size) < 1.06


@pytest.mark.slow
def test_train_step_is_three_forward_passes_of_both_streams():
  config = from_configdict(common.set_tiny_model(get_default_config()))
  size, batch = 16, 4
  built = mutils.build(config, size)
  state = mutils.abstract_state(config, built, size)
  step = train_lib.get_train_step_fn(built.loss_fn, config.train.ema_rate)
  got = _xla_flops(step, state, jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
                   jax.random.key(0))
  want = batch * flops.train_flops_per_image(built.model.config, size)
  assert want == batch * 3 * 2 * flops.unet_forward_flops(built.model.config.unet, size)
  assert 1.0 <= got / want < 1.12  # XLA adds the optimiser, the loss and the elementwise work


def test_the_paper_scale_counts():
  one_block = UNetConfig(num_res_blocks=1)
  per_image = 3 * 2 * flops.unet_forward_flops(one_block, 256)
  # XLA's CPU cost analysis of the two-block step measured 3.30 TFLOP per image on 2026-11-28
  # (docs/benchmarks.md, "One H200"), elementwise work included.
  two = 3 * 2 * flops.unet_forward_flops(dataclasses.replace(one_block, num_res_blocks=2), 256)
  assert 0.92 < two / 3.30e12 < 1.0
  assert 2.0e12 < per_image < two
