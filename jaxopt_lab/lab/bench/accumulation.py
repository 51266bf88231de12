"""The ``accumulation`` group: one optimizer step of effective batch ``n`` taken as ``k`` micro-batches.

* A full train step with ``num_microbatches=k`` against one batch of ``n`` (target <= 1.15x), and
  ``optax.MultiSteps`` fed ``k`` micro-batches by ``k`` jitted calls against the same.
* The gradient alone: :func:`~jaxopt_lab.accumulation.microbatched_value_and_grad` against
  ``optax.microbatch`` (target <= 1.05x), against one batch of ``n`` (<= 1.15x) and against its
  physical floor, ``k`` separate jitted calls at the micro-batch size (<= 1.05x); the scan as a loop and
  unrolled.
* Its temporary memory (XLA's ``memory_analysis``) against the full batch's / ``k`` plus the gradient
  buffer (<= 1.0x).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.accumulation import microbatched_value_and_grad
from jaxopt_lab.lab import models, training
from jaxopt_lab.lab.bench import timing as bm
from jaxopt_lab.lab.bench.rows import BenchConfig, Row, compared_row
from jaxopt_lab.lab.bench.workload import digits_workload

__all__ = ["accumulation_rows"]

GROUP = "accumulation"
SCAN_VARIANTS = (("lax.scan loop", "looped"), ("unroll=True", "unrolled"))  # (label, timing key)


def _steps(step: Callable, state: Any, batches: Sequence[Any]) -> Any:
    for batch in batches:
        state, _ = step(state, batch)
    return state


def _train_step_rows(cfg: BenchConfig, label: str, model: nn.Module, target: bm.Target) -> list[Row]:
    """The micro-batched train step (and, for the CNN, optax.MultiSteps) against one batch of n."""
    k, n = cfg.num_microbatches, cfg.effective_batch
    work = digits_workload(cfg, model)
    micro = jax.tree.map(lambda a: a.reshape(k, n // k, *a.shape[1:]), work.batch)
    micro_batches = [jax.tree.map(lambda a, i=i: a[i], micro) for i in range(k)]
    one_step = jax.jit(training.make_train_step())
    microbatched_step = jax.jit(training.make_train_step(num_microbatches=k))
    state = work.state_for(work.momentum_sgd)
    fns = {"one batch": functools.partial(one_step, state, work.batch),
           "microbatched": functools.partial(microbatched_step, state, work.batch)}
    if label == "CNN":
        # As MultiSteps is used: k jitted calls, one per micro-batch, the state carried between them.
        multi_state = work.state_for(optax.MultiSteps(work.momentum_sgd, every_k_schedule=k))
        fns["multisteps"] = functools.partial(_steps, one_step, multi_state, micro_batches)
    t = bm.time_interleaved(fns, **cfg.timing())
    shape = f"{label} (batch norm), {k}x{n // k} vs {n}"
    anchor = f"train step on one batch of {n}"
    rows = [compared_row(GROUP, f"train step, microbatched_value_and_grad {k}x{n // k}", anchor, shape,
                         bm.Comparison(t["microbatched"], t["one batch"]), target)]
    if "multisteps" in t:
        rows.append(compared_row(GROUP, f"train step, optax.MultiSteps {k} micro-steps", anchor, shape,
                                 bm.Comparison(t["multisteps"], t["one batch"])))
    return rows


def _optax_microbatch_row(cfg: BenchConfig) -> Row:
    """The gradient alone against optax's own micro-batching (a fori_loop; MEAN to match our mean loss)."""
    k, n = cfg.num_microbatches, cfg.effective_batch
    work = digits_workload(cfg, models.CNN(norm="group"))
    params, loss_fn = work.params(), work.loss_fn()
    ours = jax.jit(microbatched_value_and_grad(loss_fn, k))
    optax_microbatched = jax.jit(optax.microbatch(
        jax.value_and_grad(loss_fn), argnums=1, microbatch_size=n // k,
        accumulator=optax.microbatching.AccumulationType.MEAN))
    fns = {"ours": functools.partial(ours, params, work.batch),
           "optax": functools.partial(optax_microbatched, params, work.batch)}
    t = bm.time_interleaved(fns, **cfg.timing())
    return compared_row(GROUP, f"microbatched_value_and_grad {k}x{n // k}", "optax.microbatch (MEAN)",
                        f"CNN (group norm), {k}x{n // k}", bm.Comparison(t["ours"], t["optax"]),
                        bm.Target("max_ratio", 1.05))


