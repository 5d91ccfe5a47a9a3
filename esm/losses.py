"""The ESM loss (eq. 10) of the dual-stream model and the DSM loss of the SGM baseline.

Both losses take a `net_fn(params, x_i, i, *, train, rng) -> NetOutput(eps, log_var)`
(esm/models/dual_stream.py); the DSM model returns log_var=None. Any network with that signature
works: the U-Nets of esm/models and the small MLPs of esm/analysis use the same losses.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from esm.errors import UserError
from esm.sde import VPSDE, per_example

LOSS_KINDS = ('esm', 'dsm', 'hybrid')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """config.loss: 'esm' trains the dual-stream model by eq. 10, 'dsm' the single-stream SGM.
  'hybrid' (ours, not the paper's; the improved-DDPM trick): a dual-stream model whose ε stream is
  trained by the DSM loss and whose σ² stream by eq. 10 on a stopped-gradient ε."""
  kind: str = 'esm'

  def __post_init__(self):
    if self.kind not in LOSS_KINDS:
      raise UserError(f'loss.kind: expected one of {LOSS_KINDS}, got {self.kind!r}')

  @property
  def dual_stream(self) -> bool:
    return self.kind in ('esm', 'hybrid')


def _mean_per_example(x):
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def esm_loss(noise, eps, log_var, alpha_bar):
  """Eq. 10 per example: mean over pixels of (1-ᾱ_i)(ε̄-ε_θ)²/σ²_θ + log σ²_θ.

  Returns (loss, squared-error term, log σ² term), each of shape [B]. σ² enters through its log so
  that 1/σ² never overflows.
  """
  ab = per_example(alpha_bar, noise.ndim)
  sq = (1.0 - ab) * jnp.square(noise - eps) * jnp.exp(-log_var)
  sq_term = _mean_per_example(sq)
  log_var_term = _mean_per_example(log_var)
  return sq_term + log_var_term, sq_term, log_var_term


def dsm_loss(noise, eps):
  """The DSM (SGM baseline) loss per example: mean over pixels of (ε̄-ε_θ)²."""
  return _mean_per_example(jnp.square(noise - eps))


def get_loss_fn(net_fn: Callable, sde: VPSDE, kind: str) -> Callable:
  """A pure loss_fn(params, x0, rng, train=True) -> (scalar loss, dict of logged terms).

  i is drawn uniformly from 1..T per example, ε̄ ~ N(0, I), and x_i from q(x_i | x_0).
  """
  dual_stream = LossConfig(kind).dual_stream
  hybrid = kind == 'hybrid'

  def loss_fn(params, x0, rng, train: bool = True):
    rng_i, rng_noise, rng_net = jax.random.split(rng, 3)
    i = jax.random.randint(rng_i, (x0.shape[0],), 1, sde.num_steps + 1)
    x_i, noise = sde.sample_marginal(rng_noise, x0, i)
    out = net_fn(params, x_i, i, train=train, rng=rng_net)
    eps = out.eps.astype(jnp.float32)
    if dual_stream:
      # hybrid: eq. 10 trains σ² only; the ε stream gets the DSM gradient alone.
      eps_in_eq10 = jax.lax.stop_gradient(eps) if hybrid else eps
      loss, sq_term, log_var_term = esm_loss(noise, eps_in_eq10, out.log_var.astype(jnp.float32),
                                             sde.alpha_bar[i])
      terms = {'sq_term': jnp.mean(sq_term), 'log_var_term': jnp.mean(log_var_term)}
      if hybrid:
        eps_term = dsm_loss(noise, eps)
        loss = loss + eps_term
        terms['eps_term'] = jnp.mean(eps_term)
    else:
      loss = dsm_loss(noise, eps)
      terms = {}
    loss = jnp.mean(loss)
    return loss, {'loss': loss, **terms}

  return loss_fn
