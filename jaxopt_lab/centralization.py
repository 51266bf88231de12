"""Gradient Centralization (Yong et al., ECCV 2020) as an optax transform, in Flax parameter layout.

GC subtracts, from the gradient of every output unit's weight vector, that vector's mean:

    phi_GC(g)[..., j] = g[..., j] - mean(g[..., j])      (mean over every axis but the output axis j)

Flax keeps the output features LAST (``Dense``: ``(in, out)``; ``Conv``: ``(*kernel_size, in, out)``), so
the default ``feature_axis=-1`` averages over inputs and kernel positions, exactly the paper's per-unit
mean. PyTorch-layout parameters (``(out, in, kh, kw)``) use ``feature_axis=0``, which is also what
``optax.centralize`` does unconditionally (it averages over every axis but the FIRST): on a Flax kernel
``optax.centralize`` therefore centres each *input* row across outputs, which is not the paper's operation.

GC is a linear orthogonal projection P (P = P^T = P^2) onto the weights whose per-unit mean is zero, so:

* with plain SGD (and momentum, and L2 weight decay added before it) every output unit's mean weight
  stays exactly where it started: the paper's weight-space constraint;
* with adaptive methods the same holds only if the *update* is centralized (the official code's
  ``gc_loc=False``, which its authors recommend for Adam-type methods): ``placement="update"`` in
  :func:`with_gradient_centralization`. ``placement="gradient"`` centralizes the raw gradient (the
  paper's ``Adam_GC``); Adam's per-coordinate scaling then moves the means again.

Where weight decay sits follows the official optimizers (github.com/Yonghongwei/Gradient-Centralization):
``SGD_GC``/``Adam_GC`` add the L2 term ``wd * w`` to the gradient *before* GC (so it is centralized too);
decoupled AdamW decay is centralized with the update when GC is on the update (``gc_loc=False``) and is not
when GC is on the gradient (``AdamW_GCC``, ``gc_loc=True``). :func:`sgd_gc`, :func:`adam_gc` and
:func:`adamw_gc` reproduce these orders by composing optax's own optimizers. Like optax's optimizers they
work under ``optax.inject_hyperparams`` with no ``static_args``: their float hyperparameters become state
that a jitted update reads (see :func:`sgd_gc`).

Example:
  >>> import jax.numpy as jnp
  >>> import optax
  >>> from jaxopt_lab.centralization import gradient_centralization
  >>> tx = optax.chain(gradient_centralization(), optax.sgd(0.1, momentum=0.9))
  >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
  >>> grads = {"kernel": jnp.array([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]]), "bias": jnp.ones(2)}
  >>> updates, _ = tx.update(grads, tx.init(params), params)
  >>> updates["kernel"].sum(axis=0)    # each output unit's update sums to zero
  Array([0., 0.], dtype=float32)
  >>> updates["bias"]                  # 1-D leaves are left alone
  Array([-0.1, -0.1], dtype=float32)
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "adam_gc",
    "adamw_gc",
    "centralize_gradient",
    "gradient_centralization",
    "sgd_gc",
    "with_gradient_centralization",
]

Placement = Literal["gradient", "update"]
MaskOrFn = Any | Callable[[optax.Params], Any] | None

# Flax conv kernels are (*kernel_size, in, out): at least 3 axes. Dense kernels have 2.
_MIN_CONV_NDIM = 3


def _static_feature_axis(feature_axis: Any) -> int:
    """``feature_axis`` as a Python int; ``None`` is ``-1``, the last axis (Flax layout).

    ``optax.inject_hyperparams`` turns every numeric argument of a factory into an array, so a concrete 0-d
    integer array is accepted too. A *traced* one (an injected value read back from the optimizer state
    inside ``jax.jit``) cannot choose the axes of a reduction, hence the error pointing at ``static_args``.
    """
    if feature_axis is None:
        return -1
    if isinstance(feature_axis, jax.core.Tracer):
        raise TypeError(
            "feature_axis must be a concrete int, got a traced array: optax.inject_hyperparams turns a numeric "
            "feature_axis into one. Leave it at its default (None, the last axis) or make it static: "
            "optax.inject_hyperparams(factory, static_args=('feature_axis',))")
    error = TypeError(f"feature_axis must be an int, got {type(feature_axis).__name__} {feature_axis!r}")
    # bool is an int subclass (and a 0-d bool array has __index__), but True is no axis.
    if isinstance(feature_axis, bool | np.bool_) or getattr(feature_axis, "dtype", None) == np.bool_:
        raise error
    try:
        return operator.index(feature_axis)
    except TypeError:
        raise error from None


def _reduced_axes(ndim: int, feature_axis: int) -> tuple[int, ...]:
    if not -ndim <= feature_axis < ndim:
        raise ValueError(
            f"feature_axis={feature_axis} is out of range for a gradient leaf with {ndim} dimensions "
            f"(expected -{ndim} <= feature_axis < {ndim})")
    feature_axis %= ndim
    return tuple(axis for axis in range(ndim) if axis != feature_axis)


def centralize_gradient(g: jax.Array, *, feature_axis: int | None = -1) -> jax.Array:
    """Subtracts from ``g`` its mean over every axis except ``feature_axis``.

    Leaves with fewer than two dimensions (biases, norm scales, scalars) are returned unchanged: a
    1-D parameter holds a single number per output unit, so there is nothing to average over. The
    mean is accumulated in at least float32, so bfloat16 gradients lose no precision to the reduction.
    Floating (and complex) gradients keep their dtype; integer or boolean ones come back as float32 (a
    centred integer array is not an integer array: rounding it back would lose the fractions), as
    ``optax.centralize`` does.

    Args:
      g: a gradient (or update) array.
      feature_axis: the output-feature axis that is kept; ``-1`` (or ``None``) for Flax kernels, ``0`` for
        PyTorch. An int or a concrete 0-d integer array.

    Returns:
      An array of ``g``'s shape and dtype whose mean over the reduced axes is zero.

    Example:
      >>> import jax.numpy as jnp
      >>> centralize_gradient(jnp.array([[1.0, 4.0], [3.0, 0.0]]))
      Array([[-1.,  2.],
             [ 1., -2.]], dtype=float32)
      >>> centralize_gradient(jnp.array([[1, 2], [4, 6]]))  # integers: a float result
      Array([[-1.5, -2. ],
             [ 1.5,  2. ]], dtype=float32)
    """
    axis = _static_feature_axis(feature_axis)
    g = jnp.asarray(g)
    if g.ndim < 2:
        return g
    axes = _reduced_axes(g.ndim, axis)
    stats_dtype = jnp.promote_types(g.dtype, jnp.float32)
    mean = jnp.mean(g, axis=axes, keepdims=True, dtype=stats_dtype)
    out_dtype = g.dtype if jnp.issubdtype(g.dtype, jnp.inexact) else stats_dtype
    return (g.astype(stats_dtype) - mean).astype(out_dtype)


def _static_keep(keep: Any) -> bool:
    """One leaf of a GC ``mask`` as a Python bool; a traced one cannot select leaves."""
    try:
        return bool(keep)
    except jax.errors.ConcretizationTypeError:
        raise TypeError(
            "mask must hold static bools, got a traced array: pass Python bools (or a callable returning "
            "them); under optax.inject_hyperparams list a callable mask in static_args=('mask',)") from None


def gradient_centralization(
    *,
    feature_axis: int | None = None,
    conv_only: bool = False,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """Gradient Centralization as a stateless optax transform.

    Put it before an optimizer to centralize gradients (the paper's GC), or after one to centralize its
    updates (see :func:`with_gradient_centralization`).

    Args:
      feature_axis: output-feature axis of every kernel; ``None`` (default) or ``-1`` for the Flax layout,
        ``0`` for the PyTorch layout. An int, or a concrete 0-d integer array (what
        ``optax.inject_hyperparams`` makes of an explicit value outside ``jax.jit``); a traced value is a
        ``TypeError`` (list it in ``static_args``). The default is ``None`` rather than ``-1`` so that
        ``optax.inject_hyperparams`` leaves it static.
      conv_only: the paper's GC-C variant: centralize only leaves with at least 3 dimensions (Flax
        ``Conv`` kernels ``(*kernel_size, in, out)``; a multi-axis ``DenseGeneral`` kernel counts too, so
        pass ``mask`` when the model has those).
      mask: a pytree of bools with the structure of the updates (or a prefix of it: one bool per layer),
        or a callable returning one from the updates (as ``optax.masked`` calls it); leaves under
        ``False`` pass through unchanged. The mask must be static (Python bools), not traced arrays.
        ``optax.inject_hyperparams`` takes every callable argument for a schedule, so a callable mask
        must be listed in its ``static_args`` (as for ``optax.adamw``'s ``mask``).

    Returns:
      An ``optax.GradientTransformation`` whose state is ``optax.EmptyState``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> tx = optax.chain(gradient_centralization(), optax.adam(1e-3))
      >>> state = tx.init({"w": jnp.zeros((4, 3))})

    References:
      Yong, Huang, Hua, Zhang, `Gradient Centralization: A New Optimization Technique for Deep Neural
      Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    axis = _static_feature_axis(feature_axis)
    min_ndim = _MIN_CONV_NDIM if conv_only else 2

    def centralize_leaf(g):
        return centralize_gradient(g, feature_axis=axis) if jnp.ndim(g) >= min_ndim else g

    def centralize_tree(tree):
        return jax.tree.map(centralize_leaf, tree)

    def update_fn(updates, state, params=None):
        del params
        if mask is None:
            return centralize_tree(updates), state
        mask_tree = mask(updates) if callable(mask) else mask
        # The mask may be a prefix of the updates (one bool for a whole layer), as in optax.masked.
        return jax.tree.map(lambda keep, sub: centralize_tree(sub) if _static_keep(keep) else sub,
                            mask_tree, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def with_gradient_centralization(
    optimizer: optax.GradientTransformation,
    *,
    placement: Placement = "gradient",
    feature_axis: int | None = None,
    conv_only: bool = False,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """Adds Gradient Centralization to any optax optimizer, on its input or on its output.

    Because GC is linear, ``placement`` matters only for optimizers that are not: for SGD and momentum
    both placements give the same updates; for Adam-type methods they differ.

    Args:
      optimizer: the optax optimizer to wrap.
      placement: ``"gradient"`` centralizes the raw gradient before ``optimizer`` (the paper's
        ``Adam_GC``, official ``gc_loc=True``); ``"update"`` centralizes ``optimizer``'s final update
        (official ``gc_loc=False``, recommended there for adaptive methods), which keeps every output
        unit's mean weight exactly fixed whatever ``optimizer`` does.
      feature_axis, conv_only, mask: see :func:`gradient_centralization`.

    Returns:
      ``optax.chain(gc, optimizer)`` or ``optax.chain(optimizer, gc)``.

    Example:
      >>> import optax
      >>> tx = with_gradient_centralization(optax.adam(1e-3), placement="update")
      >>> # To inject the wrapped optimizer's hyperparameters, inject them there:
      >>> tx = with_gradient_centralization(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))
    """
    gc = gradient_centralization(feature_axis=feature_axis, conv_only=conv_only, mask=mask)
    if placement == "gradient":
        return optax.chain(gc, optimizer)
    if placement == "update":
        return optax.chain(optimizer, gc)
    raise ValueError(f"placement must be 'gradient' or 'update', got {placement!r}")


def _l2_then(optimizer: optax.GradientTransformation, weight_decay: Any, weight_decay_mask: MaskOrFn):
    """Adds ``weight_decay * params`` to the gradient first (coupled L2, as the official SGD_GC/Adam_GC).

    The stage is left out for ``None`` or a Python (or NumPy) zero only, the rule of
    ``optax.add_decayed_weights``: an array, which is what ``optax.inject_hyperparams`` passes (concrete in
    ``init``, traced in a jitted ``update``), always keeps it, so ``init`` and ``update`` build the same
    chain whatever the value, and the value can be changed later.
    """
    if weight_decay is None or (not isinstance(weight_decay, jax.Array) and weight_decay == 0):
        return optimizer
    return optax.chain(optax.add_decayed_weights(weight_decay, weight_decay_mask), optimizer)


def sgd_gc(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: float | None = None,
    *,
    weight_decay_mask: MaskOrFn = None,
    feature_axis: int | None = None,
    conv_only: bool = False,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """SGD (with optional momentum and L2 weight decay) with Gradient Centralization: official ``SGD_GC``.

    Order, as in the official code: ``g + weight_decay * w`` -> GC -> momentum -> ``-learning_rate``.
    The decay term is centralized with the gradient, so every output unit's mean weight stays fixed.

    Every float hyperparameter is only used in array arithmetic and the options that shape the computation
    default to non-numeric values (``None``, bools), so ``optax.inject_hyperparams(sgd_gc)`` works without
    ``static_args``, under ``jax.jit``; ``state.hyperparams["learning_rate"] = ...`` changes the next step
    without retracing (assign an array of the stored dtype: a Python float has another abstract type and
    traces once more). An explicit ``feature_axis`` and a callable ``mask`` or ``weight_decay_mask`` go
    in ``static_args``.

    Args:
      learning_rate: a float or an ``optax`` schedule.
      momentum: heavy-ball momentum decay, or ``None`` for none (as ``optax.sgd``).
      nesterov: Nesterov momentum (as ``optax.sgd``).
      weight_decay: coupled L2 rate, added to the gradient before GC. ``None`` or a Python zero leaves the
        stage out; an array (what ``optax.inject_hyperparams`` passes) keeps it, so ``update`` then needs
        ``params``.
      weight_decay_mask: which leaves are decayed (as ``optax.add_decayed_weights``'s ``mask``).
      feature_axis, conv_only, mask: see :func:`gradient_centralization`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> tx = sgd_gc(0.1, momentum=0.9, weight_decay=5e-4)
      >>> tx = optax.inject_hyperparams(sgd_gc)(learning_rate=0.1, momentum=0.9)
      >>> params = {"kernel": jnp.ones((3, 2))}
      >>> grads = {"kernel": jnp.array([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]])}
      >>> state = tx.init(params)
      >>> state.hyperparams["learning_rate"] = jnp.asarray(0.5)
      >>> updates, state = tx.update(grads, state, params)
      >>> updates["kernel"][:, 0]          # -0.5 * (g - mean(g)) for the first output unit
      Array([ 0.5, -0. , -0.5], dtype=float32)

    References:
      Yong, Huang, Hua, Zhang, `Gradient Centralization: A New Optimization Technique for Deep Neural
      Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    sgd = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
    gc_sgd = with_gradient_centralization(
        sgd, placement="gradient", feature_axis=feature_axis, conv_only=conv_only, mask=mask)
    return _l2_then(gc_sgd, weight_decay, weight_decay_mask)


def adam_gc(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | None = None,
    *,
    placement: Placement = "update",
    weight_decay_mask: MaskOrFn = None,
    feature_axis: int | None = None,
    conv_only: bool = False,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """Adam (with optional coupled L2 weight decay) with Gradient Centralization.

    The L2 term is added to the gradient first, as in the official ``Adam``/``Adam_GC``.
    ``placement="update"`` (default, the official recommendation for adaptive methods) centralizes Adam's
    update and keeps each output unit's mean weight fixed; ``placement="gradient"`` is ``Adam_GC``.
    Works under ``optax.inject_hyperparams`` as :func:`sgd_gc` does (``b1``, ``b2``, ``eps`` and
    ``weight_decay`` are injectable too).

    Args:
      learning_rate: a float or an ``optax`` schedule.
      b1, b2, eps: as ``optax.adam``.
      weight_decay: coupled L2 rate, added to the gradient before Adam; as in :func:`sgd_gc`.
      placement: ``"update"`` or ``"gradient"``, see :func:`with_gradient_centralization`.
      weight_decay_mask: which leaves are decayed (as ``optax.add_decayed_weights``'s ``mask``).
      feature_axis, conv_only, mask: see :func:`gradient_centralization`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import optax
      >>> tx = adam_gc(1e-3)
      >>> tx = optax.inject_hyperparams(adam_gc)(learning_rate=1e-3, weight_decay=1e-4)

    References:
      Yong, Huang, Hua, Zhang, `Gradient Centralization: A New Optimization Technique for Deep Neural
      Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    gc_adam = with_gradient_centralization(
        adam, placement=placement, feature_axis=feature_axis, conv_only=conv_only, mask=mask)
    return _l2_then(gc_adam, weight_decay, weight_decay_mask)


def adamw_gc(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    placement: Placement = "update",
    weight_decay_mask: MaskOrFn = None,
    feature_axis: int | None = None,
    conv_only: bool = False,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) with Gradient Centralization.

    ``placement="update"`` (default) centralizes ``adam_update + weight_decay * w`` together, as the
    official AdamW with ``gc_loc=False``: weight means stay fixed. ``placement="gradient"`` centralizes
    only the raw gradient and leaves the decoupled decay uncentralized, as the official ``AdamW_GCC``.
    Works under ``optax.inject_hyperparams`` as :func:`sgd_gc` does (``b1``, ``b2``, ``eps`` and
    ``weight_decay`` are injectable too).

    Args:
      learning_rate: a float or an ``optax`` schedule.
      b1, b2, eps: as ``optax.adamw``.
      weight_decay: decoupled decay rate (as ``optax.adamw``, which always needs ``params``).
      placement: ``"update"`` or ``"gradient"``, see :func:`with_gradient_centralization`.
      weight_decay_mask: which leaves are decayed (``optax.adamw``'s ``mask``).
      feature_axis, conv_only, mask: see :func:`gradient_centralization`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import optax
      >>> tx = adamw_gc(1e-3, weight_decay=1e-2)
      >>> tx = optax.inject_hyperparams(adamw_gc)(learning_rate=1e-3, weight_decay=1e-2)

    References:
      Yong, Huang, Hua, Zhang, `Gradient Centralization: A New Optimization Technique for Deep Neural
      Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=weight_decay_mask)
    return with_gradient_centralization(
        adamw, placement=placement, feature_axis=feature_axis, conv_only=conv_only, mask=mask)
