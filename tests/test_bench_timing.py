"""The timing harness (jaxopt_lab.lab.bench.timing): what it calls, in which order, and how it reduces samples.

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

from jaxopt_lab.lab import experiment
from jaxopt_lab.lab.bench import timing as bm


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


def test_ratio_quartiles_and_the_upper_quartile_rule():
    # Per-repetition ratios 0.8, 0.9, 1.0, 1.1, 1.3: median 1.0, quartiles 0.9 and 1.1.
    ours = bm.Timing(np.array([0.8, 0.9, 1.0, 1.1, 1.3]), 1)
    cmp = bm.Comparison(ours, bm.Timing(np.ones(5), 1))
    assert cmp.ratio == pytest.approx(1.0)
    assert cmp.ratio_quartiles == pytest.approx((0.9, 1.1))
    np.testing.assert_allclose(cmp.ratios, ours.samples)
    # A median that meets "<= 1.0" is not enough: the upper quartile (1.1) must.
    assert bm.Target("max_ratio", 1.0).met(cmp.ratio) and not cmp.meets(bm.Target("max_ratio", 1.0))
    assert cmp.meets(bm.Target("max_ratio", 1.1))
    # min_speedup is judged at the same pessimistic end: 1 / 1.1 = 0.909x.
    assert cmp.meets(bm.Target("min_speedup", 0.9)) and not cmp.meets(bm.Target("min_speedup", 1.0))
    with pytest.raises(ValueError, match="same interleaved run"):
        _ = bm.Comparison(ours, bm.Timing(np.ones(3), 1)).ratios
    with pytest.raises(ValueError, match="positive finite"):
        bm.Target("max_ratio", 1.0).met_by([1.0, np.nan])


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
    ({"repeats": 0}, ValueError, "repeats must be a positive int, got 0"),
    ({"repeats": 2.0}, ValueError, "repeats must be a positive int"),
    ({"warmup": -1}, ValueError, "warmup must be a non-negative integer, got -1"),
    ({"min_sample_s": -1.0}, ValueError, "min_sample_s must be >= 0"),
    ({"number": 0}, ValueError, "number must be a positive int, got 0"),
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


def test_memory_traffic_counts_passes_and_full_size_arrays():
    x = jnp.ones((64, 256))
    copy = bm.memory_traffic(bm.streaming_copy, (x,), x)
    assert copy.passes == pytest.approx(2.0) and copy.full_size_buffers == 1  # read x, write one array
    # Two outputs of x's size: two fusions reading x each (4 passes) or one multi-output fusion (3).
    two = bm.memory_traffic(jax.jit(lambda x: (x + 1, x * 2)), (x,), x)
    assert two.full_size_buffers in (1, 2) and two.passes == pytest.approx(2 + two.full_size_buffers, rel=0.01)
    # A reduction writes nothing of x's size; an already compiled program is read as it is.
    compiled = jax.jit(lambda x: x.sum(0)).lower(x).compile()
    total = bm.memory_traffic(compiled, (x,), x)
    assert total.full_size_buffers == 0 and 1.0 <= total.passes < 1.1
    assert total.reductions == 1 and total.kernels >= 1 and copy.reductions == 0
    assert total.as_dict() == {"passes": total.passes, "full_size_buffers": 0, "kernels": total.kernels,
                               "reductions": 1}
    # Two sums of x are two reductions (in one multi-output fusion or two).
    assert bm.memory_traffic(jax.jit(lambda x: (x.sum(0), (x * x).sum(0))), (x,), x).reductions == 2


def test_compiled_memory_reports_temporaries():
    x = jnp.ones((128, 128))
    small = bm.compiled_memory(jax.jit(lambda x: (x @ x).sum()), (x,))
    assert small["argument_bytes"] == x.nbytes and small["output_bytes"] == 4 and small["temp_bytes"] >= 0
    # A backward pass keeps the forward's activations (here two of x's size) as temporaries.
    grad = bm.compiled_memory(lambda x: jax.grad(lambda w: jnp.tanh(jnp.tanh(x @ w) @ w).sum())(x), (x,))
    assert grad["temp_bytes"] >= 2 * x.nbytes and grad["output_bytes"] == x.nbytes


def test_load_average_is_recorded():
    load = bm.load_average()
    assert load is None or (len(load) == 3 and all(v >= 0 for v in load))
    recorded = bm.benchmark_environment()["load_average"]
    assert recorded is None or len(recorded) == 3


def test_environment_names_the_device_and_versions():
    env = bm.benchmark_environment()
    # An experiment's record, extended (built apart from the runner, which imports the CLI).
    assert env.items() >= experiment.environment().items()
    assert env["jax"] == jax.__version__ and env["device_count"] == jax.device_count()
    assert env["backend"] == jax.default_backend() and env["flax"] and env["optax"] and env["cpu_count"] >= 1
