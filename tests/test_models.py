"""The digits models with every norm: shapes, which variables exist, batch (in)dependence, errors."""

import math

import chex
import jax
import jax.numpy as jnp
import pytest

from jaxopt_lab import nn as norms
from jaxopt_lab.lab import models

X = jax.random.normal(jax.random.key(0), (6, 8, 8, 1))


def _small_cnn(norm: str) -> models.CNN:
    return models.CNN(norm=norm, widths=(4, 8), num_groups=2)


def _models_with(norm: str) -> list:
    out = [_small_cnn(norm)]
    if norm != "instance":
        out.append(models.MLP(norm=norm, widths=(16,), num_groups=4))
    if norm in ("none", "batch", "layer"):
        out.append(models.NormGRU(norm=norm, hidden=8))
    return out


@pytest.mark.parametrize("norm", models.NORMS)
def test_every_model_gives_logits_and_only_batch_norm_keeps_batch_stats(norm):
    for model in _models_with(norm):
        variables = model.init(jax.random.key(1), X)
        logits, updates = model.apply(variables, X, train=True, mutable=["batch_stats"])
        assert logits.shape == (6, 10)
        chex.assert_tree_all_finite(logits)
        assert ("batch_stats" in variables) == (norm == "batch"), type(model).__name__
        if norm == "batch":  # train mode moved the running statistics; eval mode uses them
            moved = jax.tree.map(lambda new, old: not jnp.allclose(new, old), updates["batch_stats"],
                                 variables["batch_stats"])
            assert all(jax.tree.leaves(moved)), moved


@pytest.mark.parametrize("norm", models.NORMS)
def test_only_batch_norm_in_train_mode_mixes_the_examples_of_a_batch(norm):
    for model in _models_with(norm):
        variables = model.init(jax.random.key(1), X)
        def apply(x, train, model=model, variables=variables):
            return model.apply(variables, x, train=train, mutable=["batch_stats"])[0]

        other = X.at[1:].multiply(3.0).at[1:].add(1.0)  # change every example but the first
        mixes = not jnp.allclose(apply(X, True)[0], apply(other, True)[0], atol=1e-5)
        assert mixes == (norm == "batch"), type(model).__name__
        chex.assert_trees_all_close(apply(X, False)[0], apply(other, False)[0], atol=1e-5)


def test_norms_are_jaxopt_lab_modules():
    expected = {"batch": norms.BatchNorm, "layer": norms.LayerNorm, "instance": norms.InstanceNorm,
                "group": norms.GroupNorm}
    for name, cls in expected.items():
        assert isinstance(models.make_norm(name, train=True), cls)
    assert models.make_norm("batch", train=False).use_running_average
    x = jnp.arange(6.0).reshape(2, 3)
    chex.assert_trees_all_equal(models.make_norm("none", train=True)(x), x)


def test_instance_norm_is_invariant_to_per_image_contrast():
    model = _small_cnn("instance")
    variables = model.init(jax.random.key(2), X)
    # The first conv has no bias and zero padding, so a positive per-image scale of the input is removed
    # by the first instance norm (up to its epsilon). A brightness shift is not: the padding stays at 0.
    contrast = X * jnp.arange(1.0, 7.0)[:, None, None, None]
    chex.assert_trees_all_close(model.apply(variables, contrast), model.apply(variables, X), atol=1e-3)
    assert not jnp.allclose(model.apply(variables, X + 0.5), model.apply(variables, X), atol=1e-3)


@pytest.mark.parametrize("make, message", [
    (lambda: models.CNN(norm="weight"), "norm must be one of"),
    (lambda: models.CNN(norm="group", widths=(6,), num_groups=4), "divisible by num_groups"),
    (lambda: models.MLP(norm="instance"), "norm must be one of"),
    (lambda: models.NormGRU(norm="group"), "norm must be one of"),
])
def test_bad_configurations_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make().init(jax.random.key(0), X)




# --- 1-D signals (N, L, C) as well as images (N, H, W, C); Logistic and GRU ----------------------------

