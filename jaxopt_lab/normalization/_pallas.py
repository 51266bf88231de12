"""Fused layer and group norm forward + backward as Pallas kernels: an optional GPU path.

On XLA:CPU (and, less so, XLA:GPU) the compiled forward + backward of a norm streams ``x`` and ``dy``
through memory more times than the four passes it needs (read x and dy, write y and dx): XLA
materializes broadcasts and intermediates such as ``x_hat`` between its reduction fusions
(``docs/benchmarks.md`` counts them per norm). These kernels do each normalization group in one program
instance that holds the group on chip:

* forward: one kernel reads ``x`` once, computes the group's mean and ``rstd = 1/sqrt(var + eps)``
  (two-pass on the resident block: exact centering, no cancellation), writes ``y`` and saves only
  ``mean`` and ``rstd`` (one number each per group) for the backward;
* backward: one kernel reads ``x`` and ``dy`` once, *recomputes* ``x_hat`` from the saved statistics
  instead of storing it, writes ``dx`` and per-program *partial* sums of ``dy * x_hat`` and ``dy``;
  one small XLA reduction of those partials gives ``dscale`` and ``dbias``,

the structure of JAX's own ``jax/experimental/pallas/ops/gpu/layer_norm.py`` (and of openxla/tokamax),
here for channels-last group norm as well. The math is that of :mod:`jaxopt_lab.normalization` (biased
variance, statistics in float32, output in the input's dtype); the tests check both passes against it.

The kernels use only the portable ``pl.pallas_call`` API with ``BlockSpec`` tiling, so they compile with
Pallas' Triton backend on GPUs and run anywhere with ``interpret=True`` (how the tests run them on CPU).
``jaxopt_lab.normalization.layer_norm`` and ``group_norm`` take them only where they are verified to be
faster, never by trying them and falling back on an error (a Triton lowering error would surface inside
the caller's ``jit``, after the choice). With ``implementation=None`` (the default) a call takes the kernel
when :func:`dispatches` says so: this process can compile them (:func:`available`: a GPU backend), the
``(norm, backend, dtype)`` is in :data:`VERIFIED`, and the shape fits Triton's constraints
(:func:`supported`: power-of-two block sizes, a normalization group small enough for one program).
:data:`VERIFIED` is empty until a run on a GPU verifies the kernels (``scripts/gpu_check.sh`` prints the
figures that decide), so every backend takes the XLA path today. ``implementation="pallas"`` asks for the
kernel explicitly and raises a ``ValueError`` where it cannot run; ``implementation="xla"`` never takes it.

>>> import jax.numpy as jnp
>>> from jaxopt_lab.normalization import _pallas as pallas_norm
>>> x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
>>> y = pallas_norm.layer_norm(x, jnp.ones(4), jnp.zeros(4), eps=0.0, interpret=True)
>>> y.round(4)
Array([[-1.3416, -0.4472,  0.4472,  1.3416]], dtype=float32)

References: Ba, Kiros & Hinton, "Layer Normalization", 2016; Wu & He, "Group Normalization", ECCV 2018;
Tillet et al., "Triton", MAPL 2019.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxopt_lab.normalization._checks import check_eps

__all__ = ["DISPATCH_INTERPRETED", "IMPLEMENTATIONS", "KERNELS", "MAX_BLOCK_ELEMENTS", "VERIFIED",
           "Implementation", "Verified", "available", "dispatches", "group_norm", "layer_norm", "supported",
           "takes_kernel"]

# The most elements one program instance holds (one normalization group, or a block of layer norm rows).
# A Triton program keeps its block in registers / shared memory; 64K float32 is its practical ceiling.
MAX_BLOCK_ELEMENTS = 1 << 16


def available(backend: str | None = None) -> bool:
    """Whether the kernels can be compiled here: a GPU backend (Pallas' Triton lowering) is present.

    ``backend`` defaults to ``jax.default_backend()``. On CPU and TPU this is False (use the XLA path;
    the kernels still run there with ``interpret=True``, for testing).
    """
    backend = jax.default_backend() if backend is None else backend
    if backend not in ("gpu", "cuda", "rocm"):
        return False
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:  # pragma: no cover - a jaxlib without the Triton lowering
        return False
    return True


Implementation = Literal["xla", "pallas"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "pallas")
KERNELS = ("layer_norm", "group_norm")


class Verified(NamedTuple):
    """A ``(norm, backend, dtype)`` where ``implementation=None`` takes the kernel (a key of :data:`VERIFIED`).

    ``norm`` is ``"layer_norm"`` or ``"group_norm"``, ``backend`` what ``jax.default_backend()`` returns
    (``"gpu"``), ``dtype`` the name of ``x``'s dtype (``"float32"``, ``"bfloat16"``).
    """

    norm: str
    backend: str
    dtype: str


# Where the automatic choice takes the kernels. An entry is added after a run on a GPU verified it, and
# only then: the kernels' tests passed compiled on that backend (scripts/gpu_check.sh, step "Pallas
# kernels compiled") and `jaxopt-lab bench --group norms` timed the kernel at most 1.0x the XLA path by
# the upper quartile on every supported shape of that norm and dtype, in both contexts (vjp and loss).
# The value records that evidence: device, jax/jaxlib versions, commit, the ratios. Empty: no GPU has
# verified the kernels yet, so every backend takes the XLA path.
VERIFIED: Mapping[Verified, str] = MappingProxyType({})

# What the dispatch passes as ``interpret``: False compiles the kernels (the only setting for real use).
# Tests set it, together with a VERIFIED entry for their backend, to route the automatic path through the
# interpreted kernels on a CPU.
DISPATCH_INTERPRETED = False


def dispatches(norm: str, shape: tuple[int, ...], dtype: Any, num_groups: int | None = None, *,
               backend: str | None = None) -> bool:
    """Whether ``implementation=None`` takes the kernel for a call of ``norm`` on ``x`` of this shape and dtype.

    True only where this process can run the kernels (:func:`available`; or :data:`DISPATCH_INTERPRETED`),
    ``Verified(norm, backend, dtype)`` is in :data:`VERIFIED` and the shape is :func:`supported`. The caller
    also needs the kernel's layout: no ``mask`` or ``axis_name``, the default axes (see
    ``jaxopt_lab.normalization.layer_norm``). ``backend`` defaults to ``jax.default_backend()``, which the
    choice is made for at trace time.

    >>> import jax.numpy as jnp
    >>> from jaxopt_lab.normalization import _pallas as pallas_norm
    >>> pallas_norm.dispatches("layer_norm", (64, 1024), jnp.float32, backend="cpu")
    False
    """
    if norm not in KERNELS:
        raise ValueError(f"dispatches: norm must be one of {KERNELS}, got {norm!r}")
    if (norm == "group_norm") != (num_groups is not None):
        raise ValueError(f"dispatches: num_groups is needed for group_norm and only for it, got {num_groups!r} "
                         f"for {norm!r}")
    backend = jax.default_backend() if backend is None else backend
    return (Verified(norm, backend, jnp.dtype(dtype).name) in VERIFIED
            and (DISPATCH_INTERPRETED or available(backend)) and supported(tuple(shape), num_groups))


def takes_kernel(fn: str, norm: str, implementation: Any, x: jax.Array, num_groups: int | None,
                 not_kernel_layout: str | None) -> bool:
    """Whether a call of ``fn`` takes the kernel; checks ``implementation`` (None, ``"xla"``, ``"pallas"``).

    ``not_kernel_layout`` is why the call's arguments do not fit the kernel (a mask, other axes, ...), None
    when they do. ``None`` asks :func:`dispatches`; ``"pallas"`` raises a ``ValueError`` naming why the
    kernel cannot run, before anything is traced, instead of falling back.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{fn}: implementation must be None (automatic), 'xla' or 'pallas', "
                         f"got {implementation!r}")
    if implementation == "xla":
        return False
    if implementation is None:
        return not_kernel_layout is None and dispatches(norm, x.shape, x.dtype, num_groups)
    if not_kernel_layout is not None:
        raise ValueError(f"{fn}: implementation='pallas' needs the kernel's layout: {not_kernel_layout}")
    if not (DISPATCH_INTERPRETED or available()):
        raise ValueError(f"{fn}: implementation='pallas' needs a GPU backend (this process has "
                         f"{jax.default_backend()!r}); use implementation=None or 'xla'")
    if not supported(x.shape, num_groups):
        raise ValueError(f"{fn}: implementation='pallas': shape {x.shape}"
                         + ("" if num_groups is None else f" with {num_groups} groups")
                         + f" does not fit the compiled kernel ({_SHAPE_RULE[norm]})")
    return True


