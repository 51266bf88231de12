"""The runner: one experiment into OUT/NAME with metrics.json, summary.md and its figures, or nothing."""

import importlib.metadata
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from jaxopt_lab.lab import report, runner
from jaxopt_lab.lab.experiment import Experiment, RunContext
from jaxopt_lab.lab.plotting import new_figure, plot_loss_curves


def _toy_run(ctx: RunContext) -> None:
    fig, axes = new_figure()
    plot_loss_curves(axes[0, 0], [[3.0, 2.0, 1.0], [1.0, 1e3, np.nan]], ["ok", "bad"],
                     diverged_at=[None, 2])
    ctx.save_figure(fig, "curves.png")
    ctx.set_metrics({"quick": ctx.quick}, {"value": 1.0})
    ctx.set_summary("# toy\n\n![curves](curves.png)\n")


def test_run_experiment_writes_the_contract_files(tmp_path):
    toy = Experiment("toy", "a toy", _toy_run, lambda: None)
    runner.run_experiment(toy, tmp_path, quick=True, seed=3, show_progress=False)
    meta = json.loads((tmp_path / "toy" / "metrics.json").read_text())
    assert meta["seed"] == 3 and meta["quick"] is True and meta["metrics"] == {"value": 1.0}
    env = meta["environment"]
    assert env["backend"] and meta["figures"] == ["curves.png"]
    assert {"jax", "jaxlib", "flax", "optax", "numpy", "device_kind", "commit"} <= set(env)
    assert all(env[name] == importlib.metadata.version(name) for name in ("flax", "optax", "numpy"))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                          text=True).stdout.strip()
    assert env["commit"] in (head, head + "+dirty")  # the checkout these tests run from
    summary = (tmp_path / "toy" / "summary.md").read_text()
    assert "jaxopt-lab run toy --quick --seed 3" in summary and f"code {env['commit'][:12]}" in summary
    out = report.write_report(tmp_path)
    text = out.read_text()
    assert "![curves](toy/curves.png)" in text and "## toy" in text


def test_experiment_without_outputs_fails_and_leaves_nothing(tmp_path):
    lazy = Experiment("lazy", "writes nothing", lambda ctx: None, lambda: None)
    with pytest.raises(RuntimeError, match="metrics, summary, a figure"):
        runner.run_experiment(lazy, tmp_path, quick=True, seed=0, show_progress=False)
    assert not (tmp_path / "lazy").exists()
