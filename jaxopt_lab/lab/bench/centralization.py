"""The ``gradient-centralization`` group: a training step with and without
:func:`~jaxopt_lab.centralization.gradient_centralization` (target <= 1.05x), and the optimizer update
alone (GC's cost with no forward or backward to hide it)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

from jaxopt_lab.centralization import gradient_centralization
from jaxopt_lab.lab import training
from jaxopt_lab.lab.bench import timing as bm
from jaxopt_lab.lab.bench.rows import BenchConfig, Row, compared_row
from jaxopt_lab.lab.bench.workload import digits_workload

__all__ = ["gradient_centralization_rows"]

GROUP = "gradient-centralization"


def _update_fn(optimizer: optax.GradientTransformation, params: Any, grads: Any) -> Callable[[], Any]:
    """One jitted ``optimizer`` update and its application, closed over its inputs."""

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return functools.partial(update, params, optimizer.init(params), grads)


def gradient_centralization_rows(cfg: BenchConfig) -> list[Row]:
    """The ``gradient-centralization`` group: the train step and the optimizer update, with GC and without."""
    work = digits_workload(cfg)
    tx, tx_gc = work.momentum_sgd, optax.chain(gradient_centralization(), work.momentum_sgd)
    state, state_gc = work.state_for(tx), work.state_for(tx_gc)
    step = jax.jit(training.train_step)
    t = bm.time_interleaved({"plain": functools.partial(step, state, work.batch),
                             "gc": functools.partial(step, state_gc, work.batch)}, **cfg.timing())
    grads = jax.tree.map(lambda p: p * 0.01, state.params)
    u = bm.time_interleaved({"plain": _update_fn(tx, state.params, grads),
                             "gc": _update_fn(tx_gc, state.params, grads)}, **cfg.timing())
    return [
        compared_row(GROUP, "train step with GC", "train step without GC (SGD momentum)",
                     f"CNN, batch {cfg.effective_batch}", bm.Comparison(t["gc"], t["plain"]),
                     bm.Target("max_ratio", 1.05)),
        compared_row(GROUP, "optimizer update with GC", "optimizer update without GC", "CNN params",
                     bm.Comparison(u["gc"], u["plain"])),
    ]
