"""The baselines experiment: its configs build, and a tiny run end to end writes the table and endpoint."""

import json

import pytest
from jaxopt_lab.lab.experiments import baselines

from jaxopt_lab.lab import models, runner


def test_check_configs_builds_every_quick_and_full_model_and_optimizer():
    baselines.check_configs()


def test_check_configs_catches_a_budget_that_cannot_run(monkeypatch):
    broken = baselines.Part("digits", ("MLP",), steps=10, batch_size=2000)  # more than the 1,078 train images
    monkeypatch.setattr(baselines, "FULL", baselines.Config(parts=(broken,), seeds=1, learning_rates=(1e-2,)))
    with pytest.raises(ValueError, match="batch_size=2000"):
        baselines.check_configs()


def test_a_tiny_quick_run_writes_the_table_the_endpoint_and_the_figures(tmp_path, monkeypatch):
    tiny = baselines.Config(parts=(baselines.Part("mnist1d", ("logistic",), steps=20, batch_size=50),
                                   baselines.Part("digits", ("MLP", "CNN"), steps=10, batch_size=32)),
                            seeds=2, learning_rates=(1e-3, 1e-2), widen=1)
    monkeypatch.setattr(baselines, "QUICK", tiny)
    small = {"CNN": lambda num_classes: models.CNN(norm="none", num_classes=num_classes, widths=(8,)),
             "MLP": lambda num_classes: models.MLP(num_classes=num_classes, widths=(16,))}
    monkeypatch.setattr(baselines, "MODELS", {**baselines.MODELS, **small})
    runner.run_experiment(baselines.EXPERIMENT, tmp_path, quick=True, seed=0, show_progress=False)

    out = tmp_path / "baselines"
    metrics = json.loads((out / "metrics.json").read_text())
    runs = metrics["metrics"]["runs"]
    assert [(r["dataset"], r["model"]) for r in runs] == [("mnist1d", "logistic"), ("digits", "MLP"),
                                                         ("digits", "CNN")]
    for r in runs:
        # widen=1: at most one rate added, 3x beyond the edge the choice sat at; an edge choice is marked.
        rates = [row["learning_rate"] for row in r["rate_table"]]
        assert rates[:2] in ([1e-3, 1e-2], [1e-3 / 3, 1e-3]) and len(rates) in (2, 3)
        assert len(rates) == 2 or rates in ([1e-3, 1e-2, 3e-2], [1e-3 / 3, 1e-3, 1e-2])
        assert sum(row["chosen"] for row in r["rate_table"]) == 1
        chosen = rates.index(r["learning_rate"])
        assert (r["rate_at_edge"] is None) == (0 < chosen < len(rates) - 1)
        assert set(r["test_accuracy"]) == {"mean", "std", "values"} and len(r["test_accuracy"]["values"]) == 2
        assert isinstance(r["loss_flattened"], bool) and r["flattened_window_steps"] >= 2
    assert runs[0]["paper_accuracy"] == 0.32 and runs[1]["paper_accuracy"] is None
    verdicts = metrics["metrics"]["verdicts"]
    assert set(verdicts) == {"cnn_at_least_mlp_digits", "gap_points_logistic"}
    summary = (out / "summary.md").read_text()
    heading, mode_line = summary.splitlines()[:2]  # the runner's quick/full line under the heading, once
    assert heading.startswith("# baselines") and "quick" not in heading.lower()
    assert "Quick mode" in mode_line and "not conclusive" in mode_line
    endpoint = next(line for line in summary.splitlines() if line.startswith("**Endpoint.**"))
    assert "mnist1d: 20 Adam steps at batch 50" in endpoint and "digits: 10 Adam steps at batch 32" in endpoint
    assert "among 0.001, 0.01" in endpoint
    assert "train loss flattened" in summary and "| mnist1d | logistic |" in summary
    assert "Endpoint rule (the last column): flattened when" in summary
    for r in runs:
        if r["rate_at_edge"]:
            assert f"{r['learning_rate']:g} ({r['rate_at_edge']} tried)" in summary
    assert {"paper_comparison.png", "training_curves.png"} <= {p.name for p in out.iterdir()}
