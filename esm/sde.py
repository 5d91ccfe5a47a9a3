"""The discrete VP noise schedule, the forward marginal q(x_i | x_0), the two scores and eq. 12.

Steps are i = 1..T. Arrays are stored with a leading entry for i = 0 (β_0 = 0, ᾱ_0 = 1), so that
`alpha_bar[i]` is ᾱ_i with no off-by-one. The network sees time t = i / T.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from esm.errors import UserError


SCHEDULES = ('linear', 'cosine')


@dataclasses.dataclass(frozen=True)
class SDEConfig:
  schedule: str = 'linear'
  beta_min: float = 1e-4
  beta_max: float = 0.02
  num_steps: int = 1000

  def __post_init__(self):
    if self.num_steps < 1:
      raise UserError(f'sde.num_steps: expected a positive number of steps, got {self.num_steps}')
    if self.schedule not in SCHEDULES:
      raise UserError(f'sde.schedule: expected one of {SCHEDULES}, got {self.schedule!r}')
    if not 0.0 < self.beta_min <= self.beta_max < 1.0:
      raise UserError(f'sde.beta_min/beta_max: expected 0 < beta_min <= beta_max < 1, got '
                      f'{self.beta_min} and {self.beta_max}')



def linear_betas(beta_min: float, beta_max: float, num_steps: int) -> np.ndarray:
  """β_1..β_T evenly spaced (DDPM)."""
  return np.linspace(beta_min, beta_max, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """β_1..β_T of the cosine schedule (Nichol & Dhariwal 2021), clipped at max_beta."""
  def f(t):
    return np.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
  t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  alpha_bar = f(t) / f(0.0)
  return np.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.0, max_beta)


class VPSDE:
  """The variance-preserving diffusion in its discrete (DDPM) form: β_i, α_i = 1-β_i, ᾱ_i = Π_{j≤i} α_j."""

  def __init__(self, cfg: SDEConfig):
    if cfg.schedule == 'linear':
      betas = linear_betas(cfg.beta_min, cfg.beta_max, cfg.num_steps)
    else:
      betas = cosine_betas(cfg.num_steps)
    self.config = cfg
    self.num_steps = cfg.num_steps
    betas = np.concatenate([[0.0], betas])
    alpha_bar = np.cumprod(1.0 - betas)
    # Kept in float32 for the device; computed in float64 so long products do not drift.
    self.betas = jnp.asarray(betas, jnp.float32)
    self.alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
    self.alpha_bar_np = alpha_bar

  def time(self, i):
    """Network time label t = i / T."""
    return jnp.asarray(i, jnp.float32) / self.num_steps

  def marginal_prob(self, x0, i):
    """Mean √ᾱ_i x_0 and std √(1-ᾱ_i) of q(x_i | x_0); i is a scalar or a [B] array."""
    ab = per_example(self.alpha_bar[i], x0.ndim)
    return jnp.sqrt(ab) * x0, jnp.sqrt(1.0 - ab)

  def sample_marginal(self, rng, x0, i):
    """x_i = √ᾱ_i x_0 + √(1-ᾱ_i) ε̄ with ε̄ ~ N(0, I); returns (x_i, ε̄)."""
    noise = jax.random.normal(rng, x0.shape, x0.dtype)
    mean, std = self.marginal_prob(x0, i)
    return mean + std * noise, noise

  def matched_step(self, alpha_bar_accumulated):
    """The step label whose ᾱ is closest to an accumulated Π(1-b_j) (ESM^σ 'matched' time)."""
    ab = self.alpha_bar[1:]
    # ᾱ is decreasing, so search on -ᾱ; pick the nearer of the two neighbours.
    hi = jnp.clip(jnp.searchsorted(-ab, -alpha_bar_accumulated), 1, self.num_steps - 1)
    lo = hi - 1
    nearer_lo = jnp.abs(ab[lo] - alpha_bar_accumulated) <= jnp.abs(ab[hi] - alpha_bar_accumulated)
    return jnp.where(nearer_lo, lo, hi) + 1


def per_example(values, ndim):
  """Broadcast a scalar or [B] schedule value against an NHWC batch."""
  values = jnp.asarray(values)
  return values.reshape(values.shape + (1,) * (ndim - values.ndim)) if values.ndim else values


def esm_score(eps, var, alpha_bar):
  """Eq. 3: the explicit score -√(1-ᾱ_i) ε_θ / σ²_θ."""
  ab = per_example(alpha_bar, eps.ndim)
  return -jnp.sqrt(1.0 - ab) * eps / var


def dsm_score(eps, alpha_bar):
  """Eq. 4: the denoising score -ε_θ / √(1-ᾱ_i)."""
  ab = per_example(alpha_bar, eps.ndim)
  return -eps / jnp.sqrt(1.0 - ab)


def variance_ode_rhs(var):
  """Eq. 12 rearranged: dσ²/dt = σ²(1 - σ²)."""
  return var * (1.0 - var)


def variance_ode_solution(var0, t):
  """Closed-form solution of eq. 12: σ²(t) = σ²_0 e^t / (1 - σ²_0 + σ²_0 e^t)."""
  et = jnp.exp(t)
  return var0 * et / (1.0 - var0 + var0 * et)


def get_sde(cfg: SDEConfig) -> VPSDE:
  """The schedule of config.sde."""
  return VPSDE(cfg)
