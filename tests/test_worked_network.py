"""The course notes' 2-2-2 network: forward values, hand backward vs jax.grad, one gradient step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_lab.lab import worked_network as net

SEED_FORWARD = {"z1": 2.0, "h1": 2.0, "z2": -0.5, "h2": 0.0, "o1": 0.0, "o2": -1.5}


class ForwardTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_matches_seed(self):
        out = self.variant(net.forward)(net.PARAMS, net.INPUTS)
        chex.assert_trees_all_close({k: out[k] for k in SEED_FORWARD},
                                    {k: jnp.float32(v) for k, v in SEED_FORWARD.items()})

    @chex.variants(with_jit=True, without_jit=True)
    def test_losses_match_seed(self):
        e1, e2 = self.variant(net.loss_terms)(net.PARAMS, net.INPUTS, net.TARGETS)
        np.testing.assert_allclose([e1, e2], [0.5, 2.0])
        np.testing.assert_allclose(net.mse(net.PARAMS, net.INPUTS, net.TARGETS), 2.5)
        np.testing.assert_allclose(net.total_loss(net.PARAMS, net.INPUTS, net.TARGETS), 2.5)


def _autodiff(params, inputs, targets):
    return net.HandGradients(
        total=jax.grad(net.total_loss)(params, inputs, targets),
        e1=jax.grad(lambda p: net.loss_terms(p, inputs, targets)[0])(params),
        e2=jax.grad(lambda p: net.loss_terms(p, inputs, targets)[1])(params),
    )


def test_hand_gradients_equal_jax_grad_at_seed_point():
    hand = net.hand_gradients(net.PARAMS, net.INPUTS, net.TARGETS)
    chex.assert_trees_all_close(hand, _autodiff(net.PARAMS, net.INPUTS, net.TARGETS), atol=1e-6)


def test_seed_worked_derivatives_are_per_term():
    hand = net.hand_gradients(net.PARAMS, net.INPUTS, net.TARGETS)
    # The course notes' dE1/dw21 = (-1)(0.5)(1)(-1) = 0.5 is the E1 term only ...
    assert float(hand.e1["w21"]) == pytest.approx(0.5)
    # ... while the total loss also reaches w21 through o2: dE2/dw21 = (-2)(-1)(1)(-1) = -2.
    assert float(hand.e2["w21"]) == pytest.approx(-2.0)
    assert float(hand.total["w21"]) == pytest.approx(-1.5)
    # h2 is dead (z2 = -0.5), so nothing reaches w12, w22, b2 from either term.
    for name in ("w12", "w22", "b2"):
        for grads in hand:
            assert float(grads[name]) == 0.0


def test_one_gradient_step_at_learning_rate_0_1():
    hand = net.hand_gradients(net.PARAMS, net.INPUTS, net.TARGETS)
    by_e1 = net.gradient_step(net.PARAMS, hand.e1, 0.1)
    by_total = net.gradient_step(net.PARAMS, hand.total, 0.1)
    assert float(by_e1["w21"]) == pytest.approx(0.45)       # the course notes' update
    assert float(by_total["w21"]) == pytest.approx(0.65)    # the total loss's update
    assert float(by_total["w12"]) == pytest.approx(-0.5)    # dead ReLU: unchanged
    # The step along the total gradient lowers the total loss.
    assert net.total_loss(by_total, net.INPUTS, net.TARGETS) < net.total_loss(net.PARAMS, net.INPUTS,
                                                                             net.TARGETS)


_value = st.floats(-3.0, 3.0, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(_value, min_size=16, max_size=16))
def test_hand_gradients_equal_jax_grad_on_random_points(values):
    params = dict(zip(net.PARAM_NAMES, values[:12], strict=True))
    inputs, targets = tuple(values[12:14]), tuple(values[14:16])
    chex.assert_trees_all_close(net.hand_gradients(params, inputs, targets),
                                _autodiff(params, inputs, targets), atol=1e-4, rtol=1e-4)


def test_dead_relu_blocks_every_gradient_behind_it():
    params = dict(net.PARAMS, b1=-10.0, b2=-10.0)  # both hidden units dead
    hand = net.hand_gradients(params, net.INPUTS, net.TARGETS)
    for name in ("w11", "w12", "w21", "w22", "b1", "b2", "w31", "w32", "w41", "w42"):
        assert float(hand.total[name]) == 0.0
    chex.assert_trees_all_close(hand, _autodiff(params, net.INPUTS, net.TARGETS))


def test_gradients_are_jittable_and_vmappable():
    batch = jnp.array([[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0]])
    grads = jax.jit(jax.vmap(net.hand_gradients, in_axes=(None, 0, None)))(net.PARAMS, batch, net.TARGETS)
    chex.assert_shape(grads.total["w21"], (3,))
    np.testing.assert_allclose(grads.total["w21"][0], -1.5)


def test_missing_parameter_is_a_clear_error():
    params = dict(net.PARAMS)
    del params["w42"]
    with pytest.raises(ValueError, match="w42"):
        net.forward(params, net.INPUTS)
