"""Building blocks of the DDPM++/NCSN++-family U-Net: time embedding, residual blocks, attention,
resampling. All modules are NHWC and compute in `dtype` with float32 parameters."""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def _group_stats(xf, groups: int):
  """Per-(example, group) mean and variance of x [B, ..., C], each [B, G]: the sums run over the
  spatial axes per channel first (channels stay the contiguous minor dimension), then over the
  channels of a group on the small [B, C] result. Fast variance E[x²] - E[x]², as flax."""
  b, c = xf.shape[0], xf.shape[-1]
  axes = tuple(range(1, xf.ndim - 1))
  n = math.prod(xf.shape[1:-1]) * (c // groups)
  s1 = jnp.sum(xf, axis=axes).reshape(b, groups, c // groups).sum(-1)
  s2 = jnp.sum(xf * xf, axis=axes).reshape(b, groups, c // groups).sum(-1)
  mean = s1 / n
  return mean, jnp.maximum(0.0, s2 / n - mean * mean)


def _per_channel(v, c: int, ndim: int, weights=None):
  """[B, G] -> [B, 1, .., 1, C]: each group's value repeated over its channels (times a per-channel
  weight), as a product with the 0/1 group-membership matrix. The product is exact, and XLA does
  not duplicate a dot into the full-size elementwise loops that read its result, as it does with
  cheap elementwise producers (an optimization_barrier does not stop that on CPU: it is removed
  before fusion). So this per-(example, channel) arithmetic runs once, not once per pixel; the
  GroupNorm gradient took 2.3x less time in the CPU-scale train step."""
  g = v.shape[-1]
  member = jnp.repeat(jnp.eye(g, dtype=v.dtype), c // g, axis=1)  # [G, C]
  if weights is not None:
    member = member * weights
  v = jnp.dot(v, member, precision=jax.lax.Precision.HIGHEST)
  return v.reshape((v.shape[0],) + (1,) * (ndim - 2) + (c,))


def _gn_forward(x, scale, bias, groups, eps, act, out_dtype):
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean, var = _group_stats(xf, groups)
  rstd = jax.lax.rsqrt(var + eps)
  c = x.shape[-1]
  y = (xf - _per_channel(mean, c, x.ndim)) * _per_channel(rstd, c, x.ndim, scale) + bias
  if act:
    y = nn.silu(y)
  return y.astype(out_dtype), (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _group_norm(x, scale, bias, groups, eps, act, out_dtype):
  return _gn_forward(x, scale, bias, groups, eps, act, out_dtype)[0]


def _group_norm_fwd(x, scale, bias, groups, eps, act, out_dtype):
  y, (mean, rstd) = _gn_forward(x, scale, bias, groups, eps, act, out_dtype)
  return y, (x, scale, bias, mean, rstd)


def _group_norm_bwd(groups, eps, act, out_dtype, res, dout):
  """The GroupNorm(+SiLU) gradient in two passes over the activations: one reduction of the
  per-(example, channel) sums of dy and dy·x over the spatial axes, one elementwise pass
  dx = A·dy + B·x + C with per-(example, channel) A and per-(example, group) B, C. SiLU's
  derivative is recomputed from x in both passes instead of being stored."""
  del eps, out_dtype
  # The barrier keeps XLA from merging this recomputation with the forward pass's (which would
  # store SiLU's sigmoid, a full-size tensor, from the forward pass to here).
  x, scale, bias, mean, rstd, dout = jax.lax.optimization_barrier(res + (dout,))
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  b, c, nd = x.shape[0], x.shape[-1], x.ndim
  axes = tuple(range(1, nd - 1))
  n = math.prod(x.shape[1:-1]) * (c // groups)
  mean_c, a = _per_channel(mean, c, nd), _per_channel(rstd, c, nd, scale)
  dy = dout.astype(jnp.float32)
  if act:
    y = (xf - mean_c) * a + bias
    sig = jax.nn.sigmoid(y)
    dy = dy * (sig * (1.0 + y * (1.0 - sig)))
  s_dy = jnp.sum(dy, axis=axes)  # [B, C]
  s_dyx = jnp.sum(dy * xf, axis=axes)  # [B, C]
  s_dyxhat = _per_channel(rstd, c, 2) * (s_dyx - mean_c.reshape(b, c) * s_dy)  # Σ over space of dy·x̂
  dscale = jnp.sum(s_dyxhat, axis=0)
  dbias = jnp.sum(s_dy, axis=0)
  group_mean = lambda v: (v.reshape(b, groups, c // groups).sum(-1) / n)
  m1 = group_mean(scale * s_dy)  # [B, G]: mean over the group of dy·γ
  m2 = group_mean(scale * s_dyxhat)  # [B, G]: mean over the group of dy·γ·x̂
  coef_x = -rstd * rstd * m2
  const = -rstd * m1 - coef_x * mean
  dx = a * dy + _per_channel(coef_x, c, nd) * xf + _per_channel(const, c, nd)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """GroupNorm over NHWC, optionally followed by SiLU (`act`): the same function and parameters as
  `nn.GroupNorm` (epsilon 1e-6, fast variance, float32 statistics), laid out for the CPU.

  flax's version reshapes to [..., groups, C/groups], whose minor dimension of C/groups (2 at 16
  channels and 8 groups) vectorises poorly; with autodiff through it and through SiLU, GroupNorm was
  about 40% of the executed-op time of the CPU-scale train step (this version's share: "Where the
  time goes" in docs/benchmarks.md).
  Here the statistics are per-channel sums over space combined into groups on the small [B, C]
  result, the normalisation is one elementwise pass with per-(example, channel) coefficients, and
  the gradient is written out (`_group_norm_bwd`).
  """
  num_groups: int
  dtype: Dtype = jnp.float32
  epsilon: float = 1e-6
  act: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return _group_norm(x, scale, bias, self.num_groups, self.epsilon, self.act, self.dtype)


def group_norm(channels: int, num_groups: int, dtype: Dtype, act: bool = False) -> GroupNorm:
  """GroupNorm with the largest group count <= num_groups dividing the channels; SiLU after it
  when `act`."""
  return GroupNorm(num_groups=_groups(channels, num_groups), dtype=dtype, act=act)


def _conv_init(init_scale: float):
  return (nn.initializers.zeros if init_scale == 0 else
          nn.initializers.variance_scaling(init_scale, 'fan_avg', 'uniform'))


def conv(features: int, kernel: int, dtype: Dtype, stride: int = 1, init_scale: float = 1.0,
         name: Optional[str] = None) -> nn.Conv:
  """A 'SAME' conv with DDPM's variance-scaling init (init_scale 0 gives a zero-initialised conv)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding='SAME', dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=_conv_init(init_scale), name=name)


# _TAPS[a, t, k]: 1 where row k of a 3x3 kernel, applied to a nearest-2x-upsampled image at an output
# row of parity a, reads low-resolution row i - 1 + a + t (t = 0, 1) for output row 2i + a.
_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


class UpsampleConv(nn.Module):
  """conv(features, 3)(upsample_nearest(x)) computed on the low-resolution grid: the same parameters
  (kernel [3, 3, C_in, C_out] and bias, same initialisation) and the same function.

  After nearest upsampling, each of the four output phases (row and column parity) of a 3x3 conv
  reads only a 2x2 window of the input, with weights that are sums of the 3x3 kernel's taps
  (`_TAPS`). So one 2x2 conv with 4·C_out outputs over the input padded by one pixel, interleaved
  into the 2x-sized output, does 16 multiply-adds per output pixel and channel pair instead of 36,
  and its gradients never touch the upsampled input."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    co = self.features
    kernel = self.param('kernel', _conv_init(1.0), (3, 3, c, co), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (co,), jnp.float32)
    # [tap row, tap col, C_in, (row parity, col parity, C_out)]: sums of 1-4 kernel taps
    phases = jnp.einsum('atk,bsl,klio->tsiabo', _TAPS, _TAPS, kernel,
                        precision=jax.lax.Precision.HIGHEST).reshape(2, 2, c, 4 * co)
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = jax.lax.conv_general_dilated(x, phases.astype(self.dtype), (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = y.reshape(b, h + 1, w + 1, 2, 2, co)  # phase (a, a') of output (2i+a, 2j+a') is at (i+a, j+a')
    rows = [jnp.stack([y[:, a:a + h, p:p + w, a, p] for p in range(2)], axis=3) for a in range(2)]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, co) + bias.astype(self.dtype)


def upsample_nearest(x):
  """Nearest 2x upsampling as a broadcast and a reshape (jax.image.resize gathers, and its gradient
  scatters); its gradient is a sum over the 2x2 blocks."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def downsample_avg(x):
  """2x2 average pooling, stride 2, as a reshape and a mean (the same values as nn.avg_pool)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Upsample(nn.Module):
  """Nearest 2x upsampling, optionally followed by a 3x3 conv."""
  with_conv: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      return UpsampleConv(x.shape[-1], self.dtype, name='Conv_0')(x)
    return upsample_nearest(x)


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
    h = group_norm(x.shape[-1], self.num_groups, self.dtype, act=True)(x)
    skip = resize(x)
    # Explicit names keep the parameter tree (Conv_0..2) whichever module computes the first conv.
    if self.resample == 'up':
      h = UpsampleConv(self.out_ch, self.dtype, name='Conv_0')(h)
    else:
      h = conv(self.out_ch, 3, self.dtype, name='Conv_0')(resize(h))
    h = h + nn.Dense(self.out_ch, dtype=self.dtype, param_dtype=jnp.float32)(nn.silu(temb))[:, None, None]
    h = group_norm(self.out_ch, self.num_groups, self.dtype, act=True)(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    # Zero-initialised last conv: every block starts as the identity, which stabilises deep U-Nets.
    h = conv(self.out_ch, 3, self.dtype, init_scale=0.0, name='Conv_1')(h)
    if skip.shape[-1] != self.out_ch:
      skip = conv(self.out_ch, 1, self.dtype, name='Conv_2')(skip)
    return (skip + h) / math.sqrt(2.0)


def attention(q, k, v):
  """Single-head softmax(q kᵀ / √C) v over [B, T, C] inputs: the function of
  jax.nn.dot_product_attention with one head (logits and softmax in float32, the probabilities cast
  back to v's dtype), written out because that function's general path, vmapped over head groups,
  made the attention block's forward + backward 5x slower in the CPU-scale train step."""
  logits = jnp.einsum('btc,bsc->bts', q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * (1.0 / math.sqrt(q.shape[-1])), axis=-1)
  return jnp.einsum('bts,bsc->btc', probs.astype(v.dtype), v)


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
    y = dense('out', scale=0.0)(attention(q, k, v))
    return (x + y.reshape(b, h, w, c)) / math.sqrt(2.0)
