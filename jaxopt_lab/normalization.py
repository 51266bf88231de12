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
  reference to ~2e-6. The shift is the group's mean when the reduced axes are the trailing ones (layer
  norm: a cache-resident first pass, the corrected two-pass algorithm) and one sample of the group
  otherwise (one pass over ``x``). A constant input gives variance exactly 0 (no NaN).
* The backward is hand-derived (:func:`_normalize`, a ``jax.custom_vjp``): one reduction pass over
  ``(dy, dy * x_hat)`` and one elementwise pass, 1.2-2.7x faster than autodiff of the same forward; with
  it, forward + backward is close to Flax's fast variance, not yet faster (1.03-1.44x on XLA:CPU;
  ``docs/benchmarks.md`` has the numbers).
* Under ``axis_name`` (``shard_map``/``pmap``) the per-device ``(mean, var)`` pairs travel in one
  collective (a ``psum`` gathering the stacked pairs) and are combined exactly with the law of total
  variance, so the cross-device statistics are as stable as the local ones. Under plain ``jit`` with a
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


class BatchNormStats(NamedTuple):
    """Running statistics of :func:`batch_norm`, one entry per channel (names as Flax's ``batch_stats``)."""

    mean: jax.Array
    var: jax.Array


# --------------------------------------------------------------------------------------------------
# The shared statistics helper and the standardization built on it.


def _statistics_dtype(dtype: Any) -> jnp.dtype:
    """At least float32: half-precision inputs get float32 statistics, float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _first_along(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """The element at index 0 of every axis in ``axes`` (kept as size-1 axes): one sample per group."""
    return x[tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))]


class _Moments(NamedTuple):
    """Statistics of one or more reduction groups, all of shape ``x``'s with size-1 reduced axes.

    The mean is kept as ``shift + offset`` with ``shift`` a sample of the data: ``x - shift`` is exact
    for ``x`` near ``shift`` (Sterbenz), so ``(x - shift) - offset`` centers ``x`` to float32 accuracy
    even when the mean is large; ``x - (shift + offset)`` would round the mean to the ulp of ``shift``.
    """

    shift: jax.Array
    offset: jax.Array
    var: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.shift + self.offset


def _moments(x: jax.Array, axes: tuple[int, ...], axis_name: str | None = None) -> _Moments:
    """Mean and biased variance of ``x`` over ``axes`` (kept as size-1 axes), in at least float32.

    The one statistics helper under every norm. One pass over ``x`` (a shifted sum and sum of squares),
    stable for large offsets, exactly 0 variance for constant input. With ``axis_name``, the statistics
    also run over that mapped axis, each device holding an equal share of the data (as ``shard_map``
    and ``pmap`` give), with a single collective.
    """
    x = x.astype(_statistics_dtype(x.dtype))
    # Any shift near the mean makes E[(x-s)^2] - E[x-s]^2 exact to rounding. When the reduced axes are
    # the trailing ones (layer norm), each group is contiguous and cache-resident, so its own mean is a
    # cheap first pass and the shifted sums are the corrected two-pass algorithm of Chan, Golub &
    # LeVeque. Otherwise a second pass would stream x from memory again; one sample of each group
    # (its first element) is near enough the mean, and keeps the statistics to one pass.
    # The shift does not change the variance mathematically, only the rounding; so it gets no gradient.
    trailing = axes == tuple(range(x.ndim - len(axes), x.ndim))
    shift = lax.stop_gradient(jnp.mean(x, axes, keepdims=True) if trailing else _first_along(x, axes))
    centered = x - shift
    offset = jnp.mean(centered, axes, keepdims=True)
    # Rounding can leave a tiny negative difference; clip it so that rsqrt(var + eps) stays finite.
    var = jnp.maximum(jnp.mean(jnp.square(centered), axes, keepdims=True) - jnp.square(offset), 0.0)
    if axis_name is not None:
        # One collective for all statistics. Combining per-device (mean, var) pairs with the law of total
        # variance (var = mean of the vars + var of the means) keeps the stability of the local
        # statistics, which a psum of [sum, sum of squares] would lose to cancellation. The gather is a
        # psum of each device's triple written into its own slot: unlike all_gather, its result is
        # known to be the same on every device, so shard_map can return the statistics replicated.
        local = jnp.stack([shift, offset, var])
        slots = jnp.zeros((lax.axis_size(axis_name), *local.shape), local.dtype)
        shifts, offsets, variances = jnp.moveaxis(
            lax.psum(slots.at[lax.axis_index(axis_name)].set(local), axis_name), 1, 0)
        shift = shifts[0]  # a shift common to all devices, so every result is replicated
        device_offsets = (shifts - shift) + offsets  # each device's mean, relative to that shift
        offset = jnp.mean(device_offsets, axis=0)
        var = jnp.mean(variances, axis=0) + jnp.mean(jnp.square(device_offsets - offset), axis=0)
    return _Moments(shift, offset, var)


def _standardize(x: jax.Array, moments: _Moments, eps: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` in the statistics' dtype."""
    centered = (x.astype(moments.var.dtype) - moments.shift) - moments.offset
    return centered * lax.rsqrt(moments.var + eps)