def _accumulate_fn(loss_fn: Callable) -> Callable:
    """The floor's one jitted call: ``acc + (loss, grads)`` of one micro-batch."""
    value_and_grad = jax.value_and_grad(loss_fn)

    @jax.jit
    def accumulate(acc, params, micro_batch):
        return jax.tree.map(jnp.add, acc, value_and_grad(params, micro_batch))

    return accumulate


def _gradient_rows(cfg: BenchConfig, label: str, model: nn.Module, target: bm.Target) -> list[Row]:
    """The gradient alone against one batch of n and against its physical floor, and its memory.

    The floor is k separate jitted calls at the micro-batch size, each adding one micro-batch's (loss,
    gradient) to a buffer: the work accumulation cannot avoid (one batch of n also profits from larger
    GEMMs, the floor does not). The scan runs as a loop (bounded memory) and unrolled (XLA:CPU runs a
    conv backward inside a loop body slowly, jax-ml/jax#12868; unrolling removes the loop).
    """
    k, n = cfg.num_microbatches, cfg.effective_batch
    work = digits_workload(cfg, model)
    batch, params, loss_fn = work.batch, work.params(), work.loss_fn()
    # Compiled once, then timed and read (memory_analysis) from the same program.
    looped, unrolled, full = (jax.jit(fn).lower(params, batch).compile() for fn in (
        microbatched_value_and_grad(loss_fn, k), microbatched_value_and_grad(loss_fn, k, unroll=True),
        jax.value_and_grad(loss_fn)))
    accumulate = _accumulate_fn(loss_fn)
    micro_batches = [jax.tree.map(lambda a, i=i: a[i * (n // k):(i + 1) * (n // k)], batch) for i in range(k)]
    zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), params))
    scale = jax.jit(lambda acc: jax.tree.map(lambda a: a / k, acc))

    def floor():
        acc = zeros
        for micro in micro_batches:
            acc = accumulate(acc, params, micro)
        return scale(acc)  # the mean, as microbatched_value_and_grad returns it

    t = bm.time_interleaved({"looped": functools.partial(looped, params, batch),
                             "unrolled": functools.partial(unrolled, params, batch),
                             "full": functools.partial(full, params, batch), "floor": floor}, **cfg.timing())
    shape = f"{label}, {k}x{n // k}"
    floor_anchor = f"floor: {k} jitted value_and_grad calls on {n // k}, summed"
    rows = []
    for variant, key in SCAN_VARIANTS:
        ours = f"microbatched_value_and_grad {k}x{n // k}, {variant}"
        rows.append(compared_row(GROUP, ours, f"jax.value_and_grad on one batch of {n}", shape,
                                 bm.Comparison(t[key], t["full"]), target))
        rows.append(compared_row(GROUP, ours, floor_anchor, shape, bm.Comparison(t[key], t["floor"]),
                                 bm.Target("max_ratio", 1.05)))
    # Memory: the micro-batched program should hold about one micro-batch's activations (1/k of the full
    # step's temporaries) plus the gradient buffer it accumulates into.
    memory = {key: bm.compiled_memory(fn, (params, batch))
              for key, fn in (("full", full), ("looped", looped), ("unrolled", unrolled))}
    grad_bytes = bm.nbytes(params)
    bound = memory["full"]["temp_bytes"] / k + grad_bytes
    for variant, key in SCAN_VARIANTS:
        temp = memory[key]["temp_bytes"]
        rows.append(Row(GROUP, f"temp memory, microbatched_value_and_grad {k}x{n // k}, {variant}",
                        f"full batch's temp / {k} + gradient buffer", shape, float(temp), bound, temp / bound,
                        bm.Target("max_ratio", 1.0), unit="bytes",
                        extra={"temp_bytes": memory, "gradient_bytes": grad_bytes, "bound_bytes": bound}))
    return rows


def accumulation_rows(cfg: BenchConfig) -> list[Row]:
    """The ``accumulation`` group: train steps, the gradient against optax and its floor, and memory."""
    target = bm.Target("max_ratio", 1.15)
    rows = [row for label, model in (("CNN", models.CNN()), ("MLP", models.MLP()))
            for row in _train_step_rows(cfg, label, model, target)]
    rows.append(_optax_microbatch_row(cfg))
    # Quick mode: the MLP only (the CNN's scan compiles for tens of seconds on a loaded 2-core machine).
    workloads: list[tuple[str, nn.Module]] = [("MLP (layer norm)", models.MLP(norm="layer"))]
    if not cfg.quick:
        workloads.insert(0, ("CNN (group norm)", models.CNN(norm="group")))
    rows += [row for label, model in workloads for row in _gradient_rows(cfg, label, model, target)]
    return rows
