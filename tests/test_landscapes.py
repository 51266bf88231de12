"""The saddles are saddles (gradient zero, Hessian signs, manifolds) and the regression problem is as stated."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.lab import landscapes, sweep
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


@pytest.mark.parametrize("name", list(SADDLES))
def test_the_per_example_losses_average_to_the_landscape_plus_the_offset(name):
    examples = landscapes.saddle_examples(name, 200, seed=3, residual_std=0.7)
    saddle = examples.saddle
    assert saddle is SADDLES[name]
    assert examples.offset == pytest.approx(0.49 if name == "two_weight_net" else 0.0)
    assert examples.value == pytest.approx(saddle.value + examples.offset, rel=1e-5)
    for theta in jax.random.normal(jax.random.PRNGKey(0), (5, len(saddle.point))):
        mean = examples.loss(theta, examples.data)
        np.testing.assert_allclose(mean, saddle.loss(theta) + examples.offset, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jax.grad(examples.loss)(theta, examples.data), jax.grad(saddle.loss)(theta),
                                   rtol=1e-4, atol=1e-5)
    # one example at a time: they differ (the noise), and every one has zero gradient at the saddle
    one = lambda i: jax.tree.map(lambda a: a[i:i + 1], examples.data)
    point = jnp.asarray(saddle.point)
    per_example = jnp.stack([jax.grad(examples.loss)(theta, one(i)) for i in range(4)])
    assert float(jnp.ptp(per_example, axis=0).max()) > 0.1
    assert float(jnp.abs(jnp.stack([jax.grad(examples.loss)(point, one(i)) for i in range(4)])).max()) == 0.0


def test_every_example_of_the_net_pushes_along_its_stable_manifold():
    # Each example's gradient c_i (b, a) is parallel to (-1, 1) on a = -b: no component across the manifold.
    examples = landscapes.saddle_examples("two_weight_net", 64, seed=1)
    across = jnp.asarray(SADDLES["two_weight_net"].unstable_direction)
    per_example = jax.vmap(jax.grad(examples.loss), in_axes=(None, 0))
    for a in (0.5, -0.3, 2.0):
        grads = per_example(jnp.array([a, -a]), jax.tree.map(lambda x: x[:, None], examples.data))
        assert float(jnp.abs(grads).max()) > 0.1 and float(jnp.abs(grads @ across).max()) == 0.0


def test_real_minibatch_noise_leaves_sgd_on_the_nets_stable_manifold_and_isotropic_noise_does_not():
    examples = landscapes.saddle_examples("two_weight_net", 32, seed=0)
    start, steps = jnp.array([0.5, -0.5]), 300
    minibatch = sweep.run_sweep(examples.loss, "sgd", sweep.grid([0.05], range(6), start), examples.data,
                                sweep.SweepConfig(steps=steps, batch_size=8, evaluate_full_loss=False,
                                                  record_params=True))["sgd"]
    a, b = minibatch.params[..., 0], minibatch.params[..., 1]
    np.testing.assert_array_equal(a, -b)  # exactly on a = -b at every step of every seed
    assert float(np.abs(a[:, -1]).max()) < 0.05  # and slid to the saddle
    isotropic = sweep.run_sweep(landscapes.two_weight_net, "sgd", sweep.grid([0.05], range(6), start, 0.1),
                                config=sweep.SweepConfig(steps=steps, target_loss=0.9))["sgd"]
    assert isotropic.reached.all()  # every isotropic-noise run left: loss below the saddle's 1 - 0.1


def test_saddle_examples_are_deterministic_per_seed():
    a, b = (landscapes.saddle_examples("hyperbolic", 16, seed=5) for _ in range(2))
    chex.assert_trees_all_equal(a.data, b.data)
    assert not np.allclose(a.data["u"], landscapes.saddle_examples("hyperbolic", 16, seed=6).data["u"])


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    (("saddle", 8, 0), {}, "unknown saddle 'saddle'"),
    (("cubic", 1, 0), {}, "num_examples must be an int >= 2"),
    (("cubic", True, 0), {}, "num_examples must be an int >= 2"),
    (("two_weight_net", 8, 0), {"residual_std": -0.1}, "residual_std must be >= 0"),
])
def test_saddle_examples_reject_bad_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        landscapes.saddle_examples(*args, **kwargs)


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
