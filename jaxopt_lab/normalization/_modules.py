"""What the Flax modules over the normalization functions share (:mod:`jaxopt_lab.nn`, :mod:`jaxopt_lab.nnx`).

Imported by the modules only, so that the pure functions of :mod:`jaxopt_lab.normalization` need no Flax.
"""

from __future__ import annotations

from typing import Any

import jax
from flax.linen import dtypes

from jaxopt_lab.normalization._checks import Axes


def feature_shape(x: jax.Array, axes: Axes) -> tuple[int, ...]:
    """``x.shape`` at the (canonicalized, sorted) ``axes``: Flax's parameter shape."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(x.shape[a] for a in sorted({a % x.ndim for a in axes}))


def output_dtype(dtype: Any, *arrays: jax.Array | None) -> Any:
    """Flax's rule: ``dtype`` if given, else the promoted dtype of the input and the parameters."""
    return dtypes.canonicalize_dtype(*(a for a in arrays if a is not None), dtype=dtype)
