"""The normalization experiment's claim rows: which test each claim gets, replication on two seed sets, the
speed claim at a shared rate, and no verdict for a model that did not learn."""

import numpy as np
import pytest

from jaxopt_lab.lab import norm_claims, training

SIZES = (4, 32)
NORMS = ("none", "batch", "layer", "instance", "group")


def _record(values, loss=0.05, rate=1e-2, first=None, steps=None):
    """A configuration's record as the experiment stores it, over seeds (set A first, then set B)."""
    values = np.asarray(values, dtype=np.float64)
    return {**training.mean_std(values), "final_train_loss": {"mean": loss}, "learning_rate": rate,
            "first_eval": training.mean_std(values if first is None else first), "first_eval_step": 20,
            "steps_to_target": {**training.mean_std([100] * values.size if steps is None else steps),
                                "reached": values.size, "budget": 400}}


def _runs(offsets, seeds=(0.90, 0.95, 0.92, 0.97)):
    """Every norm at every batch size: the seed's level (shared by every configuration) plus the norm's
    offset, so a paired test sees the offset and an unpaired one the seed-to-seed spread too."""
    return {n: {b: _record(np.asarray(seeds) + offsets.get(n, 0.0)) for b in SIZES} for n in NORMS}


def _claims(cnn, rnn=None, speed=None, groups=None, num_classes=10):
    rnn = rnn or {n: {32: _record([0.9, 0.91, 0.92, 0.93])} for n in ("none", "batch", "layer")}
    robust = {n: {k: _record([0.9, 0.9, 0.9, 0.9]) for k in ("clean", "contrast")} for n in NORMS}
    speed = speed or {"comparisons": _speed(cnn)}
    groups = groups or {1: _record([0.9, 0.91, 0.92, 0.93]), 4: _record([0.9, 0.91, 0.92, 0.93])}
    rows = norm_claims.claims(batch_sizes=SIZES, reference_batch=32, cnn_runs=cnn, rnn=rnn, robust=robust,
                              groups=groups, speed=speed, num_classes=num_classes)
    return {(r["claim"], r["test"].split(":")[-1]): r for r in rows}, rows


def _speed(cnn, bn_shared=None):
    return norm_claims.speed_comparisons(none=cnn["none"][32], bn_own=cnn["batch"][32],
                                         bn_shared=bn_shared or cnn["batch"][32], reference_batch=32,
                                         target=0.5, window=20, num_classes=10)


def _row(rows, claim):
    (row,) = [r for r in rows if r["claim"] == claim]
    return row


def test_a_general_claim_is_the_pooled_paired_test_over_every_batch_size():
    # BN beats LN by 1 point for every seed at every batch size; the seeds themselves spread by 7 points.
    cnn = _runs({"batch": 0.01})
    _, rows = _claims(cnn)
    pooled = _row(rows, "LN is less effective for CNNs")
    assert pooled["paired"] and "pooled, paired by seed over batch sizes 4, 32" in pooled["test"]
    assert pooled["difference"] == pytest.approx(0.01) and pooled["verdict"] == "supported"
    assert pooled["set_verdicts"] == ["supported", "supported"]
    # Each batch size on its own, unpaired, sees the seeds' spread as well: within noise.
    per_batch = {r["id"]: r for r in norm_claims.per_batch(cnn, {}, num_classes=10)}
    assert {b: r["verdict"] for b, r in per_batch["N7"]["by_batch"].items()} == {4: "unclear", 32: "unclear"}
    assert "N5" not in per_batch  # no GRU trained: no RNN claim
    table = "\n".join(norm_claims.per_batch_table(list(per_batch.values()), SIZES))
    assert "| N7 | LN is less effective for CNNs (BN minus LN) | +1.0 ± 2.2 unclear | +1.0 ± 2.2 unclear |" \
        in table


def test_best_default_compares_with_the_best_other_norm_over_every_batch_size():
    cnn = _runs({"batch": 0.01, "group": 0.02, "layer": 0.005})
    row = _row(_claims(cnn)[1], "BN is the best default")
    assert "BN minus GN" in row["test"] and row["verdict"] == "not supported"
    per_batch = {r["id"]: r for r in norm_claims.per_batch(cnn, {}, num_classes=10)}
    assert per_batch["N13"]["test"] == "BN minus the best other norm at that batch size"


