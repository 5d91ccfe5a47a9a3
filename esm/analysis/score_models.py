"""Small MLP score models for vector data, trained with the project's own esm_loss / dsm_loss.

The one-stream model (DSM, the SGM baseline) predicts ε_θ. The two-stream model (ESM) adds an
independent MLP whose raw output v becomes log σ²_θ = log(1-ᾱ_i) + 12·tanh(v/12) through the U-Net's
own `variance_from_raw` ('scaled'), one variance per dimension. Both take t = i/T through
`sinusoidal_embedding`, like the U-Net. Training is a jitted lax.scan over chunks of Adam steps with
fresh data from the mixture each step.
"""

import dataclasses
import time
from typing import Callable, Dict, List, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from esm.analysis import gmm as gmm_lib
from esm.errors import UserError
from esm.losses import LOSS_KINDS, get_loss_fn
from esm.models.dual_stream import NetOutput, variance_from_raw
from esm.models.layers import sinusoidal_embedding
from esm.sde import VPSDE, dsm_score, esm_score


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  dim: int  # data dimension d
  two_stream: bool  # True: ε and σ² streams (ESM); False: ε only (DSM)
  hidden: int = 128  # width of every hidden layer
  num_blocks: int = 3  # residual blocks per stream
  time_dim: int = 64  # size of the sinusoidal time embedding
  log_var_bound: float = 12.0  # soft clip of v, as model.log_var_bound of the U-Net


class StreamMLP(nn.Module):
  """One stream: (x [B, d], t [B]) -> [B, out_dim], residual blocks with an additive time signal."""
  hidden: int
  num_blocks: int
  time_dim: int
  out_dim: int
  zero_out: bool = False  # zero-initialised output layer (stream 2 then starts at σ² = 1-ᾱ)

  @nn.compact
  def __call__(self, x, t):
    temb = nn.Dense(self.hidden)(sinusoidal_embedding(t, self.time_dim))
    temb = nn.Dense(self.hidden)(nn.silu(temb))
    h = nn.Dense(self.hidden)(x)
    for _ in range(self.num_blocks):
      z = nn.Dense(self.hidden)(nn.silu(h)) + nn.Dense(self.hidden)(nn.silu(temb))
      h = h + nn.Dense(self.hidden)(nn.silu(z))
    init = nn.initializers.zeros if self.zero_out else nn.initializers.lecun_normal()
    return nn.Dense(self.out_dim, kernel_init=init)(nn.silu(h))


class ScoreMLP(nn.Module):
  """x_i, t -> (ε, raw v) for two streams, or (ε, None) for one; the streams share no parameters."""
  config: MLPConfig

  @nn.compact
  def __call__(self, x, t):
    c = self.config
    eps = StreamMLP(c.hidden, c.num_blocks, c.time_dim, c.dim, name='eps_stream')(x, t)
    if not c.two_stream:
      return eps, None
    v = StreamMLP(c.hidden, c.num_blocks, c.time_dim, c.dim, zero_out=True, name='var_stream')(x, t)
    return eps, v


def init_params(model: ScoreMLP, rng: jax.Array):
  x = jnp.zeros((1, model.config.dim), jnp.float32)
  return model.init(rng, x, jnp.zeros((1,)))['params']


def get_net_fn(model: ScoreMLP, sde: VPSDE) -> Callable:
  """net_fn(params, x_i, i, *, train=False, rng=None) -> NetOutput, the signature of esm/losses."""
  bound = model.config.log_var_bound

  def net_fn(params, x, i, *, train: bool = False, rng=None):
    del train, rng  # no dropout in these models
    i = jnp.broadcast_to(jnp.asarray(i, jnp.int32), (x.shape[0],))
    eps, v = model.apply({'params': params}, x, sde.time(i))
    if v is None:
      return NetOutput(eps, None)
    return NetOutput(eps, variance_from_raw(v, sde.alpha_bar[i], 'scaled', bound))

  return net_fn


def _score(out: NetOutput, alpha_bar, form: str):
  if form == 'esm':
    return esm_score(out.eps, jnp.exp(out.log_var), alpha_bar)
  return dsm_score(out.eps, alpha_bar)


def _check_form(form: str) -> None:
  if form not in LOSS_KINDS:
    raise UserError(f'score form: expected one of {LOSS_KINDS}, got {form!r}')


