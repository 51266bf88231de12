"""The CLI on a user's mistakes and on Ctrl-C: one line, exit 2 or 130, no traceback unless --debug.

Most cases call ``cli.main`` in-process (a usage error raises ``SystemExit(2)``, as argparse does); the
ones that need a real process -- a traceback on stderr, a folder root could write into, SIGINT -- run
the CLI in a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxopt_lab.lab import cli, data, program, runner

CLI = [sys.executable, "-m", "jaxopt_lab.lab.cli"]


def _arrays(**changes):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(12, 4, 4)), y_train=np.arange(12) % 3,
                  x_test=rng.normal(size=(6, 4, 4)), y_test=np.arange(6) % 3)
    return {k: v for k, v in {**arrays, **changes}.items() if v is not None}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return _one_line(capsys.readouterr().err)


def _bad_data(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "bad.npz"
    if kind == "text":
        path.write_text("x_train,y_train\n1,2\n")
    elif kind == "npy":
        with path.open("wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "missing-arrays":
        np.savez(path, **_arrays(x_test=None, y_test=None))
    elif kind == "nan":
        x = _arrays()["x_train"]
        x[0, 1, 2] = np.nan
        np.savez(path, **_arrays(x_train=x))
    elif kind == "one-class":
        np.savez(path, **_arrays(y_train=np.full(12, 99), y_test=np.full(6, 99)))
    elif kind == "float-labels":
        np.savez(path, **_arrays(y_train=np.zeros(12, np.float32)))
    elif kind != "absent":
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind, expected", [
    ("absent", "no such file"),
    ("text", "not a readable .npz archive: not a zip file"),
    ("npy", "single array"),
    ("missing-arrays", "lacks the array(s) x_test, y_test"),
    ("nan", "x_train holds NaN or infinite values"),
    ("one-class", "every training label is 99; expected y_train to cover at least 2 classes"),
    ("float-labels", "integer class labels"),
])
def test_bad_data_is_one_line_before_anything_runs(tmp_path, capsys, kind, expected):
    out = tmp_path / "out"
    line = _usage_error(["run", "hand-backprop", "--quick", "--no-progress", "--out", str(out),
                         "--data", str(_bad_data(tmp_path, kind))], capsys)
    assert line.startswith("jaxopt-lab run: error: --data: ") and expected in line, line
    assert not out.exists()  # checked before the results folder is even created


def test_out_on_a_file_or_below_one(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    line = _usage_error(["run", "hand-backprop", "--out", str(afile)], capsys)
    assert line == f"jaxopt-lab run: error: --out {afile}: is a file; expected a folder (created if missing)"
    line = _usage_error(["run", "hand-backprop", "--out", str(afile / "sub")], capsys)
    assert f"--out {afile / 'sub'}: cannot write there (Not a directory)" in line
    line = _usage_error(["report", "--out", str(afile)], capsys)
    assert f"--out {afile}: report: {afile} is a file" in line
    line = _usage_error(["bench", "--quick", "--out", str(afile)], capsys)
    assert f"--out {afile}: is a file" in line
    assert afile.read_text() == "mine\n"


def test_real_process_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = _bad_data(tmp_path, "text")
    argv = [*CLI, "run", "hand-backprop", "--quick", "--out", str(tmp_path / "out"), "--data", str(bad)]
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert _one_line(proc.stderr).startswith("jaxopt-lab run: error: --data: load_npz: ")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**env, cli.DEBUG_ENV: "1"})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ValueError: load_npz: " in proc.stderr
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith("jaxopt_lab.lab.program.UsageError: --data: load_npz: ")


@pytest.mark.parametrize("argv", [["--debug", "run", "hand-backprop"], ["run", "hand-backprop", "--debug"]])
def test_debug_flag_raises_with_the_cause(tmp_path, argv):
    with pytest.raises(cli.UsageError, match="--data: load_npz") as exc:
        cli.main([*argv, "--out", str(tmp_path), "--data", str(_bad_data(tmp_path, "nan"))])
    assert isinstance(exc.value.__cause__, ValueError)


def test_debug_env_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(cli.UsageError, match="is a file"):
        cli.main(["run", "hand-backprop", "--out", str(_bad_data(tmp_path, "npy"))])
    monkeypatch.setenv(cli.DEBUG_ENV, "0")  # "0" means off
    with pytest.raises(SystemExit):
        cli.main(["run", "hand-backprop", "--out", str(_bad_data(tmp_path, "npy"))])


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Only input errors are shortened: an exception from inside an experiment propagates unchanged."""
    def broken(*args, **kwargs):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(runner, "run_experiment", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["run", "hand-backprop", "--out", str(tmp_path)])

    def elsewhere(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "not-the-out-folder"))

    monkeypatch.setattr(runner, "run_experiment", elsewhere)
    with pytest.raises(FileNotFoundError):
        cli.main(["run", "hand-backprop", "--out", str(tmp_path / "out")])


