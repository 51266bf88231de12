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

All four share one statistics helper (``_statistics.moments``, like Flax's ``_compute_stats``):

* Statistics are computed in (at least) float32, so bf16/fp16 inputs keep full-precision statistics;
  the output comes back in the input's dtype (or ``dtype`` when given).
* The variance is a *shifted* estimate ``var = E[(x-s)^2] - E[x-s]^2`` with ``s`` near each group's
  mean, and ``x`` is centered as ``(x - s) - E[x-s]`` where ``x - s`` is exact. Flax's default
  ``E[x^2] - E[x]^2`` (``use_fast_variance=True``) cancels catastrophically instead: for
  ``x = 1e4 + N(0, 1)`` in float32, ``E[x^2]`` and ``E[x]^2`` are both about 1e8 and agree to all of
  float32's digits, so the naive difference keeps no correct digit of the variance 1. The shift is the
  group's mean when the reduced axes are the trailing ones (layer norm: the corrected two-pass algorithm
  on a cache-resident group) and otherwise the mean of 64 spread samples of the group (a strided slice;
  one pass over ``x``). ``shift + offset`` is split exactly (TwoSum), and the means run in levels where
  the reduced axes are not contiguous (group norm), so the error stays at float32's rounding floor at
  any offset (``docs/normalization.md`` measures it). A constant input gives variance exactly 0.
* Flax's arguments: ``mask`` (statistics of the ``True`` elements only), ``feature_axes`` (layer and
  instance norm), ``reduction_axes`` (layer and group norm), ``axis`` (batch norm), ``axis_name`` and
  ``axis_index_groups`` (all four), and complex input (complex mean, variance ``E|x - mean|^2``).
* The backward is hand-derived (a ``jax.custom_vjp``, in ``_vjp``): one reduction pass over
  ``(dy, dy * x_hat)`` and one elementwise pass. Layer norm over trailing axes and group norm's common
  case have their own backwards on the saved ``x - shift``, with the same values to rounding and fewer
  full-size arrays on XLA:CPU.
* Under ``axis_name`` (``shard_map``/``pmap``) the per-device ``(mean, var, count)`` triples travel in
  one collective and are combined exactly with the law of total variance, so the cross-device statistics
  are as stable as the local ones, and exact when masks leave the devices different counts. Under plain
  ``jit`` with a sharded batch no ``axis_name`` is needed: XLA's SPMD partitioner makes the reductions
  global.

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

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_lab.normalization import _pallas, _vjp
from jaxopt_lab.normalization._checks import (
    BATCH_AXIS_MESSAGE,
    Axes,
    as_inexact_array,
    canonical_axes,
    check_eps,
    check_mask,
    check_rank,
    feature_param,
    resolve_groups,
)
from jaxopt_lab.normalization._pallas import Implementation
from jaxopt_lab.normalization._statistics import Moments, affine, real_dtype, standardize, statistics_dtype

__all__ = [
    "Axes",
    "BatchNormStats",
    "Implementation",
    "batch_norm",
    "batch_norm_init",
    "group_norm",
    "instance_norm",
    "layer_norm",
]


class BatchNormStats(NamedTuple):
    """Running statistics of :func:`batch_norm`, one entry per feature (names as Flax's ``batch_stats``)."""

    mean: jax.Array
    var: jax.Array


def _not_kernel_layout(x: jax.Array, mask: Any, axis_name: str | None, default_axes: bool, dtype: Any
                       ) -> str | None:
    """Why a call does not fit the Pallas kernels' layout (``_pallas.takes_kernel``), or None when it does."""
    if statistics_dtype(x.dtype) != jnp.float32 or jnp.iscomplexobj(x):
        return f"real input of at most 32 bits (statistics in float32), got dtype {x.dtype}"
    if not jnp.issubdtype(dtype, jnp.floating):
        return f"a floating-point output dtype, got {dtype}"
    if mask is not None or axis_name is not None:
        return "no mask and no axis_name"
    return None if default_axes else "the default reduction and feature axes"