SIGNAL = jax.random.normal(jax.random.key(3), (6, 40, 1))


@pytest.mark.parametrize("norm", models.NORMS)
def test_every_model_takes_signals_with_every_norm_and_stays_per_example_without_batch_norm(norm):
    for model in _models_with(norm):
        variables = model.init(jax.random.key(1), SIGNAL)
        logits, _ = model.apply(variables, SIGNAL, train=True, mutable=["batch_stats"])
        assert logits.shape == (6, 10), type(model).__name__
        chex.assert_tree_all_finite(logits)
        assert ("batch_stats" in variables) == (norm == "batch")
        other = SIGNAL.at[1:].multiply(3.0)
        first = lambda x, model=model, variables=variables: model.apply(variables, x, train=True,
                                                                        mutable=["batch_stats"])[0][0]
        assert (not jnp.allclose(first(SIGNAL), first(other), atol=1e-5)) == (norm == "batch")


def test_norms_of_signals_take_their_statistics_over_the_right_axes():
    x = jax.random.normal(jax.random.key(4), (3, 40, 8)) * jnp.arange(1.0, 9.0) + 5.0
    layer = models.make_norm("layer", train=True, spatial_dims=1)
    y = layer.apply(layer.init(jax.random.key(0), x), x)
    # Layer norm: one mean/variance per example over (L, C); instance norm: per example and channel over L.
    chex.assert_trees_all_close((y.mean(axis=(1, 2)), y.std(axis=(1, 2))), (jnp.zeros(3), jnp.ones(3)),
                                atol=1e-4)
    instance = models.make_norm("instance", train=True, spatial_dims=1)
    y = instance.apply(instance.init(jax.random.key(0), x), x)
    chex.assert_trees_all_close((y.mean(axis=1), y.std(axis=1)), (jnp.zeros((3, 8)), jnp.ones((3, 8))),
                                atol=1e-3)
    with pytest.raises(ValueError, match="instance norm needs spatial axes"):
        models.make_norm("instance", train=True, spatial_dims=0)
    with pytest.raises(ValueError, match="spatial_dims"):
        models.make_norm("layer", train=True, spatial_dims=3)


def test_the_cnn_is_translation_equivariant_along_a_signal_up_to_its_pooling():
    # Shifting a zero-padded signal by the pooling stride (2) moves every feature map by one step, so the
    # global average pool (away from the borders) gives the same logits.
    model = models.CNN(norm="none")
    bump = jnp.zeros((1, 40, 1)).at[0, 14:22, 0].set(jnp.arange(1.0, 9.0))
    variables = model.init(jax.random.key(0), bump)
    chex.assert_trees_all_close(model.apply(variables, jnp.roll(bump, 2, axis=1)), model.apply(variables, bump),
                                rtol=1e-4, atol=1e-5)


def test_logistic_regression_is_one_linear_map_of_the_flattened_input():
    model = models.Logistic(num_classes=3)
    variables = model.init(jax.random.key(0), X)
    kernel, bias = variables["params"]["head"]["kernel"], variables["params"]["head"]["bias"]
    assert kernel.shape == (64, 3)
    chex.assert_trees_all_close(model.apply(variables, X), X.reshape(6, -1) @ kernel + bias, rtol=1e-5)


def test_the_gru_reads_the_sequence_in_both_directions():
    model = models.GRU(hidden=4)
    variables = model.init(jax.random.key(0), SIGNAL)
    assert set(variables["params"]) == {"forward", "backward", "head"}
    assert variables["params"]["head"]["kernel"].shape == (40 * 2 * 4, 10)  # every step's output, both ways
    # The last step's input changes the forward output of the last step only and the backward output of
    # every step: the logits depend on it (a one-directional GRU read forward too).
    changed = SIGNAL.at[:, -1].add(1.0)
    assert not jnp.allclose(model.apply(variables, changed), model.apply(variables, SIGNAL))
    one_way = models.GRU(hidden=4, bidirectional=False)
    assert one_way.init(jax.random.key(0), X)["params"]["head"]["kernel"].shape == (8 * 4, 10)  # 8 rows