def test_os_error_inside_the_out_folder_during_a_run_is_the_users(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def disk_full(experiment_, out_, **kwargs):
        raise OSError(28, "No space left on device", str(Path(out_) / "hand-backprop" / "metrics.json"))

    monkeypatch.setattr(runner, "run_experiment", disk_full)
    line = _usage_error(["run", "hand-backprop", "--out", str(out)], capsys)
    assert line == (f"jaxopt-lab run: error: --out {out}: No space left on device: "
                    f"{out / 'hand-backprop' / 'metrics.json'}; expected a folder you can write to")


# --- a folder one cannot write to (root can write anywhere: its subprocess drops that capability) ----

_NO_ROOT_OVERRIDE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: out of the bounding set, so exec drops them
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
os.execv(sys.argv[1], sys.argv[1:])
"""


def _run_as_plain_user(argv):
    wrapper = [sys.executable, "-c", _NO_ROOT_OVERRIDE] if os.geteuid() == 0 else []
    return subprocess.run([*wrapper, *argv], capture_output=True, text=True, timeout=300)


def test_out_in_a_read_only_folder(tmp_path):
    readonly = tmp_path / "readonly"
    (readonly / "old-results").mkdir(parents=True)
    (readonly / "old-results" / "summary.md").write_text("# old\n")
    readonly.chmod(0o555)
    try:
        for out in (readonly, readonly / "new"):
            proc = _run_as_plain_user([*CLI, "run", "hand-backprop", "--quick", "--out", str(out)])
            assert proc.returncode == 2, proc.stderr
            assert _one_line(proc.stderr) == (f"jaxopt-lab run: error: --out {out}: cannot write there "
                                              f"(Permission denied); expected a folder you can write to "
                                              f"(created if missing)")
        # `report` fails only when it writes REPORT.md (an OSError inside --out, caught as the user's).
        proc = _run_as_plain_user([*CLI, "report", "--out", str(readonly)])
        assert proc.returncode == 2, proc.stderr
        line = _one_line(proc.stderr)
        expected = f"jaxopt-lab report: error: --out {readonly}: Permission denied: {readonly}/"
        assert line.startswith(expected) and line.endswith("expected a folder you can write to"), line
        assert sorted(p.name for p in readonly.iterdir()) == ["old-results"]
    finally:
        readonly.chmod(0o755)


# --- warnings -----------------------------------------------------------------------------------------

def test_labels_that_skip_classes_warn_in_one_line(tmp_path, capsys):
    path = tmp_path / "skip.npz"
    np.savez(path, **_arrays(y_train=np.array([0, 1, 2, 4, 5, 6, 8, 9] * 2)[:12]))
    out = tmp_path / "out"
    assert cli.main(["run", "hand-backprop", "--quick", "--no-progress", "--out", str(out),
                     "--data", str(path)]) == 0
    err = capsys.readouterr().err
    assert _one_line(err) == (f"jaxopt-lab run: warning: load_npz: {path}: 2 of the 10 classes (0..9: labels "
                              f"count from 0 up to the largest) have no training example: 3, 7; relabel to "
                              f"0..K-1 unless the model should have those outputs")
    assert (out / "hand-backprop" / "summary.md").is_file()


def test_one_line_warnings_show_a_repeated_warning_once_and_restore_the_default(tmp_path, capsys):
    path = tmp_path / "skip.npz"
    np.savez(path, **_arrays(y_train=np.arange(12) % 3 * 2))  # classes 0, 2, 4: 1 and 3 never trained
    previous = warnings.showwarning
    with program._one_line_warnings("jaxopt-lab run"):
        warnings.simplefilter("default")  # what a plain `python` process has for UserWarning
        data.load_dataset(path)  # the CLI's up-front check ...
        data.load_dataset(path)  # ... and the experiment's own load: one warning, not two
    assert warnings.showwarning is previous
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("jaxopt-lab run: warning: load_npz: ") and "have no training example: 1, 3;" in line


# --- Ctrl-C ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where, expected", [
    ("check", "interrupted before any experiment started (nothing written)"),
    ("during", "interrupted during optimizer-grid (nothing of it written); finished and kept in {out}/: "
               "hand-backprop; not run: learning-rate; {out}/REPORT.md not updated "
               "(`jaxopt-lab report --out {out}` rebuilds it)"),
    ("between", "interrupted before learning-rate started; finished and kept in {out}/: hand-backprop, "
                "optimizer-grid; not run: learning-rate; {out}/REPORT.md not updated "
                "(`jaxopt-lab report --out {out}` rebuilds it)"),
    ("report", "interrupted while writing the report; finished and kept in {out}/: hand-backprop, "
               "optimizer-grid, learning-rate; {out}/REPORT.md not updated "
               "(`jaxopt-lab report --out {out}` rebuilds it)"),
])
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "wrapped"])
def test_interrupt_line_says_what_finished(tmp_path, monkeypatch, capsys, where, expected, wrapped):
    """Ctrl-C at each point of `run` (simulated in-process: the real signal is tested below), bare or
    wrapped as JAX wraps one that lands while it compares pytree metadata."""
    def interrupt(*args, **kwargs):
        if not wrapped:
            raise KeyboardInterrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise ValueError("Exception raised while checking equality of metadata fields of pytree") from err

    def fake_run(exp, out, **kwargs):
        if where == "during" and exp.name == "optimizer-grid":
            interrupt()
        return 0.0

    def fake_print(*args, **kwargs):
        if where == "between" and "running learning-rate" in str(args[0]):
            interrupt()
        print(*args, **kwargs)

    monkeypatch.setattr(runner, "run_experiment", fake_run)
    monkeypatch.setattr(runner, "print", fake_print, raising=False)
    if where == "check":
        monkeypatch.setattr(runner, "writable_folder", interrupt)
    if where == "report":
        monkeypatch.setattr(runner, "write_report", interrupt)
    out = tmp_path / "out"
    assert cli.main(["run", "hand-backprop", "optimizer-grid", "learning-rate", "--out", str(out)]) == 130
    assert _one_line(capsys.readouterr().err) == "jaxopt-lab run: " + expected.format(out=out)


def test_caused_by_interrupt_follows_cause_and_context_and_stops_on_a_cycle():
    def raised(make):
        try:
            make()
        except BaseException as err:
            return err
        raise AssertionError("nothing raised")

    def from_interrupt(kind, explicit):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            if explicit:
                raise kind("wrapped") from err
            raise kind("while handling")  # noqa: B904 - the implicit __context__ is what is tested

    assert program.caused_by_interrupt(KeyboardInterrupt())
    assert program.caused_by_interrupt(program.Interrupted("line"))
    for kind in (ValueError, program.UsageError, OSError):
        assert program.caused_by_interrupt(raised(lambda k=kind: from_interrupt(k, True)))
        assert program.caused_by_interrupt(raised(lambda k=kind: from_interrupt(k, False)))
    assert not program.caused_by_interrupt(raised(lambda: int("x")))
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert not program.caused_by_interrupt(a)


def test_interrupt_wrapped_in_a_usage_error_is_still_ctrl_c(capsys):
    """A usage check (``--set`` builds the model) that Ctrl-C interrupts is not reported as the user's error."""
    def dispatch(parser, args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise program.UsageError("--set: cannot build the model") from err

    assert program.run_program(_build_parser, dispatch, []) == 130
    assert _one_line(capsys.readouterr().err) == "prog: interrupted"


def _build_parser():
    parser = program.Parser(prog="prog")
    program.add_debug(parser, default=False)
    return parser


def test_ctrl_c_swallowed_by_library_code_is_delivered_again(capsys):
    """A real SIGINT whose KeyboardInterrupt a bare ``except:`` drops (as JAX's shape helpers do) still ends
    the program: the main thread is interrupted again until an interrupt gets through."""
    swallowed = []

    def dispatch(parser, args):
        deadline = time.monotonic() + 10  # fails rather than hangs if nothing is delivered again
        while time.monotonic() < deadline:
            try:
                if not swallowed:
                    os.kill(os.getpid(), signal.SIGINT)  # handled at once, inside this try
            except:  # noqa: E722 - what the library code under test does
                swallowed.append(1)
            time.sleep(0.001)
        return 0

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # else nothing is taken over
    previous_hook = sys.unraisablehook
    assert program.run_program(_build_parser, dispatch, []) == 130
    assert swallowed  # the first interrupt was dropped, a later one got through
    assert _one_line(capsys.readouterr().err) == "prog: interrupted"
    # Restored: a repeat still pending at the end does not reach the caller.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and sys.unraisablehook is previous_hook
    time.sleep(3 * program.REDELIVER_S)


def test_ctrl_c_dropped_in_a_gc_callback_is_not_printed(capsys):
    class Unraisable:  # what Python passes for an exception raised in a gc callback
        exc_type, exc_value, exc_traceback = KeyboardInterrupt, KeyboardInterrupt(), None
        err_msg = object = None

    def dispatch(parser, args):
        sys.unraisablehook(Unraisable())
        return 0

    assert program.run_program(_build_parser, dispatch, []) == 0
    assert capsys.readouterr().err == ""


def test_sigint_mid_run_keeps_finished_experiments_and_prints_one_line(tmp_path):
    """A real SIGINT in a subprocess while the second experiment runs (its folder must not appear)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "run", "hand-backprop", "optimizer-grid", "learning-rate", "--quick",
                             "--no-progress", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV})
    watchdog = threading.Timer(240, proc.kill)  # a hung child fails the test instead of hanging it
    watchdog.start()
    try:
        stdout = []
        for line in proc.stdout:  # type: ignore[union-attr]
            stdout.append(line)
            if "running optimizer-grid" in line:
                break
        time.sleep(1.0)  # inside optimizer-grid (about 10 s in --quick)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=200)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 130, "".join(stdout) + rest + err
    assert _one_line(err) == (f"jaxopt-lab run: interrupted during optimizer-grid (nothing of it written); "
                              f"finished and kept in {out}/: hand-backprop; not run: learning-rate; "
                              f"{out}/REPORT.md not updated (`jaxopt-lab report --out {out}` rebuilds it)")
    assert sorted(p.name for p in out.iterdir()) == ["hand-backprop"]  # no staging folder, no REPORT.md
    kept = {p.name for p in (out / "hand-backprop").iterdir()}
    assert {"metrics.json", "summary.md", "gradients.png"} <= kept
