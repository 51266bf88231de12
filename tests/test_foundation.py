"""The experiment contract, atomic results, the report and the CLI's error handling."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaxopt_lab.lab import cli, experiment, report, results
from jaxopt_lab.lab.experiment import Experiment, RunContext


def test_atomic_write_json_is_strict_and_converts_arrays(tmp_path):
    path = results.atomic_write_json(tmp_path / "a" / "m.json",
                                     {"x": np.arange(3), "nan": float("nan"), "f": np.float32(1.5),
                                      "t": (1, 2), "p": Path("p")})
    assert json.loads(path.read_text()) == {"x": [0, 1, 2], "nan": None, "f": 1.5, "t": [1, 2], "p": "p"}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temp file left behind


def test_to_jsonable_rejects_unknown_types():
    with pytest.raises(TypeError, match="object"):
        results.to_jsonable({"bad": object()})


def test_staging_dir_keeps_old_results_when_interrupted(tmp_path):
    final = tmp_path / "exp"
    with results.staging_dir(final) as staged:
        (staged / "metrics.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), results.staging_dir(final) as staged:
        (staged / "metrics.json").write_text("half-written")
        raise KeyboardInterrupt
    assert (final / "metrics.json").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["exp"]  # the failed staging folder was removed
    with results.staging_dir(final) as staged:
        (staged / "summary.md").write_text("new")
    assert sorted(os.listdir(final)) == ["summary.md"]  # re-running replaces cleanly


def _toy_run(ctx: RunContext) -> None:
    from jaxopt_lab.lab.plotting import new_figure, plot_loss_curves

    fig, axes = new_figure()
    plot_loss_curves(axes[0, 0], [[3.0, 2.0, 1.0], [1.0, 1e3, np.nan]], ["ok", "bad"],
                     diverged_at=[None, 2])
    ctx.save_figure(fig, "curves.png")
    ctx.set_metrics({"quick": ctx.quick}, {"value": 1.0})
    ctx.set_summary("# toy\n\n![curves](curves.png)\n")


def test_run_experiment_writes_the_contract_files(tmp_path):
    toy = Experiment("toy", "a toy", _toy_run)
    experiment.run_experiment(toy, tmp_path, quick=True, seed=3, show_progress=False)
    meta = json.loads((tmp_path / "toy" / "metrics.json").read_text())
    assert meta["seed"] == 3 and meta["quick"] is True and meta["metrics"] == {"value": 1.0}
    assert meta["environment"]["backend"] and meta["figures"] == ["curves.png"]
    summary = (tmp_path / "toy" / "summary.md").read_text()
    assert "jaxopt-lab run toy --quick --seed 3" in summary
    out = report.write_report(tmp_path)
    text = out.read_text()
    assert "![curves](toy/curves.png)" in text and "## toy" in text


def test_experiment_without_outputs_fails_and_leaves_nothing(tmp_path):
    lazy = Experiment("lazy", "writes nothing", lambda ctx: None)
    with pytest.raises(RuntimeError, match="metrics, summary, a figure"):
        experiment.run_experiment(lazy, tmp_path, quick=True, seed=0, show_progress=False)
    assert not (tmp_path / "lazy").exists()


def test_registry_lists_only_existing_experiments_in_canonical_order():
    names = list(experiment.available_experiments())
    assert "hand-backprop" in names
    ranked = [n for n in experiment.CANONICAL_ORDER if n in names]
    assert names[: len(ranked)] == ranked


def test_report_without_results_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "no experiment results" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["run", "no-such-experiment"], "choose from: all, hand-backprop"),
    (["run", "hand-backprop", "--seed", "-1"], "non-negative integer"),
    (["run", "hand-backprop", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_are_one_line_with_exit_status_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_list_shows_every_experiment(capsys):
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(experiment.available_experiments())


def test_hand_backprop_end_to_end(tmp_path):
    assert cli.main(["run", "hand-backprop", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    out = tmp_path / "hand-backprop"
    assert {"metrics.json", "summary.md", "gradients.png"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["max_abs_hand_vs_jax"] < 1e-6
    rows = {r["param"]: r for r in metrics["seed_comparison"]}
    assert rows["w21"]["seed_matches_term"] and not rows["w21"]["seed_matches_total"]
    assert rows["w12"]["seed_matches_total"]
    assert (tmp_path / "REPORT.md").exists()


def test_readme_test_command_is_what_ci_runs():
    root = Path(__file__).resolve().parents[1]
    readme_commands = [line.strip().strip("`") for line in (root / "README.md").read_text().splitlines()[:12]
                       if line.strip().startswith(("python", "`python"))]
    assert len(readme_commands) == 2, readme_commands
    assert readme_commands[1] in (root / ".ci" / "run").read_text()


def test_installed_version_and_type_marker():
    import importlib.metadata
    import importlib.resources

    import jaxopt_lab

    assert importlib.metadata.version("jaxopt-lab") == jaxopt_lab.__version__
    assert importlib.resources.files("jaxopt_lab").joinpath("py.typed").is_file()  # PEP 561


def test_code_is_ruff_clean():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", str(root)],
                          capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_library_and_experiments_type_check():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_data_parallel_flag_names_its_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "hand-backprop", "--data-parallel", "yes"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'auto', 'on', 'off'" in err, err


def test_data_flag_needs_an_existing_npz(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "hand-backprop", "--data", str(tmp_path / "missing.npz")])
    assert exc.value.code == 2
    assert "expected a built-in dataset (digits, mnist1d) or an existing .npz file" in capsys.readouterr().err
