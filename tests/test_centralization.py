"""Gradient Centralization: projection properties, Flax vs optax/PyTorch layout, placements, optimizers."""

import doctest

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_lab import centralization
from jaxopt_lab.centralization import (
    adam_gc,
    adamw_gc,
    centralize_gradient,
    gradient_centralization,
    sgd_gc,
    with_gradient_centralization,
)

# A handful of small shapes keeps hypothesis cheap (every new shape compiles anew).
SHAPES = st.sampled_from([(3, 2), (2, 5), (4, 1), (2, 3, 4), (3, 3, 2, 4), (1, 2, 2, 3)])


@st.composite
def gradient_and_axis(draw):
    shape = draw(SHAPES)
    feature_axis = draw(st.integers(-len(shape), len(shape) - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    g = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * draw(st.sampled_from([1e-3, 1.0]))
    return g, feature_axis


def _reduced(shape, feature_axis):
    return tuple(a for a in range(len(shape)) if a != feature_axis % len(shape))


# ------------------------------------------------------------------------------------------------
# The projection: properties on random shapes.
# ------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(gradient_and_axis())
def test_zero_mean_over_reduced_axes_and_removed_part_is_the_mean(case):
    g, axis = case
    gc = np.asarray(centralize_gradient(g, feature_axis=axis))
    axes = _reduced(g.shape, axis)
    scale = np.abs(g).max()
    np.testing.assert_allclose(gc.mean(axis=axes), 0.0, atol=1e-6 * scale)
    # What GC removes is constant over the reduced axes: exactly the per-unit mean.
    np.testing.assert_allclose(g - gc, np.broadcast_to(g.mean(axis=axes, keepdims=True), g.shape),
                               rtol=1e-5, atol=1e-6 * scale)


@settings(max_examples=25, deadline=None)
@given(gradient_and_axis())
def test_idempotent_and_orthogonal_projection(case):
    g, axis = case
    gc = centralize_gradient(g, feature_axis=axis)
    chex.assert_trees_all_close(centralize_gradient(gc, feature_axis=axis), gc, atol=1e-6 * np.abs(g).max())
    # <P g, g - P g> = 0: P is the ORTHOGONAL projection onto the zero-mean subspace.
    inner = float(jnp.vdot(gc, g - gc))
    assert abs(inner) <= 1e-5 * float(jnp.vdot(g, g))


@settings(max_examples=20, deadline=None)
@given(gradient_and_axis(), st.floats(-3, 3), st.floats(-3, 3), st.integers(0, 2**31 - 1))
def test_linear(case, a, b, seed):
    x, axis = case
    y = np.random.default_rng(seed).normal(size=x.shape).astype(np.float32)
    lhs = centralize_gradient(a * x + b * y, feature_axis=axis)
    rhs = a * centralize_gradient(x, feature_axis=axis) + b * centralize_gradient(y, feature_axis=axis)
    scale = (1 + abs(a) + abs(b)) * (np.abs(x).max() + np.abs(y).max())
    chex.assert_trees_all_close(lhs, rhs, atol=1e-5 * scale)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_vectors_and_scalars_unchanged(size, seed):
    rng = np.random.default_rng(seed)
    v, s = rng.normal(size=size).astype(np.float32), np.float32(rng.normal())
    tx = gradient_centralization()
    out, _ = tx.update({"bias": v, "scalar": s}, tx.init({"bias": v, "scalar": s}))
    np.testing.assert_array_equal(out["bias"], v)
    np.testing.assert_array_equal(out["scalar"], s)


def test_bfloat16_keeps_dtype_and_float32_accurate_mean():
    g = jax.random.normal(jax.random.key(0), (256, 4), jnp.float32) + 3.0
    out = centralize_gradient(g.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    ref = centralize_gradient(g.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2)


def test_integer_gradient_gives_a_float_result_like_optax():
    # An integer gradient centred in integer arithmetic would truncate the means ([[1, 2], [4, 6]] gave
    # [[0, 0], [-1, 1]]); the result is float32, as optax.centralize's.
    g = jnp.array([[1, 2], [4, 6]])
    out = centralize_gradient(g, feature_axis=0)  # optax's layout: mean over every axis but the first
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, [[-0.5, 0.5], [-1.0, 1.0]])
    optax_out, _ = optax.centralize().update(g, optax.EmptyState())
    np.testing.assert_array_equal(out, optax_out)
    tx_out, _ = gradient_centralization().update({"k": g, "b": jnp.array([1, 2])}, optax.EmptyState())
    np.testing.assert_array_equal(tx_out["k"], [[-1.5, -2.0], [1.5, 2.0]])
    assert tx_out["b"].dtype == jnp.int32  # 1-D leaves pass through unchanged


# ------------------------------------------------------------------------------------------------
# Layout: Flax (features last) vs optax.centralize / the official PyTorch code (features first).
# ------------------------------------------------------------------------------------------------


def _official_pytorch_gc(w_out_first):
    """The official code's formula (numpy): x - x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)."""
    return w_out_first - w_out_first.mean(axis=tuple(range(1, w_out_first.ndim)), keepdims=True)


@pytest.mark.parametrize("flax_shape", [(5, 3), (3, 3, 2, 4)])
def test_flax_layout_equals_official_gc_on_the_pytorch_layout(flax_shape):
    g = np.random.default_rng(0).normal(size=flax_shape).astype(np.float32)
    # Flax (*kernel, in, out) -> PyTorch (out, in, *kernel).
    to_torch = (g.ndim - 1, g.ndim - 2, *range(g.ndim - 2))
    official = _official_pytorch_gc(g.transpose(to_torch)).transpose(np.argsort(to_torch))
    np.testing.assert_allclose(centralize_gradient(g), official, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 2, 4)])
