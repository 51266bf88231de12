"""The residual CNN of the depth experiment, and the experiment: configs, verdicts, readings, a quick run."""

import dataclasses
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxopt_lab.lab.experiments import normalization_depth as depth

from jaxopt_lab import nn as norms
from jaxopt_lab.lab import cli, models, training

SIGNALS = jax.random.normal(jax.random.key(0), (6, 40, 1))
IMAGES = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))


def _residual(norm="batch", blocks=3, **kwargs):
    return models.ResidualCNN(norm=norm, blocks=blocks, width=8, num_groups=4, **kwargs)


@pytest.mark.parametrize("norm", models.RESIDUAL_NORMS)
@pytest.mark.parametrize("x", [SIGNALS, IMAGES], ids=["signals", "images"])
def test_residual_cnn_gives_logits_on_signals_and_images(norm, x):
    model = _residual(norm)
    variables = model.init(jax.random.key(2), x)
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (6, 10)
    chex.assert_tree_all_finite(logits)
    taps = variables["params"]["blocks"]["conv1"]["kernel"].shape
    assert taps == (3, *(3,) * (x.ndim - 2), 8, 8)  # (blocks, window..., in, out)


@pytest.mark.parametrize("x", [SIGNALS, IMAGES], ids=["signals", "images"])
def test_parameters_grow_linearly_with_blocks(x):
    def count(blocks):
        params = _residual("group", blocks).init(jax.random.key(0), x)["params"]
        return sum(p.size for p in jax.tree.leaves(params))

    counts = [count(b) for b in (1, 2, 4, 8)]
    window = 3 ** (x.ndim - 2)
    per_block = 2 * (window * 8 * 8) + 2 * (2 * 8)  # two bias-free convs, two norms (scale and bias)
    assert np.diff(counts).tolist() == [per_block, 2 * per_block, 4 * per_block]


def _norms_called(model, x):
    """The class of every norm module that runs, with the path of the module that owns it."""
    called = []

    def record(f, args, kwargs, context):
        if isinstance(context.module, (norms.BatchNorm, norms.GroupNorm, norms.LayerNorm, norms.InstanceNorm)):
            called.append((type(context.module).__name__, context.module.path))
        return f(*args, **kwargs)

    variables = model.init(jax.random.key(0), x)
    with nn.intercept_methods(record):
        model.apply(variables, x, train=True, mutable=["batch_stats"])
    return variables, called


@pytest.mark.parametrize("norm, cls", [("batch", "BatchNorm"), ("group", "GroupNorm"), ("layer", "LayerNorm")])
def test_the_norm_choice_reaches_every_block(norm, cls):
    variables, called = _norms_called(_residual(norm, blocks=5), SIGNALS)
    # The stem's norm and each block's two (the scanned block body is traced once for all blocks) ...
    assert {name for name, _ in called} == {cls}
    assert {path[-1] for _, path in called} == {"stem_norm", "norm1", "norm2"}
    # ... and every block has its own parameters (and, for batch norm, running statistics) of that norm.
    for name in ("norm1", "norm2"):
        assert variables["params"]["blocks"][name]["scale"].shape == (5, 8)
        if norm == "batch":
            assert variables["batch_stats"]["blocks"][name]["mean"].shape == (5, 8)
    assert ("batch_stats" in variables) == (norm == "batch")


def test_only_batch_norm_mixes_the_examples_of_a_batch():
    other = SIGNALS.at[1:].multiply(3.0).at[1:].add(1.0)  # every example but the first changes
    for norm in ("batch", "group"):
        model = _residual(norm)
        variables = model.init(jax.random.key(0), SIGNALS)
        first = lambda x, model=model, variables=variables: model.apply(variables, x, train=True,
                                                                        mutable=["batch_stats"])[0][0]
        mixes = not jnp.allclose(first(SIGNALS), first(other), atol=1e-5)
        assert mixes == (norm == "batch"), norm


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_initialized_blocks_start_as_the_identity(zero_init):
    model = _residual("group", blocks=4, zero_init_residual=zero_init)
    variables = model.init(jax.random.key(0), SIGNALS)
    assert bool(jnp.all(variables["params"]["blocks"]["norm2"]["scale"] == 0)) == zero_init
    # Other weights inside the blocks change the output only when the blocks are not the identity.
    blocks = variables["params"]["blocks"]
    scrambled = {**variables["params"],
                 "blocks": {**blocks, "conv1": {"kernel": -3 * blocks["conv1"]["kernel"]}}}
    same = jnp.allclose(model.apply(variables, SIGNALS), model.apply({"params": scrambled}, SIGNALS), atol=1e-6)
    assert bool(same) == zero_init


