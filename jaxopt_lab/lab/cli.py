"""The ``jaxopt-lab`` command: ``list``, ``run NAME... | all``, ``report``, ``bench``.

A thin layer over :mod:`jaxopt_lab.lab.experiment`, :mod:`jaxopt_lab.lab.report` and the benchmark suite
(``experiments/benchmarks.py``). A mistake in the user's input prints one line naming the flag, the
problem and what was expected, and exits with status 2: a bad flag or value, an unknown experiment,
a ``--data`` file that is missing or malformed (checked before any experiment runs), an ``--out`` that is
a file or a folder one cannot write to. A warning (e.g. ``--data`` labels that skip classes) is one
``warning:`` line. Ctrl-C prints one line saying which experiments finished (they are kept) and which did
not (nothing of them is written), and exits with status 130. ``--debug`` or ``JAXOPT_LAB_DEBUG=1`` shows
the traceback and Python's usual warnings instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["DEBUG_ENV", "UsageError", "main"]

DEBUG_ENV = "JAXOPT_LAB_DEBUG"  # set to anything but "" or "0": tracebacks for usage errors and Ctrl-C


class UsageError(Exception):
    """A mistake in the user's input (flags, files, folders): one line on stderr and exit status 2."""


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``run``, carrying the one line that says what finished and what did not."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _add_debug(parser: argparse.ArgumentParser, default: Any) -> None:
    # Accepted before and after the command; a subcommand's SUPPRESS default keeps the main one's value.
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"show the traceback of a usage error or Ctrl-C (also: {DEBUG_ENV}=1)")


def _build_parser() -> _Parser:
    from jaxopt_lab.lab.experiment import (
        DATA_PARALLEL_MODES,  # here, so that a Ctrl-C in numpy's import is caught
    )

    parser = _Parser(prog="jaxopt-lab", description=__doc__.splitlines()[0])
    _add_debug(parser, False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                     metavar="{list,run,report,bench}")
    commands.add_parser("list", help="list every experiment with a one-line description")
    run = commands.add_parser("run", help="run experiments (names or 'all') and write the report")
    run.add_argument("names", nargs="+", metavar="NAME", help="experiment names, or 'all'")
    run.add_argument("--quick", action="store_true", help="small configs (~1-2 min each on 2 CPU cores)")
    run.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results)")
    run.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    run.add_argument("--data", default=None, metavar="NAME|PATH.npz",
                     help="the real-data experiments' dataset: a built-in one (digits, mnist1d) or a .npz "
                          "with x_train, y_train, x_test, y_test, checked before any experiment runs "
                          "(default: scikit-learn's bundled digits)")
    run.add_argument("--data-parallel", choices=tuple(DATA_PARALLEL_MODES), default="auto",
                     help="split each training batch over all visible devices: auto (when more than one "
                          "device is visible and the batch divides), on (always; a batch that does not "
                          "divide is an error), off (default: auto)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    report = commands.add_parser("report", help="gather every summary and figure into OUT/REPORT.md")
    report.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results)")
    from jaxopt_lab.lab.bench import GROUP_NAMES as BENCH_GROUPS  # stdlib-only module

    bench = commands.add_parser("bench", help="time our paths against their anchors into OUT/bench/")
    bench.add_argument("--quick", action="store_true",
                       help="small shapes, few repetitions (<= ~1 min on 2 CPU cores)")
    bench.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results)")
    bench.add_argument("--group", action="append", choices=BENCH_GROUPS, metavar="GROUP",
                       help=f"measure only this group (repeatable): {', '.join(BENCH_GROUPS)}; default all")
    for sub in (commands.choices[name] for name in ("list", "run", "report", "bench")):
        _add_debug(sub, argparse.SUPPRESS)
    return parser


def _cmd_list() -> int:
    from jaxopt_lab.lab.experiment import available_experiments

    experiments = available_experiments()
    width = max(map(len, experiments), default=0)
    for name, exp in experiments.items():
        print(f"{name:<{width}}  {exp.description}")
    return 0


def _writable_folder(out: Path) -> None:
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
    from jaxopt_lab.lab.data import BUILTIN_DATASETS, load_dataset

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


def _cmd_run(parser: _Parser, args: argparse.Namespace) -> int:
    finished: list[str] = []
    current: str | None = None
    names: list[str] = []
    try:
        from jaxopt_lab.lab.experiment import DATA_PARALLEL_MODES, available_experiments, run_experiment
        from jaxopt_lab.lab.report import write_report

        experiments = available_experiments()
        unknown = [n for n in args.names if n != "all" and n not in experiments]
        if unknown:
            parser.error(f"unknown experiment {unknown[0]!r}; choose from: all, {', '.join(experiments)}")
        names = list(experiments) if "all" in args.names else list(dict.fromkeys(args.names))
        if args.data is not None:
            _check_data(args.data)
        _writable_folder(args.out)
        data_path = None if args.data is None else Path(args.data)
        for name in names:
            print(f"[jaxopt-lab] running {name}{' (quick)' if args.quick else ''} ...", flush=True)
            current = name
            elapsed = run_experiment(experiments[name], args.out, quick=args.quick, seed=args.seed,
                                     show_progress=not args.no_progress, data_path=data_path,
                                     data_parallel=DATA_PARALLEL_MODES[args.data_parallel])
            finished.append(name)
            current = None
            print(f"[jaxopt-lab] {name}: done in {elapsed:.1f} s -> {args.out / name}/", flush=True)
        report = write_report(args.out)
    except KeyboardInterrupt as err:
        pending = names[len(finished) + (current is not None):]
        raise _Interrupted(_interrupted_line(args.out, finished, current, pending)) from err
    print(f"[jaxopt-lab] report: {report}", flush=True)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from jaxopt_lab.lab.report import write_report

    try:
        report = write_report(args.out)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise UsageError(f"--out {args.out}: {err}") from err
    print(report)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from jaxopt_lab.lab.bench import run_benchmarks

    _writable_folder(args.out)
    folder = run_benchmarks(args.out, quick=args.quick, groups=args.group)
    print(f"[jaxopt-lab] bench: {folder}/summary.md", flush=True)
    return 0


