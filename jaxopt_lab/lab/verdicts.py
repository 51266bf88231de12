"""One rule for every verdict and every sentence that interprets a result: two standard errors over seeds.

A summary's reading is picked from the measured numbers by the same rule as the verdict table beside it
(:func:`reading`), so the prose can never claim what the table does not show.

Two tests, one rule:

- :func:`difference`: one comparison (two configurations, e.g. two norms at one batch size), unpaired.
- :func:`paired_difference`: a claim about many configurations at once (e.g. "BN beats LN" over every
  batch size): per seed, the mean over the configurations of ``a - b``; its mean and standard error over
  seeds. Seed ``s`` of every configuration shares its data order (and, for equal shapes, its initial
  weights), so the pairing removes the seed-to-seed noise the configurations share.

And a replication rule (:func:`replicated`): the seeds are split into disjoint sets (:func:`seed_sets`), each
set gets its own verdict, and a claim is supported or not supported only when every set agrees; two sets
that disagree make it *unstable*.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["NOT_SUPPORTED", "SUPPORTED", "UNCLEAR", "UNSTABLE", "Judgement", "difference", "judge",
           "paired_difference", "reading", "replicated", "seed_sets", "verdict"]

SUPPORTED, NOT_SUPPORTED, UNCLEAR, UNSTABLE = "supported", "not supported", "unclear", "unstable"


def difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, float]:
    """``mean(a) - mean(b)`` and its standard error, from per-seed summaries ``{"mean", "std", "values"}``.

    With a single seed on either side the standard error is infinite, so every verdict is unclear.

    >>> diff, se = difference({"mean": 0.9, "std": 0.02, "values": [0.88, 0.92]},
    ...                       {"mean": 0.8, "std": 0.02, "values": [0.78, 0.82]})
    >>> round(diff, 6), round(se, 6)
    (0.1, 0.02)
    """
    n_a, n_b = len(a["values"]), len(b["values"])
    if min(n_a, n_b) < 2:  # one seed has no spread: no difference can exceed the noise
        return a["mean"] - b["mean"], math.inf
    return a["mean"] - b["mean"], math.sqrt(a["std"] ** 2 / n_a + b["std"] ** 2 / n_b)


def verdict(diff: float, se: float, labels: tuple[str, str, str] = (SUPPORTED, NOT_SUPPORTED, UNCLEAR)) -> str:
    """``labels[0]`` when the claimed difference exceeds two standard errors, ``labels[1]`` when the opposite
    one does, else ``labels[2]`` (the difference is within the seed-to-seed noise).

    >>> verdict(0.05, 0.01), verdict(-0.05, 0.01), verdict(0.01, 0.01)
    ('supported', 'not supported', 'unclear')
    >>> verdict(0.05, 0.01, ("GC better", "GC worse", "within noise"))
    'GC better'
    """
    if diff > 2 * se and diff > 0:
        return labels[0]
    if diff < -2 * se and diff < 0:
        return labels[1]
    return labels[2]


def reading(outcome: str, texts: Mapping[str, str]) -> str:
    """The sentence written for ``outcome`` (a verdict, or any measured case), which must be one of ``texts``.

    Interpretive prose is chosen here, by the outcome the numbers gave, never written in advance.

    >>> reading("unclear", {"supported": "It holds.", "unclear": "Within noise."})
    'Within noise.'
    """
    if outcome not in texts:
        raise KeyError(f"reading: no text for the outcome {outcome!r}; written for {sorted(texts)}")
    return texts[outcome]


def paired_difference(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> tuple[float, float]:
    """The pooled, paired difference of many comparisons and its standard error.

    ``pairs``: ``(a, b)`` per-seed summaries ``{"values": [...]}`` (e.g. norm A and norm B at each batch
    size), every one over the same seeds in the same order. Per seed ``s``: ``d_s = mean over pairs of
    (a.values[s] - b.values[s])``; the result is ``mean(d)`` and ``std(d, ddof=1) / sqrt(seeds)``
    (infinite for one seed).

    >>> a = [{"values": [0.90, 0.92]}, {"values": [0.80, 0.86]}]
    >>> b = [{"values": [0.85, 0.88]}, {"values": [0.79, 0.83]}]
    >>> diff, se = paired_difference(list(zip(a, b)))
    >>> round(diff, 6), round(se, 6)
    (0.0325, 0.0025)
    """
    if not pairs:
        raise ValueError("paired_difference: pairs must hold at least one (a, b) comparison, got none")
    rows: list[np.ndarray] = []
    for i, (a, b) in enumerate(pairs):
        va, vb = np.asarray(a["values"], dtype=np.float64), np.asarray(b["values"], dtype=np.float64)
        if va.shape != vb.shape or va.ndim != 1 or (rows and va.size != rows[0].size):
            first = rows[0].size if rows else va.size
            raise ValueError(f"paired_difference: every pair must hold the same seeds; pair {i} has "
                             f"{va.size} and {vb.size} values, the first pair {first}")
        rows.append(va - vb)
    per_seed = np.mean(rows, axis=0)
    if per_seed.size < 2:
        return float(per_seed.mean()), math.inf
    return float(per_seed.mean()), float(per_seed.std(ddof=1) / math.sqrt(per_seed.size))


def seed_sets(summary: Mapping[str, Any], sets: int = 2) -> list[dict[str, Any]]:
    """``summary`` (``{"values": [...]}`` over seeds) split into ``sets`` disjoint, equal, consecutive seed
    sets, each a ``{"mean", "std", "values"}`` summary of its own (std with ``ddof=1``).

    >>> [s["values"] for s in seed_sets({"values": [1.0, 2.0, 3.0, 4.0]})]
    [[1.0, 2.0], [3.0, 4.0]]
    """
    values = np.asarray(summary["values"], dtype=np.float64).ravel()
    if isinstance(sets, bool) or not isinstance(sets, int) or sets < 1 or values.size % sets:
        raise ValueError(f"seed_sets: sets must be a positive int dividing the {values.size} seeds, "
                         f"got {sets!r}")
    return [{"mean": float(part.mean()), "std": float(part.std(ddof=1)) if part.size > 1 else 0.0,
             "values": part.tolist()} for part in np.split(values, sets)]


def replicated(verdicts: Sequence[str], labels: tuple[str, str, str] = (SUPPORTED, NOT_SUPPORTED, UNCLEAR),
               unstable: str = UNSTABLE) -> str:
    """The verdict of a claim tested on disjoint seed sets: the sets' common verdict when they all agree,
    else ``unstable`` (one set supports what another does not, or finds it within noise).

    >>> replicated(["supported", "supported"]), replicated(["supported", "unclear"])
    ('supported', 'unstable')
    >>> replicated(["unclear", "unclear"])
    'unclear'
    """
    if not verdicts:
        raise ValueError("replicated: needs the verdict of at least one seed set, got none")
    unknown = [v for v in verdicts if v not in labels]
    if unknown:
        raise ValueError(f"replicated: verdicts must be among {labels}, got {unknown}")
    return verdicts[0] if len(set(verdicts)) == 1 else unstable


class Judgement(NamedTuple):
    """:func:`judge`'s result: the test on every seed, and the verdict of each disjoint seed set.

    Attributes:
      difference, standard_error: over every seed (what the table's numbers show).
      set_verdicts: one verdict per seed set (:func:`seed_sets`), in order.
      verdict: :func:`replicated` of ``set_verdicts``: the claim's verdict.
    """

    difference: float
    standard_error: float
    set_verdicts: tuple[str, ...]
    verdict: str


def judge(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], *, paired: bool = False,
          sets: int = 2) -> Judgement:
    """A claim's test on all seeds and its replication on ``sets`` disjoint seed sets.

    Args:
      pairs: the compared ``(a, b)`` per-seed summaries; an unpaired test (:func:`difference`) takes exactly
        one pair, a pooled one (``paired=True``, :func:`paired_difference`) one or more.
      paired: use the pooled, paired test.
      sets: the number of disjoint seed sets (1: no replication); each side's seeds must split evenly.

    >>> a, b = {"values": [0.90, 0.91, 0.92, 0.93]}, {"values": [0.80, 0.81, 0.83, 0.82]}
    >>> j = judge([(a, b)], paired=True)
    >>> round(j.difference, 4), j.set_verdicts, j.verdict
    (0.1, ('supported', 'supported'), 'supported')
    """
    if not pairs:
        raise ValueError("judge: pairs must hold at least one (a, b) comparison, got none")
    if not paired and len(pairs) != 1:
        raise ValueError(f"judge: an unpaired test compares one pair, got {len(pairs)} "
                         "(pass paired=True to pool)")

    def test(chosen: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> tuple[float, float]:
        if paired:
            return paired_difference(chosen)
        a, b = chosen[0]
        return difference(_summary(a), _summary(b))

    diff, se = test(pairs)
    split = [(seed_sets(a, sets), seed_sets(b, sets)) for a, b in pairs]
    set_verdicts = tuple(verdict(*test([(a_sets[k], b_sets[k]) for a_sets, b_sets in split]))
                         for k in range(sets))
    return Judgement(diff, se, set_verdicts, replicated(set_verdicts))


def _summary(x: Mapping[str, Any]) -> dict[str, Any]:
    """``{"mean", "std", "values"}`` recomputed from ``x["values"]`` (std with ``ddof=1``)."""
    return seed_sets(x, 1)[0]