_SHAPE_RULE = {"layer_norm": f"C a power of two <= {MAX_BLOCK_ELEMENTS}",
               "group_norm": f"H*W and C/G powers of two, H*W*C/G <= {MAX_BLOCK_ELEMENTS}"}


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def supported(shape: tuple[int, ...], num_groups: int | None = None) -> bool:
    """Whether a channels-last ``shape`` fits the compiled (Triton) kernels.

    ``num_groups=None`` asks about :func:`layer_norm` over the last axis, otherwise about
    :func:`group_norm` with that many groups. Triton needs power-of-two block sizes, and one program
    holds one normalization group (group norm: ``H*W x C/G`` elements) or one block of rows (layer
    norm: ``C`` elements each), at most :data:`MAX_BLOCK_ELEMENTS`. With ``interpret=True`` every shape
    works; this is about compiling for a GPU.
    """
    if len(shape) < 2 or any(d < 1 for d in shape):
        return False
    channels = shape[-1]
    if num_groups is None:
        return _is_power_of_two(channels) and channels <= MAX_BLOCK_ELEMENTS
    if channels % num_groups:
        return False
    spatial = math.prod(shape[1:-1])
    group_size = channels // num_groups
    return (_is_power_of_two(spatial) and _is_power_of_two(group_size)
            and spatial * group_size <= MAX_BLOCK_ELEMENTS)


