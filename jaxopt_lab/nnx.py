"""Flax NNX modules over :mod:`jaxopt_lab.normalization`: drop-in for ``flax.nnx``'s norms.

Native ``flax.nnx.Module`` classes with ``flax.nnx``'s (0.12.8) constructor signatures
(``num_features``, keyword-only options, ``promote_dtype``, ``rngs``, ``bias_metadata``,
``scale_metadata``) and variables (``scale``/``bias`` as ``nnx.Param``, ``mean``/``var`` as
``nnx.BatchStat``), so ``nnx.state`` of ours maps one to one onto Flax's. ``__call__`` takes ``mask=``
(and ``use_running_average=`` for :class:`BatchNorm`, which also supports ``model.train()`` /
``model.eval()`` / ``nnx.view``). Each calls the same pure function as the linen module of
:mod:`jaxopt_lab.nn`, so the two agree bit for bit (``tests/flax_compat/test_nnx_normalization.py``,
flax's own nnx-vs-linen suite). ``use_fast_variance`` is accepted and has no effect: the variance is
always the stable one.

The module is named after ``flax.nnx`` as :mod:`jaxopt_lab.nn` is after ``flax.linen``; import it under
another name next to Flax's (``from jaxopt_lab import nnx as jnnx``).

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> from jaxopt_lab import nnx as jnnx
>>> bn = jnnx.BatchNorm(16, rngs=nnx.Rngs(0))
>>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(bn)))
{'bias': (16,), 'mean': (16,), 'scale': (16,), 'var': (16,)}
>>> x = jax.random.normal(jax.random.key(1), (8, 4, 4, 16))
>>> y = bn(x)                             # training (the default): batch statistics; running ones move
>>> bool(jnp.any(bn.mean[...] != 0.0))
True
>>> bn.eval()                            # use_running_average=True from now on
>>> bn(x).shape
(8, 4, 4, 16)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes, initializers

from jaxopt_lab import normalization
from jaxopt_lab.normalization import Axes
from jaxopt_lab.normalization._checks import resolve_groups
from jaxopt_lab.normalization._modules import feature_shape, output_dtype

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm"]

Initializer = Any  # flax.typing.Initializer
Dtype = Any
PromoteDtypeFn = Any

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
_ZEROS, _ONES = initializers.zeros_init(), initializers.ones_init()  # Flax nnx's default initializers


def _params(module: Any, num_features: int, rngs: nnx.Rngs, param_dtype: Dtype, use_scale: bool,
            use_bias: bool, scale_init: Initializer, bias_init: Initializer, scale_metadata: Mapping[str, Any],
            bias_metadata: Mapping[str, Any]) -> None:
    """Flax's ``scale`` and ``bias`` (``nnx.Param`` of shape ``(num_features,)``, or ``None``)."""
    shape = (num_features,)
    module.scale = (nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata) if use_scale
                    else nnx.data(None))
    module.bias = (nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata) if use_bias
                   else nnx.data(None))


def _values(module: Any) -> tuple[jax.Array | None, jax.Array | None]:
    scale, bias = module.scale, module.bias
    return (None if scale is None else scale[...]), (None if bias is None else bias[...])


def _feature_shaped(param: jax.Array | None, x: jax.Array, axes: Axes) -> jax.Array | None:
    """A ``(num_features,)`` parameter reshaped to ``x.shape[axes]`` (as Flax's nnx ``_normalize``)."""
    return None if param is None else param.reshape(feature_shape(x, axes))