@pytest.mark.parametrize("model", [models.CNN(), models.GRU(), models.NormGRU()])
def test_models_reject_inputs_without_a_spatial_axis(model):
    with pytest.raises(ValueError, match=r"expected images \(N, H, W, C\) or signals \(N, L, C\)"):
        model.init(jax.random.key(0), jnp.zeros((2, 64)))


@pytest.mark.parametrize("shape", [(3, 12, 5), (3, 6, 6, 5)])
def test_conv_is_flax_conv_with_same_padding_computed_as_patches_times_kernel(shape):
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(1), shape)
    ours, flax_conv = models.Conv(7, 3), nn.Conv(7, (3,) * (len(shape) - 2), padding="SAME")
    variables = ours.init(jax.random.key(0), x)
    # The same parameters, drawn the same way from the same key, and the same output.
    chex.assert_trees_all_equal(variables, flax_conv.init(jax.random.key(0), x))
    chex.assert_trees_all_close(ours.apply(variables, x), flax_conv.apply(variables, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        models.Conv(4, 2).init(jax.random.key(0), x)


# --- The normalized GRU (models.NormGRU / NormGRUCell) -------------------------------------------------------

ROWS = jax.random.normal(jax.random.key(5), (6, 5, 4))  # 6 sequences of 5 steps of 4 features


@pytest.mark.parametrize("norm", models.RNN_NORMS)
@pytest.mark.parametrize("x", [X, SIGNAL], ids=["images", "signals"])
def test_the_normalized_gru_gives_logits_and_batch_norm_keeps_statistics_per_step(norm, x):
    model = models.NormGRU(norm=norm, hidden=8)
    variables = model.init(jax.random.key(0), x)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == model.apply(variables, x).shape == (6, 10)
    chex.assert_tree_all_finite(logits)
    assert ("batch_stats" in variables) == (norm == "batch")
    if norm == "batch":  # one running mean / variance per time step and feature, for both projections
        features = math.prod(x.shape[2:])  # per step: W * C of an image row, C of a signal position
        names = {"recurrent_norm"} | ({"input_norm"} if features > 1 else set())
        stats = updates["batch_stats"]["cell"]
        assert set(stats) == names and all(s["mean"].shape == (x.shape[1], 24) for s in stats.values())


def _flax_gru_params(flax_params: dict) -> dict:
    """flax.linen.GRUCell's per-gate parameters as NormGRUCell(norm="none")'s side-by-side ones."""
    cat = lambda *xs: jnp.concatenate(xs, axis=-1)
    hidden = flax_params["hn"]["bias"].shape[0]
    return {"input": {"kernel": cat(*(flax_params[g]["kernel"] for g in ("ir", "iz", "in"))),
                      "bias": cat(*(flax_params[g]["bias"] for g in ("ir", "iz", "in")))},
            "recurrent": {"kernel": cat(*(flax_params[g]["kernel"] for g in ("hr", "hz", "hn"))),
                          "bias": cat(jnp.zeros(2 * hidden), flax_params["hn"]["bias"])}}


def test_the_cell_without_a_norm_is_flax_s_gru_cell():
    import flax.linen as nn

    h = jax.random.normal(jax.random.key(6), (6, 8))
    x = ROWS[:, 0]
    theirs = nn.GRUCell(8)
    flax_params = theirs.init(jax.random.key(0), h, x)["params"]
    # Random biases, so that a misplaced one (the candidate's recurrent bias sits inside r * (...)) shows.
    flax_params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(7), p.shape), flax_params)
    ours = models.NormGRUCell(8, norm="none")
    mapped = _flax_gru_params(flax_params)
    chex.assert_trees_all_equal_shapes(ours.init(jax.random.key(0), h, x)["params"], mapped)
    expected, _ = theirs.apply({"params": flax_params}, h, x)
    got, out = ours.apply({"params": mapped}, h, x)
    chex.assert_trees_all_close(got, expected, atol=1e-6)
    chex.assert_trees_all_equal(got, out)


