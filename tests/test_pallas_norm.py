"""The fused Pallas layer/group norm (jaxopt_lab.normalization._pallas), interpreted on any backend.

Forward and every gradient are checked against the XLA path of jaxopt_lab.normalization, which has its
own tests against flax and float64 references. With ``JAXOPT_LAB_PALLAS_COMPILED=1`` (what
``scripts/gpu_check.sh`` sets on a GPU) the same checks run the kernels compiled instead of interpreted;
without a GPU they then fail, as they should.
"""

import functools
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


# --- the dispatch of jaxopt_lab.normalization to the kernels ------------------------------------------

BACKEND = jax.default_backend()


def _uses_kernel(fn, *args) -> bool:
    """Whether tracing ``fn(*args)`` reaches a Pallas kernel."""
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


@pytest.fixture
def verified(monkeypatch):
    """Layer and group norm verified in float32 on this backend, the dispatch running the kernels as the
    rest of this file does (interpreted unless JAXOPT_LAB_PALLAS_COMPILED=1)."""
    entries = {pallas_norm.Verified(name, BACKEND, "float32"): "test" for name in pallas_norm.KERNELS}
    monkeypatch.setattr(pallas_norm, "VERIFIED", entries)
    monkeypatch.setattr(pallas_norm, "DISPATCH_INTERPRETED", INTERPRET)


def test_nothing_dispatches_off_gpu_or_unverified(monkeypatch):
    x = jnp.ones((8, 16, 16, 32))
    if not pallas_norm.available():  # this process's own VERIFIED record cannot route a CPU to the kernels
        assert not _uses_kernel(norm.layer_norm, x) and not _uses_kernel(lambda x: norm.group_norm(x, 4), x)
    monkeypatch.setattr(pallas_norm, "VERIFIED", {})
    assert not _uses_kernel(norm.layer_norm, x) and not _uses_kernel(lambda x: norm.group_norm(x, 4), x)
    # A CPU entry does not make the kernels compile there; a GPU without an entry does not dispatch.
    monkeypatch.setattr(pallas_norm, "VERIFIED", {pallas_norm.Verified("layer_norm", "cpu", "float32"): "x"})
    assert not pallas_norm.dispatches("layer_norm", (64, 1024), jnp.float32, backend="cpu")
    assert not pallas_norm.dispatches("layer_norm", (64, 1024), jnp.float32, backend="gpu")
    monkeypatch.setattr(pallas_norm, "VERIFIED", {pallas_norm.Verified("layer_norm", "gpu", "float32"): "x"})
    monkeypatch.setattr(pallas_norm, "available", lambda backend=None: backend == "gpu")
    assert pallas_norm.dispatches("layer_norm", (64, 1024), jnp.float32, backend="gpu")
    assert not pallas_norm.dispatches("layer_norm", (64, 1024), jnp.bfloat16, backend="gpu")  # not verified
    assert not pallas_norm.dispatches("group_norm", (8, 16, 16, 64), jnp.float32, 32, backend="gpu")
    assert not pallas_norm.dispatches("layer_norm", (64, 1000), jnp.float32, backend="gpu")  # unsupported


