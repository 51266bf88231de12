"""The digits models with every norm: shapes, which variables exist, batch (in)dependence, errors."""

import chex
import jax
import jax.numpy as jnp
import pytest

from jaxopt_lab import models
from jaxopt_lab import nn as norms

X = jax.random.normal(jax.random.key(0), (6, 8, 8, 1))


def _small_cnn(norm: str) -> models.CNN:
    return models.CNN(norm=norm, widths=(4, 8), num_groups=2)


def _models_with(norm: str) -> list:
    out = [_small_cnn(norm)]
    if norm != "instance":
        out.append(models.MLP(norm=norm, widths=(16,), num_groups=4))
    if norm in ("none", "batch", "layer"):
        out.append(models.RowRNN(norm=norm, hidden=8))
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
    (lambda: models.RowRNN(norm="group"), "norm must be one of"),
])
def test_bad_configurations_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make().init(jax.random.key(0), X)


@pytest.mark.parametrize("model", [models.CNN(), models.RowRNN()])
def test_models_need_nhwc_images(model):
    with pytest.raises(ValueError, match=r"expected images \(N, H, W, C\)"):
        model.init(jax.random.key(0), jnp.zeros((2, 64)))