def _apply_train(model, variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]


def test_layer_norm_statistics_are_per_example_and_per_step():
    # Layer norm over W_x x_t (no bias) removes any positive scale of one example's input at one step; over
    # W_h h_t every step is normalized on its own. So scaling one example at one step changes nothing: the
    # statistics are neither shared with the other examples nor with the other steps.
    model = models.NormGRU(norm="layer", hidden=8)
    variables = model.init(jax.random.key(1), ROWS)
    scaled = ROWS.at[2, 3].multiply(7.0)
    chex.assert_trees_all_close(_apply_train(model, variables, scaled), _apply_train(model, variables, ROWS),
                                atol=1e-5)
    plain = models.NormGRU(norm="none", hidden=8)  # the control: without a norm the scale matters
    plain_vars = plain.init(jax.random.key(1), ROWS)
    assert not jnp.allclose(plain.apply(plain_vars, scaled)[2], plain.apply(plain_vars, ROWS)[2], atol=1e-3)


def test_batch_norm_statistics_are_per_step_over_the_batch():
    model = models.NormGRU(norm="batch", hidden=8)
    variables = model.init(jax.random.key(1), ROWS)
    # Scaling one step of EVERY example scales each feature of that step's W_x x over the batch: removed by
    # statistics of that step (shared statistics over steps would not remove it) ...
    every = ROWS.at[:, 3].multiply(7.0)
    chex.assert_trees_all_close(_apply_train(model, variables, every), _apply_train(model, variables, ROWS),
                                atol=1e-4)
    # ... while scaling one example changes the others' outputs: the statistics cross the batch.
    one = ROWS.at[2, 3].multiply(7.0)
    assert not jnp.allclose(_apply_train(model, variables, one)[0], _apply_train(model, variables, ROWS)[0],
                            atol=1e-4)
    # The running mean of step t moved towards that step's batch mean of W_x x_t (momentum 0.9, from 0).
    _, updates = model.apply(variables, ROWS, train=True, mutable=["batch_stats"])
    kernel = variables["params"]["cell"]["input"]["kernel"]
    expected = (1 - models.BN_MOMENTUM) * jnp.einsum("ntf,fk->tk", ROWS, kernel) / ROWS.shape[0]
    chex.assert_trees_all_close(updates["batch_stats"]["cell"]["input_norm"]["mean"], expected, atol=1e-5)


def test_a_single_input_feature_is_not_layer_normalized_by_default():
    # W_x x is rank one for one feature per step: layer norm over it would keep only the sign of x.
    for x, normalized in ((SIGNAL, False), (ROWS, True)):
        params = models.NormGRU(norm="layer", hidden=8).init(jax.random.key(0), x)["params"]["cell"]
        assert ("input_norm" in params) == normalized and ("bias" in params["input"]) != normalized
    forced = models.NormGRU(norm="layer", hidden=8, normalize_input=True).init(jax.random.key(0), SIGNAL)
    assert "input_norm" in forced["params"]["cell"]


@pytest.mark.parametrize("norm", models.RNN_NORMS)
def test_the_normalized_gru_s_gradients_match_finite_differences(norm):
    from jax.test_util import check_grads

    model = models.NormGRU(norm=norm, hidden=4, num_classes=3)
    x = ROWS[:4, :3]
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(2), x))
        x64 = jnp.asarray(x, jnp.float64)
        weights = jnp.linspace(-1.0, 2.0, 4 * 3).reshape(4, 3)

        @jax.jit
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, x64, train=True, mutable=["batch_stats"])
            return jnp.sum(logits * weights)

        # Float64 central differences agree to ~1e-6 relative; a wrong gradient is off by O(1).
        check_grads(loss, (variables["params"],), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_the_normalized_gru_takes_only_the_recurrent_norms(norm):
    with pytest.raises(ValueError, match="norm must be one of 'none', 'batch', 'layer'"):
        models.NormGRU(norm=norm).init(jax.random.key(0), ROWS)
