"""How the ``jaxopt-lab`` program behaves around its commands: one-line errors, Ctrl-C, warnings.

A mistake in the user's input prints one line naming the flag, the problem and what was expected, and
exits with status 2. A warning is one ``warning:`` line. Ctrl-C prints one line and exits with status 130.
``--debug`` or ``JAXOPT_LAB_DEBUG=1`` shows the traceback and Python's usual warnings instead. Any other
exception is a bug and keeps its traceback. Used by :mod:`jaxopt_lab.lab.cli` and, for
``python experiments/NAME.py``, by :func:`jaxopt_lab.lab.runner.main_for`; standard library only.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["DEBUG_ENV", "Interrupted", "Parser", "UsageError", "add_debug", "run_program", "user_path_error"]

DEBUG_ENV = "JAXOPT_LAB_DEBUG"  # set to anything but "" or "0": tracebacks for usage errors and Ctrl-C


class UsageError(Exception):
    """A mistake in the user's input (flags, files, folders): one line on stderr and exit status 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``run``, carrying the one line that says what finished and what did not."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_debug(parser: argparse.ArgumentParser, default: Any) -> None:
    # Accepted before and after the command; a subcommand's SUPPRESS default keeps the main one's value.
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"show the traceback of a usage error or Ctrl-C (also: {DEBUG_ENV}=1)")


def _inside(name: object, folder: Path) -> bool:
    if not isinstance(name, (str, os.PathLike)):
        return False
    path, folder = Path(os.path.abspath(name)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def user_path_error(err: OSError, args: argparse.Namespace) -> str | None:
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


def run_program(build_parser: Callable[[], argparse.ArgumentParser],
                dispatch: Callable[[argparse.ArgumentParser, argparse.Namespace], int],
                argv: Sequence[str] | None = None, *, exit_on_interrupt: bool | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``) with ``build_parser()``, runs ``dispatch(parser, args)``
    and returns its exit status.

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
            parser = build_parser()
            args = parser.parse_args(argv)
            debug = debug or args.debug
            command = getattr(args, "command", None)
            prog = parser.prog if command is None else f"{parser.prog} {command}"
            with contextlib.nullcontext() if debug else _one_line_warnings(prog):
                return dispatch(parser, args)
        except UsageError as err:
            if debug:
                raise
            print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except OSError as err:
            line = user_path_error(err, args)
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
                print(f"{prog}: {err if isinstance(err, Interrupted) else 'interrupted'}", file=sys.stderr,
                      flush=True)
            if exit_on_interrupt:
                _exit_now(130)
            return 130
