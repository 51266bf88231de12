"""The gradient-centralization experiment's own logic, without training: its config checks, the learning-rate
schedule, and how rows become verdicts (replicated over seed sets; speed judged at plain's rate)."""

import dataclasses
import types

import jax.numpy as jnp
import numpy as np
import pytest
from jaxopt_lab.lab.experiments import gradient_centralization as gc_exp

from jaxopt_lab.lab import training
from jaxopt_lab.lab.experiment import RunContext

QUICK = gc_exp.Config.for_mode(True)
FULL = gc_exp.Config.for_mode(False)


@pytest.mark.parametrize(("change", "message"), [
    (dict(seed_sets=0), "seed_sets >= 1"),
    (dict(seeds=0), "seeds >= 1"),
    (dict(widen=-1), "widen must be >= 0"),
    (dict(schedule="linear"), "schedule must be one of"),
    (dict(speed_steps=12), r"speed_steps must be an evaluation step, a multiple of 8"),
    (dict(speed_steps=168), r"speed_steps must be an evaluation step"),
    (dict(loss_target=0.0), "loss_target must be > 0"),
    (dict(optimizers=("Lion",)), "unknown optimizers"),
])
def test_a_config_field_that_cannot_run_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        gc_exp.check_config(dataclasses.replace(QUICK, **change), "QUICK", "digits")


def test_the_configs_replicate_widen_and_measure_speed_at_an_evaluation():
    for cfg in (QUICK, FULL, gc_exp.Config.for_mode(False, "mnist1d")):
        assert cfg.seed_sets == 2 and cfg.widen >= 1
        assert cfg.speed_steps % gc_exp.evaluation_every(cfg) == 0
    assert FULL.seeds == 5 and QUICK.seeds == 2
    assert gc_exp.Config.for_mode(False, "mnist1d").schedule == "cosine" and FULL.schedule == "constant"


@pytest.mark.parametrize("variant", gc_exp.VARIANTS)
def test_the_cosine_schedule_reaches_zero_at_the_budget_for_every_variant(variant):
    tx = gc_exp.optimizer("SGD", variant, 0.1, schedule="cosine", steps=4)
    params = {"Dense_0": {"kernel": jnp.zeros((3, 2))}}
    grads = {"Dense_0": {"kernel": jnp.array([[1.0, 2.0], [3.0, 5.0], [0.0, -1.0]])}}
    state, sizes = tx.init(params), []
    for _ in range(5):
        updates, state = tx.update(grads, state, params)
        sizes.append(float(jnp.abs(updates["Dense_0"]["kernel"]).max()))
    assert sizes[0] > sizes[2] > sizes[3] > 0.0 == sizes[4], sizes  # 0.1 decayed to 0 after 4 steps
    constant = gc_exp.optimizer("SGD", variant, 0.1)
    first, _ = constant.update(grads, constant.init(params), params)
    assert float(jnp.abs(first["Dense_0"]["kernel"]).max()) == pytest.approx(sizes[0])


def test_an_unknown_schedule_is_a_value_error():
    with pytest.raises(ValueError, match="schedule must be one of"):
        gc_exp.learning_rate_schedule(0.1, "linear", 10)


def _row(variant, rate, *, steps, early, accuracy, at_edge=None, model="MLP", optimizer="SGD", reversal=None):
    loss = 1.0 + np.exp(-np.arange(200) / 20.0)  # flattened by the end
    return {"model": model, "optimizer": optimizer, "variant": variant, "learning_rate": rate,
            "at_edge": at_edge, "rate_table": [], "test_accuracy": training.mean_std(accuracy),
            "accuracy_after_speed_steps": training.mean_std(early),
            "final_train_loss": training.mean_std([1.0] * len(steps)),
            "flattened": dataclasses.asdict(training.loss_flattened(loss)), "steps_to_target": steps,
            "diverged": [None] * len(steps), "weight_mean_drift": {"Dense_0": 1e-8},
            "max_weight_mean_drift": 1e-8,
            "test_loss_reversal": training.mean_std([0.5] * len(steps) if reversal is None else reversal)}


@pytest.fixture
def ctx(tmp_path):
    return RunContext(gc_exp.NAME, quick=False, seed=0, out_dir=tmp_path)


CFG = dataclasses.replace(FULL, seeds=2, steps=200, speed_steps=40)


def test_a_speed_up_that_comes_with_a_larger_rate_is_not_credited_to_gc(ctx):
    plain = _row("plain", 0.1, steps=[100, 102, 98, 101], early=[0.5, 0.52, 0.48, 0.5], accuracy=[0.9] * 4)
    gc = _row("GC (ours)", 0.3, steps=[50, 52, 49, None], early=[0.8, 0.81, 0.79, 0.8], accuracy=[0.9] * 4)
    gc_at_plain_rate = _row("GC (ours)", 0.1, steps=[100, 103, 97, 101], early=[0.5, 0.53, 0.47, 0.5],
                            accuracy=[0.9] * 4)
    speed = gc_exp._speed(ctx, CFG, plain, gc, gc_at_plain_rate)
    assert speed["steps"]["GC (ours)"] == [50.0, 52.0, 49.0, 200.0]  # never reached: the whole budget
    assert speed["own_rates"]["steps_difference"] == pytest.approx((50 + 50 + 49 - 99) / 4)  # per seed
    assert speed["common_rate_steps"]["difference"] == pytest.approx(0.0)
    assert speed["common_rate_steps"]["verdict"] == "unclear"  # the verdict comes from the common rate
    assert speed["common_rate_accuracy"]["verdict"] == "unclear"
    lost = "it is not shown faster at plain's rate (there: unclear): the speed is not shown without its rate"
    assert "at its own rate it was not faster" in gc_exp._rate_reading([speed])  # the seed that never reached
    own_rates = dict(speed["own_rates"], steps_difference=49.75, steps_standard_error=0.5)
    faster_own = dict(speed, own_rates=own_rates)
    assert lost in gc_exp._rate_reading([faster_own])


