"""Flax linen modules over :mod:`jaxopt_lab.normalization`: drop-in for ``flax.linen``'s norms.

Each module is a thin wrapper: it declares the parameters (``scale``, ``bias``) and, for
:class:`BatchNorm`, the running statistics (``batch_stats`` collection, variables ``mean`` and ``var``)
with Flax's names, shapes and initializers, then calls the pure function. The attributes are exactly
``flax.linen``'s (0.12.8), in Flax's order and with Flax's defaults (``momentum=0.99``; ``epsilon=1e-5``
for :class:`BatchNorm` and ``1e-6`` for the others; ``num_groups=32``), and ``__call__`` takes Flax's
``mask=`` (and ``use_running_average=`` for :class:`BatchNorm`); a Flax checkpoint loads unchanged.
Flax's own ``NormalizationTest`` runs against these modules (``tests/flax_compat``).

What we accept but do differently, on purpose:

* ``use_fast_variance``: accepted, no effect. The variance is always the stable shifted estimate, at
  least as accurate as Flax's two-pass one and as fast as its fast one (``docs/normalization.md``).
* ``force_float32_reductions=False``: the running statistics are kept in ``param_dtype`` as Flax does,
  but the statistics are still computed in (at least) float32.
* ``axis_name`` with a ``mask``: the statistics are exact over all devices' unmasked elements; Flax
  averages the per-device means, weighting devices equally whatever their unmasked counts.

Native NNX versions (``flax.nnx.Module``, ``nnx.BatchNorm``'s signature) are in :mod:`jaxopt_lab.nnx`.

>>> import jax, jax.numpy as jnp
>>> from jaxopt_lab import nn
>>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 16))
>>> bn = nn.BatchNorm(use_running_average=False)
>>> variables = bn.init(jax.random.key(1), x)
>>> jax.tree.map(jnp.shape, variables)
{'batch_stats': {'mean': (16,), 'var': (16,)}, 'params': {'bias': (16,), 'scale': (16,)}}
>>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
>>> y.shape, updates["batch_stats"]["mean"].shape
((8, 4, 4, 16), (16,))
"""

from __future__ import annotations

from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
from jax.nn import initializers

from jaxopt_lab import normalization
from jaxopt_lab.normalization import Axes
from jaxopt_lab.normalization._modules import feature_shape, output_dtype

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm"]

Initializer = Any  # flax.typing.Initializer
Dtype = Any


def _scale_and_bias(module: Any, shape: tuple[int, ...]) -> tuple[jax.Array | None, jax.Array | None]:
    """Declares Flax's ``scale`` and ``bias`` parameters of ``shape`` (the feature shape) when enabled."""
    scale = module.param("scale", module.scale_init, shape, module.param_dtype) if module.use_scale else None
    bias = module.param("bias", module.bias_init, shape, module.param_dtype) if module.use_bias else None
    return scale, bias