def test_optax_centralize_keeps_the_first_axis_which_is_wrong_for_flax_kernels(shape):
    g = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
    tx = optax.centralize()
    optax_out, _ = tx.update(g, tx.init(g))
    # optax.centralize == ours with feature_axis=0 (PyTorch layout) ...
    chex.assert_trees_all_close(optax_out, centralize_gradient(g, feature_axis=0), atol=1e-6)
    # ... so on a Flax kernel it does not give each output unit (last axis) a zero-mean gradient,
    per_unit_mean = np.asarray(optax_out).mean(axis=tuple(range(g.ndim - 1)))
    assert np.abs(per_unit_mean).max() > 1e-2
    # while ours does.
    ours = np.asarray(centralize_gradient(g)).mean(axis=tuple(range(g.ndim - 1)))
    np.testing.assert_allclose(ours, 0.0, atol=1e-6)


def test_bad_feature_axis_is_a_clear_error():
    with pytest.raises(ValueError, match=r"feature_axis=2 is out of range .* 2 dimensions"):
        centralize_gradient(jnp.ones((3, 4)), feature_axis=2)
    with pytest.raises(TypeError, match="feature_axis must be an int"):
        gradient_centralization(feature_axis=1.0)
    with pytest.raises(ValueError, match="placement must be 'gradient' or 'update', got 'before'"):
        with_gradient_centralization(optax.sgd(0.1), placement="before")


# ------------------------------------------------------------------------------------------------
# The optax transform: selection of leaves, jit, vmap, MultiSteps.
# ------------------------------------------------------------------------------------------------

PARAM_SHAPES = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "dense": {"kernel": (6, 3), "bias": (3,)}}


def _tree(seed, shapes=PARAM_SHAPES):
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, s) for k, s in zip(keys, leaves, strict=True)])


def _is_centralized(x):
    return bool(np.allclose(np.asarray(x).mean(axis=tuple(range(x.ndim - 1))), 0.0, atol=1e-6))


@pytest.mark.parametrize(
    ("kwargs", "expect_conv", "expect_dense"),
    [
        ({}, True, True),
        ({"conv_only": True}, True, False),
        ({"mask": {"conv": {"kernel": False, "bias": False}, "dense": {"kernel": True, "bias": False}}},
         False, True),
        ({"mask": {"conv": True, "dense": False}}, True, False),
        ({"mask": lambda tree: jax.tree_util.tree_map_with_path(
            lambda path, _: "conv" in jax.tree_util.keystr(path), tree)}, True, False),
    ],
    ids=["all", "conv_only", "mask_tree", "mask_prefix", "mask_callable"],
)
def test_leaf_selection(kwargs, expect_conv, expect_dense):
    grads = _tree(0)
    tx = gradient_centralization(**kwargs)
    out, state = tx.update(grads, tx.init(grads))
    assert _is_centralized(out["conv"]["kernel"]) is expect_conv
    assert _is_centralized(out["dense"]["kernel"]) is expect_dense
    if not expect_dense:
        np.testing.assert_array_equal(out["dense"]["kernel"], grads["dense"]["kernel"])
    np.testing.assert_array_equal(out["dense"]["bias"], grads["dense"]["bias"])
    assert isinstance(state, optax.EmptyState)


class TransformTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_update_equals_leafwise_centralize(self):
        grads = _tree(1)
        tx = gradient_centralization()
        out, _ = self.variant(tx.update)(grads, tx.init(grads))
        expected = jax.tree.map(lambda g: centralize_gradient(g) if g.ndim > 1 else g, grads)
        chex.assert_trees_all_close(out, expected, atol=1e-6)

    def test_vmap_over_a_batch_of_gradient_trees(self):
        batch = jax.tree.map(lambda *xs: jnp.stack(xs), *[_tree(s) for s in range(3)])
        tx = gradient_centralization()
        out, _ = jax.vmap(tx.update, in_axes=(0, None))(batch, tx.init(_tree(0)))
        for i in range(3):
            expected, _ = tx.update(_tree(i), tx.init(_tree(i)))
            chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], out), expected, atol=1e-6)

    def test_inside_multisteps_the_applied_update_is_the_centralized_mean(self):
        params = _tree(0)
        tx = optax.MultiSteps(optax.chain(gradient_centralization(), optax.sgd(1.0)), every_k_schedule=3)
        state = tx.init(params)
        update = jax.jit(tx.update)
        micro = [_tree(10 + i) for i in range(3)]
        for grads in micro:
            updates, state = update(grads, state, params)
        mean = jax.tree.map(lambda *g: sum(g) / 3, *micro)
        expected = jax.tree.map(lambda g: -(centralize_gradient(g) if g.ndim > 1 else g), mean)
        chex.assert_trees_all_close(updates, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Placements and the official optimizers' weight-decay order.
# ------------------------------------------------------------------------------------------------


def _unit_means(params):
    return {name: np.asarray(layer["kernel"]).mean(axis=tuple(range(layer["kernel"].ndim - 1)))
            for name, layer in params.items()}


def _run_quadratic(tx, steps=30):
    """Minimizes a quadratic with a fixed random target: gradients with far-from-zero unit means."""
    params, target = _tree(0), jax.tree.map(lambda t: 3.0 + t, _tree(1))

    def loss(p):
        return sum(jnp.sum((a - b) ** 2 * (1 + jnp.arange(a.size).reshape(a.shape) % 3))
                   for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True))

    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return (optax.apply_updates(params, updates), state), None
        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return params

    return params, run(params)


def _mean_drift(tx):
    start, end = _run_quadratic(tx)
    return max(float(np.abs(_unit_means(end)[k] - _unit_means(start)[k]).max()) for k in start)


def test_adam_update_placement_keeps_unit_means_gradient_placement_does_not():
    assert _mean_drift(optax.adam(0.05)) > 0.5                          # control: plain Adam moves them
    assert _mean_drift(with_gradient_centralization(optax.adam(0.05), placement="update")) < 1e-5
    assert _mean_drift(with_gradient_centralization(optax.adam(0.05), placement="gradient")) > 1e-2


def test_sgd_and_momentum_placements_coincide_because_gc_is_linear():
    grads = [_tree(20 + i) for i in range(3)]
    for momentum in (None, 0.9):
        results = []
        for placement in ("gradient", "update"):
            tx = with_gradient_centralization(optax.sgd(0.1, momentum=momentum), placement=placement)
            state, outs = tx.init(grads[0]), []
            for g in grads:
                u, state = tx.update(g, state)
                outs.append(u)
            results.append(outs)
        chex.assert_trees_all_close(*results, atol=1e-6)