def _check(fn: str, x: Any, scale: Any, bias: Any, eps: float, min_ndim: int) -> tuple[jax.Array, ...]:
    """``(x, scale, bias)`` checked, with ``scale``/``bias`` defaulting to ones/zeros of shape ``(C,)``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: x must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{fn}: x must have rank >= {min_ndim} (channels last), got shape {x.shape}")
    channels = x.shape[-1]
    params = []
    for name, p in (("scale", scale), ("bias", bias)):
        p = jnp.ones((channels,), x.dtype) if p is None and name == "scale" else p
        p = jnp.zeros((channels,), x.dtype) if p is None else jnp.asarray(p)
        if p.shape != (channels,):
            raise ValueError(f"{fn}: {name} must have shape (C,) = ({channels},) for x of shape {x.shape}, "
                             f"got shape {p.shape}")
        params.append(p)
    check_eps(fn, eps)
    return x, params[0], params[1]


def _check_dtype(fn: str, dtype: Any, x: jax.Array) -> jnp.dtype:
    """The output dtype: ``x``'s by default, else a floating-point ``dtype``."""
    if dtype is None:
        return x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{fn}: dtype must be a floating-point dtype (of the output), got {dtype!r}")
    return jnp.dtype(dtype)


def _check_interpret(fn: str, interpret: bool) -> None:
    if not isinstance(interpret, bool):
        raise TypeError(f"{fn}: interpret must be a bool, got {type(interpret).__name__}")
    if not interpret and not available():
        raise ValueError(f"{fn}: the compiled kernels need a GPU backend (this process has "
                         f"{jax.default_backend()!r}); pass interpret=True to run them anyway (slowly, for "
                         f"testing) or use jaxopt_lab.normalization")


# --------------------------------------------------------------------------------------------------
# The kernels. Each program instance sees one block: ``x_ref`` of shape (rows, K) for layer norm (one
# group per row, statistics over K) or (M, K) for group norm (one group, statistics over the block).


