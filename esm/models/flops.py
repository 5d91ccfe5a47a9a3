"""Analytic FLOP counts of the U-Net (esm/models/unet.py): for MFU figures and for sizing runs.

Counted: the multiply-adds of every convolution, dense layer and attention product, as 2 FLOPs
each, in the form the code computes them (the up-sampling convolution of `layers.UpsampleConv`
as 2x2 windows of the low-resolution grid). A convolution with 'SAME' padding counts the taps
that fall inside the image only, as XLA's cost analysis does. Not counted: normalisation,
activations, sums and the optimiser (a few percent at the widths of the paper; the test checks
the total against XLA's own count of a small model). A training step costs 3x the forward pass
(forward, gradient of the input, gradient of the weights), the usual convention for MFU.
"""

from esm.models.dual_stream import ScoreNetConfig
from esm.models.unet import UNetConfig, attention_levels


def _valid_taps(side: int, kernel: int, stride: int) -> int:
  """Sum over the output positions of one axis of the kernel taps that land inside the input,
  for 'SAME' padding (jax.lax's: total max((out-1)·stride + kernel - side, 0), low half first)."""
  out = -(-side // stride)
  low = max((out - 1) * stride + kernel - side, 0) // 2
  return sum(1 for o in range(out) for j in range(kernel) if 0 <= o * stride + j - low < side)


def conv_flops(side: int, c_in: int, c_out: int, kernel: int, stride: int = 1) -> int:
  """One image through a square 'SAME' convolution on a side x side input."""
  return 2 * _valid_taps(side, kernel, stride) ** 2 * c_in * c_out


def upsample_conv_flops(side: int, c_in: int, c_out: int) -> int:
  """layers.UpsampleConv: each pixel of the 2x-upsampled output reads a 2x2 window of the input
  (padded by one), so 4 taps instead of the 9 of a 3x3 conv of the upsampled input."""
  return 2 * (2 * side) ** 2 * 4 * c_in * c_out


def dense_flops(rows: int, c_in: int, c_out: int) -> int:
  return 2 * rows * c_in * c_out


def attention_flops(side: int, c: int) -> int:
  """layers.AttnBlock on side² tokens of c channels: q, k, v, out and the two token products."""
  tokens = side * side
  return 4 * dense_flops(tokens, c, c) + 2 * 2 * tokens * tokens * c


def resnet_block_flops(side: int, c_in: int, c_out: int, temb_ch: int, resample=None) -> int:
  """layers.ResnetBlock at input side `side` (resample 'up' doubles it, 'down' halves it)."""
  out_side = {'up': 2 * side, 'down': side // 2, None: side}[resample]
  if resample == 'up':
    first = upsample_conv_flops(side, c_in, c_out)
  else:  # 'down' pools before the conv
    first = conv_flops(out_side, c_in, c_out, 3)
  skip = conv_flops(out_side, c_in, c_out, 1) if c_in != c_out else 0
  return first + conv_flops(out_side, c_out, c_out, 3) + dense_flops(1, temb_ch, c_out) + skip


def unet_forward_flops(cfg: UNetConfig, image_size: int) -> int:
  """FLOPs of one image through UNet.__call__ (the same walk over levels and skips)."""
  temb = 4 * cfg.ch
  attends = attention_levels(cfg, image_size)
  attn = lambda level, side, c: attention_flops(side, c) if level in attends else 0
  total = dense_flops(1, cfg.ch, temb) + dense_flops(1, temb, temb)
  total += conv_flops(image_size, 3, cfg.ch, 3)
  side, c, skips = image_size, cfg.ch, [cfg.ch]
  for level, mult in enumerate(cfg.ch_mult):
    for _ in range(cfg.num_res_blocks):
      total += resnet_block_flops(side, c, cfg.ch * mult, temb) + attn(level, side, cfg.ch * mult)
      c = cfg.ch * mult
      skips.append(c)
    if level != len(cfg.ch_mult) - 1:
      if cfg.resblock_type == 'biggan':
        total += resnet_block_flops(side, c, c, temb, 'down')
      elif cfg.resamp_with_conv:
        total += conv_flops(side, c, c, 3, stride=2)
      side //= 2
      skips.append(c)
  total += 2 * resnet_block_flops(side, c, c, temb) + attention_flops(side, c)
  for level, mult in reversed(list(enumerate(cfg.ch_mult))):
    for _ in range(cfg.num_res_blocks + 1):
      c_in = c + skips.pop()
      c = cfg.ch * mult
      total += resnet_block_flops(side, c_in, c, temb) + attn(level, side, c)
    if level != 0:
      if cfg.resblock_type == 'biggan':
        total += resnet_block_flops(side, c, c, temb, 'up')
      elif cfg.resamp_with_conv:
        total += upsample_conv_flops(side, c, c)
      side *= 2
  return total + conv_flops(image_size, cfg.ch, cfg.out_ch, 3)


def net_forward_flops(cfg: ScoreNetConfig, image_size: int) -> int:
  """One image through the network: both streams of the dual-stream model, or the one of DSM."""
  return (2 if cfg.dual else 1) * unet_forward_flops(cfg.unet, image_size)


def train_flops_per_image(cfg: ScoreNetConfig, image_size: int) -> int:
  """One training image: forward and backward (3x forward)."""
  return 3 * net_forward_flops(cfg, image_size)
