"""The benchmark suite behind ``jaxopt-lab bench [--quick] [--group GROUP] [--out DIR]``.

Each row times one of our code paths against the anchor it must match or beat, in the same process with
interleaved repetitions (:mod:`jaxopt_lab.lab.bench.timing`), and reports ours/anchor as the median of the
per-repetition ratios with their interquartile range; a target counts as met only when the pessimistic
(upper) quartile of the ratios meets it. The host's load average is recorded before and after every group.
One module per group:

- :mod:`~jaxopt_lab.lab.bench.norms`: forward + backward of layer/instance/group/batch norm against
  ``flax.linen``, with bandwidth, HLO memory traffic and accuracy at a large offset.
- :mod:`~jaxopt_lab.lab.bench.accumulation`: micro-batched train steps and gradients against one batch,
  ``optax.MultiSteps``/``optax.microbatch`` and their physical floor, and their temporary memory.
- :mod:`~jaxopt_lab.lab.bench.centralization`: a training step with and without gradient centralization.
- :mod:`~jaxopt_lab.lab.bench.sweep`: the optimizer grid as one vmapped jit against a Python loop.
- :mod:`~jaxopt_lab.lab.bench.end_to_end`: wall time of ``jaxopt-lab run all --quick`` (full mode only).

:mod:`~jaxopt_lab.lab.bench.suite` runs them and writes ``OUT/bench/`` with the figure and summary of
:mod:`~jaxopt_lab.lab.bench.report`. The suite is not an experiment: ``jaxopt-lab run all`` does not run it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from jaxopt_lab.lab.bench.groups import GROUP_NAMES

if TYPE_CHECKING:
    from jaxopt_lab.lab.bench.rows import BenchConfig, Row
    from jaxopt_lab.lab.bench.suite import collect_rows, run_benchmarks

__all__ = ["GROUP_NAMES", "BenchConfig", "Row", "collect_rows", "run_benchmarks"]

# The CLI builds `jaxopt-lab bench --group` from GROUP_NAMES (stdlib only). Importing the suite here too
# (JAX, flax, optax, matplotlib) took `jaxopt-lab --help` from 0.25 s to 3-4 s, so the rest of the public
# names load on first use (PEP 562).
_LAZY_MODULES = {"BenchConfig": "rows", "Row": "rows", "collect_rows": "suite", "run_benchmarks": "suite"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY_MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY_MODULES[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
