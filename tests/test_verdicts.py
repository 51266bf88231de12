"""The verdict rule's tests: unpaired and pooled paired differences, seed sets and replication."""

import math

import numpy as np
import pytest

from jaxopt_lab.lab import training, verdicts


def _summary(values):
    return training.mean_std(values)


def test_paired_difference_removes_the_noise_the_configurations_share():
    # Seed s is good or bad for both norms alike (a shared offset): unpaired, the gap of 0.01 is lost in the
    # seed-to-seed spread; paired, it is exact.
    offsets = np.array([0.0, 0.05, -0.04, 0.08, -0.02])
    a = [_summary(0.90 + offsets), _summary(0.80 + offsets)]
    b = [_summary(0.89 + offsets), _summary(0.79 + offsets)]
    diff, se = verdicts.paired_difference(list(zip(a, b, strict=True)))
    assert diff == pytest.approx(0.01) and se < 1e-12
    unpaired = verdicts.difference(a[0], b[0])
    assert verdicts.verdict(*unpaired) == verdicts.UNCLEAR
    assert verdicts.verdict(diff, se) == verdicts.SUPPORTED


def test_paired_difference_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    a = [rng.normal(size=6) for _ in range(3)]
    b = [rng.normal(size=6) for _ in range(3)]
    d = np.mean([x - y for x, y in zip(a, b, strict=True)], axis=0)
    diff, se = verdicts.paired_difference([(_summary(x), _summary(y)) for x, y in zip(a, b, strict=True)])
    np.testing.assert_allclose([diff, se], [d.mean(), d.std(ddof=1) / math.sqrt(6)], rtol=1e-12)
    assert verdicts.paired_difference([(_summary([1.0]), _summary([0.0]))])[1] == math.inf


def test_paired_difference_rejects_pairs_over_different_seeds():
    with pytest.raises(ValueError, match="same seeds"):
        verdicts.paired_difference([(_summary([1.0, 2.0]), _summary([1.0, 2.0, 3.0]))])
    with pytest.raises(ValueError, match="same seeds"):
        verdicts.paired_difference([(_summary([1.0, 2.0]), _summary([1.0, 2.0])),
                                    (_summary([1.0, 2.0, 3.0]), _summary([1.0, 2.0, 3.0]))])
    with pytest.raises(ValueError, match="at least one"):
        verdicts.paired_difference([])


def test_seed_sets_are_disjoint_and_recompute_their_spread():
    sets = verdicts.seed_sets(_summary([1.0, 2.0, 3.0, 10.0, 20.0, 30.0]), 2)
    assert [s["values"] for s in sets] == [[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]]
    assert sets[1]["mean"] == 20.0 and sets[1]["std"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="dividing the 5 seeds"):
        verdicts.seed_sets(_summary([1.0] * 5), 2)
    with pytest.raises(ValueError, match="positive int"):
        verdicts.seed_sets(_summary([1.0] * 4), 0)


def test_a_claim_that_one_seed_set_supports_and_the_other_does_not_is_unstable():
    # Set 1: a clear gain; set 2: none. All seeds together would call it supported.
    a = _summary([0.95, 0.96, 0.95, 0.96, 0.95, 0.90, 0.91, 0.92, 0.90, 0.91])
    b = _summary([0.90, 0.91, 0.90, 0.91, 0.90, 0.90, 0.91, 0.92, 0.90, 0.91])
    j = verdicts.judge([(a, b)])
    assert verdicts.verdict(j.difference, j.standard_error) == verdicts.SUPPORTED
    assert j.set_verdicts == (verdicts.SUPPORTED, verdicts.UNCLEAR) and j.verdict == verdicts.UNSTABLE
    both = verdicts.judge([(a, b)], sets=1)
    assert both.verdict == verdicts.SUPPORTED and len(both.set_verdicts) == 1


def test_judge_pools_only_when_asked():
    a, b = _summary([1.0, 2.0]), _summary([0.0, 1.0])
    with pytest.raises(ValueError, match="paired=True"):
        verdicts.judge([(a, b), (a, b)])
    j = verdicts.judge([(a, b), (a, b)], paired=True, sets=1)
    assert j.difference == 1.0 and j.standard_error == 0.0 and j.verdict == verdicts.SUPPORTED
    with pytest.raises(ValueError, match="among"):
        verdicts.replicated(["supported", "maybe"])