@pytest.mark.parametrize(
    ("tx", "keeps_means"),
    [
        (sgd_gc(0.02, momentum=0.9, weight_decay=0.1), True),       # L2 added before GC (official SGD_GC)
        (adam_gc(0.05, weight_decay=0.1), True),                    # update placement
        (adamw_gc(0.05, weight_decay=0.1), True),                   # decay centralized with the update
        (adamw_gc(0.05, weight_decay=0.1, placement="gradient"), False),   # AdamW_GCC: decay not centralized
    ],
    ids=["sgd_gc", "adam_gc", "adamw_gc_update", "adamw_gc_gradient"],
)
def test_ready_optimizers_and_weight_decay_order(tx, keeps_means):
    drift = _mean_drift(tx)
    assert (drift < 1e-5) is keeps_means, drift


def test_l2_decay_is_added_before_gc_as_in_the_official_code():
    params, grads = _tree(0), _tree(1)
    tx = adam_gc(0.1, weight_decay=0.5, placement="gradient")
    got, _ = tx.update(grads, tx.init(params), params)
    official = optax.chain(optax.add_decayed_weights(0.5), gradient_centralization(), optax.adam(0.1))
    other_order = optax.chain(gradient_centralization(), optax.add_decayed_weights(0.5), optax.adam(0.1))
    want, _ = official.update(grads, official.init(params), params)
    not_want, _ = other_order.update(grads, other_order.init(params), params)
    chex.assert_trees_all_close(got, want)
    assert not np.allclose(got["conv"]["kernel"], not_want["conv"]["kernel"])


# ------------------------------------------------------------------------------------------------
# optax.inject_hyperparams: the ready optimizers' hyperparameters live in the state.
# ------------------------------------------------------------------------------------------------