def layer_norm(x: jax.typing.ArrayLike, scale: jax.typing.ArrayLike | None = None,
               bias: jax.typing.ArrayLike | None = None, *, eps: float = 1e-5, reduction_axes: Axes = -1,
               feature_axes: Axes = -1, mask: jax.typing.ArrayLike | None = None, axis_name: str | None = None,
               axis_index_groups: Any = None, dtype: Any = None, implementation: Implementation | None = None
               ) -> jax.Array:
    """Layer normalization: statistics over the last axis of each sample.

    Each sample (and position) is standardized with the mean and biased variance of its own values over
    ``reduction_axes``, then scaled and shifted per feature; nothing depends on the rest of the batch.

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
      implementation: ``None`` (automatic) takes the fused Pallas kernel of
        :mod:`~jaxopt_lab.normalization._pallas` where it is verified faster for this backend and dtype
        (``_pallas.dispatches``; nowhere yet) and the call fits it (the last axis, no ``mask`` or
        ``axis_name``, input of at most 32 bits), else the XLA path. ``"xla"`` always takes the XLA path;
        ``"pallas"`` the kernel, raising a ``ValueError`` where it cannot run (no GPU, unsupported shape).
        The choice is made at trace time for ``jax.default_backend()``.

    Returns:
      The normalized array, shape of ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxopt_lab.normalization import layer_norm
      >>> layer_norm(jnp.array([[1.0, 2.0, 3.0]]), eps=0.0).round(4)
      Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)
      >>> mask = jnp.array([True, True, True, False])  # 9 is normalized by the statistics of 1, 2, 3
      >>> layer_norm(jnp.array([[1.0, 2.0, 3.0, 9.0]]), eps=0.0, mask=mask).round(4)
      Array([[-1.2247,  0.    ,  1.2247,  8.5732]], dtype=float32)

    References:
      Ba, Kiros & Hinton, `Layer Normalization <https://arxiv.org/abs/1607.06450>`_, 2016
    """
    fn = "layer_norm"
    x = as_inexact_array(fn, x)
    check_rank(fn, x, 1, "(..., C)")
    check_eps(fn, eps)
    axes = canonical_axes(fn, "reduction_axes", reduction_axes, x.ndim)
    features = canonical_axes(fn, "feature_axes", feature_axes, x.ndim)
    scale = feature_param(fn, "scale", scale, features, x.shape)
    bias = feature_param(fn, "bias", bias, features, x.shape)
    mask = check_mask(fn, mask, x.shape)
    dtype = dtype or x.dtype
    last = (x.ndim - 1,)
    if _pallas.takes_kernel(fn, "layer_norm", implementation, x, None,
                            _not_kernel_layout(x, mask, axis_name, axes == features == last, dtype)):
        return _pallas.layer_norm(x, *_kernel_params(x, scale, bias), eps=eps, dtype=dtype,
                                  interpret=_pallas.DISPATCH_INTERPRETED)
    return _vjp.normalize(x, scale, bias, axes, eps, dtype, mask=mask, axis_name=axis_name,
                          axis_index_groups=axis_index_groups)[0]


def _kernel_params(x: jax.Array, *params: jax.Array | None) -> tuple[jax.Array | None, ...]:
    """Per-channel parameters ``(1.., C)`` as the kernels' ``(C,)``, varying like ``x`` (``_vjp.normalize``)."""
    return tuple(None if p is None else _vjp.varying_like(x, p.reshape(-1)) for p in params)


