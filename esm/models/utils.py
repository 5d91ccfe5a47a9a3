"""Model construction shared by training, evaluation and the benchmarks (score_sde's `mutils`).

`build` turns a config into the schedule, the network, its net_fn, the loss and the optimiser;
`init_state` makes the TrainState that checkpoints hold, and `abstract_state` its shapes, which is
what a reader (evaluation) needs to restore one.
"""

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from esm.losses import get_loss_fn
from esm.models.dual_stream import ScoreNet, ScoreNetConfig, convert_params, get_net_fn
from esm.models.unet import check_image_size
from esm.sde import VPSDE, get_sde
from esm.train_state import TrainState, make_optimiser


class Built(NamedTuple):
  """The pieces of one configured model."""
  sde: VPSDE
  model: ScoreNet
  net_fn: Callable  # (params, x_i, i, *, train, rng) -> NetOutput
  loss_fn: Callable  # (params, x_0, rng, train=True) -> (loss, {name: logged term})
  tx: optax.GradientTransformation


def create_model(config, image_size: int) -> ScoreNet:
  """The network for image_size² inputs; model.attn_resolutions are sides of the training input
  (the crop where data.train_crop is set), so crops and whole images attend at the same levels."""
  model_cfg = ScoreNetConfig.from_model_config(config.model, dual=config.loss.dual_stream)
  unet = dataclasses.replace(model_cfg.unet, attn_side=config.data.train_crop or image_size)
  check_image_size(unet, image_size)
  return ScoreNet(dataclasses.replace(model_cfg, unet=unet))


def build(config, image_size: int) -> Built:
  sde = get_sde(config.sde)
  model = create_model(config, image_size)
  net_fn = get_net_fn(model, sde)
  loss_fn = get_loss_fn(net_fn, sde, config.loss.kind)
  tx = make_optimiser(config.train.lr, config.train.warmup_steps, config.train.grad_clip)
  return Built(sde, model, net_fn, loss_fn, tx)


def _example_input(image_size: int):
  return jnp.zeros((1, image_size, image_size, 3), jnp.float32)


def init_params(model: ScoreNet, rng, image_size: int):
  """Float32 parameters; jitted, because eager initialisation of a U-Net is very slow on CPU."""
  x = _example_input(image_size)
  return jax.jit(lambda r: model.init({'params': r}, x, jnp.zeros((1,)), False)['params'])(rng)


def count_params(model: ScoreNet, image_size: int) -> int:
  """Parameter count through jax.eval_shape: nothing is allocated, so paper scale costs nothing."""
  return _count_params(model.config, image_size)


@functools.lru_cache(maxsize=64)  # tracing the init costs about a second per scorer otherwise
def _count_params(model_cfg: ScoreNetConfig, image_size: int) -> int:
  shapes = jax.eval_shape(lambda: init_params(ScoreNet(model_cfg), jax.random.key(0), image_size))
  return int(sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)))


def logged_metric_names(loss_fn: Callable, params, image_size: int) -> tuple:
  """The names of the terms the loss logs, read from its output (no hand-kept list)."""
  _, terms = jax.eval_shape(loss_fn, params, _example_input(image_size), jax.random.key(0))
  return tuple(terms)


def init_state(config, built: Built, image_size: int) -> TrainState:
  """The state at step 0: parameters from fold_in(key(seed), 0)."""
  params = init_params(built.model, jax.random.fold_in(jax.random.key(config.seed), 0), image_size)
  names = logged_metric_names(built.loss_fn, params, image_size)
  return TrainState.create(params, built.tx, names)


def abstract_state(config, built: Built, image_size: int):
  """Shapes and dtypes of init_state's result, without computing anything."""
  return jax.eval_shape(lambda: init_state(config, built, image_size))


def convert_state(state: TrainState, config, image_size: int) -> TrainState:
  """A TrainState of any parameter layout (model.scan_streams, model.scan_blocks) in the layout of
  `config`: the parameters, the EMA parameters and every parameter-shaped part of the optimiser
  state (Adam's moments). A checkpoint restored under the layout it was written in (abstract_state
  of its own config) then serves a config that scans differently."""
  model_cfg = create_model(config, image_size).config
  convert = lambda tree: convert_params(tree, model_cfg, image_size)
  like_params = jax.tree.structure(state.params)

  def visit(node):
    if isinstance(node, dict) and jax.tree.structure(node) == like_params:
      return convert(node)
    if isinstance(node, tuple) and hasattr(node, '_fields'):  # optax's NamedTuple states
      return type(node)(*map(visit, node))
    if isinstance(node, (tuple, list)):
      return type(node)(map(visit, node))
    return node

  return state.replace(params=convert(state.params), ema_params=convert(state.ema_params),
                       opt_state=visit(state.opt_state))