def _stats(x: jax.Array, axes: tuple[int, ...], eps: float) -> tuple[jax.Array, jax.Array]:
    """Two-pass mean and 1/sqrt(var + eps) of the resident block (keepdims)."""
    mean = jnp.mean(x, axes, keepdims=True)
    centered = x - mean
    return mean, lax.rsqrt(jnp.mean(centered * centered, axes, keepdims=True) + eps)


def _fwd_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, axes, eps):
    x = x_ref[...].astype(jnp.float32)
    mean, rstd = _stats(x, axes, eps)
    scale = scale_ref[...].astype(jnp.float32)
    bias = bias_ref[...].astype(jnp.float32)
    y_ref[...] = ((x - mean) * rstd * scale + bias).astype(y_ref.dtype)
    mean_ref[...] = mean.reshape(mean_ref.shape)
    rstd_ref[...] = rstd.reshape(rstd_ref.shape)


def _bwd_kernel(x_ref, scale_ref, mean_ref, rstd_ref, dy_ref, dx_ref, dscale_ref, dbias_ref, *, axes):
    x = x_ref[...].astype(jnp.float32)
    dy = dy_ref[...].astype(jnp.float32)
    stat_shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
    mean = mean_ref[...].reshape(stat_shape)
    rstd = rstd_ref[...].reshape(stat_shape)
    x_hat = (x - mean) * rstd  # recomputed from x and the saved statistics, never stored
    g = dy * scale_ref[...].astype(jnp.float32)
    mean_g = jnp.mean(g, axes, keepdims=True)
    mean_g_x_hat = jnp.mean(g * x_hat, axes, keepdims=True)
    dx_ref[...] = (rstd * (g - mean_g - x_hat * mean_g_x_hat)).astype(dx_ref.dtype)
    # This program's share of the parameter gradients: sums over its rows / positions.
    dscale_ref[...] = jnp.sum(dy * x_hat, axis=0, keepdims=True).reshape(dscale_ref.shape)
    dbias_ref[...] = jnp.sum(dy, axis=0, keepdims=True).reshape(dbias_ref.shape)