def _float64_vjp(x, scale, bias, dy, groups):
    """(y, dx, dscale, dbias) of channels-last group norm (``groups=None``: layer norm) in float64."""
    x, scale, bias, dy = (np.asarray(a, np.float64) for a in (x, scale, bias, dy))
    shape = x.shape
    grouped = (*shape[:-1], 1, shape[-1]) if groups is None else (*shape[:-1], groups, shape[-1] // groups)
    axes = (x.ndim,) if groups is None else (*range(1, x.ndim - 1), x.ndim)
    xg, g = x.reshape(grouped), (dy * scale).reshape(grouped)
    rstd = 1.0 / np.sqrt(xg.var(axes, keepdims=True) + 1e-5)
    x_hat = (xg - xg.mean(axes, keepdims=True)) * rstd
    dx = rstd * (g - g.mean(axes, keepdims=True) - x_hat * (g * x_hat).mean(axes, keepdims=True))
    x_hat = x_hat.reshape(shape)
    lead = tuple(range(x.ndim - 1))
    return x_hat * scale + bias, dx.reshape(shape), (dy * x_hat).sum(lead), dy.sum(lead)


@pytest.mark.usefixtures("verified")
@pytest.mark.parametrize(("shape", "groups"), [((4, 8, 8, 16), None), ((64, 128), None), ((2, 4, 4, 16), 4),
                                               ((4, 12), 3)])
def test_verified_auto_path_takes_the_kernel_and_matches_xla_and_float64(shape, groups):
    x, scale, bias, dy = _inputs(shape)

    def ours(x, s, b, implementation=None):
        if groups is None:
            return norm.layer_norm(x, s, b, eps=1e-5, implementation=implementation)
        return norm.group_norm(x, groups, s, b, eps=1e-5, implementation=implementation)

    # Forward and backward both run the kernels; "xla" stays on the XLA path.
    assert _uses_kernel(lambda *a: _fwd_and_grads(ours, *a), x, scale, bias, dy)
    assert "_bwd" in str(jax.make_jaxpr(lambda *a: _fwd_and_grads(ours, *a))(x, scale, bias, dy))
    xla = functools.partial(ours, implementation="xla")
    assert not _uses_kernel(lambda *a: _fwd_and_grads(xla, *a), x, scale, bias, dy)
    _assert_matches_xla(ours, xla, x, scale, bias, dy)
    for name, got, want in zip(("y", "dx", "dscale", "dbias"), _fwd_and_grads(ours, x, scale, bias, dy),
                               _float64_vjp(x, scale, bias, dy, groups), strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-4, rtol=2e-5, err_msg=name)


@pytest.mark.usefixtures("verified")
def test_flax_modules_take_the_verified_kernel():
    from jaxopt_lab import nn as jnn

    x = jnp.ones((2, 4, 4, 16)).at[:, 0].set(3.0)
    for module in (jnn.LayerNorm(), jnn.GroupNorm(num_groups=4)):
        variables = module.init(jax.random.key(0), x)
        assert _uses_kernel(lambda v, x: module.apply(v, x), variables, x)  # noqa: B023 (called at once)
        xla = (norm.layer_norm(x, eps=1e-6, implementation="xla") if isinstance(module, jnn.LayerNorm)
               else norm.group_norm(x, 4, eps=1e-6, implementation="xla"))
        np.testing.assert_allclose(module.apply(variables, x), xla, atol=2e-5)


@pytest.mark.usefixtures("verified")
@pytest.mark.parametrize("call", [
    lambda x: norm.layer_norm(x[..., :12]),                                   # C = 12: not a power of two
    lambda x: norm.group_norm(x[:, :3, :3], 4),                               # H*W = 9
    lambda x: norm.layer_norm(x.astype(jnp.bfloat16)),                        # bfloat16 is not verified
    lambda x: norm.layer_norm(x, mask=x > 0),
    lambda x: norm.layer_norm(x, reduction_axes=(1, 2, 3)),
    lambda x: norm.layer_norm(x, jnp.ones((4, 16)), feature_axes=(2, 3)),
    lambda x: norm.group_norm(x, 4, reduction_axes=(2, 3)),
    lambda x: norm.layer_norm(x.astype(jnp.complex64)),
    lambda x: norm.layer_norm(x, implementation="xla"),
], ids=["odd-C", "odd-HW", "bf16", "mask", "axes", "feature-axes", "gn-axes", "complex", "xla"])
def test_calls_the_kernel_does_not_fit_take_the_xla_path(call):
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 16))
    assert not _uses_kernel(call, x)


def test_explicit_pallas_is_checked_before_anything_runs(monkeypatch):
    x = jnp.ones((2, 4, 4, 16))
    with pytest.raises(ValueError, match=r"must be None \(automatic\), 'xla' or 'pallas', got 'triton'"):
        norm.layer_norm(x, implementation="triton")
    if not pallas_norm.available():
        with pytest.raises(ValueError, match=r"layer_norm: implementation='pallas' needs a GPU backend"):
            norm.layer_norm(x, implementation="pallas")
    monkeypatch.setattr(pallas_norm, "DISPATCH_INTERPRETED", True)  # as if the kernels could run here
    with pytest.raises(ValueError, match=r"group_norm: implementation='pallas'.* with 4 groups does not fit"):
        norm.group_norm(x[:, :3, :3], 4, implementation="pallas")
    with pytest.raises(ValueError, match=r"implementation='pallas' needs the kernel's layout: no mask"):
        norm.layer_norm(x, mask=x > 0, implementation="pallas")
    with pytest.raises(ValueError, match=r"layout: real input of at most 32 bits"):
        norm.layer_norm(x.astype(jnp.complex64), implementation="pallas")
    # Asked for explicitly, the kernel runs without a VERIFIED entry.
    assert _uses_kernel(lambda x: norm.group_norm(x, 4, implementation="pallas"), x)
    with pytest.raises(ValueError, match=r"dispatches: num_groups is needed for group_norm"):
        pallas_norm.dispatches("group_norm", x.shape, x.dtype)
