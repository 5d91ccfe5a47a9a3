"""The dual-stream network of paper Fig. 1 and the single-stream SGM baseline.

Stream 1 predicts the noise expectation ε_θ; stream 2 is an independent copy of the same U-Net
(no shared parameters) whose raw output v becomes σ²_θ through `variance_from_raw`.

With `scan_streams` the two streams are one `nn.scan` of length 2 over stacked parameters
({'streams': {'unet': ...}}, stream 1 at index 0): the same function, with the U-Net in the
compiled program once instead of twice. `convert_params` moves parameters between this layout,
that of `scan_blocks` (esm/models/unet.py) and the default one.
"""

import dataclasses
from typing import Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from esm.errors import UserError
from esm.models.unet import (DTYPES, RESBLOCK_TYPES, UNet, UNetConfig, scanned_runs, stack_blocks,
                             unstack_blocks)
from esm.sde import VPSDE, per_example

VAR_PARAMS = ('scaled', 'direct')
STREAMS = ('eps_stream', 'var_stream')  # the two U-Nets, in the order of the stacked layout
STACKED = 'streams'


class NetOutput(NamedTuple):
  """What every net_fn returns (the U-Nets here and the MLPs of esm/analysis alike)."""
  eps: jax.Array  # ε_θ(x_i, i), the noise expectation (stream 1)
  log_var: Optional[jax.Array]  # log σ²_θ(x_i, i) (stream 2); None for a single-stream DSM model


# log σ² = log(1-ᾱ_i) + v with |v| < bound ('scaled'), and the loss uses exp(±log σ²). float32 and
# bfloat16 overflow past exp(88.7); 60 leaves 28 nats for log(1-ᾱ_i), which is >= -16.7 wherever
# 1-ᾱ_i is a positive float32.
MAX_LOG_VAR_BOUND = 60.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """config.model: the U-Net of each stream and the variance stream's parameterisation."""
  ch: int
  ch_mult: Tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: Tuple[int, ...]
  dropout: float
  resblock_type: str
  resamp_with_conv: bool
  num_groups: int
  var_param: str
  log_var_bound: float
  dtype: str
  scan_streams: bool  # the two streams as one scan over stacked parameters (module doc)
  scan_blocks: bool  # runs of identical blocks of a level as one scan (esm/models/unet.py)

  def __post_init__(self):
    if self.resblock_type not in RESBLOCK_TYPES:
      raise UserError(f'model.resblock_type: expected one of {RESBLOCK_TYPES}, got '
                      f'{self.resblock_type!r}')
    if self.dtype not in DTYPES:
      raise UserError(f'model.dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}')
    if self.var_param not in VAR_PARAMS:
      raise UserError(f'model.var_param: expected one of {VAR_PARAMS}, got {self.var_param!r}')
    if not 0 < self.log_var_bound <= MAX_LOG_VAR_BOUND:
      raise UserError(f'model.log_var_bound: expected 0 < bound <= {MAX_LOG_VAR_BOUND:g} '
                      f'(exp(±log σ²) must stay finite in float32/bfloat16), got {self.log_var_bound}')
    for name in ('ch', 'num_res_blocks', 'num_groups'):
      if getattr(self, name) < 1:
        raise UserError(f'model.{name}: expected a positive integer, got {getattr(self, name)}')
    if not self.ch_mult or min(self.ch_mult) < 1:
      raise UserError(f'model.ch_mult: expected positive multipliers, got {self.ch_mult}')
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f'model.dropout: expected a rate in [0, 1), got {self.dropout}')

  @property
  def unet(self) -> UNetConfig:
    """The U-Net of one stream."""
    return UNetConfig(ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                      attn_resolutions=self.attn_resolutions, dropout=self.dropout,
                      resblock_type=self.resblock_type, resamp_with_conv=self.resamp_with_conv,
                      num_groups=self.num_groups, dtype=self.dtype, scan_blocks=self.scan_blocks)


