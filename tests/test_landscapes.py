"""The saddles are saddles (gradient zero, Hessian signs, manifolds) and the regression problem is as stated."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.lab import landscapes
from jaxopt_lab.lab.landscapes import SADDLES


@pytest.mark.parametrize("name", list(SADDLES))
def test_gradient_vanishes_at_each_saddle_with_the_stated_value(name):
    saddle = SADDLES[name]
    point = jnp.asarray(saddle.point)
    assert float(saddle.loss(point)) == saddle.value
    chex.assert_trees_all_close(jax.grad(saddle.loss)(point), jnp.zeros_like(point))


def test_hessians_have_the_documented_curvature():
    np.testing.assert_allclose(jax.hessian(landscapes.cubic)(jnp.zeros(1)), [[0.0]])  # degenerate
    np.testing.assert_allclose(jax.hessian(landscapes.hyperbolic)(jnp.zeros(2)), [[2.0, 0.0], [0.0, -2.0]])
    h = np.asarray(jax.hessian(landscapes.two_weight_net)(jnp.zeros(2)))
    np.testing.assert_allclose(h, [[0.0, -2.0], [-2.0, 0.0]])
    s = SADDLES["two_weight_net"]
    stable, unstable = np.asarray(s.stable_direction), np.asarray(s.unstable_direction)
    assert stable @ h @ stable > 0 > unstable @ h @ unstable


@pytest.mark.parametrize("name", ["hyperbolic", "two_weight_net"])
def test_gradient_descent_on_the_stable_manifold_stays_on_it(name):
    saddle = SADDLES[name]
    direction = jnp.asarray(saddle.stable_direction)
    theta = 0.5 * direction
    for _ in range(50):
        theta = theta - 0.05 * jax.grad(saddle.loss)(theta)
    # still a multiple of the stable direction, and closer to the saddle
    cross = theta[0] * direction[1] - theta[1] * direction[0]
    assert abs(float(cross)) < 1e-6 and float(jnp.linalg.norm(theta)) < 0.5 * float(jnp.linalg.norm(direction))


def test_regression_is_deterministic_and_its_floor_is_the_noise():
    a, b = landscapes.make_regression(7, num_samples=400), landscapes.make_regression(7, num_samples=400)
    chex.assert_trees_all_close(a, b)
    assert not np.allclose(a.data["y"], landscapes.make_regression(8, num_samples=400).data["y"])
    floor = float(landscapes.mse_loss(a.true_params, a.data))
    assert 0.5 * a.noise_std ** 2 < floor < 1.5 * a.noise_std ** 2


def test_curvature_is_the_eigenvalues_of_the_loss_hessian():
    problem = landscapes.make_regression(1, num_samples=50, num_features=3)

    def flat_loss(v):
        return landscapes.mse_loss({"w": v[:3], "b": v[3]}, problem.data)

    hessian = np.asarray(jax.hessian(flat_loss)(jnp.zeros(4)), dtype=np.float64)
    np.testing.assert_allclose(landscapes.regression_curvature(problem.data), np.linalg.eigvalsh(hessian),
                               rtol=1e-4)


def test_init_linear_scales():
    key = jax.random.PRNGKey(0)
    zeros = landscapes.init_linear(4)(key)
    assert zeros["w"].shape == (4,) and float(jnp.abs(zeros["w"]).sum() + jnp.abs(zeros["b"])) == 0.0
    assert float(jnp.abs(landscapes.init_linear(4, 1.0)(key)["w"]).sum()) > 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_samples": 0}, "num_samples must be a positive int"),
    ({"num_features": 2.5}, "num_features must be a positive int"),
    ({"noise_std": -1.0}, "noise_std must be >= 0"),
])
def test_make_regression_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        landscapes.make_regression(0, **kwargs)
