"""The noise schedule, q(x_i | x_0), the two scores and eq. 12."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esm import sde as sde_lib
from esm.errors import UserError


def test_linear_schedule_endpoints_and_alpha_bar():
  s = sde_lib.VPSDE(sde_lib.SDEConfig())
  betas = np.asarray(s.betas)
  assert betas.shape == (1001,) and betas[0] == 0
  np.testing.assert_allclose([betas[1], betas[1000]], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s.alpha_bar)[1:], np.cumprod(1 - betas[1:]), rtol=1e-5)
  assert np.all(np.diff(np.asarray(s.alpha_bar)) < 0)


def test_cosine_schedule_is_monotone_and_nearly_destroys_signal():
  s = sde_lib.VPSDE(sde_lib.SDEConfig(schedule='cosine'))
  ab = np.asarray(s.alpha_bar)
  assert ab[0] == 1 and np.all(np.diff(ab) < 0) and ab[-1] < 1e-4


def test_unknown_schedule_is_a_user_error():
  with pytest.raises(UserError, match='sde.schedule'):
    sde_lib.VPSDE(sde_lib.SDEConfig(schedule='quadratic'))


def test_marginal_sample_has_the_right_moments():
  s = sde_lib.VPSDE(sde_lib.SDEConfig())
  x0 = jnp.full((4000, 2, 2, 3), 0.5)
  i = jnp.full((4000,), 300)
  xi, noise = s.sample_marginal(jax.random.key(0), x0, i)
  ab = float(s.alpha_bar[300])
  np.testing.assert_allclose(xi, np.sqrt(ab) * 0.5 + np.sqrt(1 - ab) * noise, rtol=1e-5, atol=1e-6)
  assert abs(float(xi.mean()) - np.sqrt(ab) * 0.5) < 0.02
  assert abs(float(xi.var()) - (1 - ab)) < 0.02


def test_esm_score_equals_dsm_score_when_variance_is_one_minus_alpha_bar():
  s = sde_lib.VPSDE(sde_lib.SDEConfig())
  eps = jax.random.normal(jax.random.key(1), (3, 4, 4, 3))
  i = jnp.array([1, 100, 900])
  ab = s.alpha_bar[i]
  var = jnp.broadcast_to((1 - ab)[:, None, None, None], eps.shape)
  np.testing.assert_allclose(sde_lib.esm_score(eps, var, ab), sde_lib.dsm_score(eps, ab), rtol=1e-5)


def test_variance_ode_closed_form_matches_numerical_integration():
  var0 = jnp.array([1e-4, 0.01, 0.3, 0.9])
  n, t_end = 4000, 3.0
  dt = t_end / n

  def rk4(v, _):
    f = sde_lib.variance_ode_rhs
    k1 = f(v)
    k2 = f(v + dt / 2 * k1)
    k3 = f(v + dt / 2 * k2)
    k4 = f(v + dt * k3)
    return v + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4), None

  numeric, _ = jax.lax.scan(rk4, var0, None, length=n)
  np.testing.assert_allclose(sde_lib.variance_ode_solution(var0, t_end), numeric, rtol=1e-4)
  np.testing.assert_allclose(sde_lib.variance_ode_solution(var0, 0.0), var0, rtol=1e-6)


def test_matched_step_inverts_alpha_bar():
  s = sde_lib.VPSDE(sde_lib.SDEConfig())
  i = jnp.array([1, 2, 37, 500, 999, 1000])
  np.testing.assert_array_equal(s.matched_step(s.alpha_bar[i]), i)
