"""One stream: a DDPM++/NCSN++-family U-Net (Song et al. 2021b) in Flax linen."""

import dataclasses
from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp

from esm.errors import UserError
from esm.models import layers

RESBLOCK_TYPES = ('biggan', 'ddpm')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  ch: int = 128
  ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Tuple[int, ...] = (16,)
  dropout: float = 0.1
  resblock_type: str = 'biggan'
  resamp_with_conv: bool = True
  num_groups: int = 32
  dtype: str = 'float32'
  out_ch: int = 3

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


def check_image_size(cfg: UNetConfig, image_size: int) -> None:
  if image_size % cfg.downsampling_factor:
    raise UserError(f'data.image_size: {image_size} is not divisible by the U-Net downsampling factor '
                    f'{cfg.downsampling_factor} (2^(len(model.ch_mult)-1))')


class UNet(nn.Module):
  """x_i [B,H,W,3], t [B] in [0,1] -> [B,H,W,out_ch] in float32."""
  config: UNetConfig

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    c = self.config
    dtype = DTYPES[c.dtype]
    block = lambda out_ch, resample=None: layers.ResnetBlock(
        out_ch, c.dropout, c.num_groups, resample=resample, dtype=dtype)
    attn = lambda: layers.AttnBlock(c.num_groups, dtype=dtype)

    temb = layers.sinusoidal_embedding(t, c.ch)
    temb = nn.Dense(4 * c.ch, dtype=dtype, param_dtype=jnp.float32)(temb)
    temb = nn.Dense(4 * c.ch, dtype=dtype, param_dtype=jnp.float32)(nn.silu(temb))

    h = layers.conv(c.ch, 3, dtype)(x.astype(dtype))
    skips = [h]
    for level, mult in enumerate(c.ch_mult):
      for _ in range(c.num_res_blocks):
        h = block(c.ch * mult)(h, temb, train)
        if h.shape[1] in c.attn_resolutions:
          h = attn()(h)
        skips.append(h)
      if level != len(c.ch_mult) - 1:
        if c.resblock_type == 'biggan':
          h = block(h.shape[-1], 'down')(h, temb, train)
        else:
          h = layers.Downsample(c.resamp_with_conv, dtype)(h)
        skips.append(h)

    h = block(h.shape[-1])(h, temb, train)
    h = attn()(h)
    h = block(h.shape[-1])(h, temb, train)

    for level, mult in reversed(list(enumerate(c.ch_mult))):
      for _ in range(c.num_res_blocks + 1):
        h = block(c.ch * mult)(jnp.concatenate([h, skips.pop()], axis=-1), temb, train)
        if h.shape[1] in c.attn_resolutions:
          h = attn()(h)
      if level != 0:
        if c.resblock_type == 'biggan':
          h = block(h.shape[-1], 'up')(h, temb, train)
        else:
          h = layers.Upsample(c.resamp_with_conv, dtype)(h)
    assert not skips, 'every skip connection must be consumed'

    h = layers.group_norm(h.shape[-1], c.num_groups, dtype, act=True)(h)
    h = layers.conv(c.out_ch, 3, dtype, init_scale=0.0)(h)
    return h.astype(jnp.float32)