class BatchNorm(linen.Module):
    """Batch normalization (Ioffe & Szegedy, 2015), drop-in for ``flax.linen.BatchNorm``.

    Running statistics live in the ``batch_stats`` collection (``mean``, ``var``; biased variance, as
    Flax) and follow ``new = momentum * running + (1 - momentum) * batch``; they are not updated while
    the module is initializing, and ``axis_name`` is ignored then (as Flax does).

    Attributes:
      use_running_average: normalize with the running statistics (eval) instead of the batch's.
      axis: the feature axis, or axes (channels-last by default).
      momentum: weight of the old running statistics (Flax's default 0.99; PyTorch's 0.1 means 0.9 here).
      epsilon: added to the variance.
      dtype: output dtype (default: promoted from input and parameters, as Flax).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a per-channel bias.
      use_scale: learn a per-channel scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      axis_name: mapped axis (``shard_map``/``pmap``) over which the batch statistics are global.
      axis_index_groups: groups of device indices along ``axis_name`` normalized separately.
      use_fast_variance: accepted for compatibility; no effect (the variance is always the stable one).
      force_float32_reductions: ``False`` keeps the running statistics in ``param_dtype`` (as Flax); the
        statistics themselves are computed in at least float32 either way.

    >>> import jax, jax.numpy as jnp
    >>> from jaxopt_lab.nn import BatchNorm
    >>> x = jnp.arange(12.0).reshape(6, 2)
    >>> variables = BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    >>> BatchNorm(use_running_average=True).apply(variables, x).shape  # eval: running mean 0, var 1
    (6, 2)
    """

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @linen.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``use_running_average`` here overrides the attribute (as Flax).

        ``mask``: booleans broadcastable to ``x``; only ``True`` positions enter the batch statistics.
        """
        use_running_average = linen.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        x = jnp.asarray(x)
        shape = feature_shape(x, self.axis)
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), shape)
        scale, bias = _scale_and_bias(self, shape)
        initializing = self.is_initializing()
        y, new_stats = normalization.batch_norm(
            x, normalization.BatchNormStats(ra_mean.value, ra_var.value), scale, bias,
            training=not use_running_average, momentum=self.momentum, eps=self.epsilon, axis=self.axis,
            mask=mask, axis_name=None if initializing else self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=output_dtype(self.dtype, x, scale, bias))
        if not use_running_average and not initializing:
            ra_mean.value, ra_var.value = new_stats
        return y


class LayerNorm(linen.Module):
    """Layer normalization (Ba et al., 2016), drop-in for ``flax.linen.LayerNorm``.

    Attributes:
      epsilon: added to the variance (Flax's default 1e-6).
      dtype: output dtype (default: promoted from input and parameters, as Flax).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a bias.
      use_scale: learn a scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      reduction_axes: axes of the statistics (default the last; ``(1, ..., ndim-1)`` for a CNN's LN).
      feature_axes: axes the learned scale and bias vary over (default the last).
      axis_name: mapped axis over which ``x`` is split (model parallelism): statistics span the devices.
      axis_index_groups: groups of device indices along ``axis_name`` normalized separately.
      use_fast_variance: accepted for compatibility; no effect (the variance is always the stable one).
      force_float32_reductions: accepted; the statistics are computed in at least float32 either way.

    >>> import jax, jax.numpy as jnp
    >>> from jaxopt_lab.nn import LayerNorm
    >>> x = jnp.ones((2, 5, 8))
    >>> jax.tree.map(jnp.shape, LayerNorm().init(jax.random.key(0), x))
    {'params': {'bias': (8,), 'scale': (8,)}}
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @linen.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; only the ``True`` positions of ``mask`` (if given) enter the statistics."""
        x = jnp.asarray(x)
        scale, bias = _scale_and_bias(self, feature_shape(x, self.feature_axes))
        return normalization.layer_norm(
            x, scale, bias, eps=self.epsilon, reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=output_dtype(self.dtype, x, scale, bias))


class InstanceNorm(linen.Module):
    """Instance normalization (Ulyanov et al., 2016), drop-in for ``flax.linen.InstanceNorm``.

    Statistics over every axis but the first (batch) and ``feature_axes``.

    Attributes:
      epsilon: added to the variance (Flax's default 1e-6).
      dtype: output dtype (default: promoted from input and parameters, as Flax).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a per-channel bias.
      use_scale: learn a per-channel scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      feature_axes: the channel axes (not 0); scale and bias vary over them.
      axis_name: mapped axis over which ``x`` is split (model parallelism): statistics span the devices.
      axis_index_groups: groups of device indices along ``axis_name`` normalized separately.
      use_fast_variance: accepted for compatibility; no effect (the variance is always the stable one).
      force_float32_reductions: accepted; the statistics are computed in at least float32 either way.

    >>> import jax, jax.numpy as jnp
    >>> from jaxopt_lab.nn import InstanceNorm
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    >>> variables = InstanceNorm().init(jax.random.key(1), x)
    >>> InstanceNorm().apply(variables, x).shape
    (2, 4, 4, 3)
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @linen.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; only the ``True`` positions of ``mask`` (if given) enter the statistics."""
        x = jnp.asarray(x)
        scale, bias = _scale_and_bias(self, feature_shape(x, self.feature_axes))
        return normalization.instance_norm(
            x, scale, bias, eps=self.epsilon, feature_axes=self.feature_axes, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=output_dtype(self.dtype, x, scale, bias))


class GroupNorm(linen.Module):
    """Group normalization (Wu & He, 2018), drop-in for ``flax.linen.GroupNorm``.

    Give ``num_groups`` (default 32, as Flax) or ``group_size`` with ``num_groups=None``.

    Attributes:
      num_groups: number of channel groups.
      group_size: channels per group, instead of ``num_groups``.
      epsilon: added to the variance (Flax's default 1e-6).
      dtype: output dtype (default: promoted from input and parameters, as Flax).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a per-channel bias.
      use_scale: learn a per-channel scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      reduction_axes: axes of the statistics, including the last (channel) axis; default every axis but
        the first. Canonicalized for the input at call time (negative axes count from the end).
      axis_name: mapped axis over which ``x`` is split (model parallelism): statistics span the devices.
      axis_index_groups: groups of device indices along ``axis_name`` normalized separately.
      use_fast_variance: accepted for compatibility; no effect (the variance is always the stable one).
      force_float32_reductions: accepted; the statistics are computed in at least float32 either way.

    >>> import jax, jax.numpy as jnp
    >>> from jaxopt_lab.nn import GroupNorm
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 64))
    >>> variables = GroupNorm(num_groups=None, group_size=16).init(jax.random.key(1), x)
    >>> GroupNorm(num_groups=None, group_size=16).apply(variables, x).shape
    (2, 4, 4, 64)
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @linen.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; only the ``True`` positions of ``mask`` (if given) enter the statistics."""
        x = jnp.asarray(x)
        scale, bias = _scale_and_bias(self, x.shape[-1:])
        return normalization.group_norm(
            x, self.num_groups, scale, bias, group_size=self.group_size, eps=self.epsilon,
            reduction_axes=self.reduction_axes, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=output_dtype(self.dtype, x, scale, bias))
