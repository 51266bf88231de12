"""The flags of ``jaxopt-lab run`` and of an experiment script, in the standard library only.

Kept apart from the runner so that building the parser (``jaxopt-lab --help``, a usage error) does not
import JAX.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["DATA_PARALLEL_MODES", "add_run_arguments", "add_set_argument"]

# `--data-parallel MODE` -> the `data_parallel` argument of `training.train_seeds`.
DATA_PARALLEL_MODES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``jaxopt-lab run`` (and of an experiment script) after the experiment names."""
    parser.add_argument("--quick", action="store_true", help="small configs (~1-2 min each on 2 CPU cores)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results)")
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    parser.add_argument("--data", default=None, metavar="NAME|PATH.npz",
                        help="the real-data experiments' dataset: a built-in one (digits, mnist1d) or a .npz "
                             "with x_train, y_train, x_test, y_test, checked before any experiment runs "
                             "(default: scikit-learn's bundled digits)")
    parser.add_argument("--data-parallel", choices=tuple(DATA_PARALLEL_MODES), default="auto",
                        help="split each training batch over all visible devices: auto (when more than one "
                             "device is visible and the batch divides), on (always; a batch that does not "
                             "divide is an error), off (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the configurations an interrupted run of the same settings and code "
                             "finished (OUT/.resume/NAME); without it a run starts fresh")
    add_set_argument(parser)


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable): a field of the experiment's config, parsed by the field's type."""
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a field of the experiment's config, e.g. --set seeds=1 --set "
                             "batch_sizes=2,4,8 (repeatable; `jaxopt-lab config NAME` lists the fields)")


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


