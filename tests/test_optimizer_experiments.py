"""The four optimizer experiments end to end through the CLI, in --quick mode.

Each run is also checked for its histories (histories.npz holds the names and shapes that
docs/optimizer_experiments.md documents) and redrawn with `jaxopt-lab plot NAME`: the figures come back,
byte for byte, from the histories and metrics.json alone.
"""

import json

import numpy as np
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


def _histories(out, name, meta):
    """The run's histories.npz as {name: array}, after checking that metrics.json lists exactly its names."""
    with np.load(out / name / "histories.npz") as stored:
        histories = {key: stored[key] for key in stored.files}
    assert meta["histories"] == sorted(histories)
    return histories


def _assert_shapes(histories, expected):
    """Exactly the ``expected`` names ({name: shape}) are stored, with those shapes."""
    assert set(histories) == set(expected)
    assert {key: histories[key].shape for key in expected} == expected


def _assert_redrawn(out, name, meta):
    """`jaxopt-lab plot NAME` redraws every figure of the run, byte for byte, without training."""
    folder = out / name
    drawn = {figure: (folder / figure).read_bytes() for figure in meta["figures"]}
    for figure in drawn:
        (folder / figure).unlink()
    assert cli.main(["plot", name, "--out", str(out)]) == 0
    assert sorted(path.name for path in folder.glob("*.png")) == sorted(meta["figures"])
    assert {figure: (folder / figure).read_bytes() for figure in drawn} == drawn


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

    config = meta["config"]
    runs, steps = (config["init_seeds"],), (config["steps"] + 1,)
    histories = _histories(tmp_path, "optimizer-grid", meta)
    _assert_shapes(histories, {"step": steps} | {
        f"{optimizer}/lr={lr:g}/{field}": runs + steps if field == "loss" else runs
        for optimizer in cells for lr in config["learning_rates"]
        for field in ("loss", "stop_step", "reached", "diverged")})
    # SGD at rate 1 is recorded as diverged: a loss beyond the bound (or non-finite) at its stop, NaN after.
    assert histories["sgd/lr=1/diverged"].all() and not histories["sgd/lr=1/reached"].any()
    for loss, stop in zip(histories["sgd/lr=1/loss"], histories["sgd/lr=1/stop_step"], strict=True):
        assert not np.isfinite(loss[stop]) or loss[stop] > config["divergence_bound"]
        assert np.isnan(loss[stop + 1:]).all() and np.isfinite(loss[:stop]).all()
    _assert_redrawn(tmp_path, "optimizer-grid", meta)


def test_learning_rate(tmp_path):
    meta, summary = _run("learning-rate", tmp_path)
    m = meta["metrics"]
    assert m["examples"]["too low"]["diagnosis"].startswith("too slow")
    assert m["examples"]["too high"]["diagnosis"].startswith("diverging")
    assert m["examples"]["good (grid's best)"]["diagnosis"].startswith("ok")
    assert m["best"]["sgd"]["learning_rate"] < m["stability_limit_2_over_lambda_max"]
    assert 0 < m["range_test"]["suggestion_steepest"] < m["best"]["sgd"]["learning_rate"] * 10
    assert "LR range test" in summary

    config = meta["config"]
    rates = [row["learning_rate"] for row in m["grid"]["sgd"]]
    runs, steps = (config["init_seeds"],), (config["steps"] + 1,)
    histories = _histories(tmp_path, "learning-rate", meta)
    _assert_shapes(histories, {
        "step": steps, "learning_rates": (len(rates),),
        "range_test/learning_rate": (config["range_test_steps"],),
        "range_test/loss": (config["range_test_seeds"], config["range_test_steps"])} | {
        f"{optimizer}/lr={lr:.4g}/{field}": runs + steps if field == "loss" else runs
        for optimizer in ("sgd", "momentum") for lr in rates
        for field in ("loss", "stop_step", "reached", "diverged")})
    np.testing.assert_array_equal(histories["learning_rates"], np.float32(rates))
    _assert_redrawn(tmp_path, "learning-rate", meta)


