"""Runs experiments into a results folder: ``jaxopt-lab run``'s work, and ``python experiments/NAME.py``.

:func:`run_experiment` runs one experiment into ``OUT/NAME`` atomically (a staging folder swapped in when
it is complete), :func:`run_experiments` runs several and rebuilds ``OUT/REPORT.md``, and :func:`main_for`
is the command line of one experiment script, with the flags and the error handling of ``jaxopt-lab run``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxopt_lab.lab import results
from jaxopt_lab.lab.checkpoints import RESUME_DIR, Checkpoints
from jaxopt_lab.lab.data import BUILTIN_DATASETS, load_dataset
from jaxopt_lab.lab.experiment import HISTORIES_FILE, Experiment, RunContext, environment, with_mode_line
from jaxopt_lab.lab.flags import DATA_PARALLEL_MODES, add_run_arguments
from jaxopt_lab.lab.program import Interrupted, Parser, UsageError, add_debug, caused_by_interrupt, run_program
from jaxopt_lab.lab.report import write_report

__all__ = ["check_overrides", "main_for", "replot", "run_experiment", "run_experiments", "writable_folder"]


def _data_parallel_mode(data_parallel: bool | None) -> str:
    return next(mode for mode, value in DATA_PARALLEL_MODES.items() if value is data_parallel)


def _footer(ctx: RunContext, elapsed: float, env: dict[str, Any]) -> str:
    flags = " --quick" if ctx.quick else ""
    flags += f" --seed {ctx.seed}"
    if ctx.data_path is not None:
        flags += f" --data {ctx.data_path}"
    if ctx.data_parallel is not None:
        flags += f" --data-parallel {_data_parallel_mode(ctx.data_parallel)}"
    flags += "".join(f" --set {item}" for item in ctx.overrides)
    return (
        f"\n\n---\n*Measured by `jaxopt-lab run {ctx.name}{flags}` in "
        f"{elapsed:.1f} s on {env['device_count']}x {env['device_kind']} ({env['backend']}), "
        f"JAX {env['jax']}, flax {env['flax']}, optax {env['optax']}, code {env['commit'][:12]}"
        f"{'+dirty' if env['commit'].endswith('+dirty') else ''}.*\n"
    )


def run_experiment(experiment: Experiment, out: str | Path, *, quick: bool, seed: int,
                   show_progress: bool = True, data_path: Path | None = None,
                   data_parallel: bool | None = None, overrides: Sequence[str] = (),
                   resume: bool = False) -> float:
    """Runs one experiment into ``out/NAME`` atomically and returns its wall-clock seconds.

    ``overrides`` (``KEY=VALUE``, ``--set``) change the experiment's config; they are recorded in
    ``metrics.json`` and in the summary's reproduce line. Every configuration the experiment checkpoints
    (``ctx.cached``) is saved under ``out/.resume/NAME`` as it finishes; ``resume`` reuses those whose
    key matches (one line says how many), and the folder is removed once the experiment has finished.
    """
    env = environment()
    checkpoints = Checkpoints(Path(out) / RESUME_DIR / experiment.name, resume=resume, run_key={
        "experiment": experiment.name, "quick": quick, "seed": seed, "data_path": data_path,
        "data_parallel": data_parallel, "overrides": list(overrides)})
    with results.staging_dir(Path(out) / experiment.name) as staged:
        ctx = RunContext(experiment.name, quick, seed, staged, show_progress, data_path, data_parallel,
                         tuple(overrides), checkpoints)
        start = time.perf_counter()
        experiment.run(ctx)
        elapsed = time.perf_counter() - start
        missing = [what for what, ok in (("metrics", ctx.metrics is not None),
                                         ("summary", ctx.summary is not None),
                                         ("a figure", bool(ctx.figures))) if not ok]
        if missing:
            raise RuntimeError(f"experiment {experiment.name!r} finished without {', '.join(missing)}")
        results.atomic_write_json(staged / "metrics.json", {
            "experiment": experiment.name,
            "quick": quick,
            "mode": "quick" if quick else "full",
            "endpoint": ctx.endpoint,
            "seed": seed,
            "data_path": data_path,
            "data_parallel": _data_parallel_mode(data_parallel),
            "overrides": list(overrides),
            "resumed": {"reused": checkpoints.reused, "configurations": checkpoints.total} if resume else None,
            "histories": ctx.histories,
            "elapsed_s": elapsed,
            "environment": env,
            "figures": ctx.figures,
            "config": ctx.config,
            "metrics": ctx.metrics,
        })
        summary = with_mode_line((ctx.summary or "").rstrip(), quick=quick, endpoint=ctx.endpoint)
        summary += _footer(ctx, elapsed, env)
        results.atomic_write_text(staged / "summary.md", summary)
    checkpoints.remove()
    if resume:
        print(f"[jaxopt-lab] {experiment.name}: --resume reused {checkpoints.reused} of {checkpoints.total} "
              "finished configurations", flush=True)
    return elapsed


def replot(experiment: Experiment, out: str | Path) -> list[str]:
    """Redraws ``experiment``'s figures in ``out/NAME`` from its ``histories.npz`` and ``metrics.json``
    (no training) and returns their file names."""
    folder = Path(out) / experiment.name
    if experiment.plot is None:
        raise UsageError(f"plot: {experiment.name} draws its figures while it runs; re-run it instead")
    try:
        meta = json.loads((folder / "metrics.json").read_text())
        if not (folder / HISTORIES_FILE).is_file():
            raise FileNotFoundError(folder / HISTORIES_FILE)
    except (OSError, ValueError) as err:
        raise UsageError(f"--out {out}: no finished run of {experiment.name} to redraw ({err})") from err
    ctx = RunContext(experiment.name, meta["quick"], meta["seed"], folder, show_progress=False)
    ctx.config, ctx.metrics = meta["config"], meta["metrics"]
    ctx.plot(experiment)
    return ctx.figures


def writable_folder(out: Path) -> None:
    """Creates ``--out`` if missing and checks that one can write into it (a real probe, not ``os.access``,
    which says yes to root and knows nothing of ACLs)."""
    try:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: is a file; expected a folder (created if missing)")
        out.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".jaxopt-lab-write-check-", dir=out))
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write there ({err.strerror or err}); expected a folder you "
                         f"can write to (created if missing)") from err


def _check_data(data_arg: str) -> None:
    """Loads ``--data`` once before any experiment runs, so a bad file fails in a second, not an hour in."""
    try:
        load_dataset(data_arg)
    except FileNotFoundError as err:
        raise UsageError(f"--data: {err}; expected a built-in dataset ({', '.join(BUILTIN_DATASETS)}) or an "
                         "existing .npz file") from err
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"--data: {err}") from err


def _interrupted_line(out: Path, finished: Sequence[str], current: str | None, pending: Sequence[str]) -> str:
    """What finished (kept in ``out``) and what did not, for Ctrl-C during ``run``."""
    if current is None and not finished:
        return "interrupted before any experiment started (nothing written)"
    if current is not None:
        parts = [f"interrupted during {current} (nothing of it written)"]
    elif pending:
        parts = [f"interrupted before {pending[0]} started"]
    else:
        parts = ["interrupted while writing the report"]
    parts.append(f"finished and kept in {out}/: {', '.join(finished)}" if finished else "none finished")
    if pending:
        parts.append(f"not run: {', '.join(pending)}")
    if finished:
        parts.append(f"{out / 'REPORT.md'} not updated (`jaxopt-lab report --out {out}` rebuilds it)")
    return "; ".join(parts)


def check_overrides(experiment: Experiment, quick: bool, data: str | None, overrides: Sequence[str]) -> Any:
    """The config ``--set`` gives ``experiment``, checked without training; a one-line ``UsageError`` if it
    names an unknown key, holds a value of the wrong type or cannot run."""
    try:
        return experiment.resolve_config(quick, data, overrides)
    except ValueError as err:  # OverrideError included
        raise UsageError(str(err)) from err


def run_experiments(experiments: Sequence[Experiment], args: argparse.Namespace) -> int:
    """Runs ``experiments`` in order with ``args`` (:func:`add_run_arguments`), then writes the report.

    ``--data`` is loaded and ``--out`` probed before anything trains. Ctrl-C raises
    :class:`~jaxopt_lab.lab.program.Interrupted` with the line that says what finished and what did not.
    """
    finished: list[str] = []
    current: str | None = None
    names = [experiment.name for experiment in experiments]
    try:
        if args.data is not None:
            _check_data(args.data)
        for experiment in experiments:  # a bad --set fails here, in seconds, before anything trains
            check_overrides(experiment, args.quick, args.data, args.overrides)
        writable_folder(args.out)
        data_path = None if args.data is None else Path(args.data)
        for experiment in experiments:
            print(f"[jaxopt-lab] running {experiment.name}{' (quick)' if args.quick else ''} ...", flush=True)
            current = experiment.name
            elapsed = run_experiment(experiment, args.out, quick=args.quick, seed=args.seed,
                                     show_progress=not args.no_progress, data_path=data_path,
                                     data_parallel=DATA_PARALLEL_MODES[args.data_parallel],
                                     overrides=args.overrides, resume=args.resume)
            finished.append(experiment.name)
            current = None
            print(f"[jaxopt-lab] {experiment.name}: done in {elapsed:.1f} s -> {args.out / experiment.name}/",
                  flush=True)
        report = write_report(args.out)
    except BaseException as err:
        if not caused_by_interrupt(err):
            raise
        pending = names[len(finished) + (current is not None):]
        raise Interrupted(_interrupted_line(args.out, finished, current, pending)) from err
    print(f"[jaxopt-lab] report: {report}", flush=True)
    return 0


def main_for(experiment: Experiment, argv: Sequence[str] | None = None) -> int:
    """``python experiments/NAME.py [--quick] [--out DIR] [--seed N] ...``: ``jaxopt-lab run NAME``.

    Run as a script (``argv`` None) it is the program: Ctrl-C exits at once with 130, like ``jaxopt-lab``.
    """
    def build_parser() -> Parser:
        parser = Parser(prog=f"jaxopt-lab run {experiment.name}", description=experiment.description)
        add_debug(parser, False)
        add_run_arguments(parser)
        return parser

    return run_program(build_parser, lambda _, args: run_experiments([experiment], args), argv,
                       exit_on_interrupt=argv is None)
