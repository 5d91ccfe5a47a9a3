"""The ESM loss (eq. 10) and the DSM loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esm import losses
from esm.errors import UserError
from esm.models.dual_stream import NetOutput
from esm.sde import SDEConfig, VPSDE


def test_esm_loss_value_and_terms():
  noise = jnp.full((2, 2, 2, 1), 1.0)
  eps = jnp.full((2, 2, 2, 1), 0.5)
  log_var = jnp.full((2, 2, 2, 1), np.log(0.5))
  ab = jnp.array([0.75, 0.0])
  loss, sq, lv = losses.esm_loss(noise, eps, log_var, ab)
  np.testing.assert_allclose(sq, [(0.25 * 0.25) / 0.5, 0.25 / 0.5], rtol=1e-6)
  np.testing.assert_allclose(lv, [np.log(0.5)] * 2, rtol=1e-6)
  np.testing.assert_allclose(loss, sq + lv, rtol=1e-6)


def test_esm_loss_minimiser_in_variance_is_the_squared_noise_error():
  rng = np.random.default_rng(0)
  noise = rng.normal(size=(9, 1, 1, 1)).astype(np.float32)  # one pixel per example
  eps = rng.normal(size=(9, 1, 1, 1)).astype(np.float32)
  ab = np.full((9,), 0.6, np.float32)
  # Evaluate the loss on a fine grid of log σ² per pixel and take the argmin.
  grid = np.arange(-14.0, 3.0, 1e-3, dtype=np.float32)
  loss, _, _ = jax.jit(jax.vmap(losses.esm_loss, in_axes=(None, None, 0, None)))(
      noise, eps, jnp.broadcast_to(grid[:, None, None, None, None], (grid.size, 9, 1, 1, 1)), ab)
  best = grid[np.argmin(np.asarray(loss), axis=0)]
  expected = (1 - 0.6) * (noise - eps).ravel() ** 2
  np.testing.assert_allclose(np.exp(best), expected, rtol=2e-3)


def test_dsm_loss():
  np.testing.assert_allclose(losses.dsm_loss(jnp.ones((2, 2, 2, 3)), jnp.zeros((2, 2, 2, 3))), [1, 1])


def test_loss_fn_draws_steps_uniformly_and_logs_terms():
  sde = VPSDE(SDEConfig())
  seen = []

  def net_fn(params, x, i, *, train, rng):
    del train, rng
    seen.append(np.asarray(i))
    return NetOutput(params * x, jnp.zeros_like(x))

  loss_fn = losses.get_loss_fn(net_fn, sde, 'esm')
  loss, terms = loss_fn(jnp.float32(0.0), jnp.zeros((20000, 1, 1, 1)), jax.random.key(0))
  i = seen[0]
  assert i.min() >= 1 and i.max() <= 1000 and abs(i.mean() - 500.5) < 10
  assert set(terms) == {'loss', 'sq_term', 'log_var_term'}
  # With ε_θ = 0 and log σ² = 0 the loss is E[(1-ᾱ_i) ε̄²] over i uniform in 1..T.
  expected = float(np.mean(1 - np.asarray(sde.alpha_bar)[1:]))
  assert abs(float(loss) - expected) < 0.03
  assert float(terms['log_var_term']) == 0.0


def test_unknown_loss_kind():
  with pytest.raises(UserError, match='loss.kind'):
    losses.get_loss_fn(None, VPSDE(SDEConfig()), 'vlb')


def test_hybrid_loss_gives_eps_the_dsm_gradient_and_the_variance_the_esm_gradient():
  sde = VPSDE(SDEConfig())

  def net_fn(params, x, i, *, train, rng):
    del i, train, rng
    return NetOutput(params['e'] * x, params['v'] + 0.0 * x)

  params = {'e': jnp.float32(0.3), 'v': jnp.float32(-0.5)}
  x0 = jax.random.uniform(jax.random.key(1), (8, 4, 4, 3), minval=-1, maxval=1)
  grad = lambda kind: jax.grad(lambda p: losses.get_loss_fn(net_fn, sde, kind)(
      p, x0, jax.random.key(2))[0])(params)
  hybrid, esm = grad('hybrid'), grad('esm')
  dsm = jax.grad(lambda e: losses.get_loss_fn(lambda p, x, i, **kw: NetOutput(p * x, None), sde,
                                              'dsm')(e, x0, jax.random.key(2))[0])(params['e'])
  np.testing.assert_allclose(hybrid['e'], dsm, rtol=1e-5)
  np.testing.assert_allclose(hybrid['v'], esm['v'], rtol=1e-5)
  assert not np.isclose(esm['e'], dsm, rtol=1e-2)
  _, terms = losses.get_loss_fn(net_fn, sde, 'hybrid')(params, x0, jax.random.key(2))
  assert set(terms) == {'loss', 'sq_term', 'log_var_term', 'eps_term'}
