"""The dual-stream network of paper Fig. 1 and the single-stream SGM baseline.

Stream 1 predicts the noise expectation ε_θ; stream 2 is an independent copy of the same U-Net
(no shared parameters) whose raw output v becomes σ²_θ through `variance_from_raw`.
"""

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from esm.errors import UserError
from esm.losses import NetOutput
from esm.models.unet import UNet, UNetConfig, check_image_size
from esm.sde import VPSchedule, _per_example

VAR_PARAMS = ('scaled', 'direct')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  unet: UNetConfig
  dual: bool  # True: ESM dual stream; False: the single-stream DSM (SGM) baseline
  var_param: str = 'scaled'
  log_var_bound: float = 12.0

  @classmethod
  def from_config(cls, config) -> 'ModelConfig':
    m = config.model
    if m.var_param not in VAR_PARAMS:
      raise UserError(f'model.var_param: expected one of {VAR_PARAMS}, got {m.var_param!r}')
    if config.loss.kind not in ('esm', 'dsm'):
      raise UserError(f"loss.kind: expected 'esm' or 'dsm', got {config.loss.kind!r}")
    return cls(unet=UNetConfig.from_config(m), dual=config.loss.kind == 'esm',
               var_param=m.var_param, log_var_bound=float(m.log_var_bound))


class ScoreNet(nn.Module):
  """x_i, t -> (ε, raw v) for the dual stream, or (ε, None) for the single stream."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    eps = UNet(self.config.unet, name='eps_stream')(x, t, train)
    if not self.config.dual:
      return eps, None
    return eps, UNet(self.config.unet, name='var_stream')(x, t, train)


def variance_from_raw(v, alpha_bar, var_param: str, bound: float):
  """log σ²_θ from the raw stream-2 output v (DESIGN, ambiguity 1).

  'direct': σ² = exp(v); 'scaled': σ² = (1-ᾱ_i) exp(v), so v = 0 reproduces DSM. v is soft-clipped
  to (-bound, bound) with bound·tanh(v/bound), which keeps σ² finite and positive by construction.
  """
  v = bound * jnp.tanh(v / bound)
  if var_param == 'direct':
    return v
  return v + jnp.log1p(-_per_example(alpha_bar, v.ndim))


def get_net_fn(model: ScoreNet, sde: VPSchedule) -> Callable:
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


def create_model(config, image_size: int) -> ScoreNet:
  model_cfg = ModelConfig.from_config(config)
  check_image_size(model_cfg.unet, image_size)
  return ScoreNet(model_cfg)


def init_params(model: ScoreNet, rng, image_size: int):
  """Float32 parameters; jitted, because eager initialisation of a U-Net is very slow on CPU."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(lambda r: model.init({'params': r}, x, jnp.zeros((1,)), False)['params'])(rng)


def count_params(model: ScoreNet, image_size: int) -> int:
  """Parameter count through jax.eval_shape: nothing is allocated, so paper scale costs nothing."""
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), image_size))
  return int(sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)))
