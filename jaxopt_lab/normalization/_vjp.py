"""The normalizations' hand-derived backwards (``jax.custom_vjp``) and when each one is taken.

:func:`normalize` is the general normalization of ``x`` over ``axes``. Real input without a mask or
``axis_name`` (every norm's common case) takes a closed-form backward: one reduction pass over
``(dy, dy * x_hat)`` and one elementwise pass, recomputing ``x_hat`` instead of storing it (Ioffe &
Szegedy 2015, section 3). Two common layouts have their own cores with the same values to rounding and
fewer full-size arrays on XLA:CPU:

* :func:`trailing_norm_core`: statistics over the trailing axes (layer norm), a backward on the saved
  ``x - shift`` whose per-row sums are matrix-vector products with ``scale``;
* :func:`group_norm_core`: group norm's statistics in two stages on ``(N, *spatial, C)``
  (:func:`~jaxopt_lab.normalization._statistics.group_moments`), a backward on the saved ``x - shift``.

Complex or masked input, or statistics pooled over devices, use autodiff of the same forward.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jaxopt_lab.normalization import _statistics
from jaxopt_lab.normalization._statistics import affine, group_moments, standardize, statistics_dtype


def normalize_impl(x, scale, bias, axes, eps, dtype):
    """The forward of every general norm: ``(y, moments)`` from the shared statistics helper."""
    moments = _statistics.moments(x, axes)
    return affine(standardize(x, moments, eps), scale, bias, dtype), moments


def _varying_axes(x: jax.Array) -> tuple[Any, ...]:
    """The manual mesh axes (inside ``shard_map``) over which ``x`` holds different values per device."""
    aval = jax.typeof(x)
    manual = getattr(aval, "mat", None)  # jax >= 0.9; older releases call it ``vma``
    varying = getattr(manual, "varying", None) if manual is not None else getattr(aval, "vma", ())
    return tuple(sorted(varying or (), key=str))


def normalize(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, axes: tuple[int, ...],
              eps: float, dtype: Any, *, mask: jax.Array | None = None, axis_name: str | None = None,
              axis_index_groups: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y, mean, var)`` of the normalization of ``x`` over ``axes``; ``scale``/``bias`` broadcast.

    Real input without a mask or ``axis_name`` (every norm's common case) takes the hand-derived
    backward of :func:`normalize_core`. Complex or masked input, or statistics pooled over devices,
    use autodiff of the same forward (the shared :func:`~jaxopt_lab.normalization._statistics.moments`),
    which differentiates through the mask and the collective.

    Inside ``shard_map`` a replicated ``scale``/``bias`` meets a per-device ``x``; a custom backward must
    return each cotangent with its primal's type, so the parameters are first marked as varying like
    ``x`` (``pcast``): the backward then gives the per-device gradient, and autodiff of the ``pcast``
    sums it over the devices, as it would for the plain formula.
    """
    if mask is not None or axis_name is not None or jnp.iscomplexobj(x):
        moments = _statistics.moments(x, axes, axis_name, mask=mask, axis_index_groups=axis_index_groups)
        y = affine(standardize(x, moments, eps), scale, bias, dtype)
        return y, moments.mean, moments.var
    core = trailing_norm_core if trailing_fast_path(x, scale, bias, axes) else normalize_core
    return core(x, varying_like(x, scale), varying_like(x, bias), axes, eps, dtype)