def _affine(x_hat: jax.Array, scale: jax.Array | None, bias: jax.Array | None, dtype: Any) -> jax.Array:
    """``x_hat * scale + bias`` over the last axis, cast to ``dtype``."""
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
               eps: float, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y, mean, var)`` of the normalization of ``x`` over ``axes``, with a hand-derived backward.

    Inside ``shard_map`` a replicated ``scale``/``bias`` meets a per-device ``x``; a custom backward must
    return each cotangent with its primal's type, so the parameters are first marked as varying like
    ``x`` (``pcast``): the backward then gives the per-device gradient, and autodiff of the ``pcast``
    sums it over the devices, as it would for the plain formula.
    """
    x_axes = _varying_axes(x)
    scale, bias = (None if p is None else lax.pcast(p, tuple(a for a in x_axes if a not in _varying_axes(p)),
                                                     to="varying") for p in (scale, bias))
    return _normalize_core(x, scale, bias, axes, eps, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _normalize_core(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, axes: tuple[int, ...],
                    eps: float, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`_normalize` for parameters of ``x``'s type, with a hand-derived backward.

    ``x`` is in its statistics layout (for group norm ``(N, *spatial, G, C/G)``) and ``scale``/``bias``
    broadcast against its trailing (parameter) axes. Autodiff of the forward would differentiate the
    shifted statistics term by term; the closed form below needs one reduction pass over ``x`` and
    ``dy`` and one elementwise pass (Ioffe & Szegedy 2015, section 3), recomputing ``x_hat`` from ``x``
    instead of storing it.
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
    # Parameter axes: the trailing ones scale/bias vary over. Sum dy and dy * x_hat first over the
    # statistics axes that are not parameter axes; both the parameter gradients and the per-group
    # means below are small reductions of these partial sums.
    param_ndim = max((p.ndim for p in (scale, bias) if p is not None), default=1)
    first_param_axis = x.ndim - param_ndim
    inner = tuple(a for a in axes if a < first_param_axis)
    outer = tuple(a for a in range(first_param_axis) if a not in axes)
    param_axes_in_stats = tuple(a for a in axes if a >= first_param_axis)
    sum_dy = jnp.sum(dy, inner, keepdims=True)
    sum_dy_x_hat = jnp.sum(dy * x_hat, inner, keepdims=True)
    dscale = None if scale is None else jnp.sum(sum_dy_x_hat, outer).reshape(scale.shape).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(sum_dy, outer).reshape(bias.shape).astype(bias.dtype)
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
# Input validation: every message names the function, the argument, what was expected and what came.


def _as_float_array(fn: str, x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: x must be a floating-point array, got dtype {x.dtype}")
    return x


def _check_rank(fn: str, x: jax.Array, min_ndim: int, layout: str) -> None:
    if x.ndim < min_ndim:
        raise ValueError(f"{fn}: x must have rank >= {min_ndim} with layout {layout}, got shape {x.shape}")


def _check_param(fn: str, name: str, param: Any, num_features: int, x_shape: tuple[int, ...]
                 ) -> jax.Array | None:
    if param is None:
        return None
    param = jnp.asarray(param)
    if param.shape != (num_features,):
        raise ValueError(f"{fn}: {name} must have shape (C,) = ({num_features},) for x of shape {x_shape}, "
                         f"got shape {param.shape}")
    return param


def _check_eps(fn: str, eps: float) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")


def _canonical_axes(fn: str, axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    if not axes or any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"{fn}: reduction_axes must be non-empty axes of an array of rank {ndim}, got {axes}")
    canonical = tuple(sorted({a % ndim for a in axes}))
    if len(canonical) != len(axes):
        raise ValueError(f"{fn}: reduction_axes has repeated axes: {axes}")
    return canonical


# --------------------------------------------------------------------------------------------------
# The four norms.


def layer_norm(x: jax.typing.ArrayLike, scale: jax.typing.ArrayLike | None = None,
               bias: jax.typing.ArrayLike | None = None, *, eps: float = 1e-5,
               reduction_axes: int | Sequence[int] = -1, dtype: Any = None) -> jax.Array:
    """Layer normalization: statistics over the last axis of each sample (Ba et al., 2016).

    Args:
      x: input of shape ``(..., C)``.
      scale: optional per-channel scale of shape ``(C,)`` (gamma).
      bias: optional per-channel bias of shape ``(C,)`` (beta).
      eps: added to the variance before the square root.
      reduction_axes: the axes the statistics run over; the default ``-1`` is the usual layer norm of
        transformers and RNNs, ``(1, ..., x.ndim - 1)`` normalizes each sample of a CNN over
        ``(*spatial, C)`` (the "LN" of the Group Norm paper).
      dtype: dtype of the output; by default the input's.

    Returns:
      The normalized array, shape of ``x``.

    >>> import jax.numpy as jnp
    >>> from jaxopt_lab.normalization import layer_norm
    >>> layer_norm(jnp.array([[1.0, 2.0, 3.0]]), eps=0.0).round(4)
    Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)
    """
    fn = "layer_norm"
    x = _as_float_array(fn, x)
    _check_rank(fn, x, 1, "(..., C)")
    _check_eps(fn, eps)
    axes = _canonical_axes(fn, reduction_axes, x.ndim)
    scale = _check_param(fn, "scale", scale, x.shape[-1], x.shape)
    bias = _check_param(fn, "bias", bias, x.shape[-1], x.shape)
    return _normalize(x, scale, bias, axes, eps, dtype or x.dtype)[0]


def instance_norm(x: jax.typing.ArrayLike, scale: jax.typing.ArrayLike | None = None,
                  bias: jax.typing.ArrayLike | None = None, *, eps: float = 1e-5,
                  dtype: Any = None) -> jax.Array:
    """Instance normalization: statistics over ``*spatial`` per sample and channel (Ulyanov et al., 2016).

    Args:
      x: input of shape ``(N, *spatial, C)`` with at least one spatial axis.
      scale: optional per-channel scale of shape ``(C,)``.
      bias: optional per-channel bias of shape ``(C,)``.
      eps: added to the variance before the square root.
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
    x = _as_float_array(fn, x)
    _check_rank(fn, x, 3, "(N, *spatial, C) with at least one spatial axis")
    _check_eps(fn, eps)
    scale = _check_param(fn, "scale", scale, x.shape[-1], x.shape)
    bias = _check_param(fn, "bias", bias, x.shape[-1], x.shape)
    return _normalize(x, scale, bias, tuple(range(1, x.ndim - 1)), eps, dtype or x.dtype)[0]


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
               group_size: int | None = None, eps: float = 1e-5, dtype: Any = None) -> jax.Array:
    """Group normalization: statistics over ``*spatial`` and each group of channels (Wu & He, 2018).

    Channels ``[g * C/G, (g + 1) * C/G)`` form group ``g`` (the layout of Flax and PyTorch). One group is
    :func:`layer_norm` over ``(*spatial, C)``; ``C`` groups is :func:`instance_norm`.

    Args:
      x: input of shape ``(N, *spatial, C)``; ``(N, C)`` is allowed (groups of channels only).
      num_groups: the number of groups ``G``, dividing ``C`` (the paper's best on ResNet-50 is 32).
      scale: optional per-channel scale of shape ``(C,)``.
      bias: optional per-channel bias of shape ``(C,)``.
      group_size: instead of ``num_groups``, the number of channels per group (give exactly one).
      eps: added to the variance before the square root.
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
    x = _as_float_array(fn, x)
    _check_rank(fn, x, 2, "(N, *spatial, C)")
    _check_eps(fn, eps)
    channels = x.shape[-1]
    groups = _resolve_groups(fn, channels, num_groups, group_size)
    scale = _check_param(fn, "scale", scale, channels, x.shape)
    bias = _check_param(fn, "bias", bias, channels, x.shape)
    grouped = x.reshape(*x.shape[:-1], groups, channels // groups)
    per_group = (groups, channels // groups)  # channel c = g * C/G + j: scale[c] becomes scale[g, j]
    y, _, _ = _normalize(grouped, None if scale is None else scale.reshape(per_group),
                         None if bias is None else bias.reshape(per_group),
                         (*range(1, x.ndim - 1), x.ndim), eps, dtype or x.dtype)
    return y.reshape(x.shape)


def batch_norm_init(num_features: int, dtype: Any = jnp.float32) -> BatchNormStats:
    """Running statistics before any batch: mean 0 and variance 1 per channel (what Flax starts from).

    >>> from jaxopt_lab.normalization import batch_norm_init
    >>> batch_norm_init(3)
    BatchNormStats(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32))
    """
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"batch_norm_init: num_features must be a positive integer, got {num_features!r}")
    return BatchNormStats(mean=jnp.zeros((num_features,), dtype), var=jnp.ones((num_features,), dtype))


def batch_norm(x: jax.typing.ArrayLike, stats: BatchNormStats, scale: jax.typing.ArrayLike | None = None,
               bias: jax.typing.ArrayLike | None = None, *, training: bool, momentum: float = 0.9,
               eps: float = 1e-5, axis_name: str | None = None, dtype: Any = None
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
      x: input of shape ``(N, *spatial, C)``.
      stats: running statistics for ``C`` channels, from :func:`batch_norm_init` or a previous call.
      scale: optional per-channel scale of shape ``(C,)``.
      bias: optional per-channel bias of shape ``(C,)``.
      training: use (and update with) the batch's statistics, else use the running ones.
      momentum: weight of the old running statistics, in ``[0, 1]``.
      eps: added to the variance before the square root.
      axis_name: name of a mapped axis (``shard_map``/``pmap``) across which the batch statistics are
        computed, each device holding an equal share of the batch; the statistics travel in one
        collective. Not needed under ``jit`` with a sharded batch, where the reductions are global.
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
    x = _as_float_array(fn, x)
    _check_rank(fn, x, 2, "(N, *spatial, C)")
    _check_eps(fn, eps)
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"{fn}: momentum must be a number in [0, 1], got {momentum!r}")
    channels = x.shape[-1]
    if not (isinstance(stats, tuple) and len(stats) == 2):
        raise TypeError(f"{fn}: stats must be a BatchNormStats(mean, var) (from batch_norm_init), "
                        f"got {type(stats).__name__}")
    given_stats, stats = stats, BatchNormStats(*stats)
    for name, value in zip(BatchNormStats._fields, stats, strict=True):
        if jnp.shape(value) != (channels,):
            raise ValueError(f"{fn}: stats.{name} has shape {jnp.shape(value)}, expected ({channels},) for "
                             f"x of shape {x.shape}: the statistics are for another number of features")
    scale = _check_param(fn, "scale", scale, channels, x.shape)
    bias = _check_param(fn, "bias", bias, channels, x.shape)
    dtype = dtype or x.dtype

    if not training:
        stat_dtype = _statistics_dtype(jnp.result_type(stats.mean, x.dtype))
        mean, var = (jnp.asarray(s, stat_dtype) for s in stats)
        running = _Moments(shift=jnp.zeros((), stat_dtype), offset=mean, var=var)
        return _affine(_standardize(x, running, eps), scale, bias, dtype), given_stats

    axes = tuple(range(x.ndim - 1))
    if axis_name is None:
        y, mean, var = _normalize(x, scale, bias, axes, eps, dtype)
    else:  # autodiff differentiates through the collective of the shared helper
        moments = _moments(x, axes, axis_name)
        y, mean, var = _affine(_standardize(x, moments, eps), scale, bias, dtype), moments.mean, moments.var
    batch_stats = (lax.stop_gradient(mean).reshape(channels), lax.stop_gradient(var).reshape(channels))
    new_stats = BatchNormStats(*(
        (momentum * running + (1.0 - momentum) * batch).astype(jnp.result_type(running))
        for running, batch in zip(stats, batch_stats, strict=True)))
    return y, new_stats
