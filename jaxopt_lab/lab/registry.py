"""Finds the experiments: every module of ``jaxopt_lab.lab.experiments`` that defines ``EXPERIMENT``.

The experiments are imported by name (``importlib``), never the other way round: an experiment module
imports the contract (:mod:`jaxopt_lab.lab.experiment`) and the runner, and nothing that imports this one.
"""

from __future__ import annotations

import importlib
import pkgutil

import jaxopt_lab.lab.experiments as experiments_package
from jaxopt_lab.lab.experiment import CANONICAL_ORDER, Experiment

__all__ = ["available_experiments"]


def available_experiments() -> dict[str, Experiment]:
    """Every experiment module that exists, keyed by name, in :data:`CANONICAL_ORDER` (then a-z)."""
    found: dict[str, Experiment] = {}
    for info in pkgutil.iter_modules(experiments_package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{experiments_package.__name__}.{info.name}")
        experiment = getattr(module, "EXPERIMENT", None)
        if isinstance(experiment, Experiment):
            if experiment.name in found:
                raise RuntimeError(f"two experiment modules are named {experiment.name!r}")
            found[experiment.name] = experiment
    rank = {name: i for i, name in enumerate(CANONICAL_ORDER)}
    ordered = sorted(found, key=lambda n: (rank.get(n, len(rank)), n))
    return {name: found[name] for name in ordered}
