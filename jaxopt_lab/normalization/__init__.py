"""Batch, layer, instance and group normalization as pure functions, channels-last, any rank.

Every norm standardizes ``x`` over some axes and then applies an optional per-channel affine map::

    y = (x - mean) / sqrt(var + eps) * scale + bias

They differ only in the axes the statistics run over, for ``x`` of shape ``(N, *spatial, C)``:

=================  ===========================================  ==============================
norm               statistics over                              one (mean, var) per
=================  ===========================================  ==============================
``batch_norm``     ``N`` and ``*spatial`` (and every device)    channel
``layer_norm``     the last axis (or ``reduction_axes``)        sample (and position)
``instance_norm``  ``*spatial``                                 sample and channel
``group_norm``     ``*spatial`` and the channels of one group   sample and group of channels
=================  ===========================================  ==============================

All four share one statistics helper, :func:`_moments` (like ``flax.linen.normalization._compute_stats``):

* Statistics are computed in (at least) float32, so bf16/fp16 inputs keep full-precision statistics;
  the output comes back in the input's dtype (or ``dtype`` when given).
* The variance is a *shifted* estimate ``var = E[(x-s)^2] - E[x-s]^2`` with ``s`` near each group's
  mean, and ``x`` is centered as ``(x - s) - E[x-s]`` where ``x - s`` is exact. Flax's default
  ``E[x^2] - E[x]^2`` (``use_fast_variance=True``) cancels catastrophically instead: for
  ``x = 1e4 + N(0, 1)`` in float32, ``E[x^2]`` and ``E[x]^2`` are both ~1e8 and agree to float32's ~7
  digits, so the naive difference keeps no correct digit of the variance 1; ours matches a float64
  reference to ~1e-6. The shift is the group's mean when the reduced axes are the trailing ones (layer
  norm: a cache-resident first pass, the corrected two-pass algorithm) and otherwise the mean of 64
  spread samples of the group (a strided slice; one pass over ``x``). With ``shift + offset`` split
  exactly (TwoSum) and levelled sums where the reduced axes are not contiguous (group norm), the error
  at offset 0 is at most Flax's default (4x below it for group norm), and stays so at large offsets.
  A constant input gives variance exactly 0 (no NaN).
* Flax's arguments: ``mask`` (statistics of the ``True`` elements only), ``feature_axes`` (layer and
  instance norm), ``reduction_axes`` (layer and group norm), ``axis`` (batch norm), ``axis_name`` and
  ``axis_index_groups`` (all four), and complex input (complex mean, variance ``E|x - mean|^2``).
* The backward is hand-derived (:func:`_normalize`, a ``jax.custom_vjp``): one reduction pass over
  ``(dy, dy * x_hat)`` and one elementwise pass, 1.2-2.7x faster than autodiff of the same forward; with
  it, forward + backward of instance and batch norm runs at 0.97-1.09x Flax's fast variance on XLA:CPU,
  the layer and group norm fast paths below at 0.25-0.90x (``docs/benchmarks.md`` has the numbers).
* Group norm's common case (real input, no mask or ``axis_name``, the default ``reduction_axes``) takes
  a fast path (:func:`_group_norm_core`): statistics in two stages on ``(N, *spatial, C)`` (per channel,
  then per group of channels, combined exactly), a backward on the saved ``x - shift``; same accuracy,
  fewer full-size arrays on XLA:CPU (``docs/normalization.md``).
* Layer norm's common case (real input, no mask or ``axis_name``, statistics over the trailing axes,
  ``scale``/``bias`` varying over those axes only) keeps the forward and takes a backward on the saved
  ``x - shift`` (:func:`_trailing_norm_core`): ``dy * x_hat`` written once, its per-row sums with
  ``scale`` as matrix-vector products; same values to rounding, no full-size broadcast on XLA:CPU.
* Under ``axis_name`` (``shard_map``/``pmap``) the per-device ``(mean, var, count)`` triples travel in
  one collective (a ``psum`` gathering the stacked triples, within ``axis_index_groups`` if given) and
  are combined exactly with the law of total variance, so the cross-device statistics are as stable as
  the local ones, and exact when masks leave the devices different counts. Under plain ``jit`` with a
  sharded batch no ``axis_name`` is needed: XLA's SPMD partitioner makes the reductions global.

Batch norm's running statistics use ``new = momentum * running + (1 - momentum) * batch`` with
``momentum=0.9`` by default; see :func:`batch_norm` for the conventions of Flax and PyTorch.

References: Ioffe & Szegedy, "Batch Normalization", ICML 2015; Ba, Kiros & Hinton, "Layer
Normalization", 2016; Ulyanov, Vedaldi & Lempitsky, "Instance Normalization", 2016; Wu & He, "Group
Normalization", ECCV 2018; Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983.

>>> import jax.numpy as jnp
>>> from jaxopt_lab import normalization as norm
>>> x = jnp.arange(24.0).reshape(2, 3, 4)
>>> y = norm.group_norm(x, num_groups=2)
>>> y.shape, round(float(y[0, :, :2].mean()), 6), round(float(y[0, :, :2].var()), 3)
((2, 3, 4), 0.0, 1.0)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "BatchNormStats",
    "batch_norm",
    "batch_norm_init",
    "group_norm",
    "instance_norm",
    "layer_norm",
]

Axes = int | Sequence[int]


class BatchNormStats(NamedTuple):
    """Running statistics of :func:`batch_norm`, one entry per feature (names as Flax's ``batch_stats``)."""

    mean: jax.Array
    var: jax.Array


# --------------------------------------------------------------------------------------------------
# The shared statistics helper and the standardization built on it.

# Samples averaged into the shift of a statistics group whose reduced axes are not the trailing ones:
# the shift then lies within ~sigma/8 of the mean, so the shifted sums lose no digit to cancellation
# (see _moments).
SHIFT_SAMPLES = 64


def _statistics_dtype(dtype: Any) -> jnp.dtype:
    """At least float32: half-precision inputs get float32 statistics; float64 and complex stay."""
    return jnp.promote_types(dtype, jnp.float32)


def _abs_sq(x: jax.Array) -> jax.Array:
    """``|x|^2`` elementwise, real for complex ``x`` (as Flax's ``_abs_sq``)."""
    if jnp.iscomplexobj(x):
        return lax.square(lax.real(x)) + lax.square(lax.imag(x))
    return lax.square(x)


def _sample_mean(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Mean of about :data:`SHIFT_SAMPLES` evenly spaced samples of each group (size-1 reduced axes).

    The budget is spread over the reduced axes, smallest first (a small axis is taken whole, leaving more
    samples for the others), each sampled with a stride, so the samples span the group instead of
    sitting in one corner of it (one image of a batch, the first row of a feature map). Reading them is
    a strided slice of ``SHIFT_SAMPLES`` elements per group, not a pass over ``x``.
    """
    index = [slice(None)] * x.ndim
    budget = SHIFT_SAMPLES
    ordered = sorted(axes, key=lambda a: x.shape[a])
    for i, a in enumerate(ordered):
        size = x.shape[a]
        take = min(size, max(1, math.ceil(budget ** (1.0 / (len(ordered) - i)))))
        stride = size // take
        index[a] = slice(0, stride * take, stride)
        budget = max(1, math.ceil(budget / take))
    return jnp.mean(x[tuple(index)], axes, keepdims=True)


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(hi, lo)`` with ``hi = fl(a + b)`` and ``hi + lo == a + b`` exactly (Knuth's TwoSum)."""
    hi = a + b
    b_part = hi - a
    return hi, (a - (hi - b_part)) + (b - b_part)


# Reduced axes are averaged in levels of at least this many elements each (see _mean).
_LEVEL_SIZE = 16


def _mean(v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``mean(v, axes, keepdims=True)`` in levels: the innermost reduced axes first, then the next ones.

    A float32 accumulation's rounding error grows with its length; averaging a feature map row by row
    and then the row means (each level a reduction over >= ``_LEVEL_SIZE`` elements) keeps each
    accumulation short. Measured on group norm's (16, 32, 32, 32, 2) layout: the relative error of the
    mean of squares drops from 4.3e-7 to 4.3e-8 (RMS over groups). Means, not sums: XLA folds a sum of
    sums into one reduction again, not a mean of means (equal to the mean, the levels being of equal
    size). The first level reads ``v`` once, fused with whatever computes it; the later levels reduce
    arrays ``>= 16x`` smaller.

    Only for reduced axes with a gap between them (group norm's ``(*spatial, C/G)`` around the kept
    ``G``): a contiguous block of reduced axes (batch, instance and layer norm) is one row or column
    reduction for XLA, already accurate (its levels measured 1.5x *less* accurate for batch norm).
    """
    if axes == tuple(range(axes[0], axes[-1] + 1)) if axes else True:
        return jnp.mean(v, axes, keepdims=True)
    levels: list[tuple[int, ...]] = []
    current: list[int] = []
    for a in reversed(axes):
        current.insert(0, a)
        if math.prod(v.shape[i] for i in current) >= _LEVEL_SIZE:
            levels.append(tuple(current))
            current = []
    if current:  # leftover leading axes with few elements join the last level
        levels = [*levels[:-1], tuple(current) + levels[-1]] if levels else [tuple(current)]
    for level in levels:
        v = jnp.mean(v, level, keepdims=True)
    return v


class _Moments(NamedTuple):
    """Statistics of one or more reduction groups, all of shape ``x``'s with size-1 reduced axes.

    The mean is kept as ``shift + offset``, ``shift`` near the mean and ``offset`` below its rounding
    error (``shift`` the group's exact mean rounded, or split so by :func:`_two_sum`); ``x`` is centered
    as ``(x - shift) - offset``. At a large mean ``x - shift`` is exact (Sterbenz) and ``offset`` keeps
    the digits the rounded mean lost, where ``x - (shift + offset)`` would round the mean to the ulp of
    ``shift``; near zero ``offset`` is below half an ulp of ``x - shift`` and the centering rounds once,
    as a plain ``x - mean``. (A sample mean as ``shift`` with its ``offset`` unsplit rounds twice: 1.3x
    flax's error at offset 0 for batch norm.)
    """

    shift: jax.Array
    offset: jax.Array
    var: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.shift + self.offset


def _moments(x: jax.Array, axes: tuple[int, ...], axis_name: str | None = None, *,
             mask: jax.Array | None = None, axis_index_groups: Any = None) -> _Moments:
    """Mean and biased variance of ``x`` over ``axes`` (kept as size-1 axes), in at least float32.

    The one statistics helper under every norm (like ``flax.linen.normalization._compute_stats``). One
    pass over ``x`` (a shifted sum and sum of squares), stable for large offsets, exactly 0 variance for
    constant input. For complex ``x`` the variance is ``E[|x - mean|^2]`` (real), as Flax's.

    Args:
      x: the data.
      axes: the reduced axes, canonical (sorted, non-negative); may be empty (variance 0).
      axis_name: a mapped axis (``shard_map``/``pmap``) the statistics also run over, with a single
        collective; devices may hold different numbers of (unmasked) elements.
      mask: booleans broadcastable to ``x``; only ``True`` elements enter the statistics (masked
        elements may hold anything, NaN included). A group without elements gets NaN statistics, as
        Flax's ``mean(where=...)`` gives.
      axis_index_groups: with ``axis_name``, the groups of device indices whose statistics are pooled
        (as ``lax.psum``'s); every group the same size.
    """
    x = x.astype(_statistics_dtype(x.dtype))
    # E[(x-s)^2] - E[x-s]^2 loses digits to cancellation like ((mean - s) / std)^2: any shift within a
    # fraction of a standard deviation of the mean makes it exact to rounding (a naive E[x^2] - E[x]^2
    # is the shift 0). When the reduced axes are the trailing ones (layer norm), each group is contiguous
    # and cache-resident, so its own mean is a cheap first pass and the shifted sums are the corrected
    # two-pass algorithm of Chan, Golub & LeVeque. Otherwise a second pass would stream x from memory
    # again; the mean of SHIFT_SAMPLES spread samples (a strided slice, not a pass) is within
    # ~std/8 of the mean, which costs less accuracy than the rounding of the sums themselves (one
    # sample, ~1 std away, cost 3.5-12x flax's error on N(0, 1) data). With a mask, the shift is the
    # masked mean (a second pass on that path only: samples may all be masked).
    # The shift does not change the variance mathematically, only the rounding; so it gets no gradient.
    # The means run in levels (_mean): shorter float32 accumulations, 10x less rounding.
    size = float(math.prod(x.shape[a] for a in axes))
    count: jax.Array | float = size
    trailing = axes == tuple(range(x.ndim - len(axes), x.ndim))
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
        count = jnp.sum(mask, axes, keepdims=True, dtype=_real_dtype(x.dtype))
        unmasked = size / count  # mean over the unmasked elements = mean over all (zeros put in) * this
        shift = lax.stop_gradient(_mean(jnp.where(mask, x, 0), axes) * (size / jnp.maximum(count, 1)))
        centered = jnp.where(mask, x - shift, 0)
        offset = _mean(centered, axes) * unmasked
        square = _mean(_abs_sq(centered), axes) * unmasked
    else:
        shift = lax.stop_gradient(jnp.mean(x, axes, keepdims=True) if trailing else _sample_mean(x, axes))
        centered = x - shift
        offset = _mean(centered, axes)
        square = _mean(_abs_sq(centered), axes)
    # Rounding can leave a tiny negative difference; clip it so that rsqrt(var + eps) stays finite.
    var = jnp.maximum(square - _abs_sq(offset), 0.0)
    if axis_name is not None:
        shift, offset, var = _combine_over_devices(shift, offset, var, count, axis_name, axis_index_groups)
    if mask is not None or axis_name is not None or not trailing:
        # The shift is not the group's mean rounded: split shift + offset so that the centering rounds
        # once (_Moments). Layer norm's shift is its mean, its offset already below the rounding.
        shift, offset = _two_sum(shift, offset)
    return _Moments(shift, offset, var)


def _real_dtype(dtype: Any) -> Any:
    return jnp.finfo(dtype).dtype  # float32 for complex64, itself for a real float


def _combine_over_devices(shift: jax.Array, offset: jax.Array, var: jax.Array, count: jax.Array | float,
                          axis_name: str, axis_index_groups: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pools per-device ``(shift, offset, var, count)`` over ``axis_name`` with one collective.

    Combining per-device statistics with the law of total variance (var = weighted mean of the vars +
    weighted variance of the means, weights the element counts) keeps the stability of the local
    statistics, which a psum of [sum, sum of squares] would lose to cancellation, and is exact when
    devices hold different numbers of (unmasked) elements. The gather is a psum of each device's
    statistics written into its own slot: unlike all_gather its result is known to be the same on every
    device, so shard_map can return the statistics replicated; under ``axis_index_groups`` the slots of
    the other groups stay zero (count 0) and drop out.
    """
    count = jnp.broadcast_to(jnp.asarray(count, var.dtype), var.shape)
    local = jnp.stack(jnp.broadcast_arrays(shift, offset, var.astype(shift.dtype), count.astype(shift.dtype)))
    slots = jnp.zeros((lax.axis_size(axis_name), *local.shape), local.dtype)
    gathered = lax.psum(slots.at[lax.axis_index(axis_name)].set(local), axis_name,
                        axis_index_groups=axis_index_groups)
    shifts, offsets, variances, counts = jnp.moveaxis(gathered, 1, 0)
    variances, counts = jnp.real(variances), jnp.real(counts)
    present = counts > 0
    # A shift common to the group (its first contributing device's), so every result is replicated.
    first = jnp.argmax(jnp.any(present.reshape(present.shape[0], -1), axis=1))
    shift = shifts[first]
    weights = counts / jnp.sum(counts, axis=0)
    device_offsets = jnp.where(present, (shifts - shift) + offsets, 0)  # each device's mean - shift
    offset = jnp.sum(weights * device_offsets, axis=0)
    spread = jnp.where(present, variances + _abs_sq(device_offsets - offset), 0)
    return shift, offset, jnp.sum(weights * spread, axis=0)


def _standardize(x: jax.Array, moments: _Moments, eps: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` in the statistics' dtype."""
    centered = (x.astype(moments.offset.dtype) - moments.shift) - moments.offset
    return centered * lax.rsqrt(moments.var + eps)


def _affine(x_hat: jax.Array, scale: jax.Array | None, bias: jax.Array | None, dtype: Any) -> jax.Array:
    """``x_hat * scale + bias`` with parameters broadcast against ``x_hat``, cast to ``dtype``."""
    y = x_hat
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y.astype(dtype)


def _normalize_impl(x, scale, bias, axes, eps, dtype):
    moments = _moments(x, axes)
    return _affine(_standardize(x, moments, eps), scale, bias, dtype), moments


def _varying_axes(x: jax.Array) -> tuple[Any, ...]:
    """The manual mesh axes (inside ``shard_map``) over which ``x`` holds different values per device."""
    aval = jax.typeof(x)
    manual = getattr(aval, "mat", None)  # jax >= 0.9; older releases call it ``vma``
    varying = getattr(manual, "varying", None) if manual is not None else getattr(aval, "vma", ())
    return tuple(sorted(varying or (), key=str))


def _normalize(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, axes: tuple[int, ...],
               eps: float, dtype: Any, *, mask: jax.Array | None = None, axis_name: str | None = None,
               axis_index_groups: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y, mean, var)`` of the normalization of ``x`` over ``axes``; ``scale``/``bias`` broadcast.

    Real input without a mask or ``axis_name`` (every norm's common case) takes the hand-derived
    backward of :func:`_normalize_core`. Complex or masked input, or statistics pooled over devices,
    use autodiff of the same forward (the shared :func:`_moments`), which differentiates through the
    mask and the collective.

    Inside ``shard_map`` a replicated ``scale``/``bias`` meets a per-device ``x``; a custom backward must
    return each cotangent with its primal's type, so the parameters are first marked as varying like
    ``x`` (``pcast``): the backward then gives the per-device gradient, and autodiff of the ``pcast``
    sums it over the devices, as it would for the plain formula.
    """
    if mask is not None or axis_name is not None or jnp.iscomplexobj(x):
        moments = _moments(x, axes, axis_name, mask=mask, axis_index_groups=axis_index_groups)
        return _affine(_standardize(x, moments, eps), scale, bias, dtype), moments.mean, moments.var
    core = _trailing_norm_core if _trailing_fast_path(x, scale, bias, axes) else _normalize_core
    return core(x, _varying_like(x, scale), _varying_like(x, bias), axes, eps, dtype)


def _varying_like(x: jax.Array, p: jax.Array | None) -> jax.Array | None:
    """``p`` marked as varying over the manual mesh axes ``x`` varies over (see :func:`_normalize`)."""
    if p is None:
        return None
    return lax.pcast(p, tuple(a for a in _varying_axes(x) if a not in _varying_axes(p)), to="varying")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _normalize_core(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, axes: tuple[int, ...],
                    eps: float, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`_normalize` for real, unmasked ``x`` and parameters of its type, with a hand-derived backward.

    ``x`` is in its statistics layout (for group norm ``(N, *spatial, G, C/G)``) and ``scale``/``bias``
    have ``x``'s rank, size 1 on every axis they do not vary over. Autodiff of the forward would
    differentiate the shifted statistics term by term; the closed form below needs one reduction pass
    over ``x`` and ``dy`` and one elementwise pass (Ioffe & Szegedy 2015, section 3), recomputing
    ``x_hat`` from ``x`` instead of storing it.
    """
    y, moments = _normalize_impl(x, scale, bias, axes, eps, dtype)
    return y, moments.mean, moments.var


def _normalize_fwd(x, scale, bias, axes, eps, dtype):
    y, moments = _normalize_impl(x, scale, bias, axes, eps, dtype)
    rstd = lax.rsqrt(moments.var + eps)
    return (y, moments.mean, moments.var), (x, scale, bias, moments.shift, moments.offset, rstd)


def _normalize_bwd(axes, eps, dtype, residuals, cotangents):
    x, scale, bias, shift, offset, rstd = residuals
    dy, dmean, dvar = cotangents
    dy = dy.astype(rstd.dtype)
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
    # Cotangents of the returned statistics (zero unless a caller differentiates through them):
    # d mean / dx = 1 / count, d var / dx = 2 (x - mean) / count.
    dx = dx + (dmean + 2.0 * dvar * x_hat / rstd) / count
    return dx.astype(x.dtype), dscale, dbias


_normalize_core.defvjp(_normalize_fwd, _normalize_bwd)


# --------------------------------------------------------------------------------------------------
# Layer norm's fast path: statistics over the trailing axes, a backward on the saved x - mean.
#
# With the reduced axes the trailing ones (layer norm's default, also its (*spatial, C) "LN" of CNNs) and
# scale/bias varying only over reduced axes, x is a (rows, cols) matrix normalized row by row. XLA:CPU's
# reduction fusions take no broadcast operand, so _normalize_bwd's sums over dy * x_hat wrote x_hat and the
# broadcasts of 1/sigma and of scale as full-size arrays. Here the forward is _normalize_impl's (the same
# _moments: shift the row's mean, offset and variance of x - shift), and the backward reads the saved
# x - shift (XLA:CPU writes it anyway for the statistics' sums, as group norm's fast path) and writes
# dy * x_hat once: dscale is its sum over the axes scale does not vary over (dbias dy's), the per-row sums
# of g = dy * scale and g * x_hat are matrix-vector products with scale (no broadcast of scale). Same
# values as _normalize_bwd's to rounding (the same sums of the same dy * x_hat).


def _trailing_fast_path(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
                        axes: tuple[int, ...]) -> bool:
    """Whether :func:`_normalize` takes :func:`_trailing_norm_core`: real non-empty ``x`` reduced over its
    trailing axes, ``scale``/``bias`` (rank of ``x``) of size 1 on every axis not reduced."""
    lead = x.ndim - len(axes)
    return (bool(axes) and axes == tuple(range(lead, x.ndim)) and x.size > 0 and not jnp.iscomplexobj(x)
            and all(p is None or all(d == 1 for d in p.shape[:lead]) for p in (scale, bias)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _trailing_norm_core(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, axes: tuple[int, ...],
                        eps: float, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`_normalize_core` for ``axes`` the trailing axes of ``x`` and parameters that vary over them
    only (:func:`_trailing_fast_path`): the same forward, a backward without full-size broadcasts."""
    y, moments = _normalize_impl(x, scale, bias, axes, eps, dtype)
    return y, moments.mean, moments.var


def _trailing_norm_fwd(x, scale, bias, axes, eps, dtype):
    y, moments = _normalize_impl(x, scale, bias, axes, eps, dtype)
    centered = x.astype(moments.shift.dtype) - moments.shift  # _standardize's, the same array (CSE)
    # The empty array carries x's dtype (dx's).
    return ((y, moments.mean, moments.var),
            (centered, scale, bias, moments.offset, lax.rsqrt(moments.var + eps), jnp.zeros((0,), x.dtype)))


def _trailing_norm_bwd(axes, eps, dtype, residuals, cotangents):
    centered, scale, bias, offset, rstd, x_dtype = residuals
    dy, dmean, dvar = cotangents
    shape, lead = centered.shape, centered.ndim - len(axes)
    rows, cols = math.prod(shape[:lead]), math.prod(shape[lead:])
    dy = dy.astype(centered.dtype).reshape(rows, cols)
    offset, rstd = offset.reshape(rows, 1), rstd.reshape(rows, 1)
    x_hat = (centered.reshape(rows, cols) - offset) * rstd
    dy_x_hat = dy * x_hat
    # Highest precision: the products sum float32 values (TPUs' default would round them to bfloat16).
    matvec = functools.partial(jnp.dot, precision=lax.Precision.HIGHEST)

    def to_param(v: jax.Array, p: jax.Array) -> jax.Array:  # summed over every axis where p has size 1
        # One reduction on x's shape: a sum over the rows first, then over the reduced axes p does not
        # vary over, was a (rows, cols) column sum that XLA:CPU runs ~40x slower when rows are few and
        # cols many (layer norm over (*spatial, C) of a CNN: 32 x 65536 took 16 ms).
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
    # Cotangents of the returned statistics, as _normalize_bwd's.
    dx = dx + (dmean.reshape(rows, 1) + 2.0 * dvar.reshape(rows, 1) * x_hat / rstd) / cols
    return dx.reshape(shape).astype(x_dtype.dtype), dscale, dbias


_trailing_norm_core.defvjp(_trailing_norm_fwd, _trailing_norm_bwd)


# --------------------------------------------------------------------------------------------------
# Group norm's fast path: channels-last statistics in two stages.
#
# Group norm's statistics layout (N, *spatial, G, C/G) reduced over the spatial axes and C/G at once has
# an innermost reduced axis C/G long (2 for 64 channels in 32 groups), which XLA:CPU runs ~1.1-1.35x
# slower than flax's plain formula. On the channels-last view (N, M, C), M = prod(spatial), the common
# case (real input, no mask, no axis_name, statistics over every axis but the batch) instead reduces in
# two stages: first over M for every (n, channel), a column reduction whose C outputs are contiguous (it
# vectorizes over C, as instance norm's), then over the C/G channels of each group, an (N, C)-sized
# array. Each channel has its own shift (the mean of SHIFT_SAMPLES spread samples, as _moments'); the
# channel moments combine into the group's with the law of total variance, the channel means taken
# relative to the group's first shift (differences of nearby numbers, exact at large offsets), so the
# result stays exact to rounding at any offset. The backward sums (dy, dy * x_hat) per (n, channel) in
# one pass, combines the sums per group and writes dx in one elementwise pass (as _normalize_bwd).


def _group_moments(x: jax.Array, groups: int) -> tuple[_Moments, jax.Array, jax.Array]:
    """Group statistics of channels-last ``x`` ``(N, *spatial, C)`` (statistics dtype), each ``(N, 1.., C)``.

    Returns ``(moments, centered, offset)``: ``moments.shift + moments.offset`` is the mean of the
    channel's group, split by TwoSum as :func:`_moments`' (``moments.var`` the group's biased variance);
    ``centered`` is ``x`` minus each channel's shift, the array the sums ran over, and ``offset`` the
    group mean minus that shift, so that ``centered - offset`` is ``x`` centered.
    """
    n, channels, spatial = x.shape[0], x.shape[-1], tuple(range(1, x.ndim - 1))
    size = channels // groups
    stats_shape = (n,) + (1,) * len(spatial) + (channels,)
    # One shift per channel: the mean of a power-of-two number of samples (<= SHIFT_SAMPLES, from the
    # first 2^k positions), so that sum / count is exact. XLA:CPU contracts a rounded product and a
    # subtraction into one FMA in some fusions and not in others: a mean with a rounded division then had
    # two values, and the centering and the spread of the shifts below disagreed (a constant input gave a
    # nonzero output).
    x3 = x.reshape(n, -1, channels)
    shift = lax.stop_gradient(_sample_mean(x3[:, :1 << (x3.shape[1].bit_length() - 1)], (1,)))
    shift = shift.reshape(stats_shape)
    centered = x - shift
    channel_offset = jnp.mean(centered, spatial, keepdims=True)
    channel_var = jnp.maximum(jnp.mean(jnp.square(centered), spatial, keepdims=True)
                              - jnp.square(channel_offset), 0.0)
    shifts = shift.reshape(n, groups, size)
    spread = shifts - shifts[..., :1]  # each channel's shift relative to its group's first one
    relative = spread + channel_offset.reshape(n, groups, size)  # channel means - the group's first shift
    group_offset = jnp.mean(relative, -1, keepdims=True)
    var = (jnp.mean(channel_var.reshape(n, groups, size), -1, keepdims=True)
           + jnp.mean(jnp.square(relative - group_offset), -1, keepdims=True))
    offset = (group_offset - spread).reshape(stats_shape)
    var = jnp.broadcast_to(var, shifts.shape).reshape(stats_shape)
    return _Moments(*_two_sum(shift, offset), var), centered, offset


def _group_norm_impl(x, scale, bias, groups, eps, dtype):
    moments, centered, offset = _group_moments(x.astype(_statistics_dtype(x.dtype)), groups)
    return _affine(_standardize(x, moments, eps), scale, bias, dtype), (centered, offset, moments.var)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm_core(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, groups: int, eps: float,
                     dtype: Any) -> jax.Array:
    """Group norm of real channels-last ``x`` ``(N, *spatial, C)``; ``scale``/``bias`` of shape ``(1.., C)``.

    ``x`` keeps its own shape (not ``(N, H*W, C)``): XLA:CPU then converts a bf16 ``dy`` once for both
    sums of the backward, where a reshape between them made it write two float32 copies.
    """
    return _group_norm_impl(x, scale, bias, groups, eps, dtype)[0]


def _group_norm_fwd(x, scale, bias, groups, eps, dtype):
    y, (centered, offset, var) = _group_norm_impl(x, scale, bias, groups, eps, dtype)
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


_group_norm_core.defvjp(_group_norm_fwd, _group_norm_bwd)


def _group_norm_fast_path(x: jax.Array, axes: tuple[int, ...], mask: Any, axis_name: str | None) -> bool:
    """Whether :func:`group_norm` takes :func:`_group_norm_core`: real input, no mask or ``axis_name``,
    and statistics over every axis but the batch (the default ``reduction_axes``) of ``(N, ..., C)``."""
    return (mask is None and axis_name is None and not jnp.iscomplexobj(x) and x.ndim >= 2 and x.size > 0
            and axes == tuple(range(1, x.ndim)))


# --------------------------------------------------------------------------------------------------
# Input validation: every message names the function, the argument, what was expected and what came.


def _as_inexact_array(fn: str, x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(f"{fn}: x must be a floating-point or complex array, got dtype {x.dtype}")
    return x


def _check_rank(fn: str, x: jax.Array, min_ndim: int, layout: str) -> None:
    if x.ndim < min_ndim:
        raise ValueError(f"{fn}: x must have rank >= {min_ndim} with layout {layout}, got shape {x.shape}")


def _check_eps(fn: str, eps: float) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")


def _canonical_axes(fn: str, name: str, axes: Axes, ndim: int, *, allow_empty: bool = False
                    ) -> tuple[int, ...]:
    """Sorted non-negative axes (Flax's ``_canonicalize_axes``), with errors for bad or repeated ones."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    if (not axes and not allow_empty) or any(
            isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim for a in axes):
        raise ValueError(f"{fn}: {name} must be {'' if allow_empty else 'non-empty '}axes of an array of rank "
                         f"{ndim}, got {axes}")
    canonical = tuple(sorted({a % ndim for a in axes}))
    if len(canonical) != len(axes):
        raise ValueError(f"{fn}: {name} has repeated axes: {axes}")
    return canonical


def _feature_param(fn: str, name: str, param: Any, feature_axes: tuple[int, ...], x_shape: tuple[int, ...]
                   ) -> jax.Array | None:
    """``param`` of shape ``x.shape[feature_axes]`` (Flax's parameter shape), broadcast to ``x``'s rank."""
    if param is None:
        return None
    param = jnp.asarray(param)
    expected = tuple(x_shape[a] for a in feature_axes)
    if param.shape != expected:
        what = "(C,)" if feature_axes == (len(x_shape) - 1,) else f"x.shape[{list(feature_axes)}]"
        raise ValueError(f"{fn}: {name} must have shape {what} = {expected} for x of shape {x_shape}, "
                         f"got shape {param.shape}")
    return param.reshape(tuple(d if a in feature_axes else 1 for a, d in enumerate(x_shape)))


def _check_mask(fn: str, mask: Any, x_shape: tuple[int, ...]) -> jax.Array | None:
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    try:
        broadcastable = jnp.broadcast_shapes(mask.shape, x_shape) == tuple(x_shape)
    except ValueError:
        broadcastable = False
    if not broadcastable:
        raise ValueError(f"{fn}: mask must be broadcastable to x's shape {x_shape}, got shape {mask.shape}")
    return jnp.broadcast_to(mask.astype(bool), x_shape)


# --------------------------------------------------------------------------------------------------
# The four norms.


def layer_norm(x: jax.typing.ArrayLike, scale: jax.typing.ArrayLike | None = None,
               bias: jax.typing.ArrayLike | None = None, *, eps: float = 1e-5, reduction_axes: Axes = -1,
               feature_axes: Axes = -1, mask: jax.typing.ArrayLike | None = None, axis_name: str | None = None,
               axis_index_groups: Any = None, dtype: Any = None) -> jax.Array:
    """Layer normalization: statistics over the last axis of each sample (Ba et al., 2016).

    Args:
      x: input of shape ``(..., C)`` (real or complex).
      scale: optional scale of shape ``x.shape[feature_axes]``, ``(C,)`` by default (gamma).
      bias: optional bias of the same shape (beta).
      eps: added to the variance before the square root.
      reduction_axes: the axes the statistics run over; the default ``-1`` is the usual layer norm of
        transformers and RNNs, ``(1, ..., x.ndim - 1)`` normalizes each sample of a CNN over
        ``(*spatial, C)`` (the "LN" of the Group Norm paper).
      feature_axes: the axes ``scale`` and ``bias`` vary over (Flax's ``feature_axes``).
      mask: booleans broadcastable to ``x``: only ``True`` elements enter the statistics (all of ``x``
        is normalized).
      axis_name: a mapped axis (``shard_map``/``pmap``) over which ``x`` is split; the statistics then
        cover every device's part, in one collective.
      axis_index_groups: with ``axis_name``, groups of device indices pooled separately (``lax.psum``'s).
      dtype: dtype of the output; by default the input's.

    Returns:
      The normalized array, shape of ``x``.

    >>> import jax.numpy as jnp
    >>> from jaxopt_lab.normalization import layer_norm
    >>> layer_norm(jnp.array([[1.0, 2.0, 3.0]]), eps=0.0).round(4)
    Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)
    >>> mask = jnp.array([True, True, True, False])  # 9 is normalized by the statistics of 1, 2, 3
    >>> layer_norm(jnp.array([[1.0, 2.0, 3.0, 9.0]]), eps=0.0, mask=mask).round(4)
    Array([[-1.2247,  0.    ,  1.2247,  8.5732]], dtype=float32)
    """
    fn = "layer_norm"
    x = _as_inexact_array(fn, x)
    _check_rank(fn, x, 1, "(..., C)")
    _check_eps(fn, eps)
    axes = _canonical_axes(fn, "reduction_axes", reduction_axes, x.ndim)
    features = _canonical_axes(fn, "feature_axes", feature_axes, x.ndim)
    scale = _feature_param(fn, "scale", scale, features, x.shape)
    bias = _feature_param(fn, "bias", bias, features, x.shape)
    return _normalize(x, scale, bias, axes, eps, dtype or x.dtype, mask=_check_mask(fn, mask, x.shape),
                      axis_name=axis_name, axis_index_groups=axis_index_groups)[0]


_BATCH_AXIS_MESSAGE = ("The channel axes cannot include the leading dimension as this is assumed to be the "
                       "batch axis.")


def instance_norm(x: jax.typing.ArrayLike, scale: jax.typing.ArrayLike | None = None,
                  bias: jax.typing.ArrayLike | None = None, *, eps: float = 1e-5, feature_axes: Axes = -1,
                  mask: jax.typing.ArrayLike | None = None, axis_name: str | None = None,
                  axis_index_groups: Any = None, dtype: Any = None) -> jax.Array:
    """Instance normalization: statistics over ``*spatial`` per sample and channel (Ulyanov et al., 2016).

    The statistics run over every axis but the first (the batch) and ``feature_axes``. For ``(N, C)``
    input there is nothing to reduce: each value is its own mean, and the output is ``bias`` (as Flax).

    Args:
      x: input of shape ``(N, *spatial, C)`` (real or complex).
      scale: optional scale of shape ``x.shape[feature_axes]``, ``(C,)`` by default.
      bias: optional bias of the same shape.
      eps: added to the variance before the square root.
      feature_axes: the channel axes (not axis 0); ``scale`` and ``bias`` vary over them.
      mask: booleans broadcastable to ``x``: only ``True`` elements enter the statistics.
      axis_name: a mapped axis over which ``x`` is split (see :func:`layer_norm`).
      axis_index_groups: with ``axis_name``, groups of device indices pooled separately.
      dtype: dtype of the output; by default the input's.

    Returns:
      The normalized array, shape of ``x``.

    >>> import jax.numpy as jnp
    >>> from jaxopt_lab.normalization import instance_norm
    >>> x = jnp.stack([jnp.arange(4.0), 10 * jnp.arange(4.0)], axis=-1)[None]  # (1, 4, 2)
    >>> instance_norm(x, eps=0.0)[0, :, 1].round(4)  # each channel on its own scale
    Array([-1.3416, -0.4472,  0.4472,  1.3416], dtype=float32)
    """
    fn = "instance_norm"
    x = _as_inexact_array(fn, x)
    _check_rank(fn, x, 2, "(N, *spatial, C)")
    _check_eps(fn, eps)
    features = _canonical_axes(fn, "feature_axes", feature_axes, x.ndim)
    if 0 in features:
        raise ValueError(f"{fn}: feature_axes={feature_axes!r}: {_BATCH_AXIS_MESSAGE}")
    axes = tuple(a for a in range(1, x.ndim) if a not in features)
    scale = _feature_param(fn, "scale", scale, features, x.shape)
    bias = _feature_param(fn, "bias", bias, features, x.shape)
    return _normalize(x, scale, bias, axes, eps, dtype or x.dtype, mask=_check_mask(fn, mask, x.shape),
                      axis_name=axis_name, axis_index_groups=axis_index_groups)[0]


def _resolve_groups(fn: str, num_channels: int, num_groups: int | None, group_size: int | None) -> int:
    if (num_groups is None) == (group_size is None):
        raise ValueError(f"{fn}: give exactly one of num_groups and group_size, "
                         f"got num_groups={num_groups!r} and group_size={group_size!r}")
    name, value = ("num_groups", num_groups) if num_groups is not None else ("group_size", group_size)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}")
    if num_channels % value:
        raise ValueError(f"{fn}: {num_channels} channels (x.shape[-1]) are not divisible by {name}={value}")
    return value if num_groups is not None else num_channels // value


def group_norm(x: jax.typing.ArrayLike, num_groups: int | None = None,
               scale: jax.typing.ArrayLike | None = None, bias: jax.typing.ArrayLike | None = None, *,
               group_size: int | None = None, eps: float = 1e-5, reduction_axes: Axes | None = None,
               mask: jax.typing.ArrayLike | None = None, axis_name: str | None = None,
               axis_index_groups: Any = None, dtype: Any = None) -> jax.Array:
    """Group normalization: statistics over ``*spatial`` and each group of channels (Wu & He, 2018).

    Channels ``[g * C/G, (g + 1) * C/G)`` form group ``g`` (the layout of Flax and PyTorch). One group is
    :func:`layer_norm` over ``(*spatial, C)``; ``C`` groups is :func:`instance_norm`.

    Args:
      x: input of shape ``(N, *spatial, C)`` (real or complex); ``(N, C)`` and ``(C,)`` are allowed
        (groups of channels only).
      num_groups: the number of groups ``G``, dividing ``C`` (the paper's best on ResNet-50 is 32).
      scale: optional per-channel scale of shape ``(C,)``.
      bias: optional per-channel bias of shape ``(C,)``.
      group_size: instead of ``num_groups``, the number of channels per group (give exactly one).
      eps: added to the variance before the square root.
      reduction_axes: the axes the statistics run over, which must include the last (channel) axis;
        by default every axis but the first, ``(1, ..., x.ndim - 1)`` (Flax's ``reduction_axes``).
      mask: booleans broadcastable to ``x``: only ``True`` elements enter the statistics.
      axis_name: a mapped axis over which ``x`` is split (see :func:`layer_norm`).
      axis_index_groups: with ``axis_name``, groups of device indices pooled separately.
      dtype: dtype of the output; by default the input's.

    Returns:
      The normalized array, shape of ``x``.

    >>> import jax.numpy as jnp
    >>> from jaxopt_lab.normalization import group_norm
    >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
    >>> group_norm(x, num_groups=2, eps=0.0)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
    """
    fn = "group_norm"
    x = _as_inexact_array(fn, x)
    _check_rank(fn, x, 1, "(N, *spatial, C)")
    _check_eps(fn, eps)
    channels = x.shape[-1]
    groups = _resolve_groups(fn, channels, num_groups, group_size)
    axes = _canonical_axes(fn, "reduction_axes", tuple(range(1, x.ndim)) if reduction_axes is None
                           else reduction_axes, x.ndim)
    if axes[-1] != x.ndim - 1:
        raise ValueError(f"{fn}: reduction_axes must include the last (channel) axis {x.ndim - 1} or -1, "
                         f"got {reduction_axes!r}")
    mask = _check_mask(fn, mask, x.shape)
    scale, bias = (_feature_param(fn, name, p, (x.ndim - 1,), x.shape)
                   for name, p in (("scale", scale), ("bias", bias)))
    if _group_norm_fast_path(x, axes, mask, axis_name):
        scale, bias = _varying_like(x, scale), _varying_like(x, bias)
        return _group_norm_core(x, scale, bias, groups, eps, dtype or x.dtype)
    grouped_shape = (*x.shape[:-1], groups, channels // groups)
    # Channel c = g * C/G + j: scale[c] becomes scale[..., g, j].
    scale, bias = (None if p is None else p.reshape(*p.shape[:-1], groups, channels // groups)
                   for p in (scale, bias))
    y, _, _ = _normalize(x.reshape(grouped_shape), scale, bias, (*axes[:-1], x.ndim), eps, dtype or x.dtype,
                         mask=None if mask is None else mask.reshape(grouped_shape), axis_name=axis_name,
                         axis_index_groups=axis_index_groups)
    return y.reshape(x.shape)


def batch_norm_init(num_features: int | Sequence[int], dtype: Any = jnp.float32) -> BatchNormStats:
    """Running statistics before any batch: mean 0 and variance 1 per feature (what Flax starts from).

    ``num_features`` is the number of channels, or the shape ``x.shape[axis]`` for several feature axes.

    >>> from jaxopt_lab.normalization import batch_norm_init
    >>> batch_norm_init(3)
    BatchNormStats(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32))
    """
    shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"batch_norm_init: num_features must be a positive integer (or a shape of them), "
                         f"got {num_features!r}")
    return BatchNormStats(mean=jnp.zeros(shape, dtype), var=jnp.ones(shape, dtype))


def batch_norm(x: jax.typing.ArrayLike, stats: BatchNormStats, scale: jax.typing.ArrayLike | None = None,
               bias: jax.typing.ArrayLike | None = None, *, training: bool, momentum: float = 0.9,
               eps: float = 1e-5, axis: Axes = -1, mask: jax.typing.ArrayLike | None = None,
               axis_name: str | None = None, axis_index_groups: Any = None, dtype: Any = None
               ) -> tuple[jax.Array, BatchNormStats]:
    """Batch normalization: statistics over the batch and ``*spatial`` per channel (Ioffe & Szegedy, 2015).

    Training (``training=True``) normalizes with the batch's own mean and biased variance and returns
    running statistics updated as an exponential moving average::

        new_running = momentum * running + (1 - momentum) * batch_statistic

    Conventions, which differ between libraries:

    * ``momentum`` is the weight of the *old* running value. Ours defaults to 0.9; Flax's
      ``nn.BatchNorm`` uses the same formula with default 0.99 (so does :class:`jaxopt_lab.nn.BatchNorm`,
      to be a drop-in); PyTorch's ``momentum=0.1`` is the weight of the *new* value, i.e. ``1 - ours``.
    * The running variance accumulates the *biased* batch variance (divided by the count ``m``, not
      ``m - 1``), as Flax does; PyTorch stores the unbiased one (``m / (m - 1)`` larger). Biased, because
      it is the exact statistic training normalized with, so evaluation reproduces training's scale and
      a Flax checkpoint's ``batch_stats`` mean the same thing here; the two differ by ``1/(m - 1)``
      relative, negligible for the ``m = N * H * W`` of a CNN.

    Evaluation (``training=False``) normalizes with the running statistics, which come back unchanged
    (the same object), so the output for one sample never depends on the rest of the batch.

    Args:
      x: input of shape ``(N, *spatial, C)`` (real or complex; for complex ``x`` the mean is complex and
        the variance ``E|x - mean|^2``, as Flax's).
      stats: running statistics of shape ``x.shape[axis]``, from :func:`batch_norm_init` or a previous call.
      scale: optional per-channel scale of shape ``x.shape[axis]``, ``(C,)`` by default.
      bias: optional per-channel bias of the same shape.
      training: use (and update with) the batch's statistics, else use the running ones.
      momentum: weight of the old running statistics, in ``[0, 1]``.
      eps: added to the variance before the square root.
      axis: the feature axis (or axes); the statistics run over all the others (Flax's ``axis``).
      mask: booleans broadcastable to ``x``: only ``True`` elements enter the batch statistics.
      axis_name: name of a mapped axis (``shard_map``/``pmap``) across which the batch statistics are
        computed; the statistics travel in one collective and are exact even when devices hold different
        numbers of (unmasked) elements. Not needed under ``jit`` with a sharded batch, where the
        reductions are global.
      axis_index_groups: with ``axis_name``, groups of device indices whose batches are pooled separately
        (``lax.psum``'s ``axis_index_groups``), e.g. ``[[0, 1], [2, 3]]``.
      dtype: dtype of the output; by default the input's.

    Returns:
      ``(y, new_stats)``: the normalized array and the (training: updated; eval: same) running statistics.

    >>> import jax.numpy as jnp
    >>> from jaxopt_lab.normalization import batch_norm, batch_norm_init
    >>> x = jnp.array([[0.0, 10.0], [2.0, 30.0]])
    >>> y, stats = batch_norm(x, batch_norm_init(2), training=True, eps=0.0)
    >>> y
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> stats  # 0.9 * (0, 1) + 0.1 * batch's (mean, var) = ((1, 20), (1, 100))
    BatchNormStats(mean=Array([0.1, 2. ], dtype=float32), var=Array([ 1. , 10.9], dtype=float32))
    """
    fn = "batch_norm"
    x = _as_inexact_array(fn, x)
    _check_rank(fn, x, 1, "(N, *spatial, C)")
    _check_eps(fn, eps)
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"{fn}: momentum must be a number in [0, 1], got {momentum!r}")
    features = _canonical_axes(fn, "axis", axis, x.ndim)
    feature_shape = tuple(x.shape[a] for a in features)
    stats_shape = tuple(d if a in features else 1 for a, d in enumerate(x.shape))
    if not (isinstance(stats, tuple) and len(stats) == 2):
        raise TypeError(f"{fn}: stats must be a BatchNormStats(mean, var) (from batch_norm_init), "
                        f"got {type(stats).__name__}")
    given_stats, stats = stats, BatchNormStats(*stats)
    for name, value in zip(BatchNormStats._fields, stats, strict=True):
        if jnp.shape(value) != feature_shape:
            raise ValueError(f"{fn}: stats.{name} has shape {jnp.shape(value)}, expected {feature_shape} for "
                             f"x of shape {x.shape}: the statistics are for another number of features")
    scale = _feature_param(fn, "scale", scale, features, x.shape)
    bias = _feature_param(fn, "bias", bias, features, x.shape)
    mask = _check_mask(fn, mask, x.shape)
    dtype = dtype or x.dtype

    if not training:
        stat_dtype = _statistics_dtype(jnp.result_type(stats.mean, x.dtype))
        mean = jnp.asarray(stats.mean, stat_dtype).reshape(stats_shape)
        var = jnp.asarray(stats.var, _real_dtype(stat_dtype)).reshape(stats_shape)
        running = _Moments(shift=jnp.zeros((), stat_dtype), offset=mean, var=var)
        return _affine(_standardize(x, running, eps), scale, bias, dtype), given_stats

    axes = tuple(a for a in range(x.ndim) if a not in features)
    y, mean, var = _normalize(x, scale, bias, axes, eps, dtype, mask=mask, axis_name=axis_name,
                              axis_index_groups=axis_index_groups)
    batch_stats = (lax.stop_gradient(mean).reshape(feature_shape),
                   lax.stop_gradient(var).reshape(feature_shape))

    def update(running: jax.Array, batch: jax.Array) -> jax.Array:
        # The running value keeps its dtype, unless the batch statistic is complex (complex input): then
        # it becomes complex, as Flax's variable does.
        dtype = jnp.result_type(running, batch) if jnp.iscomplexobj(batch) else jnp.result_type(running)
        return (momentum * running + (1.0 - momentum) * batch).astype(dtype)

    return y, BatchNormStats(*(update(r, b) for r, b in zip(stats, batch_stats, strict=True)))
