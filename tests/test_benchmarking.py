"""The timing harness (jaxopt_lab.benchmarking): what it calls, in which order, and how it reduces samples.

No assertion here depends on how fast anything runs: the harness is checked on call counts, call order
and hand-made samples.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_lab import benchmarking as bm


def _recorder(log, name):
    def call():
        log.append(name)
        return name

    return call


def test_calls_are_counted_and_rotated_across_repetitions():
    log = []
    fns = {name: _recorder(log, name) for name in "abc"}
    timings = bm.time_interleaved(fns, repeats=4, warmup=2, min_sample_s=0.0)
    # Per callable: 2 warm-up calls + 1 sizing call, then one call per repetition (min_sample_s=0).
    assert log[:9] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    timed = log[9:]
    assert [timed[i:i + 3] for i in range(0, 12, 3)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    for t in timings.values():
        assert t.number == 1 and t.samples.shape == (4,) and np.all(t.samples >= 0)


def test_each_sample_averages_number_calls():
    log = []
    timing = bm.time_interleaved({"a": _recorder(log, "a")}, repeats=3, warmup=1, number=4)["a"]
    assert timing.number == 4 and len(log) == 1 + 3 * 4  # warm-up, then 4 calls per sample, no sizing call
    log.clear()
    timing = bm.time_interleaved({"a": _recorder(log, "a")}, repeats=2, warmup=0, min_sample_s=1e9)["a"]
    assert timing.number == bm.MAX_CALLS_PER_SAMPLE and len(log) == 1 + 2 * bm.MAX_CALLS_PER_SAMPLE


def test_results_are_blocked_on():
    blocked = []

    class Result:
        def block_until_ready(self):
            blocked.append(True)
            return self

    bm.time_interleaved({"a": Result}, repeats=2, warmup=1, min_sample_s=0.0)
    assert len(blocked) == 4  # warm-up, sizing, 2 repetitions


def test_ratio_is_the_median_of_paired_ratios_not_the_ratio_of_medians():
    ours = bm.Timing(np.array([1.0, 4.0, 10.0]), 1)
    anchor = bm.Timing(np.array([1.0, 2.0, 10.0]), 1)
    cmp = bm.Comparison(ours, anchor)
    assert cmp.ratio == pytest.approx(1.0)  # paired: 1, 2, 1
    assert ours.median / anchor.median == pytest.approx(2.0)
    assert cmp.speedup == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(1e-6, 1.0), min_size=3, max_size=9).filter(lambda s: len(s) % 2),
       st.lists(st.floats(1e-6, 1.0), min_size=9, max_size=9), st.floats(1e-3, 1e3))
def test_ratio_is_scale_free_and_swapping_inverts_it(ours, anchor, scale):
    ours, anchor = np.array(ours), np.array(anchor[: len(ours)])
    cmp = bm.Comparison(bm.Timing(ours, 1), bm.Timing(anchor, 1))
    scaled = bm.Comparison(bm.Timing(ours * scale, 1), bm.Timing(anchor * scale, 1))
    swapped = bm.Comparison(bm.Timing(anchor, 1), bm.Timing(ours, 1))
    assert scaled.ratio == pytest.approx(cmp.ratio, rel=1e-9)
    assert swapped.ratio == pytest.approx(1.0 / cmp.ratio, rel=1e-9)  # odd sample count: exact median


def test_targets():
    slowdown, speedup = bm.Target("max_ratio", 1.15), bm.Target("min_speedup", 10)
    assert slowdown.met(1.15) and not slowdown.met(1.2)
    assert speedup.met(0.1) and speedup.met(0.05) and not speedup.met(0.2)
    assert slowdown.describe() == "ours/anchor <= 1.15" and speedup.describe() == "speed-up >= 10x"
    with pytest.raises(ValueError, match="kind must be"):
        bm.Target("faster", 1.0)
    with pytest.raises(ValueError, match="positive finite"):
        bm.Target("max_ratio", math.nan)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"fns": {}}, ValueError, "at least one callable"),
    ({"fns": {"a": 3}}, TypeError, r"fns\['a'\] must be callable, got int"),
    ({"repeats": 0}, ValueError, "repeats must be a positive integer, got 0"),
    ({"repeats": 2.0}, ValueError, "repeats must be a positive integer"),
    ({"warmup": -1}, ValueError, "warmup must be a non-negative integer, got -1"),
    ({"min_sample_s": -1.0}, ValueError, "min_sample_s must be >= 0"),
    ({"number": 0}, ValueError, "number must be a positive integer, got 0"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    kwargs = {"fns": {"a": lambda: None}, **kwargs}
    with pytest.raises(error, match=match):
        bm.time_interleaved(kwargs.pop("fns"), **kwargs)


def test_bandwidth_arithmetic():
    tree = {"a": jnp.zeros((4, 8), jnp.float32), "b": [jnp.zeros(10, jnp.bfloat16)]}
    assert bm.nbytes(tree) == 4 * 8 * 4 + 10 * 2
    assert bm.achieved_gbps(2_000_000_000, 0.5) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        bm.achieved_gbps(1, 0.0)


def test_streaming_copy_really_writes_a_new_array():
    x = jnp.arange(1024.0)
    y = bm.streaming_copy(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) + 1)
    assert y.unsafe_buffer_pointer() != x.unsafe_buffer_pointer()
    gbps, timing = bm.copy_bandwidth((256,), repeats=2, warmup=1, min_sample_s=0.0)
    assert math.isfinite(gbps) and gbps > 0 and timing.samples.shape == (2,)


def test_environment_names_the_device_and_versions():
    env = bm.benchmark_environment()
    assert env["jax"] == jax.__version__ and env["device_count"] == jax.device_count()
    assert env["backend"] == jax.default_backend() and env["flax"] and env["optax"] and env["cpu_count"] >= 1