@pytest.mark.parametrize("bad, match", [
    (dict(norm="none"), "norm must be one of 'batch', 'layer', 'instance', 'group', got 'none'"),
    (dict(blocks=0), "blocks must be an int >= 1, got 0"),
    (dict(norm="group", num_groups=3), "width divisible by num_groups=3, got width 8"),
])
def test_residual_cnn_rejects_bad_arguments(bad, match):
    model = models.ResidualCNN(**{"width": 8, "num_groups": 4, **bad})
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.key(0), SIGNALS)
    with pytest.raises(ValueError, match=r"expected images \(N, H, W, C\) or signals"):
        _residual().init(jax.random.key(0), jnp.zeros((2, 40)))


# The experiment.


def test_check_config_rejects_configs_that_cannot_test_the_claim():
    full = depth.Config.for_mode(False, "mnist1d")
    for broken, match in [(dict(depths=(8,)), "two or more increasing"), (dict(depths=(8, 2)), "increasing"),
                          (dict(small_batch=32), r"small_batch must lie in \[1, reference_batch=32\)"),
                          (dict(min_steps=30), "min_steps a positive multiple of 20"),
                          (dict(width=18), "divisible by num_groups=4")]:
        with pytest.raises(ValueError, match=match):
            depth.check_config(dataclasses.replace(full, **broken), "FULL", "mnist1d")


def _record(values, loss=0.05):
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "values": values,
            "final_train_loss": {"mean": loss}}


def _runs(gap_at, seeds=6, loss=0.05, noise=0.002):
    """Records where BN's accuracy at the small batch is ``gap_at(blocks)`` below its reference accuracy
    (GN: no gap), with a little seed noise."""
    cfg = dataclasses.replace(depth.Config.for_mode(True), depths=(1, 2, 4))
    small, ref = depth.batch_sizes(cfg)
    wiggle = noise * np.asarray([1, -1, 0.5, -0.5, 0.25, -0.25][:seeds])
    runs, bn_gap = {}, {}
    for norm in depth.NORMS:
        runs[norm] = {}
        for d in cfg.depths:
            gap = gap_at(d) if norm == "batch" else 0.0
            runs[norm][d] = {ref: _record(0.95 + wiggle, loss), small: _record(0.95 - gap + wiggle[::-1], loss)}
    for d in cfg.depths:
        stats = {"gap": training.mean_std(0.01 + wiggle)}
        bn_gap[d] = {small: stats, ref: stats}
    return cfg, runs, bn_gap


def _claims(analysis):
    return {c["id"]: c for c in analysis["claims"]}


def test_a_gap_that_grows_with_depth_is_supported_on_both_seed_sets():
    cfg, runs, bn_gap = _runs(lambda d: 0.05 * d)
    analysis = depth.analyse(cfg, runs, bn_gap, num_classes=10)
    claims = _claims(analysis)
    for key in ("bn_gap_grows", "bn_gap_trend", "bn_specific"):
        assert claims[key]["set_verdicts"] == ["supported", "supported"], key
        assert claims[key]["verdict"] == "supported", key
    assert claims["gn_gap_grows"]["verdict"] == "unclear"  # GN's gap is zero at every depth
    deep, shallow = max(cfg.depths), min(cfg.depths)
    assert claims["bn_gap_grows"]["difference"] == pytest.approx(0.05 * (deep - shallow))
    assert [row["blocks"] for row in analysis["per_depth"]] == sorted(cfg.depths)
    assert all(row["batch"]["verdict"] == "supported" for row in analysis["per_depth"])
    text = depth._reading(cfg, analysis)
    assert "**grows with depth**" in text and "the growth is batch norm's own" in text


