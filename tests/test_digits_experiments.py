"""The three real-data experiments end to end through the CLI, in --quick mode (one with --data)."""

import json

import numpy as np
import pytest

from jaxopt_lab.lab import cli, data, diagnostics, training

pytestmark = pytest.mark.slow_e2e

VERDICTS = {"supported", "not supported", "unclear", "unstable", "no verdict: a model did not learn"}
QUICK_MARK = " (quick: not conclusive)"


def _run(name, out, *extra):
    assert cli.main(["run", name, "--quick", "--no-progress", "--out", str(out), *extra]) == 0
    folder = out / name
    meta = json.loads((folder / "metrics.json").read_text())
    summary = (folder / "summary.md").read_text()
    heading, mode_line = summary.split("\n")[:2]
    assert heading.startswith(f"# {name} — "), heading  # the report's section heading
    # The line under the heading says it is a quick, smoke-size run, and gives the training endpoint.
    assert mode_line.startswith("**Quick mode: a smoke-size run") and "not conclusive" in mode_line, mode_line
    assert f"Training endpoint: {meta['endpoint']}" in mode_line and "steps" in meta["endpoint"], mode_line
    assert meta["mode"] == "quick"
    assert f"`jaxopt-lab run {name} --quick --seed 0{''.join(' ' + e for e in extra)}`" in summary  # reproduce
    for figure in meta["figures"]:
        assert (folder / figure).stat().st_size > 10_000 and f"]({figure})" in summary
    return meta["config"], meta["metrics"], summary


def _chosen_rate(record, rates):
    """The rate a sweep chose is one of the swept rates, and its table marks it."""
    assert record["learning_rate"] in rates, (record["learning_rate"], rates)
    assert [row["learning_rate"] for row in record["rate_table"] if row["chosen"]] == [record["learning_rate"]]


def test_normalization(tmp_path):
    config, metrics, summary = _run("normalization", tmp_path)
    norms = {"none", "batch", "layer", "instance", "group"}
    seeds = 2 * config["seeds"]  # the search's seed set and the replicate set
    assert set(metrics["cnn"]) == norms and config["replicate_seeds"][0] == config["seeds_used"][-1] + 1
    for norm in norms:
        assert set(metrics["cnn"][norm]) == {str(b) for b in config["batch_sizes"]}
        for record in metrics["cnn"][norm].values():
            assert len(record["values"]) == seeds >= 4 and 0.0 <= record["mean"] <= 1.0
            # The chosen rate is one the widened search tried, marked in its table; an edge is recorded.
            tried = [row["learning_rate"] for row in record["rate_table"]]
            chosen = [row["learning_rate"] for row in record["rate_table"] if row["chosen"]]
            assert chosen == [record["learning_rate"]] and set(config["learning_rates"]) <= set(tried)
            assert len(tried) <= len(config["learning_rates"]) + config["widen"]
            assert record["at_edge"] in (None, "lowest", "highest") and record["replicas"] == config["seeds"]
            if record["at_edge"]:
                assert f"({record['learning_rate']:.2g} edge)" in summary
    # A quick run teaches: at the reference batch every CNN has learned the digits.
    at_reference = {n: metrics["cnn"][n][str(config["reference_batch"])]["mean"] for n in norms}
    assert min(at_reference.values()) >= 0.90, at_reference
    assert "| MLP, no norm |" in summary  # the MLP row sits in the CNN table
    assert set(metrics["rnn"]) == {"none", "batch", "layer"}
    assert {c["verdict"] for c in metrics["claims"]} <= VERDICTS and len(metrics["claims"]) >= 11
    for c in metrics["claims"]:  # every verdict shown in quick mode is marked as not conclusive
        assert c["shown_verdict"] == c["verdict"] + QUICK_MARK and f"| {c['shown_verdict']} |" in summary
        assert len(c["set_verdicts"]) == (0 if c["verdict"].startswith("no verdict") else 2)
    pooled = {c["id"] for c in metrics["claims"] if c["paired"]}
    assert pooled == {"N13", "N7", "N9", "N5"} and {c["id"] for c in metrics["claims_per_batch"]} == pooled
    # The speed claim's verdict comes from BN and no norm at the no-norm arm's rate.
    speed = metrics["speed"]
    assert speed["shared_rate"] == metrics["cnn"]["none"][str(config["reference_batch"])]["learning_rate"]
    assert speed["bn_shared_rate"]["learning_rate"] == speed["shared_rate"]
    assert [c["shared_rate"] for c in metrics["claims"] if c["id"] == "N3"] == [True, True]
    # Batch norm with running vs batch statistics, at every batch size, on the same test examples.
    bn = metrics["bn_running_vs_batch_statistics"]
    assert set(bn) == {str(b) for b in config["batch_sizes"]}
    for b, g in bn.items():
        assert g["examples"] % int(b) == 0 and 0.0 <= g["batch"]["mean"] <= 1.0
        assert abs(g["gap"]["mean"] - (g["running"]["mean"] - g["batch"]["mean"])) < 1e-9
    # Instance norm normalizes each image: it loses less to a per-image contrast change than batch norm.
    lost = {n: r["clean"]["mean"] - r["contrast"]["mean"] for n, r in metrics["robustness"].items()}
    assert lost["instance"] < lost["batch"], lost
    assert "Wu & He" in summary and "| id | claim (course notes) |" in summary
    assert "flattened when, over the last 20% of steps" in summary  # the endpoint rule as applied


