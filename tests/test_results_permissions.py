"""Results are written with the permissions of a plain open/mkdir (0o666/0o777 less the umask), not the
0600/0700 of the temporary files and folders behind the atomic writes."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest

from jaxopt_lab.lab import cli, results

UMASKS = [pytest.param(0o022, 0o644, 0o755, id="umask022"), pytest.param(0o027, 0o640, 0o750, id="umask027")]


@contextlib.contextmanager
def _umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", UMASKS)
def test_atomic_writes_respect_the_umask(tmp_path, mask, file_mode, dir_mode):
    from jaxopt_lab.lab.plotting import new_figure

    old = tmp_path / "old.txt"
    old.write_text("written by an earlier version, private\n")
    old.chmod(0o600)
    with _umask(mask):
        results.atomic_write_text(tmp_path / "a.md", "text\n")
        results.atomic_write_json(tmp_path / "m.json", {"x": 1.0})
        results.atomic_write_text(old, "replaced\n")
        fig, _ = new_figure()
        results.save_figure(fig, tmp_path / "f.png")
        with results.staging_dir(tmp_path / "experiment") as staged:
            results.atomic_write_text(staged / "summary.md", "# done\n")
    for name in ("a.md", "m.json", "old.txt", "f.png", "experiment/summary.md"):
        assert _mode(tmp_path / name) == file_mode, (name, oct(_mode(tmp_path / name)))
    assert _mode(tmp_path / "experiment") == dir_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "experiment", "f.png", "m.json", "old.txt"]


def test_umask_is_read_without_proc_too(monkeypatch):
    calls = []

    def no_proc(*args, **kwargs):
        calls.append(args)
        raise OSError("no /proc here")

    with _umask(0o027):
        assert results._umask() == 0o027
        monkeypatch.setattr(results, "open", no_proc, raising=False)
        assert results._umask() == 0o027  # the set-and-restore fallback ...
        assert results._umask() == 0o027  # ... put it back
        assert len(calls) == 2


@pytest.mark.parametrize("mask, file_mode, dir_mode", UMASKS)
def test_cli_results_and_report_respect_the_umask(tmp_path, mask, file_mode, dir_mode):
    out = tmp_path / "results"
    with _umask(mask):
        assert cli.main(["run", "hand-backprop", "--quick", "--no-progress", "--out", str(out)]) == 0
    folder = out / "hand-backprop"
    assert _mode(out) == dir_mode and _mode(folder) == dir_mode
    for path in (out / "REPORT.md", folder / "metrics.json", folder / "summary.md", folder / "gradients.png"):
        assert _mode(path) == file_mode, (path, oct(_mode(path)))
