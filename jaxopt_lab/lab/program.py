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

__all__ = ["DEBUG_ENV", "Interrupted", "Parser", "UsageError", "add_debug", "caused_by_interrupt",
           "run_program", "user_path_error"]

DEBUG_ENV = "JAXOPT_LAB_DEBUG"  # set to anything but "" or "0": tracebacks for usage errors and Ctrl-C


class UsageError(Exception):
    """A mistake in the user's input (flags, files, folders): one line on stderr and exit status 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``run``, carrying the one line that says what finished and what did not."""


def caused_by_interrupt(err: BaseException | None) -> bool:
    """Whether ``err`` is Ctrl-C's ``KeyboardInterrupt`` or was raised from or while handling one.

    Library code may wrap whatever it catches: JAX turns an exception raised while it compares pytree
    metadata into a ``ValueError`` (``raise ... from``), so a Ctrl-C that lands there reaches us as one.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


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


REDELIVER_S = 0.1  # after a Ctrl-C, how often the main thread is interrupted again until the program ends


@contextlib.contextmanager
def _interrupts_delivered() -> Iterator[None]:
    """Makes one Ctrl-C end the program even where library code swallows its ``KeyboardInterrupt``.

    Python raises a signal's ``KeyboardInterrupt`` at the next bytecode, wherever that is: inside a bare
    ``except:`` of library code (JAX's shape helpers have several, and tracing calls them all the time),
    or in a ``gc.callbacks`` function, where it is printed as "ignored" and dropped. Either way the run
    would go on. So after a Ctrl-C the main thread is interrupted again every :data:`REDELIVER_S`
    seconds until the program ends. A repeat that finds a ``KeyboardInterrupt`` being handled (in an
    ``except`` or ``finally`` block, wrapped or not) does nothing: clean-up runs undisturbed. A dropped
    one is not printed; the next repeat delivers it.
    """
    # Only the main thread gets signals; a SIGINT ignored (a background job) or handled elsewhere is left so.
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    over = threading.Event()
    repeater: list[threading.Thread] = []

    def repeat() -> None:
        while not over.wait(REDELIVER_S):
            _thread.interrupt_main(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        if over.is_set() or caused_by_interrupt(sys.exception()):
            return
        if not repeater:
            repeater.append(threading.Thread(target=repeat, name="jaxopt-lab-ctrl-c", daemon=True))
            repeater[0].start()
        raise KeyboardInterrupt

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_type, type) and issubclass(unraisable.exc_type, KeyboardInterrupt)):
            previous_hook(unraisable)

    previous_hook = sys.unraisablehook
    signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        over.set()
        for thread in repeater:
            thread.join()
        # signal.signal runs a repeat still pending (ignored: `over` is set) before it swaps the handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook


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

    Returns 0 on success and 130 after Ctrl-C (one line on stderr), also when library code wrapped its
    ``KeyboardInterrupt`` in another exception (:func:`caused_by_interrupt`). A usage error prints one line on
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
    with _interrupts_delivered():
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            debug = debug or args.debug
            command = getattr(args, "command", None)
            prog = parser.prog if command is None else f"{parser.prog} {command}"
            with contextlib.nullcontext() if debug else _one_line_warnings(prog):
                return dispatch(parser, args)
        except BaseException as err:
            # Ctrl-C comes first: a usage or OS error raised from it (library code wraps) is still Ctrl-C.
            if caused_by_interrupt(err):
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
            line = (str(err) if isinstance(err, UsageError)
                    else user_path_error(err, args) if isinstance(err, OSError) else None)
            if debug or line is None:
                raise  # a bug, or --debug: the traceback
            print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
