"""Gaussian-mixture data whose diffused marginal p_i, score and noise posterior are closed-form.

p_0 = Σ_k π_k N(μ_k, Σ_k) with Σ_k = U_k diag(λ_k) U_kᵀ. Under the VP forward process
x_i = √ᾱ_i x_0 + √(1-ᾱ_i) ε̄ every component stays Gaussian:
p_i = Σ_k π_k N(√ᾱ_i μ_k, ᾱ_i Σ_k + (1-ᾱ_i) I), whose covariance has the same eigenvectors U_k and
eigenvalues s_k = ᾱ_i λ_k + 1 - ᾱ_i. Everything below works in those eigenbases, so no matrix is
ever inverted. Functions take ᾱ_i (a scalar), not the step label, so any schedule works.
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from esm.errors import UserError


@flax.struct.dataclass
class GaussianMixture:
  """Σ_k π_k N(μ_k, U_k diag(λ_k) U_kᵀ); a pytree, so it can be closed over or passed into jit."""
  weights: jax.Array  # [K] mixture weights π_k, summing to 1
  means: jax.Array  # [K, d] μ_k
  eigvecs: jax.Array  # [K, d, d] U_k, orthonormal columns
  eigvals: jax.Array  # [K, d] λ_k > 0

  @property
  def dim(self) -> int:
    return self.means.shape[-1]

  @property
  def num_components(self) -> int:
    return self.means.shape[0]


def _random_rotations(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
  """k Haar-random orthogonal d x d matrices (QR of a Gaussian matrix with the sign fix)."""
  out = np.empty((k, d, d))
  for j in range(k):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    out[j] = q * np.sign(np.diag(r))[None, :]
  return out


def ring_gmm(num_components: int = 8, radius: float = 1.0, stds=(0.15, 0.05),
             seed: int = 0) -> GaussianMixture:
  """The 2-d test case: elongated components on a circle, randomly rotated, unequal weights."""
  rng = np.random.default_rng(seed)
  angles = 2 * math.pi * np.arange(num_components) / num_components
  means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  weights = rng.uniform(0.5, 1.5, num_components)
  eigvals = np.tile(np.square(np.asarray(stds, np.float64)), (num_components, 1))
  return _make(weights, means, _random_rotations(rng, num_components, 2), eigvals)


def random_gmm(dim: int, num_components: int = 6, mean_scale: float = 0.6,
               eigval_range=(1e-3, 0.1), seed: int = 0) -> GaussianMixture:
  """A d-dimensional mixture: means uniform in [-mean_scale, mean_scale]^d, random orientations,
  eigenvalues log-uniform in eigval_range (so each component is strongly anisotropic)."""
  rng = np.random.default_rng(seed)
  means = rng.uniform(-mean_scale, mean_scale, (num_components, dim))
  lo, hi = np.log(eigval_range[0]), np.log(eigval_range[1])
  eigvals = np.exp(rng.uniform(lo, hi, (num_components, dim)))
  weights = rng.uniform(0.5, 1.5, num_components)
  return _make(weights, means, _random_rotations(rng, num_components, dim), eigvals)


def get_gmm(dim: int, seed: int = 0) -> GaussianMixture:
  """The measured data family: the 2-d ring for d = 2, a random anisotropic mixture otherwise."""
  if dim < 1:
    raise UserError(f'analysis dims: expected a positive dimension, got {dim}')
  return ring_gmm(seed=seed) if dim == 2 else random_gmm(dim, seed=seed)


def _make(weights, means, eigvecs, eigvals) -> GaussianMixture:
  weights = np.asarray(weights, np.float64)
  return GaussianMixture(weights=jnp.asarray(weights / weights.sum(), jnp.float32),
                         means=jnp.asarray(means, jnp.float32),
                         eigvecs=jnp.asarray(eigvecs, jnp.float32),
                         eigvals=jnp.asarray(eigvals, jnp.float32))


def sample(gmm: GaussianMixture, rng: jax.Array, n: int) -> jax.Array:
  """n draws x_0 ~ p_0, shape [n, d]."""
  rng_k, rng_z = jax.random.split(rng)
  k = jax.random.categorical(rng_k, jnp.log(gmm.weights), shape=(n,))
  z = jax.random.normal(rng_z, (n, gmm.dim)) * jnp.sqrt(gmm.eigvals[k])
  return gmm.means[k] + jnp.einsum('nij,nj->ni', gmm.eigvecs[k], z)


def _components(gmm: GaussianMixture, x, alpha_bar):
  """Per component k of p_i: eigen-coordinates y_k = U_kᵀ(x - √ᾱ μ_k) [n, K, d], eigenvalues
  s_k [K, d], and log π_k + log N(x; √ᾱ μ_k, ᾱΣ_k + (1-ᾱ)I) [n, K]."""
  ab = jnp.asarray(alpha_bar, jnp.float32)
  centred = x[:, None, :] - jnp.sqrt(ab) * gmm.means[None]
  y = jnp.einsum('kji,nkj->nki', gmm.eigvecs, centred)
  s = ab * gmm.eigvals + (1.0 - ab)
  log_norm = -0.5 * jnp.sum(jnp.log(2 * math.pi * s), axis=-1)
  log_joint = jnp.log(gmm.weights) + log_norm - 0.5 * jnp.sum(jnp.square(y) / s, axis=-1)
  return y, s, log_joint


def marginal_log_prob(gmm: GaussianMixture, x: jax.Array, alpha_bar) -> jax.Array:
  """log p_i(x) for x of shape [n, d]; returns [n]."""
  _, _, log_joint = _components(gmm, x, alpha_bar)
  return jax.nn.logsumexp(log_joint, axis=-1)


def marginal_score(gmm: GaussianMixture, x: jax.Array, alpha_bar) -> jax.Array:
  """∇_x log p_i(x) = Σ_k r_k(x) · (-U_k (y_k / s_k)), with r_k the posterior responsibilities."""
  y, s, log_joint = _components(gmm, x, alpha_bar)
  resp = jax.nn.softmax(log_joint, axis=-1)
  per_comp = -jnp.einsum('kij,nkj->nki', gmm.eigvecs, y / s)
  return jnp.einsum('nk,nki->ni', resp, per_comp)


def noise_posterior(gmm: GaussianMixture, x: jax.Array, alpha_bar):
  """Mean E[ε̄ | x_i] and per-dimension variance Var(ε̄_d | x_i), both [n, d].

  These are the minimisers of the ESM loss (eq. 10) over ε_θ and σ²_θ/(1-ᾱ): the loss is a
  Gaussian likelihood of ε̄ given x_i. Derived from the posterior of x_0, which is Gaussian per
  component: in U_k coordinates its variance is λ(1-ᾱ)/s and its mean U_kᵀμ_k + λ√ᾱ y/s.
  """
  ab = jnp.asarray(alpha_bar, jnp.float32)
  y, s, log_joint = _components(gmm, x, alpha_bar)
  resp = jax.nn.softmax(log_joint, axis=-1)
  lam = gmm.eigvals
  mean_k = gmm.means[None] + jnp.einsum('kij,nkj->nki', gmm.eigvecs, lam * jnp.sqrt(ab) * y / s)
  # diag(U diag(c) Uᵀ)_i = Σ_j U_ij² c_j.
  cov_diag_k = jnp.einsum('kij,kj->ki', jnp.square(gmm.eigvecs), lam * (1.0 - ab) / s)
  x0_mean = jnp.einsum('nk,nki->ni', resp, mean_k)
  # Law of total variance about the mixture mean: no E[x²] - E[x]² cancellation in float32.
  spread = cov_diag_k[None] + jnp.square(mean_k - x0_mean[:, None, :])
  x0_var = jnp.einsum('nk,nki->ni', resp, spread)
  eps_mean = (x - jnp.sqrt(ab) * x0_mean) / jnp.sqrt(1.0 - ab)
  eps_var = ab / (1.0 - ab) * x0_var
  return eps_mean, eps_var