# Every float hyperparameter each factory has, at non-default values (weight_decay given explicitly, so
# the plain and the injected optimizer build the same chain).
INJECT_CASES = {
    "sgd_gc": (sgd_gc, {"momentum": 0.9, "weight_decay": 1e-2}),
    "adam_gc": (adam_gc, {"b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 1e-2}),
    "adamw_gc": (adamw_gc, {"b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 1e-2}),
}
INJECT_PARAMS = [(f"{name}_{extra}", factory, kwargs if extra == "all" else {})
                 for name, (factory, kwargs) in INJECT_CASES.items() for extra in ("lr_only", "all")]
# What inject_hyperparams puts in the state from the defaults alone: numeric defaults only (None, bools
# and the GC options stay static, feature_axis included).
DEFAULT_HYPERPARAMS = {"sgd_gc": {"learning_rate"}, "adam_gc": {"learning_rate", "b1", "b2", "eps"},
                       "adamw_gc": {"learning_rate", "b1", "b2", "eps", "weight_decay"}}
RATES = (0.1, 0.03, 0.2)
TOL = {"atol": 1e-6, "rtol": 1e-5}


def _inject_trajectory(tx, steps, update, set_hyperparams=lambda state, i: state):
    """Runs ``steps`` updates from the Flax-layout tree ``_tree(0)``; returns every step's updates."""
    params = _tree(0)
    state, outs = tx.init(params), []
    for i in range(steps):
        state = set_hyperparams(state, i)
        updates, state = update(_tree(30 + i), state, params)
        params = optax.apply_updates(params, updates)
        outs.append(updates)
    return outs, state


def _set_rate(hyperparams, rate):
    """Assigns a rate as an array of the stored dtype, so the jitted update sees the same abstract value."""
    hyperparams["learning_rate"] = jnp.asarray(rate, hyperparams["learning_rate"].dtype)


def _counted_jit(fn):
    traces = []

    def traced(*args):
        traces.append(None)  # runs once per trace, never per call of the compiled function
        return fn(*args)

    return jax.jit(traced), traces


class InjectHyperparamsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(INJECT_PARAMS)
    def test_injected_optimizer_gives_the_plain_optimizers_updates(self, factory, kwargs):
        tx = factory(learning_rate=0.1, **kwargs)
        injected = optax.inject_hyperparams(factory)(learning_rate=0.1, **kwargs)
        want, want_state = _inject_trajectory(tx, 3, tx.update)
        got, got_state = _inject_trajectory(injected, 3, self.variant(injected.update))
        chex.assert_trees_all_close(got, want, **TOL)
        chex.assert_trees_all_close(got_state.inner_state, want_state, **TOL)
        assert set(got_state.hyperparams) == DEFAULT_HYPERPARAMS[factory.__name__] | set(kwargs)

    @parameterized.named_parameters(INJECT_PARAMS)
    def test_changing_the_rate_in_the_state_is_a_new_rate_without_retracing(self, factory, kwargs):
        # The reference: the plain optimizer with a schedule that takes the same rates at the same steps.
        schedule = lambda count: jnp.asarray(RATES)[count]
        ref = factory(schedule, **kwargs)
        want, _ = _inject_trajectory(ref, len(RATES), ref.update)
        injected = optax.inject_hyperparams(factory)(learning_rate=RATES[0], **kwargs)
        update, traces = _counted_jit(injected.update)

        def set_rate(state, i):
            _set_rate(state.hyperparams, RATES[i])
            return state

        got, state = _inject_trajectory(injected, len(RATES), update, set_rate)
        chex.assert_trees_all_close(got, want, **TOL)
        assert len(traces) == 1
        np.testing.assert_allclose(state.hyperparams["learning_rate"], RATES[-1])
        # And it is a change: with the first rate throughout, the later steps differ.
        fixed_tx = factory(RATES[0], **kwargs)
        fixed, _ = _inject_trajectory(fixed_tx, len(RATES), fixed_tx.update)
        assert not np.allclose(got[1]["conv"]["kernel"], fixed[1]["conv"]["kernel"])

    @parameterized.named_parameters((name, *case) for name, case in INJECT_CASES.items())
    def test_every_float_hyperparameter_is_changeable_in_the_state(self, factory, kwargs):
        # Built with other values, then given the wanted ones through the state before the first step.
        other = {name: value * 0.5 for name, value in kwargs.items()}
        injected = optax.inject_hyperparams(factory)(learning_rate=0.5, **other)
        update, traces = _counted_jit(injected.update)

        def set_all(state, i):
            for name, value in {"learning_rate": 0.1, **kwargs}.items():
                state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
            return state

        got, _ = _inject_trajectory(injected, 2, update, set_all)
        tx = factory(0.1, **kwargs)
        want, _ = _inject_trajectory(tx, 2, tx.update)
        chex.assert_trees_all_close(got, want, **TOL)
        assert len(traces) == 1

    @parameterized.named_parameters((name, *case) for name, case in INJECT_CASES.items())
    def test_inside_multisteps_the_rate_is_read_when_the_accumulated_step_is_applied(self, factory, kwargs):
        k = 2
        schedule = lambda count: jnp.asarray(RATES)[count]
        ref = optax.MultiSteps(factory(schedule, **kwargs), every_k_schedule=k)
        want, _ = _inject_trajectory(ref, k * 2, ref.update)
        tx = optax.MultiSteps(optax.inject_hyperparams(factory)(learning_rate=RATES[0], **kwargs),
                              every_k_schedule=k)
        update, traces = _counted_jit(tx.update)

        def set_rate(state, i):
            _set_rate(state.inner_opt_state.hyperparams, RATES[i // k])
            return state

        got, _ = _inject_trajectory(tx, k * 2, update, set_rate)
        chex.assert_trees_all_close(got, want, **TOL)
        assert len(traces) == 1


@pytest.mark.parametrize("factory", [gradient_centralization, lambda: with_gradient_centralization(
    optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), placement="update")], ids=["gc", "with_gc"])
def test_gc_transforms_have_nothing_to_inject_and_work_injected(factory):
    grads = _tree(1)
    tx = factory()
    injected = optax.inject_hyperparams(factory)()
    state = injected.init(grads)
    assert state.hyperparams == {}
    got, _ = jax.jit(injected.update)(grads, state, grads)
    want, _ = tx.update(grads, tx.init(grads), grads)
    chex.assert_trees_all_close(got, want, atol=1e-6)


def test_weight_decay_default_none_and_python_zero_leave_the_l2_stage_out_an_injected_zero_keeps_it():
    grads = _tree(1)
    for tx in (sgd_gc(0.1), sgd_gc(0.1, weight_decay=0.0), adam_gc(0.1, weight_decay=0)):
        tx.update(grads, tx.init(grads))  # no params needed: there is no decay stage
    # Injected, a zero is an array: the stage stays, so the rate can be raised later without a new chain.
    injected = optax.inject_hyperparams(sgd_gc)(learning_rate=0.1, weight_decay=0.0)
    state = injected.init(grads)
    state.hyperparams["weight_decay"] = jnp.asarray(0.5, jnp.float32)
    got, _ = jax.jit(injected.update)(grads, state, _tree(0))
    want, _ = sgd_gc(0.1, weight_decay=0.5).update(grads, sgd_gc(0.1, weight_decay=0.5).init(grads), _tree(0))
    chex.assert_trees_all_close(got, want, atol=1e-6)


def test_explicit_feature_axis_under_inject_is_static_args_or_a_clear_error():
    grads, params = _tree(1), _tree(0)
    injected = optax.inject_hyperparams(sgd_gc)(learning_rate=0.1, feature_axis=0)
    state = injected.init(params)  # outside jit the injected axis is a concrete 0-d array: accepted
    with pytest.raises(TypeError, match=r"feature_axis must be a concrete int, got a traced.*static_args"):
        jax.jit(injected.update)(grads, state, params)
    injected = optax.inject_hyperparams(sgd_gc, static_args="feature_axis")(learning_rate=0.1, feature_axis=0)
    got, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    tx = sgd_gc(0.1, feature_axis=0)
    chex.assert_trees_all_close(got, tx.update(grads, tx.init(params))[0], atol=1e-6)


@pytest.mark.parametrize("axis", [0, -1, np.int64(0), np.asarray(-1), jnp.asarray(0, jnp.int32), None])
def test_feature_axis_accepts_ints_and_concrete_integer_scalars(axis):
    grads = _tree(1)
    out, _ = gradient_centralization(feature_axis=axis).update(grads, optax.EmptyState())
    expect = -1 if axis is None else int(axis)
    chex.assert_trees_all_close(out["conv"]["kernel"], centralize_gradient(grads["conv"]["kernel"],
                                                                           feature_axis=expect))


@pytest.mark.parametrize("bad", [1.5, "a", True, jnp.asarray(1.0), np.asarray([0]), jnp.asarray(True)])
def test_feature_axis_that_is_no_integer_is_a_clear_type_error(bad):
    with pytest.raises(TypeError, match="feature_axis must be an int, got"):
        gradient_centralization(feature_axis=bad)
    with pytest.raises(TypeError, match="feature_axis must be an int, got"):
        sgd_gc(0.1, feature_axis=bad)


def test_masks_under_inject_callable_in_static_args_traced_is_a_clear_error():
    grads = _tree(1)
    conv_only = lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, _: "conv" in jax.tree_util.keystr(path), tree)
    injected = optax.inject_hyperparams(sgd_gc, static_args=("mask",))(learning_rate=0.1, mask=conv_only)
    got, _ = jax.jit(injected.update)(grads, injected.init(grads))
    assert _is_centralized(got["conv"]["kernel"]) and not _is_centralized(got["dense"]["kernel"])
    # A bool array is numeric for inject_hyperparams, hence traced in a jitted update.
    injected = optax.inject_hyperparams(gradient_centralization)(mask=jnp.asarray(True))
    with pytest.raises(TypeError, match="mask must hold static bools, got a traced array"):
        jax.jit(injected.update)(grads, injected.init(grads))


# ------------------------------------------------------------------------------------------------
# The paper's weight-space constraint on a real Flax CNN.
# ------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _cnn_unit_means_drift(tx, steps=60):
    model = SmallCNN()
    k_x, k_y, k_p = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k_x, (32, 8, 8, 2))
    y = jax.random.randint(k_y, (32,), 0, 3)
    params = model.init(k_p, x[:1])["params"]

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

    @jax.jit
    def train(params):
        def step(carry, _):
            params, state = carry
            value, grads = jax.value_and_grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), value
        (end, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return end, losses

    end, losses = train(params)
    assert losses[-1] < losses[0]                                       # it really trains
    drift = max(float(np.abs(_unit_means(end)[k] - _unit_means(params)[k]).max()) for k in params)
    return drift


def test_sgd_with_gc_keeps_every_output_units_mean_weight_on_a_flax_cnn():
    assert _cnn_unit_means_drift(optax.sgd(0.5)) > 1e-3                 # control: without GC they move
    assert _cnn_unit_means_drift(optax.chain(gradient_centralization(), optax.sgd(0.5))) < 1e-6


def test_docstring_examples_run():
    result = doctest.testmod(centralization, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