@dataclasses.dataclass(frozen=True)
class ScoreNetConfig:
  """What ScoreNet builds: one U-Net per stream, and whether there is a variance stream."""
  unet: UNetConfig
  dual: bool  # True: ESM dual stream; False: the single-stream DSM (SGM) baseline
  var_param: str = 'scaled'
  log_var_bound: float = 12.0
  scan_streams: bool = False

  @classmethod
  def from_model_config(cls, model: ModelConfig, dual: bool) -> 'ScoreNetConfig':
    return cls(unet=model.unet, dual=dual, var_param=model.var_param,
               log_var_bound=model.log_var_bound, scan_streams=model.scan_streams)


class _StreamStep(nn.Module):
  """The body of the scan over the two streams: one U-Net on the shared (x, t); no carry."""
  config: UNetConfig
  train: bool

  @nn.compact
  def __call__(self, carry, x, t):
    return carry, UNet(self.config, name='unet')(x, t, self.train)


class ScoreNet(nn.Module):
  """x_i, t -> (ε, raw v) for the dual stream, or (ε, None) for the single stream."""
  config: ScoreNetConfig

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    c = self.config
    if c.dual and c.scan_streams:
      streams = nn.scan(_StreamStep, variable_axes={'params': 0}, in_axes=(nn.broadcast, nn.broadcast),
                        split_rngs={'params': True, 'dropout': True}, length=len(STREAMS))
      _, out = streams(c.unet, train, name=STACKED)(None, x, t)
      return out[0], out[1]
    eps = UNet(c.unet, name=STREAMS[0])(x, t, train)
    if not c.dual:
      return eps, None
    return eps, UNet(c.unet, name=STREAMS[1])(x, t, train)


def canonical_params(params):
  """Parameters of any layout (`scan_streams`, `scan_blocks` or neither) -> one U-Net per stream
  ({'eps_stream'[, 'var_stream']}) and one module per block: the default layout."""
  if STACKED in params:
    params = {s: jax.tree.map(lambda a, k=k: a[k], params[STACKED]['unet'])
              for k, s in enumerate(STREAMS)}
  return {name: unstack_blocks(p) for name, p in params.items()}


def convert_params(params, cfg: ScoreNetConfig, image_size: int):
  """Parameters of any layout -> the layout of `cfg` (its scan_streams and scan_blocks): how a
  checkpoint written under one layout loads under another. The values are the same, moved."""
  params = canonical_params(params)
  if cfg.unet.scan_blocks:
    runs = scanned_runs(cfg.unet, image_size)
    params = {name: stack_blocks(p, runs) for name, p in params.items()}
  if cfg.dual and cfg.scan_streams:
    params = {STACKED: {'unet': jax.tree.map(lambda *a: jnp.stack(a), *(params[s] for s in STREAMS))}}
  return params


def variance_from_raw(v, alpha_bar, var_param: str, bound: float):
  """log σ²_θ from the raw stream-2 output v (docs/method.md, the variance parameterisation).

  'direct': σ² = exp(v); 'scaled': σ² = (1-ᾱ_i) exp(v), so v = 0 reproduces DSM. v is soft-clipped
  to (-bound, bound) with bound·tanh(v/bound), which keeps σ² finite and positive by construction.
  """
  v = bound * jnp.tanh(v / bound)
  if var_param == 'direct':
    return v
  return v + jnp.log1p(-per_example(alpha_bar, v.ndim))


def get_net_fn(model: ScoreNet, sde: VPSDE) -> Callable:
  """net_fn(params, x_i, i, *, train=False, rng=None) -> NetOutput(eps, log_var) with i in 1..T."""
  cfg = model.config

  def net_fn(params, x, i, *, train: bool = False, rng=None):
    i = jnp.broadcast_to(jnp.asarray(i, jnp.int32), (x.shape[0],))
    rngs = {'dropout': rng} if train else {}
    eps, v = model.apply({'params': params}, x, sde.time(i), train, rngs=rngs)
    if v is None:
      return NetOutput(eps, None)
    return NetOutput(eps, variance_from_raw(v, sde.alpha_bar[i], cfg.var_param, cfg.log_var_bound))

  return net_fn