def test_a_gap_that_does_not_grow_drops_the_depth_explanation():
    cfg, runs, bn_gap = _runs(lambda d: 0.03)
    analysis = depth.analyse(cfg, runs, bn_gap, num_classes=10)
    claims = _claims(analysis)
    assert claims["bn_gap_grows"]["verdict"] == "unclear" and claims["bn_gap_trend"]["verdict"] == "unclear"
    text = depth._reading(cfg, analysis)
    assert "does not grow measurably with depth" in text and "explanation is dropped" in text
    assert "grows with depth**:" not in text


def test_seed_sets_that_disagree_make_the_verdict_unstable():
    cfg, runs, bn_gap = _runs(lambda d: 0.0)
    small, deep = cfg.small_batch, max(cfg.depths)
    # The first seed set loses 10 points at the small batch at the deepest depth, the second set nothing.
    runs["batch"][deep][small] = _record(0.95 - np.asarray([0.10, 0.11, 0.09, 0.0, 0.001, -0.001])[:6])
    claim = _claims(depth.analyse(cfg, runs, bn_gap, num_classes=10))["bn_gap_grows"]
    assert claim["set_verdicts"] == ["supported", "unclear"] and claim["verdict"] == "unstable"
    assert "**disagree**" in depth._reading(cfg, depth.analyse(cfg, runs, bn_gap, num_classes=10))


def test_a_model_that_did_not_learn_gives_no_verdict():
    cfg, runs, bn_gap = _runs(lambda d: 0.05 * d)
    runs["batch"][max(cfg.depths)][cfg.small_batch]["final_train_loss"]["mean"] = 2.2  # ln 10 = 2.3
    claims = _claims(depth.analyse(cfg, runs, bn_gap, num_classes=10))
    assert claims["bn_gap_grows"]["verdict"] == depth.NOT_LEARNED
    assert claims["bn_gap_grows"]["untrained_losses"] == [2.2]
    assert claims["gn_gap_grows"]["verdict"] != depth.NOT_LEARNED  # GN's runs all learned


def test_a_diverged_seed_is_recorded_not_raised():
    cfg, runs, bn_gap = _runs(lambda d: 0.05 * d)
    record = runs["batch"][max(cfg.depths)][cfg.small_batch]
    record["values"][0] = float("nan")
    claims = _claims(depth.analyse(cfg, runs, bn_gap, num_classes=10))
    assert np.isnan(claims["bn_gap_trend"]["difference"]) and claims["bn_gap_trend"]["verdict"] == "unstable"
    assert claims["gn_gap_grows"]["verdict"] == "unclear"  # the other rows are still judged


@pytest.mark.slow_e2e
def test_quick_run_end_to_end(tmp_path):
    assert cli.main(["run", depth.NAME, "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    folder = tmp_path / depth.NAME
    meta = json.loads((folder / "metrics.json").read_text())
    config, metrics = meta["config"], meta["metrics"]
    summary = (folder / "summary.md").read_text()
    sizes = {str(config["small_batch"]), str(config["reference_batch"])}
    for norm in depth.NORMS:
        assert set(metrics["runs"][norm]) == {str(d) for d in config["depths"]}
        for by_batch in metrics["runs"][norm].values():
            assert set(by_batch) == sizes
            for record in by_batch.values():
                # every seed of both sets: the search's, then the replicate set's
                assert len(record["values"]) == 2 * config["seeds"] and record["replicas"] == config["seeds"]
                assert record["learning_rate"] in config["learning_rates"]
                assert set(record["flattened"]) >= {"flattened", "relative_change", "level"}
    assert [row["blocks"] for row in metrics["per_depth"]] == config["depths"]
    for row in metrics["per_depth"]:
        for norm in depth.NORMS:
            assert np.isfinite(row[norm]["difference"]) and len(row[norm]["set_verdicts"]) == 2
        assert np.isfinite(row["statistics_gap"]["mean"])
    claims = {c["id"]: c for c in metrics["claims"]}
    assert set(claims) == {"bn_gap_grows", "bn_gap_trend", "gn_gap_grows", "bn_specific",
                           "statistics_gap_grows"}
    for c in claims.values():
        assert len(c["set_verdicts"]) == 2 and c["shown_verdict"].endswith("(quick: not conclusive)")
        assert f"| {c['shown_verdict']} |" in summary
    assert "Reading: BN's accuracy gap" in summary and "flattened when, over the last 20% of steps" in summary
    for figure in depth.FIGURES:
        assert (folder / figure).stat().st_size > 10_000 and f"]({figure})" in summary