def test_gradient_centralization_on_a_device_mesh(tmp_path):
    # --data-parallel on: the batch-sharded train step, on a 1-device mesh here (8 devices: test_parallel).
    config, metrics, summary = _run("gradient-centralization", tmp_path, "--data-parallel", "on")
    meta = json.loads((tmp_path / "gradient-centralization" / "metrics.json").read_text())
    assert meta["data_parallel"] == "on"
    runs = {(r["model"], r["optimizer"], r["variant"]): r for r in metrics["runs"]}
    assert len(runs) == 2 * len(config["optimizers"]) * 3
    for r in runs.values():  # each (model, optimizer, variant) at its own rate, from a search that may widen
        tried = [row["learning_rate"] for row in r["rate_table"]]
        _chosen_rate(r, tried)
        assert set(config["learning_rates_swept"][r["optimizer"]]) <= set(tried)
        assert r["at_edge"] in (None, "lowest", "highest")
        assert len(r["test_accuracy"]["values"]) == config["seeds"] * config["seed_sets"] == 4
    assert len(metrics["gc_vs_plain"]) == len(metrics["speed"]) == 2 * len(config["optimizers"])
    # Every verdict: the test on all seeds, one verdict per disjoint seed set, and the replicated verdict.
    judged = metrics["gc_vs_plain"] + [s[k] for s in metrics["speed"] for k in ("common_rate_steps",
                                                                               "common_rate_accuracy")]
    for v in judged:
        assert len(v["set_verdicts"]) == 2 and v["shown_verdict"] == v["verdict"] + QUICK_MARK
        assert v["verdict"] == (v["set_verdicts"][0] if len(set(v["set_verdicts"])) == 1 else "unstable")
    histories = np.load(tmp_path / "gradient-centralization" / "histories.npz")
    for s in metrics["stability"]:  # GC4: test-loss reversals, read from the saved test loss, at plain's rate
        for arm, values in s["reversal"].items():
            if arm == "GC (ours) at plain's rate" and f"{s['model']}/{s['optimizer']}/{arm}/test_loss" not in \
                    histories.files:
                arm = "GC (ours)"  # GC chose plain's rate: its own runs serve
            test_loss = histories[f"{s['model']}/{s['optimizer']}/{arm}/test_loss"]
            assert test_loss.shape[0] == config["seeds"] * config["seed_sets"]
            np.testing.assert_allclose(values, diagnostics.loss_reversals(test_loss))
            assert min(values) >= 0.0
        common = s["common_rate"]
        assert common["shown_verdict"] == common["verdict"] + QUICK_MARK and len(common["set_verdicts"]) == 2
        assert f"| {common['shown_verdict']} |" in summary
    assert "**Stability** (GC makes training more stable)" in summary
    assert "GC steadier (supported) in" in summary
    for s in metrics["speed"]:  # speed is judged at plain's rate: GC is trained there when it chose another
        common = f"{s['model']}/{s['optimizer']}/GC (ours) at plain's rate/step_loss"
        assert (common in histories.files) == (s["gc_rate"] != s["plain_rate"]), (common, s)
        if s["gc_rate"] == s["plain_rate"]:
            assert s["steps"]["GC (ours) at plain's rate"] == s["steps"]["GC (ours)"]
    assert training.endpoint_rule() in summary  # the endpoint rule, stated as applied
    for model in ("CNN (batch norm)", "MLP"):
        # GC on SGD+momentum keeps every output's mean weight at its initial value; nothing else does.
        gc = runs[model, "SGD+momentum", "GC (ours)"]["max_weight_mean_drift"]
        plain = runs[model, "SGD+momentum", "plain"]["max_weight_mean_drift"]
        anchor = runs[model, "SGD+momentum", "optax.centralize"]["max_weight_mean_drift"]
        assert gc < 1e-5 < min(plain, anchor), (model, gc, plain, anchor)
    assert all(0.0 <= r["test_accuracy"]["mean"] <= 1.0 for r in runs.values())
    assert "23.71 -> 23.21" in summary