def instance_norm(x: jax.typing.ArrayLike, scale: jax.typing.ArrayLike | None = None,
                  bias: jax.typing.ArrayLike | None = None, *, eps: float = 1e-5, feature_axes: Axes = -1,
                  mask: jax.typing.ArrayLike | None = None, axis_name: str | None = None,
                  axis_index_groups: Any = None, dtype: Any = None) -> jax.Array:
    """Instance normalization: statistics over ``*spatial`` per sample and channel.

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

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxopt_lab.normalization import instance_norm
      >>> x = jnp.stack([jnp.arange(4.0), 10 * jnp.arange(4.0)], axis=-1)[None]  # (1, 4, 2)
      >>> instance_norm(x, eps=0.0)[0, :, 1].round(4)  # each channel on its own scale
      Array([-1.3416, -0.4472,  0.4472,  1.3416], dtype=float32)

    References:
      Ulyanov, Vedaldi & Lempitsky, `Instance Normalization: The Missing Ingredient for Fast
      Stylization <https://arxiv.org/abs/1607.08022>`_, 2016
    """
    fn = "instance_norm"
    x = as_inexact_array(fn, x)
    check_rank(fn, x, 2, "(N, *spatial, C)")
    check_eps(fn, eps)
    features = canonical_axes(fn, "feature_axes", feature_axes, x.ndim)
    if 0 in features:
        raise ValueError(f"{fn}: feature_axes={feature_axes!r}: {BATCH_AXIS_MESSAGE}")
    axes = tuple(a for a in range(1, x.ndim) if a not in features)
    scale = feature_param(fn, "scale", scale, features, x.shape)
    bias = feature_param(fn, "bias", bias, features, x.shape)
    return _vjp.normalize(x, scale, bias, axes, eps, dtype or x.dtype, mask=check_mask(fn, mask, x.shape),
                          axis_name=axis_name, axis_index_groups=axis_index_groups)[0]