def _compiler_params(interpret: bool, block_elements: int) -> dict[str, Any]:
    if interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu  # only where the Triton lowering is used

    return {"compiler_params": plgpu.CompilerParams(num_warps=min(8, max(1, block_elements // 1024)))}


# --------------------------------------------------------------------------------------------------
# Layer norm over the last axis: x as (R, C), a grid over blocks of rows.


def _row_block(rows: int, channels: int) -> int:
    """The largest power of two dividing ``rows`` with a block of at most MAX_BLOCK_ELEMENTS / 16."""
    block = 1
    while rows % (2 * block) == 0 and 2 * block * channels <= MAX_BLOCK_ELEMENTS // 16:
        block *= 2
    return block


def _ln_forward(x2, scale, bias, eps, interpret, dtype):
    rows, channels = x2.shape
    block = _row_block(rows, channels)
    row_spec = pl.BlockSpec((block, channels), lambda i: (i, 0))
    param_spec = pl.BlockSpec((1, channels), lambda i: (0, 0))
    stat_spec = pl.BlockSpec((block, 1), lambda i: (i, 0))
    y, mean, rstd = pl.pallas_call(
        functools.partial(_fwd_kernel, axes=(1,), eps=eps),
        grid=(rows // block,),
        in_specs=[row_spec, param_spec, param_spec],
        out_specs=[row_spec, stat_spec, stat_spec],
        out_shape=[jax.ShapeDtypeStruct(x2.shape, dtype),
                   jax.ShapeDtypeStruct((rows, 1), jnp.float32), jax.ShapeDtypeStruct((rows, 1), jnp.float32)],
        interpret=interpret, name="layer_norm_fwd", **_compiler_params(interpret, block * channels),
    )(x2, scale.reshape(1, channels), bias.reshape(1, channels))
    return y, mean, rstd


def _ln_backward(x2, scale, mean, rstd, dy2, interpret):
    rows, channels = x2.shape
    block = _row_block(rows, channels)
    blocks = rows // block
    row_spec = pl.BlockSpec((block, channels), lambda i: (i, 0))
    param_spec = pl.BlockSpec((1, channels), lambda i: (0, 0))
    stat_spec = pl.BlockSpec((block, 1), lambda i: (i, 0))
    partial_spec = pl.BlockSpec((1, channels), lambda i: (i, 0))
    dx, dscale, dbias = pl.pallas_call(
        functools.partial(_bwd_kernel, axes=(1,)),
        grid=(blocks,),
        in_specs=[row_spec, param_spec, stat_spec, stat_spec, row_spec],
        out_specs=[row_spec, partial_spec, partial_spec],
        out_shape=[jax.ShapeDtypeStruct(x2.shape, x2.dtype),
                   jax.ShapeDtypeStruct((blocks, channels), jnp.float32),
                   jax.ShapeDtypeStruct((blocks, channels), jnp.float32)],
        interpret=interpret, name="layer_norm_bwd", **_compiler_params(interpret, block * channels),
    )(x2, scale.reshape(1, channels), mean, rstd, dy2)
    return dx, dscale.sum(0), dbias.sum(0)  # the one reduce of the per-program partial sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _layer_norm(x2, scale, bias, eps, interpret, dtype):
    return _ln_forward(x2, scale, bias, eps, interpret, dtype)[0]


def _layer_norm_fwd(x2, scale, bias, eps, interpret, dtype):
    y, mean, rstd = _ln_forward(x2, scale, bias, eps, interpret, dtype)
    return y, (x2, scale, bias, mean, rstd)


def _layer_norm_bwd(eps, interpret, dtype, residuals, dy):
    x2, scale, bias, mean, rstd = residuals
    dx, dscale, dbias = _ln_backward(x2, scale, mean, rstd, dy, interpret)
    return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x: jax.typing.ArrayLike, scale: jax.typing.ArrayLike | None = None,
               bias: jax.typing.ArrayLike | None = None, *, eps: float = 1e-5, dtype: Any = None,
               interpret: bool = False) -> jax.Array:
    """Layer norm over the last axis, fused forward and backward (``jax.custom_vjp``) in Pallas.

    Same result as ``jaxopt_lab.normalization.layer_norm(x, scale, bias, eps=eps, dtype=dtype)``.
    ``scale`` and ``bias`` of shape ``(C,)`` default to ones and zeros; ``dtype`` (of the output) to
    ``x``'s. ``interpret=True`` runs the kernels in Pallas' interpreter (any backend, slow: for tests);
    otherwise a GPU is needed (see :func:`available`) and the shape must be :func:`supported`.
    """
    fn = "pallas_norm.layer_norm"
    x, scale, bias = _check(fn, x, scale, bias, eps, 1)
    dtype = _check_dtype(fn, dtype, x)
    _check_interpret(fn, interpret)
    if not interpret and not supported(x.shape):
        raise ValueError(f"{fn}: shape {x.shape} does not fit the compiled kernel "
                         f"({_SHAPE_RULE['layer_norm']}); use jaxopt_lab.normalization.layer_norm")
    y = _layer_norm(x.reshape(-1, x.shape[-1]), scale, bias, float(eps), interpret, dtype)
    return y.reshape(x.shape)


# --------------------------------------------------------------------------------------------------
# Group norm, channels last: x as (N, M, G, C/G) with M = prod(spatial); one program per (n, g) holds
# its (M, C/G) group, read straight from the NHWC layout (no transpose).


def _gn_forward(x4, scale2, bias2, eps, interpret, dtype):
    n, m, groups, size = x4.shape
    group_spec = pl.BlockSpec((None, m, None, size), lambda i, g: (i, 0, g, 0))
    param_spec = pl.BlockSpec((None, size), lambda i, g: (g, 0))
    stat_spec = pl.BlockSpec((None, None, 1), lambda i, g: (i, g, 0))
    y, mean, rstd = pl.pallas_call(
        functools.partial(_fwd_kernel, axes=(0, 1), eps=eps),
        grid=(n, groups),
        in_specs=[group_spec, param_spec, param_spec],
        out_specs=[group_spec, stat_spec, stat_spec],
        out_shape=[jax.ShapeDtypeStruct(x4.shape, dtype),
                   jax.ShapeDtypeStruct((n, groups, 1), jnp.float32),
                   jax.ShapeDtypeStruct((n, groups, 1), jnp.float32)],
        interpret=interpret, name="group_norm_fwd", **_compiler_params(interpret, m * size),
    )(x4, scale2, bias2)
    return y, mean, rstd


def _gn_backward(x4, scale2, mean, rstd, dy4, interpret):
    n, m, groups, size = x4.shape
    group_spec = pl.BlockSpec((None, m, None, size), lambda i, g: (i, 0, g, 0))
    param_spec = pl.BlockSpec((None, size), lambda i, g: (g, 0))
    stat_spec = pl.BlockSpec((None, None, 1), lambda i, g: (i, g, 0))
    partial_spec = pl.BlockSpec((None, None, size), lambda i, g: (i, g, 0))
    dx, dscale, dbias = pl.pallas_call(
        functools.partial(_bwd_kernel, axes=(0, 1)),
        grid=(n, groups),
        in_specs=[group_spec, param_spec, stat_spec, stat_spec, group_spec],
        out_specs=[group_spec, partial_spec, partial_spec],
        out_shape=[jax.ShapeDtypeStruct(x4.shape, x4.dtype),
                   jax.ShapeDtypeStruct((n, groups, size), jnp.float32),
                   jax.ShapeDtypeStruct((n, groups, size), jnp.float32)],
        interpret=interpret, name="group_norm_bwd", **_compiler_params(interpret, m * size),
    )(x4, scale2, mean, rstd, dy4)
    return dx, dscale.sum(0), dbias.sum(0)  # (G, C/G) each: the one reduce over the batch


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x4, scale2, bias2, eps, interpret, dtype):
    return _gn_forward(x4, scale2, bias2, eps, interpret, dtype)[0]


def _group_norm_fwd(x4, scale2, bias2, eps, interpret, dtype):
    y, mean, rstd = _gn_forward(x4, scale2, bias2, eps, interpret, dtype)
    return y, (x4, scale2, bias2, mean, rstd)


def _group_norm_bwd(eps, interpret, dtype, residuals, dy):
    x4, scale2, bias2, mean, rstd = residuals
    dx, dscale, dbias = _gn_backward(x4, scale2, mean, rstd, dy, interpret)
    return dx, dscale.astype(scale2.dtype), dbias.astype(bias2.dtype)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x: jax.typing.ArrayLike, num_groups: int, scale: jax.typing.ArrayLike | None = None,
               bias: jax.typing.ArrayLike | None = None, *, eps: float = 1e-5, dtype: Any = None,
               interpret: bool = False) -> jax.Array:
    """Group norm of channels-last ``x`` ``(N, *spatial, C)``, fused forward and backward in Pallas.

    Same result as ``jaxopt_lab.normalization.group_norm(x, num_groups, scale, bias, eps=eps,
    dtype=dtype)``: channels ``[g * C/G, (g + 1) * C/G)`` form group ``g``, statistics over ``*spatial``
    and the group. ``(N, C)`` is allowed. ``dtype`` and ``interpret`` as in :func:`layer_norm`.
    """
    fn = "pallas_norm.group_norm"
    x, scale, bias = _check(fn, x, scale, bias, eps, 2)
    dtype = _check_dtype(fn, dtype, x)
    _check_interpret(fn, interpret)
    channels = x.shape[-1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{fn}: num_groups must be a positive integer, got {num_groups!r}")
    if channels % num_groups:
        raise ValueError(f"{fn}: {channels} channels (x.shape[-1]) are not divisible by "
                         f"num_groups={num_groups}")
    if not interpret and not supported(x.shape, num_groups):
        raise ValueError(f"{fn}: shape {x.shape} with {num_groups} groups does not fit the compiled kernel "
                         f"({_SHAPE_RULE['group_norm']}); use jaxopt_lab.normalization.group_norm")
    size = channels // num_groups
    x4 = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), num_groups, size)
    y = _group_norm(x4, scale.reshape(num_groups, size), bias.reshape(num_groups, size), float(eps), interpret,
                    dtype)
    return y.reshape(x.shape)