def get_score_fn(net_fn: Callable, sde: VPSDE, form: str) -> Callable:
  """score(params, x, i) -> [B, d]: 'esm' is eq. 3, -√(1-ᾱ)ε/σ²; 'dsm' is eq. 4, -ε/√(1-ᾱ)."""
  _check_form(form)

  def score_fn(params, x, i):
    return _score(net_fn(params, x, i), sde.alpha_bar[i], form)

  return score_fn


def get_scores_fn(net_fn: Callable, sde: VPSDE, forms: Dict[str, str]) -> Callable:
  """scores(params, x, i) -> {name: score} for several forms from one network evaluation."""
  for form in forms.values():
    _check_form(form)

  def scores_fn(params, x, i):
    out = net_fn(params, x, i)
    return {name: _score(out, sde.alpha_bar[i], form) for name, form in forms.items()}

  return scores_fn


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  num_steps: int = 3000  # Adam steps
  batch_size: int = 128  # fresh mixture samples per step
  lr: float = 1e-3  # peak learning rate of the cosine decay
  grad_clip: float = 1.0  # global-norm clipping
  chunk: int = 500  # steps per jitted lax.scan call (one progress line each)


def get_train_chunk_fn(loss_fn: Callable, data: gmm_lib.GaussianMixture,
                       optimiser: optax.GradientTransformation, batch_size: int,
                       chunk: int) -> Callable:
  """A jitted (params, opt_state, rng, start) -> (params, opt_state, losses [chunk]) of chunk steps.

  The per-step key is fold_in(rng, step), so a run is the same however it is chunked.
  """
  def step(carry, step_index):
    params, opt_state, rng = carry
    rng_step = jax.random.fold_in(rng, step_index)
    rng_data, rng_loss = jax.random.split(rng_step)
    x0 = gmm_lib.sample(data, rng_data, batch_size)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x0, rng_loss)
    updates, opt_state = optimiser.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, rng), loss

  @jax.jit
  def run_chunk(params, opt_state, rng, start):
    (params, opt_state, _), losses = jax.lax.scan(
        step, (params, opt_state, rng), start + jnp.arange(chunk))
    return params, opt_state, losses

  return run_chunk


class TrainResult(NamedTuple):
  params: dict
  losses: jax.Array  # [num_steps] training loss per step
  chunk_seconds: List[Tuple[float, float]]  # (wall, process CPU) per chunk; the first compiles


def train(model: ScoreMLP, sde: VPSDE, data: gmm_lib.GaussianMixture, kind: str,
          cfg: TrainConfig, rng: jax.Array) -> TrainResult:
  """Trains model with get_loss_fn(net_fn, sde, kind) and optax Adam on fresh mixture samples."""
  if kind == 'esm' and not model.config.two_stream:
    raise UserError("analysis: the 'esm' loss needs a two-stream model (MLPConfig.two_stream)")
  if cfg.num_steps < 1 or cfg.chunk < 1:
    raise UserError(f'analysis train: expected positive num_steps and chunk, got {cfg}')
  rng_init, rng_train = jax.random.split(rng)
  params = init_params(model, rng_init)
  loss_fn = get_loss_fn(get_net_fn(model, sde), sde, kind)
  schedule = optax.cosine_decay_schedule(cfg.lr, cfg.num_steps)
  optimiser = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(schedule))
  opt_state = optimiser.init(params)
  chunk = min(cfg.chunk, cfg.num_steps)
  run_chunk = get_train_chunk_fn(loss_fn, data, optimiser, cfg.batch_size, chunk)
  losses, chunk_seconds, done = [], [], 0
  start = time.perf_counter()
  while done < cfg.num_steps:
    wall, cpu = time.perf_counter(), time.process_time()
    # A last partial chunk runs whole: past num_steps the cosine schedule's rate is 0, so those
    # extra steps leave params unchanged, and no second chunk size is compiled.
    params, opt_state, chunk_losses = run_chunk(params, opt_state, rng_train, done)
    losses.append(np.asarray(chunk_losses[:cfg.num_steps - done]))  # also waits for the chunk
    chunk_seconds.append((time.perf_counter() - wall, time.process_time() - cpu))
    done = min(done + chunk, cfg.num_steps)
    rate = done / max(time.perf_counter() - start, 1e-9)
    logging.info('analysis train %s d=%d: %d/%d steps, loss %.4f, %.0f steps/s, ETA %.0fs', kind,
                 model.config.dim, done, cfg.num_steps, float(np.mean(losses[-1])), rate,
                 (cfg.num_steps - done) / rate)
  return TrainResult(params, jnp.asarray(np.concatenate(losses)), chunk_seconds)
