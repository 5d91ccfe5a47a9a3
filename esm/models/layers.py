"""Building blocks of the DDPM++/NCSN++-family U-Net: time embedding, residual blocks, attention,
resampling. All modules are NHWC and compute in `dtype` with float32 parameters."""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def sinusoidal_embedding(t, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
  """Transformer-style sinusoidal embedding of a continuous time t in [0, 1], shape [B] -> [B, dim].

  t is multiplied by `scale` first so that t = i/T recovers the integer-step frequencies of DDPM.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = (jnp.asarray(t, jnp.float32) * scale)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _groups(channels: int, num_groups: int) -> int:
  """The largest group count <= num_groups that divides the channels."""
  g = min(num_groups, channels)
  while channels % g:
    g -= 1
  return g


def group_norm(channels: int, num_groups: int, dtype: Dtype) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=_groups(channels, num_groups), dtype=dtype, param_dtype=jnp.float32)


def conv(features: int, kernel: int, dtype: Dtype, stride: int = 1, init_scale: float = 1.0,
         name: Optional[str] = None) -> nn.Conv:
  """A 'SAME' conv with DDPM's variance-scaling init (init_scale 0 gives a zero-initialised conv)."""
  init = (nn.initializers.zeros if init_scale == 0 else
          nn.initializers.variance_scaling(init_scale, 'fan_avg', 'uniform'))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding='SAME', dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=init, name=name)


def upsample_nearest(x):
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), 'nearest')


def downsample_avg(x):
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """Nearest 2x upsampling, optionally followed by a 3x3 conv."""
  with_conv: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = upsample_nearest(x)
    return conv(x.shape[-1], 3, self.dtype)(x) if self.with_conv else x


class Downsample(nn.Module):
  """2x downsampling by a strided 3x3 conv or by average pooling."""
  with_conv: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return conv(x.shape[-1], 3, self.dtype, stride=2)(x) if self.with_conv else downsample_avg(x)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, with the time embedding added in between and dropout before the
  second conv. With `resample` set ('up' or 'down') it is a BigGAN-style block that resamples both
  paths inside the block."""
  out_ch: int
  dropout: float
  num_groups: int
  resample: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool):
    resize = {'up': upsample_nearest, 'down': downsample_avg, None: lambda v: v}[self.resample]
    h = nn.silu(group_norm(x.shape[-1], self.num_groups, self.dtype)(x))
    h, skip = resize(h), resize(x)
    h = conv(self.out_ch, 3, self.dtype)(h)
    h = h + nn.Dense(self.out_ch, dtype=self.dtype, param_dtype=jnp.float32)(nn.silu(temb))[:, None, None]
    h = nn.silu(group_norm(self.out_ch, self.num_groups, self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    # Zero-initialised last conv: every block starts as the identity, which stabilises deep U-Nets.
    h = conv(self.out_ch, 3, self.dtype, init_scale=0.0)(h)
    if skip.shape[-1] != self.out_ch:
      skip = conv(self.out_ch, 1, self.dtype)(skip)
    return (skip + h) / math.sqrt(2.0)


class AttnBlock(nn.Module):
  """Single-head self-attention over all spatial positions, with a residual connection."""
  num_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = group_norm(c, self.num_groups, self.dtype)(x).reshape(b, h * w, c)
    dense = lambda name, scale=1.0: nn.DenseGeneral(
        c, dtype=self.dtype, param_dtype=jnp.float32, name=name,
        kernel_init=(nn.initializers.zeros if scale == 0 else nn.initializers.lecun_normal()))
    q, k, v = dense('q')(y), dense('k')(y), dense('v')(y)
    y = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]
    y = dense('out', scale=0.0)(y)
    return (x + y.reshape(b, h, w, c)) / math.sqrt(2.0)
