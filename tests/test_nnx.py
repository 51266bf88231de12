"""Tests of jaxopt_lab.nnx: the native NNX modules against flax.nnx's, variables and semantics."""

from __future__ import annotations

import chex
import jax
import pytest
from flax import nnx

from jaxopt_lab import nnx as jnnx

X = 1.5 + 2.0 * jax.random.normal(jax.random.key(0), (6, 4, 4, 16))
MASK = jax.random.bernoulli(jax.random.key(3), 0.7, X.shape).at[:, 0, 0].set(True)

# (our module, flax's) built by the same constructor call, and the call's keyword arguments.
NNX_PAIRS = [
    (lambda nnx_, **k: nnx_.BatchNorm(16, momentum=0.9, **k), {}),
    (lambda nnx_, **k: nnx_.LayerNorm(16, **k), {"mask": MASK}),
    (lambda nnx_, **k: nnx_.InstanceNorm(16, **k), {}),
    (lambda nnx_, **k: nnx_.GroupNorm(16, num_groups=4, **k), {"mask": MASK}),
]


@pytest.mark.parametrize("make, kwargs", NNX_PAIRS, ids=["BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm"])
def test_nnx_modules_match_flax_nnx_and_share_its_state(make, kwargs):
    ours, theirs = make(jnnx, rngs=nnx.Rngs(0)), make(nnx, rngs=nnx.Rngs(0), use_fast_variance=False)
    # Same variables (types, names, shapes): flax's state loads into ours unchanged.
    state = jax.tree.map(lambda v: v + jax.random.uniform(jax.random.key(2), v.shape), nnx.state(theirs))
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(state)
    nnx.update(ours, state)
    nnx.update(theirs, state)

    @nnx.jit
    def step(model, x):
        return model(x, **kwargs)

    for i in range(2):  # BatchNorm: training mode by default, the running statistics move alike
        chex.assert_trees_all_close(step(ours, X + i), step(theirs, X + i), atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(nnx.state(ours), nnx.state(theirs), atol=1e-5, rtol=1e-5)
    ours.eval()
    theirs.eval()
    chex.assert_trees_all_close(step(ours, X), step(theirs, X), atol=2e-5, rtol=2e-5)


def test_nnx_group_norm_checks_its_groups_at_construction():
    with pytest.raises(ValueError, match=r"16 channels .* not divisible by num_groups=5"):
        jnnx.GroupNorm(16, num_groups=5, rngs=nnx.Rngs(0))