def varying_like(x: jax.Array, p: jax.Array | None) -> jax.Array | None:
    """``p`` marked as varying over the manual mesh axes ``x`` varies over (see :func:`normalize`)."""
    if p is None:
        return None
    return lax.pcast(p, tuple(a for a in _varying_axes(x) if a not in _varying_axes(p)), to="varying")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize_core(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, axes: tuple[int, ...],
                   eps: float, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`normalize` for real, unmasked ``x`` and parameters of its type, with a hand-derived backward.

    ``x`` is in its statistics layout (for group norm ``(N, *spatial, G, C/G)``) and ``scale``/``bias``
    have ``x``'s rank, size 1 on every axis they do not vary over. Autodiff of the forward would
    differentiate the shifted statistics term by term; the closed form below needs one reduction pass
    over ``x`` and ``dy`` and one elementwise pass (Ioffe & Szegedy 2015, section 3), recomputing
    ``x_hat`` from ``x`` instead of storing it.
    """
    y, moments = normalize_impl(x, scale, bias, axes, eps, dtype)
    return y, moments.mean, moments.var


# normalize_core and trailing_norm_core return (y, mean, var) and are registered with symbolic zeros: the
# norms differentiate only y, and a dense zero cotangent of the statistics would cost the backward a
# full-size term (x * 0 is not folded away for floats). Their forwards then see CustomVJPPrimal arguments.


def _primal_values(*args: Any) -> tuple[Any, ...]:
    """The values of a ``symbolic_zeros=True`` forward's arguments (each array a ``CustomVJPPrimal``)."""
    return jax.tree.map(lambda a: a.value, args, is_leaf=lambda a: isinstance(a, CustomVJPPrimal))


def _dense(cotangent: Any) -> jax.Array:
    return jnp.zeros(cotangent.shape, cotangent.dtype) if isinstance(cotangent, SymbolicZero) else cotangent


def _statistics_cotangent(dmean: Any, dvar: Any, x_hat: jax.Array, rstd: jax.Array, count: int
                          ) -> jax.Array | None:
    """dx's share from the cotangents of the returned mean and variance (reshaped like ``rstd``), None when
    both are symbolic zeros. d mean / dx = 1 / count, d var / dx = 2 (x - mean) / count."""
    if isinstance(dmean, SymbolicZero) and isinstance(dvar, SymbolicZero):
        return None
    dmean, dvar = (_dense(v).reshape(rstd.shape) for v in (dmean, dvar))
    return (dmean + 2.0 * dvar * x_hat / rstd) / count


def _normalize_fwd(x, scale, bias, axes, eps, dtype):
    x, scale, bias = _primal_values(x, scale, bias)
    y, moments = normalize_impl(x, scale, bias, axes, eps, dtype)
    rstd = lax.rsqrt(moments.var + eps)
    return (y, moments.mean, moments.var), (x, scale, bias, moments.shift, moments.offset, rstd)


def _normalize_bwd(axes, eps, dtype, residuals, cotangents):
    x, scale, bias, shift, offset, rstd = residuals
    dy, dmean, dvar = cotangents
    dy = _dense(dy).astype(rstd.dtype)
    x_hat = ((x.astype(rstd.dtype) - shift) - offset) * rstd
    count = math.prod(x.shape[a] for a in axes)
    # Parameter axes: those scale/bias vary over. Sum dy and dy * x_hat first over the statistics axes
    # that are not parameter axes; both the parameter gradients and the per-group means below are
    # small reductions of these partial sums.
    params = [p for p in (scale, bias) if p is not None]
    param_axes = {a for p in params for a in range(x.ndim) if p.shape[a] != 1}
    inner = tuple(a for a in axes if a not in param_axes)
    outer = tuple(a for a in range(x.ndim) if a not in axes and a not in param_axes)
    param_axes_in_stats = tuple(a for a in axes if a in param_axes)
    sum_dy = jnp.sum(dy, inner, keepdims=True)
    sum_dy_x_hat = jnp.sum(dy * x_hat, inner, keepdims=True)
    dscale = None if scale is None else jnp.sum(sum_dy_x_hat, outer, keepdims=True).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(sum_dy, outer, keepdims=True).astype(bias.dtype)
    if scale is not None:  # the gradient reaching x_hat is g = dy * scale
        sum_dy, sum_dy_x_hat, dy = sum_dy * scale, sum_dy_x_hat * scale, dy * scale
    mean_g = jnp.sum(sum_dy, param_axes_in_stats, keepdims=True) / count
    mean_g_x_hat = jnp.sum(sum_dy_x_hat, param_axes_in_stats, keepdims=True) / count
    dx = rstd * (dy - mean_g - x_hat * mean_g_x_hat)
    statistics = _statistics_cotangent(dmean, dvar, x_hat, rstd, count)
    if statistics is not None:  # a caller differentiates through the returned mean or variance
        dx = dx + statistics
    return dx.astype(x.dtype), dscale, dbias


normalize_core.defvjp(_normalize_fwd, _normalize_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------------------------------
# Layer norm's fast path: statistics over the trailing axes, a backward on the saved x - mean.
#
# With the reduced axes the trailing ones (layer norm's default, also its (*spatial, C) "LN" of CNNs) and
# scale/bias varying only over reduced axes, x is a (rows, cols) matrix normalized row by row. XLA:CPU's
# reduction fusions take no broadcast operand, so _normalize_bwd's sums over dy * x_hat wrote x_hat and the
# broadcasts of 1/sigma and of scale as full-size arrays. Here the forward is normalize_impl's (the same
# moments: shift the row's mean, offset and variance of x - shift), and the backward reads the saved
# x - shift (XLA:CPU writes it anyway for the statistics' sums, as group norm's fast path) and writes
# dy * x_hat once: dscale is its sum over the axes scale does not vary over (dbias dy's), the per-row sums
# of g = dy * scale and g * x_hat are matrix-vector products with scale (no broadcast of scale). Same
# values as _normalize_bwd's to rounding (the same sums of the same dy * x_hat).


def trailing_fast_path(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
                       axes: tuple[int, ...]) -> bool:
    """Whether :func:`normalize` takes :func:`trailing_norm_core`: real non-empty ``x`` reduced over its
    trailing axes, ``scale``/``bias`` (rank of ``x``) of size 1 on every axis not reduced."""
    lead = x.ndim - len(axes)
    return (bool(axes) and axes == tuple(range(lead, x.ndim)) and x.size > 0 and not jnp.iscomplexobj(x)
            and all(p is None or all(d == 1 for d in p.shape[:lead]) for p in (scale, bias)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def trailing_norm_core(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, axes: tuple[int, ...],
                       eps: float, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`normalize_core` for ``axes`` the trailing axes of ``x`` and parameters that vary over them
    only (:func:`trailing_fast_path`): the same forward, a backward without full-size broadcasts."""
    y, moments = normalize_impl(x, scale, bias, axes, eps, dtype)
    return y, moments.mean, moments.var


def _trailing_norm_fwd(x, scale, bias, axes, eps, dtype):
    x, scale, bias = _primal_values(x, scale, bias)
    y, moments = normalize_impl(x, scale, bias, axes, eps, dtype)
    centered = x.astype(moments.shift.dtype) - moments.shift  # standardize's, the same array (CSE)
    # The empty array carries x's dtype (dx's).
    return ((y, moments.mean, moments.var),
            (centered, scale, bias, moments.offset, lax.rsqrt(moments.var + eps), jnp.zeros((0,), x.dtype)))


def _trailing_norm_bwd(axes, eps, dtype, residuals, cotangents):
    centered, scale, bias, offset, rstd, x_dtype = residuals
    dy, dmean, dvar = cotangents
    shape, lead = centered.shape, centered.ndim - len(axes)
    rows, cols = math.prod(shape[:lead]), math.prod(shape[lead:])
    dy = _dense(dy).astype(centered.dtype).reshape(rows, cols)
    if scale is None and bias is None and jnp.dtype(dtype) == centered.dtype:
        # The forward's output is x_hat itself: taken in x's shape, as the forward computed it, XLA shares
        # the array; on the (rows, cols) view it was a second full-size array in a training step's program
        # (docs/benchmarks.md, loss context, x only). Otherwise the view's own expression fuses better.
        x_hat = ((centered - offset) * rstd).reshape(rows, cols)
    else:
        x_hat = (centered.reshape(rows, cols) - offset.reshape(rows, 1)) * rstd.reshape(rows, 1)
    rstd = rstd.reshape(rows, 1)
    dy_x_hat = dy * x_hat
    # Highest precision: the products sum float32 values (TPUs' default would round them to bfloat16).
    matvec = functools.partial(jnp.dot, precision=lax.Precision.HIGHEST)

    def to_param(v: jax.Array, p: jax.Array) -> jax.Array:  # summed over every axis where p has size 1
        # One reduction on x's shape: a sum over the rows first, then over the reduced axes p does not
        # vary over, was a (rows, cols) column sum that XLA:CPU runs far slower when rows are few and
        # cols many (layer norm over (*spatial, C) of a CNN).
        axes_p = tuple(a for a in range(len(shape)) if p.shape[a] == 1)
        return jnp.sum(v.reshape(shape), axes_p, keepdims=True).astype(p.dtype)

    dscale = None if scale is None else to_param(dy_x_hat, scale)
    dbias = None if bias is None else to_param(dy, bias)
    if scale is None:
        sum_g, sum_g_x_hat, g = jnp.sum(dy, 1, keepdims=True), jnp.sum(dy_x_hat, 1, keepdims=True), dy
    else:  # the gradient reaching x_hat is g = dy * scale
        s = jnp.broadcast_to(scale, (1,) * lead + shape[lead:]).reshape(cols)
        sum_g, sum_g_x_hat, g = matvec(dy, s)[:, None], matvec(dy_x_hat, s)[:, None], dy * s
    dx = rstd * (g - sum_g / cols - x_hat * (sum_g_x_hat / cols))
    statistics = _statistics_cotangent(dmean, dvar, x_hat, rstd, cols)
    if statistics is not None:  # as _normalize_bwd's
        dx = dx + statistics
    return dx.reshape(shape).astype(x_dtype.dtype), dscale, dbias


trailing_norm_core.defvjp(_trailing_norm_fwd, _trailing_norm_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------------------------------
# Group norm's fast path: channels-last statistics in two stages, a backward on the saved x - shift.
#
# Group norm's statistics layout (N, *spatial, G, C/G) reduced over the spatial axes and C/G at once has
# an innermost reduced axis C/G long (2 for 64 channels in 32 groups), which XLA:CPU runs slower than
# flax's plain formula. On the channels-last view (N, M, C), M = prod(spatial), the common case (real
# input, no mask, no axis_name, statistics over every axis but the batch) instead reduces in two stages
# (_statistics.group_moments): first over M for every (n, channel), a column reduction whose C outputs
# are contiguous (it vectorizes over C, as instance norm's), then over the C/G channels of each group, an
# (N, C)-sized array. The backward sums (dy, dy * x_hat) per (n, channel) in one pass, combines the sums
# per group and writes dx in one elementwise pass (as _normalize_bwd).


def group_norm_impl(x, scale, bias, groups, eps, dtype):
    """The forward of group norm's fast path: ``(y, (centered, offset, var))`` for its backward."""
    moments, centered, offset = group_moments(x.astype(statistics_dtype(x.dtype)), groups)
    return affine(standardize(x, moments, eps), scale, bias, dtype), (centered, offset, moments.var)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm_core(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, groups: int, eps: float,
                    dtype: Any) -> jax.Array:
    """Group norm of real channels-last ``x`` ``(N, *spatial, C)``; ``scale``/``bias`` of shape ``(1.., C)``.

    ``x`` keeps its own shape (not ``(N, H*W, C)``): XLA:CPU then converts a bf16 ``dy`` once for both
    sums of the backward, where a reshape between them made it write two float32 copies.
    """
    return group_norm_impl(x, scale, bias, groups, eps, dtype)[0]


def _group_norm_fwd(x, scale, bias, groups, eps, dtype):
    y, (centered, offset, var) = group_norm_impl(x, scale, bias, groups, eps, dtype)
    # The backward reads the centered array the statistics were summed over (XLA:CPU writes it anyway,
    # its reductions taking no broadcast operand) instead of x: its sums then need no broadcast of the
    # shift either. The empty array carries x's dtype (dx's).
    return y, (centered, scale, bias, offset, lax.rsqrt(var + eps), jnp.zeros((0,), x.dtype))


def _group_norm_bwd(groups, eps, dtype, residuals, dy):
    centered, scale, bias, offset, rstd, x_dtype = residuals
    n, channels, spatial = centered.shape[0], centered.shape[-1], tuple(range(1, centered.ndim - 1))
    dy = dy.astype(centered.dtype)
    # One reduction pass per (n, channel) over (dy, dy * centered), no broadcast operand; sum(dy * x_hat)
    # follows from them ((centered - offset) * rstd = x_hat). Everything then is (N, C)-sized until dx.
    sum_dy = jnp.sum(dy, spatial, keepdims=True)
    sum_dy_x_hat = (jnp.sum(dy * centered, spatial, keepdims=True) - offset * sum_dy) * rstd
    dscale = None if scale is None else jnp.sum(sum_dy_x_hat, 0, keepdims=True).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(sum_dy, 0, keepdims=True).astype(bias.dtype)
    if scale is not None:  # the gradient reaching x_hat is g = dy * scale
        sum_dy, sum_dy_x_hat, dy = sum_dy * scale, sum_dy_x_hat * scale, dy * scale
    count = math.prod(centered.shape[1:-1]) * (channels // groups)

    def group_mean(v: jax.Array) -> jax.Array:  # per channel -> its group's mean over count values
        v = jnp.sum(v.reshape(n, groups, -1), -1, keepdims=True) / count
        return jnp.broadcast_to(v, (n, groups, channels // groups)).reshape(rstd.shape)

    x_hat = (centered - offset) * rstd
    dx = rstd * (dy - group_mean(sum_dy) - x_hat * group_mean(sum_dy_x_hat))
    return dx.astype(x_dtype.dtype), dscale, dbias


group_norm_core.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm_fast_path(x: jax.Array, axes: tuple[int, ...], mask: Any, axis_name: str | None) -> bool:
    """Whether ``group_norm`` takes :func:`group_norm_core`: real input, no mask or ``axis_name``, and
    statistics over every axis but the batch (the default ``reduction_axes``) of ``(N, ..., C)``."""
    return (mask is None and axis_name is None and not jnp.iscomplexobj(x) and x.ndim >= 2 and x.size > 0
            and axes == tuple(range(1, x.ndim)))