def test_seed_sets_that_disagree_make_the_verdict_unstable(ctx):
    plain = _row("plain", 0.1, steps=[30] * 4, early=[0.5] * 4, accuracy=[0.90, 0.91, 0.90, 0.91])
    # GC is 2 points better on the first seed set, and no better on the second.
    gc = _row("GC (ours)", 0.1, steps=[30] * 4, early=[0.5] * 4, accuracy=[0.92, 0.9305, 0.90, 0.9105])
    anchor = _row("optax.centralize", 0.1, steps=[30] * 4, early=[0.5] * 4, accuracy=[0.9] * 4)
    (judged,) = gc_exp._accuracy_verdicts(ctx, CFG, [plain, gc, anchor])
    assert judged["set_verdicts"] == ["supported", "unclear"] and judged["verdict"] == "unstable"
    assert judged["difference"] == pytest.approx(0.01025)


def test_the_summary_states_the_endpoint_rule_the_edges_and_every_seed_set(ctx):
    rows = [_row("plain", 0.1, steps=[30, 31, 29, 30], early=[0.5] * 4, accuracy=[0.90, 0.91, 0.90, 0.91],
                 at_edge="highest"),
            _row("GC (ours)", 0.1, steps=[20, 21, 19, 20], early=[0.55] * 4, accuracy=[0.93, 0.94, 0.93, 0.94]),
            _row("optax.centralize", 0.1, steps=[30, None, 33, None], early=[0.5] * 4, accuracy=[0.9] * 4)]
    accuracy = gc_exp._accuracy_verdicts(ctx, CFG, rows)
    speed = [gc_exp._speed(ctx, CFG, rows[0], rows[1], rows[1])]
    stability = [gc_exp._stability(ctx, CFG, rows[0], rows[1], rows[1])]
    ds = types.SimpleNamespace(describe=lambda: "toy data")
    summary = gc_exp._summary(ctx, CFG, ds, rows, accuracy, speed, stability, gc_exp.FIGURES)
    assert "GC steadier (supported) in 0 of 1 model x optimizer pairs" in summary  # equal reversals
    assert training.endpoint_rule() in summary
    assert "| 0.1 (highest tried) |" in summary and "Still at an edge: 1 of 3 runs (MLP SGD plain)" in summary
    assert training.Flatness(**rows[0]["flattened"]).describe() in summary
    # Steps to target: the mean over the seeds that reached it, and how many did.
    assert "| 30 (4/4) |" in summary and "| 20 (4/4) |" in summary and "| 32 (2/4) |" in summary
    assert "| +3.0 ± 0.0 | supported / supported | supported |" in summary  # accuracy, all seeds and each set
    assert "| +10.0 ± 0.0 | supported / supported | supported |" in summary  # steps at plain's rate
    assert "GC chose plain's rate in every pair" in summary
    assert "mean ± std over 4 seeds: 2 disjoint sets of 2" in summary


def test_stability_is_judged_at_plains_rate_and_a_diverged_run_gives_no_verdict(ctx):
    common = dict(steps=[30] * 4, early=[0.5] * 4, accuracy=[0.9] * 4)
    plain = _row("plain", 0.1, reversal=[1.0, 1.1, 0.9, 1.0], **common)
    # At its own, smaller rate GC is steadier; at plain's rate it is not: no credit for the rate.
    gc = _row("GC (ours)", 0.03, reversal=[0.2, 0.3, 0.2, 0.25], **common)
    gc_at_plain_rate = _row("GC (ours)", 0.1, reversal=[1.0, 1.05, 0.95, 1.0], **common)
    judged = gc_exp._stability(ctx, CFG, plain, gc, gc_at_plain_rate)
    assert judged["own_rates"]["difference"] == pytest.approx(0.7625)
    assert judged["common_rate"]["verdict"] == "unclear" and judged["common_rate"]["difference"] == \
        pytest.approx(0.0)
    steadier = _row("GC (ours)", 0.1, reversal=[0.5, 0.6, 0.5, 0.55], **common)
    assert gc_exp._stability(ctx, CFG, plain, gc, steadier)["common_rate"]["verdict"] == "supported"
    diverged = _row("GC (ours)", 0.1, reversal=[0.5, float("nan"), 0.5, 0.55], **common)
    none = gc_exp._stability(ctx, CFG, plain, gc, diverged)
    assert none["common_rate"]["verdict"] == gc_exp.NO_VERDICT
    line = gc_exp._stability_lines([judged, none], quick=False)[-1]
    assert line.endswith(f"within noise in 1, unstable (the seed sets disagree) in 0, {gc_exp.NO_VERDICT} "
                         "in 1.")
