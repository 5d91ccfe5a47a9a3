"""One stream: a DDPM++/NCSN++-family U-Net (Song et al. 2021b) in Flax linen.

With `scan_blocks`, each run of consecutive residual blocks of a level whose inputs have the same
shape (with the attention block after each, where the level has one) is one `nn.scan` over stacked
parameters, named `Blocks_<first>-<last>[_<first attn>-<last attn>]` after the ResnetBlock_k and
AttnBlock_k it replaces: the same function, with each run's block compiled once. `stack_blocks`
and `unstack_blocks` convert a parameter tree between the two layouts.
"""

import collections
import dataclasses
import re
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
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
  attn_resolutions: Tuple[int, ...] = (16,)  # feature-map sides, measured at attn_side
  attn_side: int = 0  # the input side attn_resolutions refer to; 0: each input's own side
  dropout: float = 0.1
  resblock_type: str = 'biggan'
  resamp_with_conv: bool = True
  num_groups: int = 32
  dtype: str = 'float32'
  out_ch: int = 3
  scan_blocks: bool = False  # runs of identical blocks as one scan (module doc)

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


def attention_levels(cfg: UNetConfig, input_side: int) -> frozenset:
  """The levels (0: full resolution) whose blocks attend. Decided by level, not by the side an
  input reaches there, so a U-Net trained on crops attends at the same blocks on whole images."""
  side = cfg.attn_side or input_side
  return frozenset(l for l in range(len(cfg.ch_mult)) if side // 2 ** l in cfg.attn_resolutions)


def check_image_size(cfg: UNetConfig, image_size: int) -> None:
  if image_size % cfg.downsampling_factor:
    raise UserError(f'data.image_size: {image_size} is not divisible by the U-Net downsampling factor '
                    f'{cfg.downsampling_factor} (2^(len(model.ch_mult)-1))')


class _BlockStep(nn.Module):
  """The body of the scan over a run of blocks: [skip concatenated,] ResnetBlock [, AttnBlock]."""
  out_ch: int
  dropout: float
  num_groups: int
  attn: bool
  down: bool  # the down path: no skip input, and each block's output is kept (as a skip)
  train: bool
  dtype: layers.Dtype

  @nn.compact
  def __call__(self, h, temb, skip=None):
    if skip is not None:
      h = jnp.concatenate([h, skip], axis=-1)
    h = layers.ResnetBlock(self.out_ch, self.dropout, self.num_groups, dtype=self.dtype,
                           name='resnet')(h, temb, self.train)
    if self.attn:
      h = layers.AttnBlock(self.num_groups, dtype=self.dtype, name='attn')(h)
    return h, (h if self.down else None)


def _runs(h_ch: int, skip_chs: Sequence[int], out_ch: int, scan: bool) -> list:
  """Block indices of one level in runs: consecutive blocks whose inputs (h, skip) have the same
  channels and whose h keeps its shape (the scan's carry); single blocks without `scan`."""
  sig = [(h_ch if j == 0 else out_ch, s) for j, s in enumerate(skip_chs)]
  runs = []
  for j, g in enumerate(sig):
    if scan and runs and sig[runs[-1][-1]] == g and g[0] == out_ch:
      runs[-1].append(j)
    else:
      runs.append([j])
  return runs


class _Names:
  """Explicit module names in creation order, the ones flax would give (ResnetBlock_k, ...)."""

  def __init__(self):
    self.counts = collections.Counter()

  def take(self, kind: str, k: int = 1) -> int:
    """The index of the first of k new modules of `kind`."""
    self.counts[kind] += k
    return self.counts[kind] - k


class UNet(nn.Module):
  """x_i [B,H,W,3], t [B] in [0,1] -> [B,H,W,out_ch] in float32."""
  config: UNetConfig

  def _block(self, names: _Names, out_ch: int, resample=None) -> layers.ResnetBlock:
    c = self.config
    return layers.ResnetBlock(out_ch, c.dropout, c.num_groups, resample=resample,
                              dtype=DTYPES[c.dtype], name=f'ResnetBlock_{names.take("ResnetBlock")}')

  def _attn(self, names: _Names) -> layers.AttnBlock:
    return layers.AttnBlock(self.config.num_groups, dtype=DTYPES[self.config.dtype],
                            name=f'AttnBlock_{names.take("AttnBlock")}')

  def _scanned_run(self, names: _Names, h, temb, train: bool, out_ch: int, skips: list,
                   with_attn: bool):
    """k > 1 identical blocks as one scan; returns h and each block's output (None going up)."""
    c, k, down = self.config, len(skips), skips[0] is None
    r = names.take('ResnetBlock', k)
    name = f'Blocks_{r}-{r + k - 1}'
    if with_attn:
      a = names.take('AttnBlock', k)
      name += f'_{a}-{a + k - 1}'
    scan = nn.scan(_BlockStep, variable_axes={'params': 0}, length=k,
                   split_rngs={'params': True, 'dropout': True},
                   in_axes=(nn.broadcast,) if down else (nn.broadcast, 0))
    body = scan(out_ch, c.dropout, c.num_groups, with_attn, down, train, DTYPES[c.dtype], name=name)
    if down:
      h, ys = body(h, temb)
      return h, [ys[i] for i in range(k)]
    h, _ = body(h, temb, jnp.stack(skips))
    return h, [None] * k

  def _level(self, names: _Names, h, temb, train: bool, out_ch: int, skips: list,
             with_attn: bool):
    """h through one level's blocks, skips[j] (None on the down path) joining block j's input;
    returns h and the blocks' outputs."""
    outs = []
    for run in _runs(h.shape[-1], [0 if s is None else s.shape[-1] for s in skips], out_ch,
                     self.config.scan_blocks):
      if len(run) > 1:
        h, ys = self._scanned_run(names, h, temb, train, out_ch, [skips[j] for j in run], with_attn)
        outs += ys
        continue
      skip = skips[run[0]]
      h = self._block(names, out_ch)(h if skip is None else jnp.concatenate([h, skip], axis=-1),
                                     temb, train)
      h = self._attn(names)(h) if with_attn else h
      outs.append(h)
    return h, outs

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    c = self.config
    dtype = DTYPES[c.dtype]
    names = _Names()
    temb = layers.sinusoidal_embedding(t, c.ch)
    temb = nn.Dense(4 * c.ch, dtype=dtype, param_dtype=jnp.float32)(temb)
    temb = nn.Dense(4 * c.ch, dtype=dtype, param_dtype=jnp.float32)(nn.silu(temb))

    h = layers.conv(c.ch, 3, dtype)(x.astype(dtype))
    skips = [h]
    attends = attention_levels(c, x.shape[1])
    for level, mult in enumerate(c.ch_mult):
      h, outs = self._level(names, h, temb, train, c.ch * mult, [None] * c.num_res_blocks,
                            level in attends)
      skips += outs
      if level != len(c.ch_mult) - 1:
        if c.resblock_type == 'biggan':
          h = self._block(names, h.shape[-1], 'down')(h, temb, train)
        else:
          h = layers.Downsample(c.resamp_with_conv, dtype)(h)
        skips.append(h)

    h = self._block(names, h.shape[-1])(h, temb, train)
    h = self._attn(names)(h)
    h = self._block(names, h.shape[-1])(h, temb, train)

    for level, mult in reversed(list(enumerate(c.ch_mult))):
      h, _ = self._level(names, h, temb, train, c.ch * mult,
                         [skips.pop() for _ in range(c.num_res_blocks + 1)], level in attends)
      if level != 0:
        if c.resblock_type == 'biggan':
          h = self._block(names, h.shape[-1], 'up')(h, temb, train)
        else:
          h = layers.Upsample(c.resamp_with_conv, dtype)(h)
    assert not skips, 'every skip connection must be consumed'

    h = layers.group_norm(h.shape[-1], c.num_groups, dtype, act=True)(h)
    h = layers.conv(c.out_ch, 3, dtype, init_scale=0.0)(h)
    return h.astype(jnp.float32)


_RUN = re.compile(r'^Blocks_(\d+)-(\d+)(?:_(\d+)-(\d+))?$')


def _run_members(name: str) -> Optional[Tuple[list, list]]:
  """The ResnetBlock_k and AttnBlock_k names a Blocks_* run stands for; None for another name."""
  m = _RUN.match(name)
  if m is None:
    return None
  r0, r1, a0, a1 = m.groups()
  attn = [f'AttnBlock_{k}' for k in range(int(a0), int(a1) + 1)] if a0 else []
  return [f'ResnetBlock_{k}' for k in range(int(r0), int(r1) + 1)], attn


def scanned_runs(cfg: UNetConfig, image_size: int) -> list:
  """The Blocks_* names in the parameter tree of the `scan_blocks` U-Net (traced, not computed)."""
  model = UNet(dataclasses.replace(cfg, scan_blocks=True))
  x, t = jnp.zeros((1, image_size, image_size, 3)), jnp.zeros((1,))
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, x, t, False)['params'])
  return sorted(n for n in shapes if _RUN.match(n))


def stack_blocks(params, runs: Sequence[str]):
  """One U-Net's parameters with one module per block -> the `scan_blocks` layout whose runs are
  `runs` (scanned_runs)."""
  out = dict(params)
  stack = lambda names: jax.tree.map(lambda *a: jnp.stack(a), *(out.pop(n) for n in names))
  for name in runs:
    resnet, attn = _run_members(name)
    out[name] = {'resnet': stack(resnet), **({'attn': stack(attn)} if attn else {})}
  return out


def unstack_blocks(params):
  """One U-Net's parameters in the `scan_blocks` layout -> one module per block."""
  out = {}
  for name, sub in params.items():
    members = _run_members(name)
    if members is None:
      out[name] = sub
      continue
    for part, names in zip(('resnet', 'attn'), members):
      for k, member in enumerate(names):
        out[member] = jax.tree.map(lambda a, k=k: a[k], sub[part])
  return out
