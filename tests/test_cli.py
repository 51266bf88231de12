"""The ``jaxopt-lab`` command: the registry behind ``list``, usage errors, and one experiment end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxopt_lab.lab import cli
from jaxopt_lab.lab.experiment import CANONICAL_ORDER
from jaxopt_lab.lab.registry import available_experiments


def test_registry_lists_only_existing_experiments_in_canonical_order():
    names = list(available_experiments())
    assert "hand-backprop" in names
    ranked = [n for n in CANONICAL_ORDER if n in names]
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
    assert [line.split()[0] for line in lines] == list(available_experiments())


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



def test_an_experiment_file_is_a_script_with_run_s_flags(tmp_path):
    script = Path(__file__).resolve().parents[1] / "experiments" / "hand_backprop.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--no-progress", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hand-backprop" / "metrics.json").is_file() and (tmp_path / "REPORT.md").is_file()
