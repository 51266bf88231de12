"""The normalization experiment's claims: each claim of the course notes as one named test, judged on two
disjoint seed sets, and the tables that show them.

A *record* is one trained configuration's summary as the experiment stores it: test accuracy
``{"mean", "std", "values"}`` over every seed (the search's seed set first, then the replicate set),
``final_train_loss``, ``first_eval``, ``steps_to_target`` and the chosen rate. Every claim row comes from
:func:`jaxopt_lab.lab.verdicts.judge`: the difference over all seeds with its standard error, one verdict
per seed set, and the replicated verdict (``unstable`` when the sets disagree). Three kinds of test:

- a claim about norms in general ("BN is the best default", "LN is less effective for CNNs", ...) is tested
  where it applies, on every batch size at once: the pooled, paired test (per seed, the mean over batch
  sizes of the difference), with the per-batch-size results beside it (:func:`per_batch`);
- a claim about small batches compares the smallest batch with the reference batch (unpaired);
- "BN speeds up training" compares BN and no norm at one shared learning rate, so that the rate does not
  decide it, by the steps to a training-loss target and by the test accuracy after the first evaluation
  (:func:`speed_comparisons` shows them beside the comparison at each arm's own rate).

A comparison in which a model did not learn (:func:`learned`) gets no verdict.

>>> run = lambda acc, loss=0.05: {"mean": acc, "std": 0.01, "values": [acc - 0.01, acc, acc + 0.01, acc],
...                               "final_train_loss": {"mean": loss}}
>>> row = judged("LN is less effective for CNNs", "BN minus LN", [(run(0.99), run(0.95))], paired=False,
...              numbers="99.0 vs 95.0", num_classes=10)
>>> row["set_verdicts"], row["verdict"]
(['supported', 'supported'], 'supported')
>>> judged("x", "y", [(run(0.99), run(0.95, loss=2.0))], paired=False, numbers="", num_classes=10)["verdict"]
'no verdict: a model did not learn'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxopt_lab.lab import diagnostics, training
from jaxopt_lab.lab.diagnostics import NOT_LEARNED, learned
from jaxopt_lab.lab.training import pct
from jaxopt_lab.lab.verdicts import SUPPORTED, UNSTABLE, judge, reading, verdict

__all__ = ["PAPER_ERROR", "claims", "claims_table", "judged", "per_batch", "per_batch_table", "record",
           "small_batch_reading", "speed_comparisons", "speed_table", "steps_record"]

# Wu & He, "Group Normalization", ECCV 2018, Figure 1 / Table 2-3: ResNet-50 ImageNet validation error (%)
# against images per GPU (BN's statistics are per GPU); LN and IN at 32 images per GPU.
PAPER_ERROR = {"batch": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
               "group": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
               "layer": {32: 25.3}, "instance": {32: 28.4}}
SHORT = {"none": "no norm", "batch": "BN", "layer": "LN", "instance": "IN", "group": "GN"}


def judged(claim: str, test: str, pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], *,
           paired: bool, numbers: str, num_classes: int, runs: Sequence[Mapping[str, Any]] = (),
           unit: str = "points", claim_id: str = "") -> dict[str, Any]:
    """One claim row: :func:`~jaxopt_lab.lab.verdicts.judge` of ``pairs`` on two seed sets, or no verdict
    when a run behind them (``runs``, default the records in ``pairs``) did not learn."""
    behind = list(runs) or [r for pair in pairs for r in pair]
    untrained = [r for r in behind if not learned(r, num_classes)]
    result = judge(pairs, paired=paired)
    row = {"id": claim_id, "claim": claim, "test": test, "paired": paired, "unit": unit,
           "difference": result.difference, "standard_error": result.standard_error,
           "set_verdicts": list(result.set_verdicts), "verdict": result.verdict, "numbers": numbers}
    if untrained:
        losses = ", ".join(f"{r['final_train_loss']['mean']:.2f}" for r in untrained)
        row.update(verdict=NOT_LEARNED, set_verdicts=[],
                   numbers=f"{numbers}; final train loss {losses} >= ½ ln {num_classes} = "
                           f"{0.5 * math.log(num_classes):.2f}")
    return row


def record(search: training.RateSearch, *, searched: bool = True) -> dict[str, Any]:
    """A *record* of one trained configuration (the normalization experiments' layout): its test accuracy
    over every seed (the search's, then the replicate set's), step budget, chosen rate (``at_edge`` only
    when ``searched``: a given rate has no edge), rate table, final training loss, endpoint
    (:func:`jaxopt_lab.lab.training.loss_flattened`) and diverged runs."""
    history = search.result.history
    return {**training.mean_std(search.result.final_test_accuracy),
            "steps": int(np.asarray(history.steps)[0, -1]),
            "learning_rate": search.learning_rate,
            "at_edge": search.at_edge if searched else None,
            "replicas": search.replicas,
            "rate_table": search.table,
            "final_train_loss": training.mean_std(np.asarray(history.train_loss)[:, -1]),
            "flattened": dataclasses.asdict(training.loss_flattened(history.step_loss)),
            "diverged": int(search.result.diverged.sum())}


def steps_record(step_loss: Any, target: float, window: int) -> dict[str, Any]:
    """Per seed, the steps until the ``window``-step moving average of the training loss is below ``target``
    (:func:`jaxopt_lab.lab.diagnostics.steps_to_target`); a seed that never gets there counts as the whole
    budget (a lower bound on its steps), and ``reached`` says how many did."""
    budget = np.asarray(step_loss).shape[-1]
    hits = diagnostics.steps_to_target(step_loss, target, window)
    return {**training.mean_std(diagnostics.censored_steps(hits, budget)),
            "reached": sum(h is not None for h in hits), "budget": budget}


def _best_other(runs: Mapping[str, Mapping[int, Any]], sizes: Sequence[int]) -> str:
    """The norm other than batch norm with the highest test accuracy averaged over ``sizes``."""
    return max((n for n in runs if n != "batch"),
               key=lambda n: float(np.mean([runs[n][b]["mean"] for b in sizes])))


def _general(cnn_runs: Mapping[str, Mapping[int, Any]], rnn: Mapping[str, Mapping[int, Any]]
             ) -> list[tuple[str, str, str, Mapping[int, Any], Mapping[int, Any], str]]:
    """The claims about norms in general: ``(id, claim, what, a by batch, b by batch, model)``."""
    sizes = sorted(cnn_runs["batch"])
    other = _best_other(cnn_runs, sizes)
    out = [("N13", "BN is the best default",
            f"BN minus {SHORT[other]} (the best other norm over every batch size)", cnn_runs["batch"],
            cnn_runs[other], "CNN"),
           ("N7", "LN is less effective for CNNs", "BN minus LN", cnn_runs["batch"], cnn_runs["layer"], "CNN"),
           ("N9", "IN is less effective for classification", "BN minus IN", cnn_runs["batch"],
            cnn_runs["instance"], "CNN")]
    if rnn.get("batch"):
        out.append(("N5", "BN suits RNNs poorly, LN suits them", "LN minus BN", rnn["layer"], rnn["batch"],
                    "GRU"))
    return out


def claims(*, batch_sizes: Sequence[int], reference_batch: int, cnn_runs: Mapping[str, Mapping[int, Any]],
           rnn: Mapping[str, Mapping[int, Any]], robust: Mapping[str, Any], groups: Mapping[int, Any],
           speed: Mapping[str, Any], num_classes: int) -> list[dict[str, Any]]:
    """Every claim row of the experiment (see the module docstring for the tests)."""
    small, ref = min(batch_sizes), reference_batch
    at = lambda norm, b: cnn_runs[norm][b]
    rows = []

    def small_batch(claim_id: str, claim: str, what: str, a: Any, b: Any) -> None:
        rows.append(judged(claim, f"unpaired: {what}", [(a, b)], paired=False, numbers=f"{pct(a)} vs {pct(b)}",
                           num_classes=num_classes, claim_id=claim_id))

    small_batch("N4", "BN degrades with small batches", f"BN at batch {ref} minus at batch {small}",
                at("batch", ref), at("batch", small))
    rows += [dict(row) for row in speed["comparisons"] if row["shared_rate"]]
    for claim_id, claim, what, a, b, model in _general(cnn_runs, rnn):
        sizes = sorted(a)
        rows.append(judged(
            claim, f"pooled, paired by seed over batch sizes {', '.join(map(str, sizes))} ({model}): {what}",
            [(a[s], b[s]) for s in sizes], paired=True, num_classes=num_classes, claim_id=claim_id,
            numbers="mean over batch sizes " + " vs ".join(
                f"{100 * np.mean([x[s]['mean'] for s in sizes]):.1f}" for x in (a, b))))
    small_batch("N6", "LN works with tiny batches", f"LN minus BN at batch {small}", at("layer", small),
                at("batch", small))
    drops = {n: training.mean_std(np.subtract(robust[n]["clean"]["values"], robust[n]["contrast"]["values"]))
             for n in robust}
    rows.append(judged("IN's per-sample normalization removes contrast changes",
                       f"unpaired: accuracy lost to per-example contrast at batch {ref}, BN's loss minus IN's",
                       [(drops["batch"], drops["instance"])], paired=False, num_classes=num_classes,
                       claim_id="N8", runs=(at("batch", ref), at("instance", ref)),
                       numbers=", ".join(f"{n} lost {pct(d)}" for n, d in drops.items())))
    small_batch("N11", "GN is robust to small batches", f"GN minus BN at batch {small}", at("group", small),
                at("batch", small))
    best = max(groups.values(), key=lambda r: r["mean"])
    worst = min(groups.values(), key=lambda r: r["mean"])
    rows.append(judged("GN's group count needs tuning",
                       f"unpaired: best minus worst group count at batch {ref}", [(best, worst)],
                       paired=False, num_classes=num_classes, claim_id="N12",
                       numbers=", ".join(f"G={g} {pct(r)}" for g, r in groups.items())))
    return rows


def per_batch(cnn_runs: Mapping[str, Mapping[int, Any]], rnn: Mapping[str, Mapping[int, Any]],
              num_classes: int) -> list[dict[str, Any]]:
    """The general claims at each batch size on its own (unpaired), beside their pooled test: ``{"id",
    "claim", "by_batch": {batch: row}}``; "BN is the best default" compares BN with the best other norm at
    that batch size."""
    out = []
    for claim_id, claim, what, a, b, model in _general(cnn_runs, rnn):
        by_batch = {}
        for size in sorted(a):
            other = b[size]
            if claim_id == "N13":  # the best other norm at this batch size
                other = max((cnn_runs[n][size] for n in cnn_runs if n != "batch"), key=lambda r: r["mean"])
            by_batch[size] = judged(claim, f"{model} at batch {size}", [(a[size], other)], paired=False,
                                    numbers="", num_classes=num_classes)
        what = "BN minus the best other norm at that batch size" if claim_id == "N13" else what
        out.append({"id": claim_id, "claim": claim, "test": what, "by_batch": by_batch})
    return out


def _gap(row: Mapping[str, Any]) -> str:
    if row["unit"] == "steps":
        return f"{row['difference']:+.0f} ± {row['standard_error']:.0f} steps"
    return f"{100 * row['difference']:+.1f} ± {100 * row['standard_error']:.1f}"


def claims_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The claims as markdown table lines; ``shown_verdict`` (the verdict as the run shows it) is used when
    present."""
    lines = ["| id | claim (course notes) | test | difference, all seeds (pts) | seed set A | seed set B | "
             "verdict | numbers |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sets = list(r["set_verdicts"]) or ["—", "—"]
        lines.append(f"| {r['id']} | {r['claim']} | {r['test']} | {_gap(r)} | {' | '.join(sets)} | "
                     f"{r.get('shown_verdict', r['verdict'])} | {r['numbers']} |")
    return lines


def per_batch_table(rows: Sequence[Mapping[str, Any]], batch_sizes: Sequence[int]) -> list[str]:
    """The per-batch-size results of the general claims as markdown table lines."""
    sizes = sorted(batch_sizes)
    lines = ["| id | claim | " + " | ".join(f"batch {b}" for b in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for r in rows:
        cells = [f"{_gap(r['by_batch'][b])} {r['by_batch'][b]['verdict']}" if b in r["by_batch"] else "—"
                 for b in sizes]
        lines.append(f"| {r['id']} | {r['claim']} ({r['test']}) | " + " | ".join(cells) + " |")
    return lines


def speed_comparisons(*, none: Mapping[str, Any], bn_own: Mapping[str, Any], bn_shared: Mapping[str, Any],
                      reference_batch: int, target: float, window: int,
                      num_classes: int) -> list[dict[str, Any]]:
    """"BN speeds up training" four ways: by steps to the loss ``target`` and by test accuracy after the first
    evaluation, each at the shared rate (the no-norm arm's chosen rate, given to BN too: the rows that
    carry the claim's verdict, ``shared_rate`` True) and with each arm at its own chosen rate."""
    rows = []
    first = none["first_eval_step"]
    for shared, bn in ((True, bn_shared), (False, bn_own)):
        rates = (f"both at the no-norm arm's rate {none['learning_rate']:g}" if shared else
                 f"each at its own rate (BN {bn['learning_rate']:g}, no norm {none['learning_rate']:g})")
        steps = judged("BN speeds up training", f"unpaired, batch {reference_batch}, {rates}: steps until the "
                       f"{window}-step mean training loss < {target:g}, no norm minus BN",
                       [(none["steps_to_target"], bn["steps_to_target"])], paired=False, unit="steps",
                       num_classes=num_classes, runs=(none, bn), claim_id="N3",
                       numbers=f"BN {_steps(bn['steps_to_target'])} vs no norm "
                               f"{_steps(none['steps_to_target'])}")
        accuracy = judged("BN speeds up training", f"unpaired, batch {reference_batch}, {rates}: test accuracy "
                          f"after {first} steps, BN minus no norm", [(bn["first_eval"], none["first_eval"])],
                          paired=False, num_classes=num_classes, runs=(none, bn), claim_id="N3",
                          numbers=f"{pct(bn['first_eval'])} vs {pct(none['first_eval'])}")
        rows += [{**steps, "shared_rate": shared}, {**accuracy, "shared_rate": shared}]
    return rows


def _steps(s: Mapping[str, Any]) -> str:
    n = len(s["values"])
    return f"{s['mean']:.0f} ± {s['std']:.0f}" + ("" if s["reached"] == n else f" ({s['reached']}/{n} reached)")


def speed_table(*, none: Mapping[str, Any], bn_own: Mapping[str, Any], bn_shared: Mapping[str, Any],
                comparisons: Sequence[Mapping[str, Any]], target: float, window: int) -> list[str]:
    """The three speed arms and the four comparisons as markdown lines."""
    first = none["first_eval_step"]
    lines = [f"| arm | Adam rate | steps until the {window}-step mean training loss < {target:g} | "
             f"test accuracy after {first} steps (%) |", "|---|---|---|---|"]
    for label, r in (("no norm, its chosen rate (the shared rate)", none), ("BN, its own chosen rate", bn_own),
                     ("BN, the shared rate", bn_shared)):
        lines.append(f"| {label} | {r['learning_rate']:g} | {_steps(r['steps_to_target'])} | "
                     f"{pct(r['first_eval'])} |")
    lines += ["", "| comparison | no norm minus BN, steps | BN minus no norm, accuracy (pts) |",
              "|---|---|---|"]
    for shared in (True, False):
        steps, accuracy = (r for r in comparisons if r["shared_rate"] == shared)
        label = "at the shared rate (the verdict)" if shared else "each at its own chosen rate (context)"
        lines.append(f"| {label} | {_gap(steps)}: {steps['verdict']} | "
                     f"{_gap(accuracy)}: {accuracy['verdict']} |")
    return lines


def small_batch_reading(*, batch_sizes: Sequence[int], reference_batch: int,
                        cnn_runs: Mapping[str, Mapping[int, Any]], bn_gap: Mapping[int, Any],
                        claims: Sequence[Mapping[str, Any]], conv_layers: int, num_classes: int) -> str:
    """One paragraph on the Group Norm paper's small-batch claim, every clause chosen by the numbers: the
    verdict of the claim's row in the table, and the 2-standard-error rule on BN's statistics gap
    (``bn_gap[b]["gap"]``: accuracy with running minus with batch statistics at test time)."""
    small, ref = min(batch_sizes), reference_batch
    row = next(c for c in claims if c["claim"] == "BN degrades with small batches")
    found, drop, se = row["verdict"], row["difference"], row["standard_error"]
    paper = {b: PAPER_ERROR["batch"][b] for b in (small, ref) if b in PAPER_ERROR["batch"]}
    gap_small, gap_ref = bn_gap[small]["gap"], bn_gap[ref]["gap"]
    at_small = {n: cnn_runs[n][small]["mean"] for n in cnn_runs}
    text = (f"Reading: BN's test accuracy at batch {ref} minus at batch {small}: {100 * drop:+.1f} ± "
            f"{100 * se:.1f} points (verdict: {row.get('shown_verdict', found)})")
    size = None
    if len(paper) == 2:
        paper_drop = paper[small] - paper[ref]
        text += (f", against {paper_drop:.1f} points of ImageNet error in the paper ({paper[ref]} % at {ref} "
                 f"images per GPU, {paper[small]} % at {small})")
        size = "full" if found == SUPPORTED and 100 * drop >= 0.25 * paper_drop else "direction"
        text += reading(found if found != SUPPORTED else size, {
            "full": ": the degradation is **reproduced**",
            "direction": ": its **direction is reproduced, its size is not**",
            "not supported": ": the opposite of the degradation was measured",
            "unclear": ": the degradation is **not reproduced** (within the seed-to-seed noise)",
            UNSTABLE: ": the two seed sets **disagree** (unstable), so the degradation is not established",
            NOT_LEARNED: ": **no verdict**, a compared model did not learn"})
    text += (f". At batch {small} the five CNNs reach {100 * min(at_small.values()):.1f}-"
             f"{100 * max(at_small.values()):.1f} % test accuracy. "
             f"Normalizing each test batch of {small} with its own statistics instead of the running averages "
             f"costs {100 * gap_small['mean']:+.1f} ± {100 * gap_small['std']:.1f} points (at batch {ref}: "
             f"{100 * gap_ref['mean']:+.1f} ± {100 * gap_ref['std']:.1f}).")
    n = len(gap_small["values"])
    noisy = verdict(gap_small["mean"], gap_small["std"] / math.sqrt(n) if n > 1 else math.inf)
    text += reading(noisy, {
        SUPPORTED: f" So statistics of {small} examples are a noisier normalization than the running averages "
                   "that inference uses; the network trained with that noise.",
        "not supported": f" The statistics of {small} examples normalize better than the running averages "
                         "here.",
        "unclear": f" The statistics of {small} examples normalize about as well as the running averages here, "
                   "so the small-batch noise that drives the paper's effect is small on this data."})
    if found != SUPPORTED or size == "direction":
        text += (" Why the paper's effect is larger than this run's is not decided here: the paper's ResNet-50 "
                 f"stacks about 50 normalized layers on 1000 classes, this CNN {conv_layers} normalized conv "
                 f"layers on {num_classes} classes. The `normalization-depth` experiment tests depth as the "
                 "cause (5 to 53 normalized layers in full mode); its verdict is in its own section.")
    return text