def test_gradient_accumulation_on_an_npz_file(tmp_path):
    digits = data.load_digits(split_seed=1)  # a different split, saved in raw-ish pixel units
    path = tmp_path / "my_digits.npz"
    np.savez(path, x_train=digits.x_train[..., 0] * 4 + 8, y_train=digits.y_train,
             x_test=digits.x_test[..., 0] * 4 + 8, y_test=digits.y_test)
    config, metrics, summary = _run("gradient-accumulation", tmp_path / "out", "--data", str(path))
    assert config["data"].startswith("my_digits:")
    # One swept rate for (a), (b) and (c) (an equivalence test needs the same rate); (d) its own.
    for model, chosen in metrics["chosen_learning_rates"].items():
        runs = {r["variant"][:3]: r for r in metrics["runs"] if r["model"] == model}
        assert runs["(a)"]["learning_rate"] == runs["(b)"]["learning_rate"] == runs["(c)"]["learning_rate"] \
            == chosen["128"]["learning_rate"] in config["learning_rates"]
        assert runs["(d)"]["learning_rate"] == chosen["32"]["learning_rate"] in config["learning_rates"]
    # Median over seeds: a rounding-level difference can flip a ReLU at its kink in one seed (see summary).
    diff = {(r["model"], r["variant"][:3]): np.median(r["max_abs_param_diff_to_a"]["values"])
            for r in metrics["runs"]}
    relative = {(r["model"], r["variant"][:3]): r["relative_l2_diff_to_a"]["mean"] for r in metrics["runs"]}
    for model in ("MLP, no norm", "MLP, group norm"):  # accumulation is exact without batch norm
        assert diff[model, "(b)"] < 1e-5 and diff[model, "(c)"] < 1e-5
    assert diff["MLP, batch norm", "(b)"] > 1000 * diff["MLP, no norm", "(b)"]  # batch statistics break it
    assert relative["MLP, batch norm", "(c)"] > 100 * relative["MLP, group norm", "(c)"]
    assert np.median(metrics["b_vs_c_max_abs_param_diff"]["MLP, batch norm"]["values"]) < 1e-5  # (b) == (c)
    assert set(metrics["timing"]) == {"(a) 1 x 128", "(b) MultiSteps 4 x 32", "(c) micro-batched 4 x 32",
                                      "(d) plain 32"}
    for t in metrics["timing"].values():  # the footprint of one call: arguments + outputs + temp - aliased
        assert t["total_bytes"] == t["argument_bytes"] + t["output_bytes"] + t["temp_bytes"] - t["alias_bytes"]
    assert "jax-ml/jax#12868" in summary
    # The chaos floor: (a) with its batch reordered ends a rounding-sized distance from (a), for every model;
    # batch norm's micro-batch statistics put (b) and (c) far beyond it.
    floor = metrics["chaos_floor"]
    assert set(floor) == set(config["models"])
    for judged in floor.values():
        assert len(judged["floor"]["values"]) == config["seeds"] and max(judged["floor"]["values"]) < 1e-4
        assert {judged[k]["outcome"] for k in ("(b) to (a)", "(c) to (a)", "(b) to (c)", "(d) to (a)")} <= {
            "above the floor", "below the floor", "at the floor"}
    bn = floor["MLP, batch norm"]
    assert bn["(b) to (a)"]["outcome"] == bn["(c) to (a)"]["outcome"] == "above the floor"
    assert "**The chaos floor.**" in summary and "distance_to_a.png" in summary
    # GA4 (stability): every variant's test-loss reversals, read from the histories it saved.
    histories = np.load(tmp_path / "out" / "gradient-accumulation" / "histories.npz")
    stability = metrics["stability"]
    for model, by_variant in stability["test_loss_reversals"].items():
        for variant, summary_of in by_variant.items():
            test_loss = histories[f"{model}/{variant}/test_loss"]
            assert test_loss.shape == histories[f"{model}/{variant}/test_accuracy"].shape
            np.testing.assert_allclose(summary_of["values"], diagnostics.loss_reversals(test_loss))
    no_norm = stability["test_loss_reversals"]["MLP, no norm"]  # (c) is (a) to rounding without batch norm
    np.testing.assert_allclose(no_norm["(c) micro-batched 4 x 32"]["values"], no_norm["(a) 1 x 128"]["values"],
                               atol=1e-3)
    assert stability["verdict"] in {"supported", "not supported", "unclear"}
    assert stability["shown_verdict"] == stability["verdict"] + QUICK_MARK
    assert f": **{stability['shown_verdict']}**." in summary and "**Stability: does accumulation" in summary
