"""One rule for every verdict and every sentence that interprets a result: two standard errors over seeds.

A summary's reading is picked from the measured numbers by the same rule as the verdict table beside it
(:func:`reading`), so the prose can never claim what the table does not show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["NOT_SUPPORTED", "SUPPORTED", "UNCLEAR", "difference", "reading", "verdict"]

SUPPORTED, NOT_SUPPORTED, UNCLEAR = "supported", "not supported", "unclear"


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
