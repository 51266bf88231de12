"""Gradient accumulation: micro-batched gradients inside one jitted step, and its equivalences.

Two ways to reach the update of an effective batch of ``N`` with micro-batches of ``N / k``:

1. :func:`microbatched_value_and_grad` (this module): one jitted train step receives the whole batch,
   reshapes it to ``(k, N / k, ...)`` and runs a ``lax.scan`` over the micro-batches, summing loss and
   gradients in a float32 carry; XLA keeps only one micro-batch's activations alive at a time. Use it
   when the whole batch fits in memory as *input* but its activations do not (the usual case).
2. ``optax.MultiSteps(optimizer, every_k_schedule=k)`` (optax, documented and tested here): every call
   to ``update`` receives one micro-batch's gradients, adds them to a running mean and applies the
   inner optimizer once every ``k`` calls (emitting zero updates in between). Use it when the data
   loader can only produce micro-batches, or when ``k`` changes during training.

For a loss that is a *mean over examples*, both give exactly (up to float rounding) the gradient of the
large batch, so SGD, momentum, Adam and Gradient Centralization chains take the same step. Layers whose
output depends on the other examples of the batch break this: batch norm normalizes each micro-batch
with its own statistics, so the accumulated gradient is *not* the large-batch gradient (group, layer and
instance norm are per-example, so they stay exact). See ``docs/gradient_accumulation.md``.

Example (a jitted train step on a batch of 128 as 4 micro-batches of 32):
  >>> import jax, jax.numpy as jnp, optax
  >>> def loss_fn(params, batch):
  ...     return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
  >>> params = {"w": jnp.zeros((3, 1))}
  >>> batch = {"x": jnp.ones((128, 3)), "y": jnp.ones((128, 1))}
  >>> tx = optax.sgd(0.1)
  >>> @jax.jit
  ... def train_step(params, opt_state, batch):
  ...     loss, grads = microbatched_value_and_grad(loss_fn, 4)(params, batch)
  ...     updates, opt_state = tx.update(grads, opt_state, params)
  ...     return optax.apply_updates(params, updates), opt_state, loss
  >>> params, opt_state, loss = train_step(params, tx.init(params), batch)
  >>> float(loss)
  1.0
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["microbatched_value_and_grad", "split_microbatches"]

AuxMode = Literal["stack", "mean"]


def _as_tuple(argnums: int | Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(argnums, int | np.integer) and not isinstance(argnums, bool):
        return (int(argnums),)
    if isinstance(argnums, Sequence) and all(isinstance(a, int | np.integer) for a in argnums):
        return tuple(int(a) for a in argnums)
    raise TypeError(f"{name} must be an int or a sequence of ints, got {argnums!r}")


def _batch_size(batches: Sequence[Any]) -> int:
    sizes: dict[int, str] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(batches):
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"every batch leaf needs a leading batch axis; leaf {jax.tree_util.keystr(path)} is a scalar")
        sizes.setdefault(jnp.shape(leaf)[0], jax.tree_util.keystr(path))
    if not sizes:
        raise ValueError("the batch arguments contain no arrays")
    if len(sizes) > 1:
        described = ", ".join(f"{name}: {size}" for size, name in sizes.items())
        raise ValueError(f"batch leaves must share their leading axis, got different sizes ({described})")
    return next(iter(sizes))


def split_microbatches(batch: Any, num_microbatches: int, *, interleave: bool = False) -> Any:
    """Reshapes every leaf of ``batch`` from ``(N, ...)`` to ``(num_microbatches, N // num_microbatches, ...)``.

    ``interleave=False``: micro-batch ``i`` holds the contiguous examples ``[i * N/k, (i + 1) * N/k)``,
    the order in which a data loader would have produced them. ``interleave=True``: example ``j`` goes to
    micro-batch ``j % k`` (``optax.microbatch``'s layout). Use it when the batch is sharded over devices
    along ``N``: every device then holds ``1/d`` of every micro-batch and the sharding survives the
    reshape, whereas contiguous micro-batches each live on ``d/k`` of the devices. Both give the same mean.

    Raises:
      ValueError: if the leaves do not share a leading axis, or it is not divisible by num_microbatches.
    """
    num_microbatches = _check_num_microbatches(num_microbatches)
    micro = _microbatch_size(_batch_size([batch]), num_microbatches)

    def split(x):
        rest = jnp.shape(x)[1:]
        if interleave:
            return jnp.swapaxes(jnp.reshape(x, (micro, num_microbatches, *rest)), 0, 1)
        return jnp.reshape(x, (num_microbatches, micro, *rest))

    return jax.tree.map(split, batch)


def _microbatch_size(size: int, num_microbatches: int) -> int:
    if size % num_microbatches:
        raise ValueError(
            f"batch size {size} is not divisible by num_microbatches={num_microbatches} "
            f"({size} = {size // num_microbatches} * {num_microbatches} + {size % num_microbatches})")
    return size // num_microbatches


def _check_num_microbatches(num_microbatches: Any) -> int:
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int | np.integer):
        raise TypeError(f"num_microbatches must be a Python int, got {type(num_microbatches).__name__}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    return int(num_microbatches)


def microbatched_value_and_grad(
    loss_fn: Callable[..., Any],
    num_microbatches: int,
    *,
    has_aux: bool = False,
    argnums: int | Sequence[int] = 0,
    batch_argnums: int | Sequence[int] = 1,
    carry_argnum: int | None = None,
    aux_mode: AuxMode = "stack",
    accumulation_dtype: Any = jnp.float32,
    interleave: bool = False,
    unroll: int | bool = 1,
) -> Callable[..., Any]:
    """``jax.value_and_grad(loss_fn)`` evaluated as a ``lax.scan`` over micro-batches.

    The returned function takes the same arguments as ``loss_fn`` (keyword arguments are passed whole to
    every micro-batch, as are positional ones outside ``batch_argnums``) and returns what
    ``jax.value_and_grad(loss_fn, argnums=argnums, has_aux=has_aux)`` returns, with:

    * value = the MEAN of the micro-batch losses, gradients = the MEAN of the micro-batch gradients.
      For a loss that is a mean over the examples of its batch this is the full-batch value and
      gradient, up to float rounding. (``optax.microbatch`` SUMS by default: pass its ``MEAN``
      accumulator to compare.) Both are accumulated in ``accumulation_dtype`` (float32 by default,
      also for bfloat16 parameters) and returned in the dtypes ``loss_fn`` produces.
    * aux (``has_aux=True``): ``aux_mode="stack"`` returns each micro-batch's aux stacked on a new
      leading axis of size ``num_microbatches`` (per-example aux of shape ``(N/k, ...)`` becomes
      ``(k, N/k, ...)``; ``.reshape(N, ...)`` restores the batch order); ``aux_mode="mean"`` averages
      them over micro-batches (right for metrics that are means over equal-sized micro-batches).
    * carried state (``carry_argnum=i``, e.g. Flax ``batch_stats``): ``loss_fn`` must return
      ``(loss, (new_state, aux))``; the ``new_state`` of micro-batch ``j`` is passed as argument ``i``
      to micro-batch ``j + 1``, and the last one is returned in place of ``new_state``, so batch-norm
      running statistics are updated once per micro-batch, as ``k`` sequential small steps would.

    The function does not jit itself (like ``jax.value_and_grad``): call it inside your jitted train
    step, so that the scan is compiled once and XLA keeps one micro-batch's activations live at a time.

    Args:
      loss_fn: ``loss_fn(*args) -> loss`` or ``(loss, aux)``; ``loss`` a scalar.
      num_microbatches: ``k``; the leading axis ``N`` of every batch leaf must be divisible by it.
      has_aux: as in ``jax.value_and_grad``.
      argnums: the differentiated positional arguments, as in ``jax.value_and_grad``.
      batch_argnums: the positional arguments that are batches (pytrees whose leaves share the leading
        axis ``N``); they are split, every other argument is passed whole to every micro-batch.
      carry_argnum: a positional argument threaded through the micro-batches (see above); needs
        ``has_aux=True``.
      aux_mode: ``"stack"`` or ``"mean"``, see above.
      accumulation_dtype: dtype of the loss and gradient accumulators.
      interleave: micro-batch ``i`` = examples ``i, i + k, i + 2k, ...`` instead of a contiguous slice;
        keeps a batch-sharded input's sharding (see :func:`split_microbatches`). Stacked per-example aux
        then comes back in that order: ``aux.swapaxes(0, 1).reshape(N, ...)`` restores the batch order.
      unroll: passed to ``lax.scan``. The default ``1`` keeps a real loop, which is what bounds the
        activation memory to one micro-batch. ``unroll=True`` (or ``k``) trades that guarantee for speed
        where the backend handles the loop badly: on XLA:CPU a convolution's backward inside a loop body is
        many times slower than outside (jax-ml/jax#12868; ``docs/gradient_accumulation.md`` measures it),
        and unrolling removes the loop. The values are the same either way.

    Returns:
      A function with ``loss_fn``'s signature returning ``(value, grads)`` or ``((value, aux), grads)``.

    Raises:
      ValueError: ``N`` is not divisible by ``num_microbatches`` (the message names both), batch leaves
        disagree on ``N``, or the arguments overlap in ways that have no meaning.
    """
    num_microbatches = _check_num_microbatches(num_microbatches)
    diff_argnums = _as_tuple(argnums, "argnums")
    split_argnums = _as_tuple(batch_argnums, "batch_argnums")
    if aux_mode not in ("stack", "mean"):
        raise ValueError(f"aux_mode must be 'stack' or 'mean', got {aux_mode!r}")
    if overlap := set(diff_argnums) & set(split_argnums):
        raise ValueError(f"argnums {sorted(overlap)} are also batch_argnums: gradients with respect to a "
                         "batch are not accumulated over micro-batches")
    if carry_argnum is not None:
        if not has_aux:
            raise ValueError("carry_argnum needs has_aux=True and loss_fn returning (loss, (new_state, aux))")
        if carry_argnum in diff_argnums or carry_argnum in split_argnums:
            raise ValueError(f"carry_argnum={carry_argnum} must not also be in argnums or batch_argnums")

    value_and_grad_fn = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=has_aux)
    acc_dtype = jnp.dtype(accumulation_dtype)

    used_argnums = (*diff_argnums, *split_argnums, *(() if carry_argnum is None else (carry_argnum,)))

    @functools.wraps(loss_fn)
    def microbatched(*args, **kwargs):
        if max(used_argnums) >= len(args):
            raise ValueError(
                f"loss_fn was called with {len(args)} positional arguments, but argnums={argnums}, "
                f"batch_argnums={batch_argnums} and carry_argnum={carry_argnum} need {max(used_argnums) + 1}")
        batches = tuple(args[i] for i in split_argnums)
        micro_batches = split_microbatches(batches, num_microbatches, interleave=interleave)

        diff_args = tuple(args[i] for i in diff_argnums)
        diff_args = diff_args[0] if isinstance(argnums, int | np.integer) else diff_args
        # Never accumulate in less precision than the parameters have (float64 under jax_enable_x64).
        zero_grads = jax.tree.map(
            lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.result_type(p), acc_dtype)), diff_args)
        init_carry = (jnp.zeros((), acc_dtype), zero_grads,
                      None if carry_argnum is None else args[carry_argnum])

        def body(carry, micro_batch):
            loss_sum, grad_sum, state = carry
            call_args = list(args)
            for i, batch in zip(split_argnums, micro_batch, strict=True):
                call_args[i] = batch
            if carry_argnum is not None:
                call_args[carry_argnum] = state
            value, grads = value_and_grad_fn(*call_args, **kwargs)
            loss, aux = value if has_aux else (value, None)
            if carry_argnum is not None:
                state, aux = aux
            grad_sum = jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads)
            return (loss_sum + loss.astype(acc_dtype), grad_sum, state), (loss, aux)

        (loss_sum, grad_sum, state), (losses, auxes) = jax.lax.scan(body, init_carry, micro_batches,
                                                                     unroll=unroll)
        loss = (loss_sum / num_microbatches).astype(losses.dtype)
        # jax.grad returns cotangents in the primal's dtype: return the means in it too.
        grads = jax.tree.map(lambda s, p: (s / num_microbatches).astype(jnp.result_type(p)),
                             grad_sum, diff_args)
        if not has_aux:
            return loss, grads
        if aux_mode == "mean":
            auxes = jax.tree.map(_mean_over_microbatches, auxes)
        if carry_argnum is not None:
            auxes = (state, auxes)
        return (loss, auxes), grads

    return microbatched


def _mean_over_microbatches(stacked: jax.Array) -> jax.Array:
    mean = jnp.mean(stacked, axis=0, dtype=jnp.promote_types(stacked.dtype, jnp.float32))
    return mean.astype(stacked.dtype) if jnp.issubdtype(stacked.dtype, jnp.inexact) else mean
