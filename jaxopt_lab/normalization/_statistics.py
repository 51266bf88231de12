"""The one statistics helper under every norm, and the standardization built on it.

:func:`moments` (like ``flax.linen.normalization._compute_stats``) gives the mean and biased variance of
each reduction group in at least float32: a *shifted* one-pass estimate, stable at large offsets, pooled
over devices under ``axis_name`` with the law of total variance. :func:`group_moments` is group norm's
two-stage variant of it on the channels-last layout. :func:`standardize` and :func:`affine` turn the
statistics into the output.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Samples averaged into the shift of a statistics group whose reduced axes are not the trailing ones:
# the shift then lies within ~sigma/8 of the mean, so the shifted sums lose no digit to cancellation
# (see :func:`moments`).
SHIFT_SAMPLES = 64


def statistics_dtype(dtype: Any) -> jnp.dtype:
    """At least float32: half-precision inputs get float32 statistics; float64 and complex stay."""
    return jnp.promote_types(dtype, jnp.float32)


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|^2`` elementwise, real for complex ``x`` (as Flax's ``_abs_sq``)."""
    if jnp.iscomplexobj(x):
        return lax.square(lax.real(x)) + lax.square(lax.imag(x))
    return lax.square(x)


def sample_mean(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
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


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(hi, lo)`` with ``hi = fl(a + b)`` and ``hi + lo == a + b`` exactly (Knuth's TwoSum)."""
    hi = a + b
    b_part = hi - a
    return hi, (a - (hi - b_part)) + (b - b_part)


# Reduced axes are averaged in levels of at least this many elements each (see _levelled_mean).
_LEVEL_SIZE = 16


def _levelled_mean(v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``mean(v, axes, keepdims=True)`` in levels: the innermost reduced axes first, then the next ones.

    A float32 accumulation's rounding error grows with its length; averaging a feature map row by row
    and then the row means (each level a reduction over >= ``_LEVEL_SIZE`` elements) keeps each
    accumulation short (``docs/normalization.md`` measures the gain on group norm's layout). Means, not
    sums: XLA folds a sum of sums into one reduction again, not a mean of means (equal to the mean, the
    levels being of equal size). The first level reads ``v`` once, fused with whatever computes it; the
    later levels reduce arrays at least ``_LEVEL_SIZE`` times smaller.

    Only for reduced axes with a gap between them (group norm's ``(*spatial, C/G)`` around the kept
    ``G``): a contiguous block of reduced axes (batch, instance and layer norm) is one row or column
    reduction for XLA, already accurate (levels made batch norm *less* accurate).
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


class Moments(NamedTuple):
    """Statistics of one or more reduction groups, all of shape ``x``'s with size-1 reduced axes.

    The mean is kept as ``shift + offset``, ``shift`` near the mean and ``offset`` below its rounding
    error (``shift`` the group's exact mean rounded, or split so by :func:`two_sum`); ``x`` is centered
    as ``(x - shift) - offset``. At a large mean ``x - shift`` is exact (Sterbenz) and ``offset`` keeps
    the digits the rounded mean lost, where ``x - (shift + offset)`` would round the mean to the ulp of
    ``shift``; near zero ``offset`` is below half an ulp of ``x - shift`` and the centering rounds once,
    as a plain ``x - mean``. (A sample mean as ``shift`` with its ``offset`` unsplit rounds twice, and
    batch norm's error at offset 0 then exceeded flax's.)
    """

    shift: jax.Array
    offset: jax.Array
    var: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.shift + self.offset


def moments(x: jax.Array, axes: tuple[int, ...], axis_name: str | None = None, *,
            mask: jax.Array | None = None, axis_index_groups: Any = None) -> Moments:
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

    Returns:
      The :class:`Moments` of every group, in the statistics dtype (:func:`statistics_dtype`).
    """
    x = x.astype(statistics_dtype(x.dtype))
    # E[(x-s)^2] - E[x-s]^2 loses digits to cancellation like ((mean - s) / std)^2: any shift within a
    # fraction of a standard deviation of the mean makes it exact to rounding (a naive E[x^2] - E[x]^2
    # is the shift 0). When the reduced axes are the trailing ones (layer norm), each group is contiguous
    # and cache-resident, so its own mean is a cheap first pass and the shifted sums are the corrected
    # two-pass algorithm of Chan, Golub & LeVeque. Otherwise a second pass would stream x from memory
    # again; the mean of SHIFT_SAMPLES spread samples (a strided slice, not a pass) is within
    # ~std/8 of the mean, which costs less accuracy than the rounding of the sums themselves (a single
    # sample, ~1 std away, cost a multiple of flax's error on N(0, 1) data). With a mask, the shift is the
    # masked mean (a second pass on that path only: samples may all be masked).
    # The shift does not change the variance mathematically, only the rounding; so it gets no gradient.
    # The means run in levels (_levelled_mean): shorter float32 accumulations, less rounding.
    size = float(math.prod(x.shape[a] for a in axes))
    count: jax.Array | float = size
    trailing = axes == tuple(range(x.ndim - len(axes), x.ndim))
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
        count = jnp.sum(mask, axes, keepdims=True, dtype=real_dtype(x.dtype))
        unmasked = size / count  # mean over the unmasked elements = mean over all (zeros put in) * this
        shift = lax.stop_gradient(_levelled_mean(jnp.where(mask, x, 0), axes)
                                  * (size / jnp.maximum(count, 1)))
        centered = jnp.where(mask, x - shift, 0)
        offset = _levelled_mean(centered, axes) * unmasked
        square = _levelled_mean(abs_sq(centered), axes) * unmasked
    else:
        shift = lax.stop_gradient(jnp.mean(x, axes, keepdims=True) if trailing else sample_mean(x, axes))
        centered = x - shift
        offset = _levelled_mean(centered, axes)
        square = _levelled_mean(abs_sq(centered), axes)
    # Rounding can leave a tiny negative difference; clip it so that rsqrt(var + eps) stays finite.
    var = jnp.maximum(square - abs_sq(offset), 0.0)
    if axis_name is not None:
        shift, offset, var = _combine_over_devices(shift, offset, var, count, axis_name, axis_index_groups)
    if mask is not None or axis_name is not None or not trailing:
        # The shift is not the group's mean rounded: split shift + offset so that the centering rounds
        # once (Moments). Layer norm's shift is its mean, its offset already below the rounding.
        shift, offset = two_sum(shift, offset)
    return Moments(shift, offset, var)


def real_dtype(dtype: Any) -> Any:
    """The real dtype of a float or complex ``dtype``: float32 for complex64, itself for a real float."""
    return jnp.finfo(dtype).dtype


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
    spread = jnp.where(present, variances + abs_sq(device_offsets - offset), 0)
    return shift, offset, jnp.sum(weights * spread, axis=0)


def standardize(x: jax.Array, moments: Moments, eps: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` in the statistics' dtype."""
    centered = (x.astype(moments.offset.dtype) - moments.shift) - moments.offset
    return centered * lax.rsqrt(moments.var + eps)


def affine(x_hat: jax.Array, scale: jax.Array | None, bias: jax.Array | None, dtype: Any) -> jax.Array:
    """``x_hat * scale + bias`` with parameters broadcast against ``x_hat``, cast to ``dtype``."""
    y = x_hat
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y.astype(dtype)


def group_moments(x: jax.Array, groups: int) -> tuple[Moments, jax.Array, jax.Array]:
    """Group statistics of channels-last ``x`` ``(N, *spatial, C)`` (statistics dtype), each ``(N, 1.., C)``.

    Group norm's fast path (:func:`jaxopt_lab.normalization._vjp.group_norm_core`) reduces in two stages
    on ``x`` as it is: over ``*spatial`` for every (n, channel), a column reduction contiguous in ``C``,
    then over the ``C/G`` channels of each group, an ``(N, C)``-sized array. Each channel has its own
    shift; the channel moments combine into the group's with the law of total variance, the channel
    means taken relative to the group's first shift (differences of nearby numbers, exact at large
    offsets), so the result stays exact to rounding at any offset.

    Returns ``(moments, centered, offset)``: ``moments.shift + moments.offset`` is the mean of the
    channel's group, split by TwoSum as :func:`moments`' (``moments.var`` the group's biased variance);
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
    shift = lax.stop_gradient(sample_mean(x3[:, :1 << (x3.shape[1].bit_length() - 1)], (1,)))
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
    return Moments(*two_sum(shift, offset), var), centered, offset