def _inside(name: object, folder: Path) -> bool:
    if not isinstance(name, (str, os.PathLike)):
        return False
    path, folder = Path(os.path.abspath(name)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def _user_path_error(err: OSError, args: argparse.Namespace) -> str | None:
    """One line for an OS error on a path the user gave (``--out``, ``--data``), else None (a bug)."""
    expected = {"--out": "a folder you can write to", "--data": "a readable .npz file"}
    for flag, given in (("--out", getattr(args, "out", None)), ("--data", getattr(args, "data", None))):
        for name in (err.filename, err.filename2):
            if given is not None and _inside(name, Path(given)):
                return f"{flag} {given}: {err.strerror or err}: {name}; expected {expected[flag]}"
    return None


@contextlib.contextmanager
def _one_line_warnings(prog: str) -> Iterator[None]:
    """Warnings as ``prog: warning: MESSAGE`` lines on stderr (restored on exit)."""
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr if file is None else file, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _interrupts_not_swallowed() -> Iterator[None]:
    """Makes Ctrl-C interrupt even when it lands in a garbage-collector callback.

    Python runs a signal's handler at the next bytecode, which may belong to a ``gc.callbacks`` function
    (JAX registers one); an exception raised there is "ignored" (printed and dropped), so the
    ``KeyboardInterrupt`` would be lost and the run would go on. Such a drop reaches
    ``sys.unraisablehook``, which interrupts the main thread again a moment later, once the callback
    is over (from a timer thread: raising the signal at once would land in the hook itself).
    """
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_type, type) and issubclass(unraisable.exc_type, KeyboardInterrupt):
            retry = threading.Timer(0.01, _thread.interrupt_main, args=(signal.SIGINT,))
            retry.daemon = True
            retry.start()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _exit_now(status: int) -> NoReturn:
    """Ends the process at once, skipping the interpreter's teardown (after a flush of stdout/stderr)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def main(argv: Sequence[str] | None = None, *, exit_on_interrupt: bool | None = None) -> int:
    """Runs the CLI on ``argv`` (default ``sys.argv[1:]``) and returns the exit status.

    Returns 0 on success and 130 after Ctrl-C (one line on stderr). A usage error prints one line on
    stderr and raises ``SystemExit(2)``, as argparse does for a bad flag. With ``--debug`` or
    ``JAXOPT_LAB_DEBUG=1``, usage errors and Ctrl-C show their traceback instead.

    ``exit_on_interrupt`` (default: when ``argv`` is None, i.e. run as the ``jaxopt-lab`` program) ends
    the process with status 130 right after Ctrl-C instead of returning: a computation that XLA was
    running when the interrupt came keeps running on its threads, and the interpreter's teardown
    would destroy the runtime under it (a segmentation fault after the one line). The results are safe
    by then: the interrupted experiment's staging folder is gone and every finished file was written.
    """
    exit_on_interrupt = argv is None if exit_on_interrupt is None else exit_on_interrupt
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    prog, args = "jaxopt-lab", argparse.Namespace()
    with _interrupts_not_swallowed():
        try:
            parser = _build_parser()
            args = parser.parse_args(argv)
            debug = debug or args.debug
            prog = f"{parser.prog} {args.command}"
            commands = {"list": _cmd_list, "run": lambda: _cmd_run(parser, args),
                        "report": lambda: _cmd_report(args), "bench": lambda: _cmd_bench(args)}
            with contextlib.nullcontext() if debug else _one_line_warnings(prog):
                return commands[args.command]()
        except UsageError as err:
            if debug:
                raise
            print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except OSError as err:
            line = _user_path_error(err, args)
            if debug or line is None:
                raise
            print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except KeyboardInterrupt as err:
            if debug and not exit_on_interrupt:
                raise
            if debug:
                traceback.print_exc()
            else:
                print(f"{prog}: {err if isinstance(err, _Interrupted) else 'interrupted'}", file=sys.stderr,
                      flush=True)
            if exit_on_interrupt:
                _exit_now(130)
            return 130


if __name__ == "__main__":  # `python -m jaxopt_lab.lab.cli`: run the imported module, not a second copy of it
    from jaxopt_lab.lab.cli import main as _main

    raise SystemExit(_main())
