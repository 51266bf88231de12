"""The fused Pallas layer/group norm (jaxopt_lab.normalization._pallas), interpreted on any backend.

Forward and every gradient are checked against the XLA path of jaxopt_lab.normalization, which has its
own tests against flax and float64 references. With ``JAXOPT_LAB_PALLAS_COMPILED=1`` (what
``scripts/gpu_check.sh`` sets on a GPU) the same checks run the kernels compiled instead of interpreted;
without a GPU they then fail, as they should.
"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jaxopt_lab import normalization as norm
from jaxopt_lab.normalization import _pallas as pallas_norm

# The kernels under test: interpreted (any backend) unless the compiled run is asked for.
INTERPRET = os.environ.get("JAXOPT_LAB_PALLAS_COMPILED", "") in ("", "0")


def _inputs(shape, dtype=jnp.float32, offset=3.0, seed=0):
    kx, ks, kb, kd = jax.random.split(jax.random.key(seed), 4)
    channels = shape[-1]
    x = (jax.random.normal(kx, shape) * 2.0 + offset).astype(dtype)
    scale = 1.0 + 0.5 * jax.random.normal(ks, (channels,))
    bias = jax.random.normal(kb, (channels,))
    dy = jax.random.normal(kd, shape).astype(dtype)
    return x, scale, bias, dy


def _fwd_and_grads(fn, x, scale, bias, dy):
    y, vjp = jax.vjp(fn, x, scale, bias)
    return (y, *vjp(dy))


def _assert_matches_xla(ours, reference, x, scale, bias, dy, atol=2e-5, rtol=2e-5):
    got = _fwd_and_grads(ours, x, scale, bias, dy)
    want = _fwd_and_grads(reference, x, scale, bias, dy)
    for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol, rtol=rtol,
                                   err_msg=name)


@pytest.mark.parametrize("shape", [(64, 128), (12, 32), (2, 5, 3, 16)])
def test_layer_norm_matches_the_xla_path(shape):
    # Tokens (R, C) with R a power of two and not; NHWC with C on the last axis.
    x, scale, bias, dy = _inputs(shape)
    _assert_matches_xla(lambda x, s, b: pallas_norm.layer_norm(x, s, b, eps=1e-5, interpret=INTERPRET),
                        lambda x, s, b: norm.layer_norm(x, s, b, eps=1e-5), x, scale, bias, dy)


@pytest.mark.parametrize(("shape", "groups"), [((2, 4, 4, 16), 4), ((3, 5, 6, 8), 2), ((2, 3, 4), 1),
                                               ((4, 12), 3)])
def test_group_norm_matches_the_xla_path(shape, groups):
    # Groups of several channels, one group (layer norm over H, W, C), C groups (instance norm), (N, C).
    x, scale, bias, dy = _inputs(shape)
    _assert_matches_xla(lambda x, s, b: pallas_norm.group_norm(x, groups, s, b, eps=1e-5, interpret=INTERPRET),
                        lambda x, s, b: norm.group_norm(x, groups, s, b, eps=1e-5), x, scale, bias, dy)


class JitTest(chex.TestCase):
    """The custom_vjp under jit (one small shape each: interpreted kernels compile slowly)."""

    @chex.variants(with_jit=True)
    def test_under_jit(self):
        x, scale, bias, dy = _inputs((2, 2, 4, 8))
        group = lambda x, s, b: pallas_norm.group_norm(x, 2, s, b, interpret=INTERPRET)
        _assert_matches_xla(self.variant(group),
                            lambda x, s, b: norm.group_norm(x, 2, s, b), x, scale, bias, dy)
        _assert_matches_xla(self.variant(lambda x, s, b: pallas_norm.layer_norm(x, s, b, interpret=INTERPRET)),
                            lambda x, s, b: norm.layer_norm(x, s, b), x, scale, bias, dy)


def test_bfloat16_inputs_keep_float32_statistics():
    x, scale, bias, dy = _inputs((2, 4, 4, 16), jnp.bfloat16)
    _assert_matches_xla(lambda x, s, b: pallas_norm.group_norm(x, 4, s, b, interpret=INTERPRET),
                        lambda x, s, b: norm.group_norm(x, 4, s, b), x, scale, bias, dy, atol=3e-2, rtol=3e-2)
    _assert_matches_xla(lambda x, s, b: pallas_norm.layer_norm(x, s, b, interpret=INTERPRET),
                        lambda x, s, b: norm.layer_norm(x, s, b), x, scale, bias, dy, atol=3e-2, rtol=3e-2)
    assert pallas_norm.layer_norm(x, scale, bias, interpret=INTERPRET).dtype == jnp.bfloat16


def test_large_offset_is_normalized_accurately():
    # The block is resident, so the statistics are two-pass: no cancellation at a large common offset.
    x, _, _, _ = _inputs((4, 8, 8, 16), offset=1e4)
    x64 = np.asarray(x, np.float64).reshape(4, 64, 4, 4)
    want = (x64 - x64.mean((1, 3), keepdims=True)) / np.sqrt(x64.var((1, 3), keepdims=True) + 1e-6)
    got = pallas_norm.group_norm(x, 4, eps=1e-6, interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(got, np.float64), want.reshape(x.shape), atol=5e-3)
    assert float(jnp.max(jnp.abs(got))) > 1.0  # not collapsed to zero by a cancelled variance


def test_default_parameters_are_identity_affine():
    x, _, _, _ = _inputs((8, 32))
    np.testing.assert_allclose(pallas_norm.layer_norm(x, interpret=INTERPRET), norm.layer_norm(x), atol=2e-6)
    np.testing.assert_allclose(pallas_norm.group_norm(x, 4, interpret=INTERPRET), norm.group_norm(x, 4),
                               atol=2e-6)


@settings(max_examples=3, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.sampled_from([(4, 2), (6, 3), (8, 8)]),
       st.integers(0, 2**16))
def test_group_norm_property(n, spatial, channels_groups, seed):
    channels, groups = channels_groups
    # A group of 2 elements normalizes to x_hat = +-1 whatever x is: its exact dx is 0, and both paths
    # return rounding noise scaled by 1/sigma, which no relative tolerance compares. 4+ elements per group.
    assume(spatial * (spatial + 1) * (channels // groups) >= 4)
    x, scale, bias, dy = _inputs((n, spatial, spatial + 1, channels), seed=seed)
    _assert_matches_xla(lambda x, s, b: pallas_norm.group_norm(x, groups, s, b, interpret=INTERPRET),
                        lambda x, s, b: norm.group_norm(x, groups, s, b), x, scale, bias, dy,
                        atol=5e-5, rtol=5e-5)


def test_backend_checks():
    assert not pallas_norm.available("cpu") and not pallas_norm.available("tpu")
    assert pallas_norm.available() == pallas_norm.available(jax.default_backend())
    assert pallas_norm.supported((64, 1024)) and not pallas_norm.supported((64, 1000))
    assert pallas_norm.supported((8, 16, 16, 64), 32)  # H*W = 256, C/G = 2
    assert not pallas_norm.supported((8, 56, 56, 64), 32)  # H*W = 3136 is not a power of two
    assert not pallas_norm.supported((8, 256, 256, 64), 1)  # one group of 4M elements: too large
    assert not pallas_norm.supported((8, 16, 16, 64), 3)  # 3 does not divide 64
    assert not pallas_norm.supported((8,))


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: pallas_norm.layer_norm(jnp.ones((2, 4)), jnp.ones(3), interpret=True), ValueError,
     r"scale must have shape \(C,\) = \(4,\)"),
    (lambda: pallas_norm.layer_norm(jnp.ones((2, 4), jnp.int32), interpret=True), TypeError, "floating-point"),
    (lambda: pallas_norm.layer_norm(jnp.ones((2, 4)), eps=-1.0, interpret=True), ValueError, "eps must be"),
    (lambda: pallas_norm.layer_norm(jnp.ones((2, 4)), interpret=1), TypeError, "interpret must be a bool"),
    (lambda: pallas_norm.group_norm(jnp.ones((2, 3, 4)), 3, interpret=True), ValueError,
     "not divisible by num_groups=3"),
    (lambda: pallas_norm.group_norm(jnp.ones((2, 3, 4)), 0, interpret=True), ValueError,
     "num_groups must be a positive integer"),
    (lambda: pallas_norm.group_norm(jnp.ones((4,)), 1, interpret=True), ValueError, "rank >= 2"),
])
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_compiled_kernels_need_a_gpu(monkeypatch):
    monkeypatch.setattr(pallas_norm, "available", lambda backend=None: False)
    with pytest.raises(ValueError, match=r"need a GPU backend.*interpret=True"):
        pallas_norm.layer_norm(jnp.ones((2, 4)))
    monkeypatch.setattr(pallas_norm, "available", lambda backend=None: True)
    with pytest.raises(ValueError, match="does not fit the compiled kernel"):
        pallas_norm.group_norm(jnp.ones((2, 3, 3, 4)), 2)  # H*W = 9: unsupported, checked before compiling
