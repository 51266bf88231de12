"""The four optimizer experiments end to end through the CLI, in --quick mode."""

import json

import pytest

from jaxopt_lab.lab import cli

pytestmark = pytest.mark.slow_e2e


def _run(name, out, seed=0):
    assert cli.main(["run", name, "--quick", "--no-progress", "--out", str(out), "--seed", str(seed)]) == 0
    folder = out / name
    meta = json.loads((folder / "metrics.json").read_text())
    summary = (folder / "summary.md").read_text()
    for figure in meta["figures"]:
        assert (folder / figure).stat().st_size > 10_000 and f"]({figure})" in summary
    return meta, summary


def test_optimizer_grid(tmp_path):
    meta, summary = _run("optimizer-grid", tmp_path)
    cells = meta["metrics"]["cells"]
    assert set(cells) == {"sgd", "momentum", "rmsprop", "adam"}
    assert set(cells["sgd"]) == {"0.001", "0.01", "0.1", "1.0"}
    limit = meta["metrics"]["problem"]["gd_stability_limit_lr"]
    assert 0.1 < limit < 1.0  # so SGD must converge at 0.1 and diverge at 1:
    assert cells["sgd"]["1.0"]["diverged"] == cells["sgd"]["1.0"]["runs"]
    assert cells["sgd"]["0.1"]["reached"] == cells["sgd"]["0.1"]["runs"]
    assert cells["sgd"]["0.1"]["median_steps"] < cells["sgd"]["0.01"]["median_steps"]
    assert "seed reported" in summary and "goal in ~150 steps" in summary and "holds?" in summary
    # deterministic for a given seed
    again, _ = _run("optimizer-grid", tmp_path / "again")
    assert again["metrics"] == meta["metrics"]


def test_learning_rate(tmp_path):
    meta, summary = _run("learning-rate", tmp_path)
    m = meta["metrics"]
    assert m["examples"]["too low"]["diagnosis"].startswith("too slow")
    assert m["examples"]["too high"]["diagnosis"].startswith("diverging")
    assert m["examples"]["good (grid's best)"]["diagnosis"].startswith("ok")
    assert m["best"]["sgd"]["learning_rate"] < m["stability_limit_2_over_lambda_max"]
    assert 0 < m["range_test"]["suggestion_steepest"] < m["best"]["sgd"]["learning_rate"] * 10
    assert "LR range test" in summary


def test_saddle_points(tmp_path):
    meta, summary = _run("saddle-points", tmp_path)
    verdicts = meta["metrics"]["verdicts"]
    assert verdicts["claim1_trapped_without_noise"]  # on the stable manifold nothing escapes without noise
    hyperbolic = verdicts["claim1_noise"]["hyperbolic"]
    assert all(v["with_noise"] == v["runs"] for v in hyperbolic.values())  # and noise frees every run there
    assert "Claim 1" in summary and "Claim 2" in summary and "Escape criterion" in summary


def test_batch_vs_minibatch(tmp_path):
    meta, summary = _run("batch-vs-minibatch", tmp_path)
    rows = meta["metrics"]["by_batch_size"]
    full = next(r for label, r in rows.items() if label.startswith("full batch"))
    single = rows["mini-batch 1"]
    assert full["increase_fraction"] == 0.0 and single["increase_fraction"] > 0.3
    assert single["roughness"] > 10 * full["roughness"]
    assert single["epochs_to_target_median"] < full["epochs_to_target_median"]
    assert "two_panel.png" in meta["figures"] and "smooth" in summary
