"""Argument checks of the normalization functions.

Every message names the function, the argument, what was expected and what came, so that a wrong call
fails at the call with a readable error rather than deep inside a reduction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

# One axis or several, as Flax's ``Axes``; negative axes count from the end.
Axes = int | Sequence[int]


def as_inexact_array(fn: str, x: Any) -> jax.Array:
    """``x`` as a JAX array of a floating-point or complex dtype (integers and booleans are refused)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(f"{fn}: x must be a floating-point or complex array, got dtype {x.dtype}")
    return x


def check_rank(fn: str, x: jax.Array, min_ndim: int, layout: str) -> None:
    """Refuses ``x`` of rank below ``min_ndim``, naming the expected ``layout``."""
    if x.ndim < min_ndim:
        raise ValueError(f"{fn}: x must have rank >= {min_ndim} with layout {layout}, got shape {x.shape}")


def check_eps(fn: str, eps: float) -> None:
    """Refuses an ``eps`` that is not a finite number >= 0 (the XLA norms and the Pallas kernels)."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")


def canonical_axes(fn: str, name: str, axes: Axes, ndim: int, *, allow_empty: bool = False
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


def feature_param(fn: str, name: str, param: Any, feature_axes: tuple[int, ...], x_shape: tuple[int, ...]
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


def check_mask(fn: str, mask: Any, x_shape: tuple[int, ...]) -> jax.Array | None:
    """``mask`` as booleans of ``x``'s shape, or None; refuses a shape that does not broadcast to it."""
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


# instance_norm refuses feature_axes holding axis 0 in Flax's words.
BATCH_AXIS_MESSAGE = ("The channel axes cannot include the leading dimension as this is assumed to be the "
                      "batch axis.")


def resolve_groups(fn: str, num_channels: int, num_groups: int | None, group_size: int | None) -> int:
    """The number of groups from exactly one of ``num_groups`` and ``group_size``, dividing the channels.

    Shared by :func:`jaxopt_lab.normalization.group_norm` and :class:`jaxopt_lab.nnx.GroupNorm`, which
    checks its groups against ``num_features`` at construction, as Flax does.
    """
    if (num_groups is None) == (group_size is None):
        raise ValueError(f"{fn}: give exactly one of num_groups and group_size, "
                         f"got num_groups={num_groups!r} and group_size={group_size!r}")
    name, value = ("num_groups", num_groups) if num_groups is not None else ("group_size", group_size)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}")
    if num_channels % value:
        raise ValueError(f"{fn}: {num_channels} channels (x.shape[-1]) are not divisible by {name}={value}")
    return value if num_groups is not None else num_channels // value