def group_norm(x: jax.typing.ArrayLike, num_groups: int | None = None,
               scale: jax.typing.ArrayLike | None = None, bias: jax.typing.ArrayLike | None = None, *,
               group_size: int | None = None, eps: float = 1e-5, reduction_axes: Axes | None = None,
               mask: jax.typing.ArrayLike | None = None, axis_name: str | None = None,
               axis_index_groups: Any = None, dtype: Any = None, implementation: Implementation | None = None
               ) -> jax.Array:
    """Group normalization: statistics over ``*spatial`` and each group of channels.

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
      implementation: ``None`` (automatic), ``"xla"`` or ``"pallas"``, as in :func:`layer_norm`; the
        kernel's layout is the default ``reduction_axes`` of ``(N, *spatial, C)`` without ``mask`` or
        ``axis_name``.

    Returns:
      The normalized array, shape of ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxopt_lab.normalization import group_norm
      >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
      >>> group_norm(x, num_groups=2, eps=0.0)
      Array([[-1.,  1., -1.,  1.]], dtype=float32)

    References:
      Wu & He, `Group Normalization <https://arxiv.org/abs/1803.08494>`_, ECCV 2018
    """
    fn = "group_norm"
    x = as_inexact_array(fn, x)
    check_rank(fn, x, 1, "(N, *spatial, C)")
    check_eps(fn, eps)
    channels = x.shape[-1]
    groups = resolve_groups(fn, channels, num_groups, group_size)
    axes = canonical_axes(fn, "reduction_axes", tuple(range(1, x.ndim)) if reduction_axes is None
                          else reduction_axes, x.ndim)
    if axes[-1] != x.ndim - 1:
        raise ValueError(f"{fn}: reduction_axes must include the last (channel) axis {x.ndim - 1} or -1, "
                         f"got {reduction_axes!r}")
    mask = check_mask(fn, mask, x.shape)
    scale, bias = (feature_param(fn, name, p, (x.ndim - 1,), x.shape)
                   for name, p in (("scale", scale), ("bias", bias)))
    default_axes = x.ndim >= 2 and axes == tuple(range(1, x.ndim))
    if _pallas.takes_kernel(fn, "group_norm", implementation, x, groups,
                            _not_kernel_layout(x, mask, axis_name, default_axes, dtype or x.dtype)):
        return _pallas.group_norm(x, groups, *_kernel_params(x, scale, bias), eps=eps, dtype=dtype or x.dtype,
                                  interpret=_pallas.DISPATCH_INTERPRETED)
    if _vjp.group_norm_fast_path(x, axes, mask, axis_name):
        scale, bias = _vjp.varying_like(x, scale), _vjp.varying_like(x, bias)
        return _vjp.group_norm_core(x, scale, bias, groups, eps, dtype or x.dtype)
    grouped_shape = (*x.shape[:-1], groups, channels // groups)
    # Channel c = g * C/G + j: scale[c] becomes scale[..., g, j].
    scale, bias = (None if p is None else p.reshape(*p.shape[:-1], groups, channels // groups)
                   for p in (scale, bias))
    y, _, _ = _vjp.normalize(x.reshape(grouped_shape), scale, bias, (*axes[:-1], x.ndim), eps,
                             dtype or x.dtype, mask=None if mask is None else mask.reshape(grouped_shape),
                             axis_name=axis_name, axis_index_groups=axis_index_groups)
    return y.reshape(x.shape)


def batch_norm_init(num_features: int | Sequence[int], dtype: Any = jnp.float32) -> BatchNormStats:
    """Running statistics before any batch: mean 0 and variance 1 per feature (what Flax starts from).

    Args:
      num_features: the number of channels, or the shape ``x.shape[axis]`` for several feature axes.
      dtype: dtype of the running statistics.

    Returns:
      A :class:`BatchNormStats` of zeros (``mean``) and ones (``var``) of shape ``num_features``.

    Example:
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
    """Batch normalization: statistics over the batch and ``*spatial`` per channel.

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

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxopt_lab.normalization import batch_norm, batch_norm_init
      >>> x = jnp.array([[0.0, 10.0], [2.0, 30.0]])
      >>> y, stats = batch_norm(x, batch_norm_init(2), training=True, eps=0.0)
      >>> y
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> stats  # 0.9 * (0, 1) + 0.1 * batch's (mean, var) = ((1, 20), (1, 100))
      BatchNormStats(mean=Array([0.1, 2. ], dtype=float32), var=Array([ 1. , 10.9], dtype=float32))

    References:
      Ioffe & Szegedy, `Batch Normalization: Accelerating Deep Network Training by Reducing Internal
      Covariate Shift <https://arxiv.org/abs/1502.03167>`_, ICML 2015
    """
    fn = "batch_norm"
    x = as_inexact_array(fn, x)
    check_rank(fn, x, 1, "(N, *spatial, C)")
    check_eps(fn, eps)
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"{fn}: momentum must be a number in [0, 1], got {momentum!r}")
    features = canonical_axes(fn, "axis", axis, x.ndim)
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
    scale = feature_param(fn, "scale", scale, features, x.shape)
    bias = feature_param(fn, "bias", bias, features, x.shape)
    mask = check_mask(fn, mask, x.shape)
    dtype = dtype or x.dtype

    if not training:
        stat_dtype = statistics_dtype(jnp.result_type(stats.mean, x.dtype))
        mean = jnp.asarray(stats.mean, stat_dtype).reshape(stats_shape)
        var = jnp.asarray(stats.var, real_dtype(stat_dtype)).reshape(stats_shape)
        running = Moments(shift=jnp.zeros((), stat_dtype), offset=mean, var=var)
        return affine(standardize(x, running, eps), scale, bias, dtype), given_stats

    axes = tuple(a for a in range(x.ndim) if a not in features)
    y, mean, var = _vjp.normalize(x, scale, bias, axes, eps, dtype, mask=mask, axis_name=axis_name,
                                  axis_index_groups=axis_index_groups)
    batch_stats = (lax.stop_gradient(mean).reshape(feature_shape),
                   lax.stop_gradient(var).reshape(feature_shape))

    def update(running: jax.Array, batch: jax.Array) -> jax.Array:
        # The running value keeps its dtype, unless the batch statistic is complex (complex input): then
        # it becomes complex, as Flax's variable does.
        dtype = jnp.result_type(running, batch) if jnp.iscomplexobj(batch) else jnp.result_type(running)
        return (momentum * running + (1.0 - momentum) * batch).astype(dtype)

    return y, BatchNormStats(*(update(r, b) for r, b in zip(stats, batch_stats, strict=True)))
