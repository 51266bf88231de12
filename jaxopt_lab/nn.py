"""Flax linen modules over :mod:`jaxopt_lab.normalization`: drop-in for ``flax.linen``'s norms.

Each module is a thin wrapper: it declares the parameters (``scale``, ``bias``) and, for
:class:`BatchNorm`, the running statistics (``batch_stats`` collection, variables ``mean`` and ``var``)
with Flax's names, shapes and initializers, then calls the pure function. Constructor arguments match
``flax.linen``'s where they overlap (``use_running_average``, ``momentum``, ``epsilon``, ``use_scale``,
``use_bias``, ``num_groups``, ``group_size``, ``axis_name``, ``dtype``, ``param_dtype``, ``scale_init``,
``bias_init``) and so do the defaults: ``momentum=0.99`` for :class:`BatchNorm` (the functional
:func:`~jaxopt_lab.normalization.batch_norm` defaults to 0.9, same formula), ``epsilon=1e-5`` for
:class:`BatchNorm` and ``1e-6`` for the others. A Flax checkpoint therefore loads unchanged. What
differs: the variance is always the stable shifted estimate (there is no ``use_fast_variance``).

NNX users wrap a module with ``flax.nnx.bridge.ToNNX`` (tested; see ``docs/normalization.md``)::

    model = nnx.bridge.ToNNX(BatchNorm(), rngs=nnx.Rngs(0)).lazy_init(x, use_running_average=False)
    y = model(x, use_running_average=False, mutable=["batch_stats"])  # updates model.mean, model.var
    y = model(x, use_running_average=True)                             # eval: running statistics

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

from collections.abc import Sequence
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from jax.nn import initializers

from jaxopt_lab import normalization

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm"]

Initializer = Any  # flax.typing.Initializer
Dtype = Any


def _scale_and_bias(module: linen.Module, num_features: int) -> tuple[jax.Array | None, jax.Array | None]:
    """Declares Flax's ``scale`` and ``bias`` parameters of shape ``(num_features,)`` when enabled."""
    shape = (num_features,)
    scale = module.param("scale", module.scale_init, shape, module.param_dtype) if module.use_scale else None
    bias = module.param("bias", module.bias_init, shape, module.param_dtype) if module.use_bias else None
    return scale, bias


def _output_dtype(module: linen.Module, *arrays: jax.Array | None) -> Any:
    """Flax's rule: ``dtype`` if given, else the promoted dtype of the input and the parameters."""
    return dtypes.canonicalize_dtype(*(a for a in arrays if a is not None), dtype=module.dtype)


class BatchNorm(linen.Module):
    """Batch normalization (Ioffe & Szegedy, 2015), drop-in for ``flax.linen.BatchNorm``.

    Running statistics live in the ``batch_stats`` collection (``mean``, ``var``; biased variance, as
    Flax) and follow ``new = momentum * running + (1 - momentum) * batch``; they are not updated while
    the module is initializing, and ``axis_name`` is ignored then (as Flax does).

    Attributes:
      use_running_average: normalize with the running statistics (eval) instead of the batch's.
      axis: the feature axis (channels-last by default).
      momentum: weight of the old running statistics (Flax's default 0.99; PyTorch's 0.1 means 0.9 here).
      epsilon: added to the variance.
      dtype: output dtype (default: promoted from input and parameters, as Flax).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a per-channel bias.
      use_scale: learn a per-channel scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      axis_name: mapped axis (``shard_map``/``pmap``) over which the batch statistics are global.

    >>> import jax, jax.numpy as jnp
    >>> from jaxopt_lab.nn import BatchNorm
    >>> x = jnp.arange(12.0).reshape(6, 2)
    >>> variables = BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    >>> BatchNorm(use_running_average=True).apply(variables, x).shape  # eval: running mean 0, var 1
    (6, 2)
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None

    @linen.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Normalizes ``x``; ``use_running_average`` here overrides the attribute (as Flax)."""
        use_running_average = linen.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        x = jnp.asarray(x)
        channels_last = jnp.moveaxis(x, self.axis, -1)
        num_features = channels_last.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (num_features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (num_features,), jnp.float32)
        scale, bias = _scale_and_bias(self, num_features)
        initializing = self.is_initializing()
        y, new_stats = normalization.batch_norm(
            channels_last, normalization.BatchNormStats(ra_mean.value, ra_var.value), scale, bias,
            training=not use_running_average, momentum=self.momentum, eps=self.epsilon,
            axis_name=None if initializing else self.axis_name, dtype=_output_dtype(self, x, scale, bias))
        if not use_running_average and not initializing:
            ra_mean.value, ra_var.value = new_stats
        return jnp.moveaxis(y, -1, self.axis)


class LayerNorm(linen.Module):
    """Layer normalization (Ba et al., 2016), drop-in for ``flax.linen.LayerNorm`` (last-axis features).

    Attributes:
      epsilon: added to the variance (Flax's default 1e-6).
      dtype: output dtype (default: promoted from input and parameters, as Flax).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a per-channel bias.
      use_scale: learn a per-channel scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      reduction_axes: axes of the statistics (default the last; ``(1, ..., ndim-1)`` for a CNN's LN).

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
    reduction_axes: int | Sequence[int] = -1

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        scale, bias = _scale_and_bias(self, x.shape[-1])
        return normalization.layer_norm(x, scale, bias, eps=self.epsilon, reduction_axes=self.reduction_axes,
                                        dtype=_output_dtype(self, x, scale, bias))


class InstanceNorm(linen.Module):
    """Instance normalization (Ulyanov et al., 2016), drop-in for ``flax.linen.InstanceNorm``.

    Attributes:
      epsilon: added to the variance (Flax's default 1e-6).
      dtype: output dtype (default: promoted from input and parameters, as Flax).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a per-channel bias.
      use_scale: learn a per-channel scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.

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

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        scale, bias = _scale_and_bias(self, x.shape[-1])
        return normalization.instance_norm(x, scale, bias, eps=self.epsilon,
                                           dtype=_output_dtype(self, x, scale, bias))


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

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        scale, bias = _scale_and_bias(self, x.shape[-1])
        return normalization.group_norm(x, self.num_groups, scale, bias, group_size=self.group_size,
                                        eps=self.epsilon, dtype=_output_dtype(self, x, scale, bias))
