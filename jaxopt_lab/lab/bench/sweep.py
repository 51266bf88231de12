"""The ``sweep`` group: the optimizer grid (4 optimizers x 4 learning rates on the synthetic regression)
as one vmapped jit (:func:`jaxopt_lab.lab.sweep.run_sweep`) against a Python loop of jitted single runs
(target: >= 10x faster)."""

from __future__ import annotations

import jax

from jaxopt_lab.lab import landscapes, sweep
from jaxopt_lab.lab.bench import timing as bm
from jaxopt_lab.lab.bench.rows import BenchConfig, Row, compared_row

__all__ = ["SWEEP_LEARNING_RATES", "SWEEP_OPTIMIZERS", "sweep_rows"]

SWEEP_OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
SWEEP_LEARNING_RATES = (0.001, 0.01, 0.1, 1.0)


def sweep_rows(cfg: BenchConfig) -> list[Row]:
    """The ``sweep`` group: one row, the vmapped grid against the loop, both to the same loss target."""
    problem = landscapes.make_regression(0)
    features = problem.data["x"].shape[1]
    specs = sweep.grid(SWEEP_LEARNING_RATES, seeds=[0], init_params=landscapes.init_linear(features))
    config = sweep.SweepConfig(steps=cfg.sweep_steps, target_loss=0.1)
    singles = [jax.tree.map(lambda a, i=i: a[i], specs) for i in range(len(SWEEP_LEARNING_RATES))]

    def vmapped():
        return sweep.run_sweep(landscapes.mse_loss, SWEEP_OPTIMIZERS, specs, problem.data, config)

    def loop():
        return [sweep.run_single(landscapes.mse_loss, name, spec, problem.data, config)
                for name in SWEEP_OPTIMIZERS for spec in singles]

    t = bm.time_interleaved({"vmapped": vmapped, "loop": loop}, **cfg.timing())
    runs = len(SWEEP_OPTIMIZERS) * len(SWEEP_LEARNING_RATES)
    return [compared_row("sweep", f"{runs}-run grid, one vmapped jit", f"Python loop of {runs} jitted runs",
                         f"{runs} runs x {cfg.sweep_steps} steps", bm.Comparison(t["vmapped"], t["loop"]),
                         bm.Target("min_speedup", 10.0))]