def test_seed_sets_that_disagree_make_a_claim_unstable():
    cnn = _runs({})
    # Set A (the first two seeds): LN 5 points below BN; set B: 5 points above.
    for b in SIZES:
        cnn["layer"][b] = _record(np.asarray([0.90, 0.95, 0.92, 0.97]) + np.asarray([-0.05, -0.05, 0.05, 0.05]))
    row = _row(_claims(cnn)[1], "LN is less effective for CNNs")
    assert row["set_verdicts"] == ["supported", "not supported"] and row["verdict"] == "unstable"
    assert "| supported | not supported | unstable |" in "\n".join(norm_claims.claims_table([row]))


def test_small_batch_claims_compare_the_smallest_with_the_reference_batch_unpaired():
    cnn = _runs({})
    cnn["batch"][4] = _record([0.5, 0.52, 0.51, 0.53])
    row = _row(_claims(cnn)[1], "BN degrades with small batches")
    assert not row["paired"] and row["test"] == "unpaired: BN at batch 32 minus at batch 4"
    assert row["verdict"] == "supported" and row["id"] == "N4"


def test_the_speed_verdict_comes_from_the_shared_rate_and_both_are_shown():
    cnn = _runs({})
    # At its own (higher) rate BN reaches the target in 40 steps, at the no-norm arm's rate in 100, as fast
    # as no norm: faster only because of its rate.
    cnn["batch"][32] = _record([0.9, 0.95, 0.92, 0.97], rate=3e-2, steps=[40, 42, 41, 39])
    cnn["none"][32] = _record([0.9, 0.95, 0.92, 0.97], steps=[100, 102, 98, 101])
    shared = _record([0.9, 0.95, 0.92, 0.97], steps=[101, 99, 100, 102])
    comparisons = _speed(cnn, bn_shared=shared)
    by = {(r["shared_rate"], r["unit"]): r for r in comparisons}
    assert by[False, "steps"]["verdict"] == "supported" and by[True, "steps"]["verdict"] == "unclear"
    rows = _claims(cnn, speed={"comparisons": comparisons})[1]
    speed_rows = [r for r in rows if r["claim"] == "BN speeds up training"]
    assert len(speed_rows) == 2 and all("both at the no-norm arm's rate 0.01" in r["test"] for r in speed_rows)
    assert speed_rows[0]["verdict"] == "unclear"
    table = "\n".join(norm_claims.speed_table(none=cnn["none"][32], bn_own=cnn["batch"][32], bn_shared=shared,
                                              comparisons=comparisons, target=0.5, window=20))
    assert "| at the shared rate (the verdict) | -0 ± 1 steps: unclear |" in table  # 100.25 vs 100.5 steps
    assert "| each at its own chosen rate (context) | +60 ± 1 steps: supported |" in table


def test_steps_to_the_target_count_an_unreached_seed_as_the_budget():
    losses = np.stack([np.linspace(2.0, 0.1, 100), np.full(100, 2.0)])
    record = norm_claims.steps_record(losses, target=0.5, window=10)
    assert record["reached"] == 1 and record["budget"] == 100 and record["values"][1] == 100
    assert 80 < record["values"][0] < 100


def test_a_claim_about_a_model_that_did_not_learn_gets_no_verdict():
    cnn = _runs({})
    cnn["batch"][4] = _record([0.5, 0.52, 0.51, 0.53])  # BN much worse at the small batch: a clear verdict
    rnn = {"none": {32: _record([0.9] * 4)}, "batch": {32: _record([0.2, 0.21, 0.2, 0.19], loss=2.1)},
           "layer": {32: _record([0.95, 0.96, 0.95, 0.94])}}
    rows = _claims(cnn, rnn=rnn)[1]
    assert _row(rows, "BN degrades with small batches")["verdict"] == "supported"
    rnn_claim = _row(rows, "BN suits RNNs poorly, LN suits them")
    # LN beats BN by 75 points, but the BN GRU's loss (2.1) is at chance level (ln 10 = 2.3): no verdict.
    assert rnn_claim["verdict"] == norm_claims.NOT_LEARNED and "final train loss 2.10" in rnn_claim["numbers"]
    assert rnn_claim["set_verdicts"] == []
    assert norm_claims.learned(_record([0.9]), 10) and not norm_claims.learned(_record([0.2], loss=1.2), 10)