def test_saddle_points(tmp_path):
    meta, summary = _run("saddle-points", tmp_path)
    verdicts = meta["metrics"]["verdicts"]
    assert verdicts["claim1_trapped_without_noise"]  # on the stable manifold nothing escapes without noise
    hyperbolic, net = verdicts["claim1_noise"]["hyperbolic"], verdicts["claim1_noise"]["two_weight_net"]
    assert all(v["isotropic"] == v["runs"] for v in hyperbolic.values())  # isotropic noise frees every run
    # The net's real mini-batch noise runs along its stable manifold: no run escapes, and the verdict says so.
    assert all(v["mini-batch"] == 0 and v["isotropic"] == v["runs"] for v in net.values())
    assert verdicts["claim1_sgd_outcome_against_no_noise"]["two_weight_net"] == {
        "isotropic": "supported", "mini-batch": "no run escaped"}
    assert verdicts["claim1_shown_verdict"] == "not supported (quick: not conclusive)"
    # Claim 2's label follows from the escape-step ratios: Adam beats GD on two landscapes, RMSprop on none.
    ratios = verdicts["claim2_steps_of_other_over_adam_without_noise"]
    assert ratios["hyperbolic"]["sgd"] > 1 and ratios["hyperbolic"]["rmsprop"] < 1
    assert verdicts["claim2_shown_verdict"] == "partly supported (quick: not conclusive)"
    assert "Verdict: **partly supported (quick: not conclusive): Adam beats GD on x^2 - y^2" in summary
    noise = meta["metrics"]["data_sets"]["two_weight_net"]["gradient_noise_std"]["mini-batch"]
    assert noise["unstable"] == 0.0 < noise["stable"]
    assert "Claim 1" in summary and "Claim 2" in summary and "Escape criterion" in summary
    assert "With real mini-batch noise no SGD run leaves the stable manifold" in summary

    config = meta["config"]
    seeds, steps = (config["noise_seeds"],), (config["steps"] + 1,)
    start_names = {"cubic": ("at_saddle", "stable_side"), "hyperbolic": ("on_manifold", "off_manifold"),
                   "two_weight_net": ("on_manifold", "off_manifold")}
    dims = {"cubic": 1, "hyperbolic": 2, "two_weight_net": 2}
    expected = {"step": steps}
    for land, starts in start_names.items():
        for optimizer in ("sgd", "momentum", "rmsprop", "adam"):
            for start in starts:
                noises = ("noise=0", f"noise={config['gradient_noise']:g}", f"batch={config['batch_size']}")
                for noise in noises:
                    prefix = f"{land}/{optimizer}/{start}/{noise}"
                    expected |= {f"{prefix}/loss": seeds + steps,
                                 f"{prefix}/trajectory": seeds + steps + (dims[land],),
                                 f"{prefix}/stop_step": seeds, f"{prefix}/escape_step": seeds}
    histories = _histories(tmp_path, "saddle-points", meta)
    _assert_shapes(histories, expected)
    # The escape table is read from the stored escape steps (-1: never escaped).
    adam = histories[f"hyperbolic/adam/on_manifold/noise={config['gradient_noise']:g}/escape_step"]
    assert (adam >= 0).sum() == verdicts["claim1_noise"]["hyperbolic"]["adam"]["isotropic"]
    # A mini-batch run stops at its escape like the others: its loss on all examples is NaN after it.
    prefix = f"two_weight_net/sgd/off_manifold/batch={config['batch_size']}"
    escape = histories[f"{prefix}/escape_step"]
    assert (escape >= 0).all() and (histories[f"{prefix}/stop_step"] == escape).all()
    assert np.isnan(histories[f"{prefix}/loss"][0, escape[0] + 1:]).all()
    # A trajectory ends at its stop step (NaN after it), where its loss history ends too.
    prefix = "hyperbolic/sgd/off_manifold/noise=0"
    stop = int(histories[f"{prefix}/stop_step"][0])
    assert np.isfinite(histories[f"{prefix}/trajectory"][0, : stop + 1]).all()
    assert np.isnan(histories[f"{prefix}/trajectory"][0, stop + 1:]).all()
    assert np.isnan(histories[f"{prefix}/loss"][0, stop + 1:]).all()
    _assert_redrawn(tmp_path, "saddle-points", meta)


def test_batch_vs_minibatch(tmp_path):
    meta, summary = _run("batch-vs-minibatch", tmp_path)
    rows = meta["metrics"]["by_batch_size"]
    full = next(r for label, r in rows.items() if label.startswith("full batch"))
    single = rows["mini-batch 1"]
    assert full["increase_fraction"] == 0.0 and single["increase_fraction"] > 0.3
    assert single["roughness"] > 10 * full["roughness"]
    assert single["epochs_to_target_median"] < full["epochs_to_target_median"]
    assert "two_panel.png" in meta["figures"] and "smooth" in summary

    config = meta["config"]
    expected = {}
    for batch_size, row in zip(config["batch_sizes"], rows.values(), strict=True):
        prefix, steps = f"batch={batch_size or 'full'}", config["epochs"] * row["updates_per_epoch"] + 1
        runs = (config["seeds"], steps)
        expected |= {f"{prefix}/step": (steps,), f"{prefix}/epoch": (steps,), f"{prefix}/loss": runs,
                     f"{prefix}/batch_loss": runs}
    histories = _histories(tmp_path, "batch-vs-minibatch", meta)
    _assert_shapes(histories, expected)
    assert histories["batch=1/epoch"][-1] == config["epochs"]
    np.testing.assert_allclose(np.median(histories["batch=1/loss"][:, -1]), single["final_full_loss_median"])
    _assert_redrawn(tmp_path, "batch-vs-minibatch", meta)
