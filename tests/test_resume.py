"""Resumable runs: a real SIGINT part-way through an experiment, then ``--resume``, ends with the numbers of
an uninterrupted run; and ``--set`` / ``jaxopt-lab config`` / ``jaxopt-lab plot`` around it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxopt_lab.lab import checkpoints, cli
from jaxopt_lab.lab.registry import available_experiments

# A test-only size of the normalization experiment, through the same code path: 9 configurations
# (5 CNN norms, the MLP, 3 GRUs; with one rate and no widening BN's own rate is the speed claim's shared
# rate, so that arm reuses BN's runs), 20 steps each, one search seed and one replicate seed.
TINY = ["--set", "steps=20", "--set", "batch_sizes=32", "--set", "group_counts=4", "--set", "seeds=1",
        "--set", "learning_rates=3e-3,", "--set", "widen=0"]
RUN = ["run", "normalization", "--quick", "--no-progress", *TINY]


def _metrics(out: Path) -> dict:
    return json.loads((out / "normalization" / "metrics.json").read_text())


@pytest.mark.slow_e2e
def test_sigint_then_resume_equals_a_clean_run_whose_overrides_are_recorded(tmp_path, capsys):
    out = tmp_path / "interrupted"
    resume_dir = out / checkpoints.RESUME_DIR / "normalization"
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "jaxopt_lab.lab.cli", *RUN, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 600
        while not (resume_dir.is_dir() and len(list(resume_dir.glob("*.msgpack"))) >= 3):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no configuration finished in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    finished = len(list(resume_dir.glob("*.msgpack")))
    assert 3 <= finished < 9 and not (out / "normalization").exists()  # kept: the checkpoints, not a result

    assert cli.main([*RUN, "--out", str(out), "--resume"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "--resume reused" in line)
    assert f"reused {finished} of 9 finished configurations" in line
    assert not resume_dir.exists()  # the experiment finished: its checkpoints are gone
    resumed = _metrics(out)
    assert resumed["resumed"] == {"reused": finished, "configurations": 9}

    clean = tmp_path / "clean"
    assert cli.main([*RUN, "--out", str(clean)]) == 0
    # Every number, test accuracies included, and the same file, byte for byte, but for time and resume.
    assert resumed["metrics"] == _metrics(clean)["metrics"]
    text = lambda folder: (folder / "normalization" / "metrics.json").read_text()
    assert text(out).split('"metrics"')[1] == text(clean).split('"metrics"')[1]
    with np.load(out / "normalization" / "histories.npz") as a, np.load(clean / "normalization" /
                                                                          "histories.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a.files)
    _check_overrides_are_recorded_and_plot_redraws_without_training(clean)


def _check_overrides_are_recorded_and_plot_redraws_without_training(out: Path) -> None:
    # Checked on the clean run above rather than on a run of its own: one compile-bound run less.
    meta = _metrics(out)
    assert meta["overrides"] == [a for a in TINY if a != "--set"]
    assert meta["config"]["steps"] == 20 and meta["config"]["seeds"] == 1
    summary = (out / "normalization" / "summary.md").read_text()
    assert "--set steps=20 --set batch_sizes=32" in summary  # the reproduce line
    with np.load(out / "normalization" / "histories.npz") as h:
        assert h["cnn/batch/b32/step_loss"].shape == (2, 20) and h["cnn/batch/b32/test_accuracy"].shape[0] == 2
    for figure in meta["figures"]:
        (out / "normalization" / figure).unlink()
    assert cli.main(["plot", "normalization", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "normalization").glob("*.png")) == sorted(meta["figures"])


def test_a_run_without_resume_starts_fresh(tmp_path):
    stale = checkpoints.Checkpoints(tmp_path / checkpoints.RESUME_DIR / "x", resume=False, run_key={"seed": 0})
    stale.cached("a", {}, lambda: {"v": 1})
    assert checkpoints.Checkpoints(stale.folder, resume=False, run_key={"seed": 0}).cached(
        "a", {}, lambda: {"v": 2}) == {"v": 2}


def test_a_checkpoint_is_reused_only_when_its_key_matches(tmp_path):
    first = checkpoints.Checkpoints(tmp_path / "x", resume=False, run_key={"seed": 0})
    first.cached("a", {"lr": 0.1}, lambda: {"v": 1})
    for run_key, key in (({"seed": 1}, {"lr": 0.1}), ({"seed": 0}, {"lr": 0.2})):
        again = checkpoints.Checkpoints(tmp_path / "x", resume=True, run_key=run_key)
        assert again.cached("a", key, lambda: {"v": 2}) == {"v": 2} and again.reused == 0
    same = checkpoints.Checkpoints(tmp_path / "x", resume=True, run_key={"seed": 0})
    assert same.cached("a", {"lr": 0.1}, lambda: {"v": 3}) == {"v": 1} and same.reused == 1


@pytest.mark.parametrize("argv, expected", [
    (["run", "normalization", "--set", "stepz=40"], "--set stepz=40: unknown key; valid keys: batch_sizes,"),
    (["run", "normalization", "--set", "steps=abc"], "--set steps=abc: expected an int for steps"),
    (["run", "normalization", "--set", "steps=30"], "steps a positive multiple of 20"),
    (["run", "hand-backprop", "--set", "steps=3"], "hand-backprop has no config to set"),
    (["config", "normalization", "--set", "seeds"], "--set seeds: expected KEY=VALUE"),
])
def test_a_bad_set_is_one_line_with_exit_status_2(argv, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", str(tmp_path)] if argv[0] == "run" else argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_config_prints_the_resolved_config(capsys):
    assert cli.main(["config", "normalization", "--quick", "--set", "seeds=1", "--set", "steps=40"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["mode"] == "quick" and shown["overrides"] == ["seeds=1", "steps=40"]
    assert shown["config"]["seeds"] == 1 and shown["config"]["steps"] == 40
    quick = available_experiments()["normalization"].config.for_mode(True)
    assert shown["config"]["batch_sizes"] == list(quick.batch_sizes)
    # An empty value is the empty tuple: no GRU.
    assert cli.main(["config", "normalization", "--quick", "--set", "rnn_batch_sizes="]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["rnn_batch_sizes"] == []