class BatchNorm(nnx.Module):
    """Batch normalization (Ioffe & Szegedy, 2015), drop-in for ``flax.nnx.BatchNorm``.

    Args:
      num_features: the number of input features (channels).
      use_running_average: normalize with the stored running statistics instead of the batch's
        (``False`` by default, as Flax's nnx; ``model.eval()`` sets it).
      axis: the feature axis.
      momentum: weight of the old running statistics (default 0.99).
      epsilon: added to the variance (default 1e-5).
      dtype: output dtype (default: promoted from input and parameters).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a per-channel bias.
      use_scale: learn a per-channel scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      axis_name: mapped axis (``shard_map``/``pmap``) over which the batch statistics are global.
      axis_index_groups: groups of device indices along ``axis_name`` normalized separately.
      use_fast_variance: accepted for compatibility; no effect (the variance is always the stable one).
      promote_dtype: promotes ``(x, mean, var, scale, bias)`` (Flax's default: to a common dtype).
      rngs: random number generators for the parameter initializers.
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.
    """

    def __init__(self, num_features: int, *, use_running_average: bool | None = False, axis: int = -1,
                 momentum: float = 0.99, epsilon: float = 1e-5, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, use_bias: bool = True, use_scale: bool = True,
                 bias_init: Initializer = _ZEROS,
                 scale_init: Initializer = _ONES, axis_name: str | None = None,
                 axis_index_groups: Any = None, use_fast_variance: bool = True,
                 promote_dtype: PromoteDtypeFn = dtypes.promote_dtype, rngs: nnx.Rngs,
                 bias_metadata: Mapping[str, Any] = _NO_METADATA,
                 scale_metadata: Mapping[str, Any] = _NO_METADATA) -> None:
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.scale: nnx.Param[jax.Array] | None
        self.bias: nnx.Param[jax.Array] | None
        _params(self, num_features, rngs, param_dtype, use_scale, use_bias, scale_init, bias_init,
                scale_metadata, bias_metadata)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``use_running_average`` here overrides the attribute (as Flax).

        ``mask``: booleans broadcastable to ``x``; only ``True`` positions enter the batch statistics.
        """
        use_running_average = first_from(
            use_running_average, self.use_running_average,
            error_msg="No `use_running_average` argument was provided to BatchNorm: pass it to the "
                      "constructor or the call, or use model.train() / model.eval() / nnx.view.")
        scale, bias = _values(self)
        x, mean, var, scale, bias = self.promote_dtype(
            (jnp.asarray(x), self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
        y, (new_mean, new_var) = normalization.batch_norm(
            x, normalization.BatchNormStats(mean, var), _feature_shaped(scale, x, self.axis),
            _feature_shaped(bias, x, self.axis), training=not use_running_average, momentum=self.momentum,
            eps=self.epsilon, axis=self.axis, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=output_dtype(self.dtype, x, scale, bias))
        if not use_running_average:
            # stop_gradient only for flax_array_ref (Flax's rule): plain variables are traced through.
            stop_gradient = jax.lax.stop_gradient if (self.mean._can_update or self.var._can_update) else (
                lambda v: v)
            self.mean[...] = stop_gradient(new_mean)
            self.var[...] = stop_gradient(new_var)
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view`` (and ``train()``/``eval()``): sets ``use_running_average``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class LayerNorm(nnx.Module):
    """Layer normalization (Ba et al., 2016), drop-in for ``flax.nnx.LayerNorm``.

    Args:
      num_features: the number of input features (the size of ``x.shape[feature_axes]``).
      epsilon: added to the variance (default 1e-6).
      dtype: output dtype (default: promoted from input and parameters).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a bias.
      use_scale: learn a scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      reduction_axes: axes of the statistics (default the last).
      feature_axes: axes the scale and bias vary over (default the last).
      axis_name: mapped axis over which ``x`` is split: statistics span the devices.
      axis_index_groups: groups of device indices along ``axis_name`` normalized separately.
      use_fast_variance: accepted for compatibility; no effect (the variance is always the stable one).
      promote_dtype: promotes ``(x, scale, bias)`` (Flax's default: to a common dtype).
      rngs: random number generators for the parameter initializers.
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, use_bias: bool = True, use_scale: bool = True,
                 bias_init: Initializer = _ZEROS,
                 scale_init: Initializer = _ONES, reduction_axes: Axes = -1,
                 feature_axes: Axes = -1, axis_name: str | None = None, axis_index_groups: Any = None,
                 use_fast_variance: bool = True, promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
                 rngs: nnx.Rngs, bias_metadata: Mapping[str, Any] = _NO_METADATA,
                 scale_metadata: Mapping[str, Any] = _NO_METADATA) -> None:
        self.scale: nnx.Param[jax.Array] | None
        self.bias: nnx.Param[jax.Array] | None
        _params(self, num_features, rngs, param_dtype, use_scale, use_bias, scale_init, bias_init,
                scale_metadata, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; only the ``True`` positions of ``mask`` (if given) enter the statistics."""
        x, scale, bias = self.promote_dtype((jnp.asarray(x), *_values(self)), dtype=self.dtype)
        return normalization.layer_norm(
            x, _feature_shaped(scale, x, self.feature_axes), _feature_shaped(bias, x, self.feature_axes),
            eps=self.epsilon, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=output_dtype(self.dtype, x, scale, bias))


class InstanceNorm(nnx.Module):
    """Instance normalization (Ulyanov et al., 2016), drop-in for ``flax.nnx.InstanceNorm``.

    Args:
      num_features: the number of input features (channels).
      epsilon: added to the variance (default 1e-6).
      dtype: output dtype (default: promoted from input and parameters).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a per-channel bias.
      use_scale: learn a per-channel scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      feature_axes: the channel axes (not 0); statistics over every other axis but the first.
      axis_name: mapped axis over which ``x`` is split: statistics span the devices.
      axis_index_groups: groups of device indices along ``axis_name`` normalized separately.
      use_fast_variance: accepted for compatibility; no effect (the variance is always the stable one).
      promote_dtype: promotes ``(x, scale, bias)`` (Flax's default: to a common dtype).
      rngs: random number generators for the parameter initializers.
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, use_bias: bool = True, use_scale: bool = True,
                 bias_init: Initializer = initializers.zeros, scale_init: Initializer = initializers.ones,
                 feature_axes: Axes = -1, axis_name: str | None = None, axis_index_groups: Any = None,
                 use_fast_variance: bool = True, promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
                 rngs: nnx.Rngs, bias_metadata: Mapping[str, Any] = _NO_METADATA,
                 scale_metadata: Mapping[str, Any] = _NO_METADATA) -> None:
        self.scale: nnx.Param[jax.Array] | None
        self.bias: nnx.Param[jax.Array] | None
        _params(self, num_features, rngs, param_dtype, use_scale, use_bias, scale_init, bias_init,
                scale_metadata, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; only the ``True`` positions of ``mask`` (if given) enter the statistics."""
        x, scale, bias = self.promote_dtype((jnp.asarray(x), *_values(self)), dtype=self.dtype)
        return normalization.instance_norm(
            x, _feature_shaped(scale, x, self.feature_axes), _feature_shaped(bias, x, self.feature_axes),
            eps=self.epsilon, feature_axes=self.feature_axes, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=output_dtype(self.dtype, x, scale, bias))


class GroupNorm(nnx.Module):
    """Group normalization (Wu & He, 2018), drop-in for ``flax.nnx.GroupNorm``.

    Give ``num_groups`` (default 32) or ``group_size`` with ``num_groups=None``; checked against
    ``num_features`` here, as Flax does.

    Args:
      num_features: the number of input features (channels).
      num_groups: number of channel groups.
      group_size: channels per group, instead of ``num_groups``.
      epsilon: added to the variance (default 1e-6).
      dtype: output dtype (default: promoted from input and parameters).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a per-channel bias.
      use_scale: learn a per-channel scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      reduction_axes: axes of the statistics, including the last; default every axis but the first.
      axis_name: mapped axis over which ``x`` is split: statistics span the devices.
      axis_index_groups: groups of device indices along ``axis_name`` normalized separately.
      use_fast_variance: accepted for compatibility; no effect (the variance is always the stable one).
      promote_dtype: promotes ``(x, scale, bias)`` (Flax's default: to a common dtype).
      rngs: random number generators for the parameter initializers.
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.
    """

    def __init__(self, num_features: int, num_groups: int | None = 32, group_size: int | None = None, *,
                 epsilon: float = 1e-6, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 use_bias: bool = True, use_scale: bool = True,
                 bias_init: Initializer = _ZEROS,
                 scale_init: Initializer = _ONES, reduction_axes: Axes | None = None,
                 axis_name: str | None = None, axis_index_groups: Any = None, use_fast_variance: bool = True,
                 promote_dtype: PromoteDtypeFn = dtypes.promote_dtype, rngs: nnx.Rngs,
                 bias_metadata: Mapping[str, Any] = _NO_METADATA,
                 scale_metadata: Mapping[str, Any] = _NO_METADATA) -> None:
        self.num_groups = resolve_groups("GroupNorm", num_features, num_groups, group_size)
        self.group_size = num_features // self.num_groups
        self.feature_axis = -1
        self.scale: nnx.Param[jax.Array] | None
        self.bias: nnx.Param[jax.Array] | None
        _params(self, num_features, rngs, param_dtype, use_scale, use_bias, scale_init, bias_init,
                scale_metadata, bias_metadata)
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; only the ``True`` positions of ``mask`` (if given) enter the statistics."""
        x, scale, bias = self.promote_dtype((jnp.asarray(x), *_values(self)), dtype=self.dtype)
        return normalization.group_norm(
            x, self.num_groups, scale, bias, eps=self.epsilon, reduction_axes=self.reduction_axes, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=output_dtype(self.dtype, x, scale, bias))
