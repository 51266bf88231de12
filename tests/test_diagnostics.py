"""diagnose on constructed histories, loss_noise, escape detection on an analytic case, the LR range test."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_lab.lab import diagnostics, landscapes, sweep
from jaxopt_lab.lab.diagnostics import diagnose

T = np.arange(200)


def test_geometric_decay_to_the_target_is_ok_and_says_when():
    d = diagnose(20.0 * 0.9 ** T, target=0.1)
    assert d.label == "ok" and d.evidence["step"] == int(np.argmax(20.0 * 0.9 ** T < 0.1))


def test_a_spike_before_converging_is_ok_but_the_evidence_shows_it():
    history = np.concatenate([[10.0, 80.0, 40.0], 5.0 * 0.8 ** np.arange(30)])
    d = diagnose(history, target=0.1)
    assert d.label == "ok" and d.evidence["peak_ratio"] == pytest.approx(8.0)


@pytest.mark.parametrize(("history", "evidence_key"), [
    (np.array([1.0, 2.0, np.nan, np.nan]), "first_nonfinite_step"),
    (1.5 ** T[:40], "growth"),
])
def test_blowups_are_diverging(history, evidence_key):
    d = diagnose(history, target=0.1)
    assert d.label == "diverging" and evidence_key in d.evidence
    if evidence_key == "first_nonfinite_step":
        assert d.evidence["first_nonfinite_step"] == 2 and d.evidence["last_finite_loss"] == 2.0


def test_bouncing_loss_is_oscillating():
    history = 5.0 + np.where(T % 2 == 0, 1.0, -1.0) * np.exp(-T / 500)
    d = diagnose(history, target=0.1)
    assert d.label == "oscillating" and d.evidence["increase_fraction"] >= 0.3


def test_flat_loss_at_a_bad_value_is_stalled():
    history = np.concatenate([10.0 * 0.97 ** T[:50], np.full(150, 10.0 * 0.97 ** 49)])
    d = diagnose(history, target=0.1)
    assert d.label == "stalled" and d.evidence["window_decrease"] == pytest.approx(0.0)


@settings(max_examples=10, deadline=None)
@given(rate=st.floats(1e-3, 1e-2), start=st.floats(5.0, 50.0))
def test_slow_geometric_decay_is_too_slow_with_an_exact_projection(rate, start):
    history = start * np.exp(-rate * T)
    d = diagnose(history, target=0.1)
    assert d.label == "too slow"
    assert d.evidence["log_decrease_per_step"] == pytest.approx(rate, rel=1e-6)
    # remaining steps to the target at the measured rate: log(L_T / 0.1) / rate
    assert d.evidence["projected_extra_steps"] == pytest.approx(math.log(history[-1] / 0.1) / rate, rel=1e-6)


def test_without_a_target_halving_decides_between_ok_and_too_slow():
    assert diagnose(np.linspace(10.0, 2.0, 50)).label == "ok"
    assert diagnose(np.linspace(10.0, 8.0, 50)).label == "too slow"


def test_diagnosis_prints_its_evidence():
    text = str(diagnose(np.array([1.0, 3.0, np.inf])))
    assert text.startswith("diverging: non-finite loss") and "first_nonfinite_step=2" in text


def test_loss_noise_separates_smooth_from_noisy():
    smooth = diagnostics.loss_noise(20.0 * 0.97 ** T)
    jitter = np.exp(0.3 * np.random.default_rng(0).normal(size=T.size))
    noisy = diagnostics.loss_noise(20.0 * 0.97 ** T * jitter)
    assert smooth["increase_fraction"] == 0.0 and smooth["roughness"] < 1e-9
    assert noisy["increase_fraction"] > 0.3 and noisy["roughness"] > 0.3


@pytest.mark.parametrize(("lr", "start"), [(0.05, (1.0, 1e-3)), (0.01, (0.5, 1e-6)), (0.1, (2.0, -1e-4))])
def test_escape_steps_match_gradient_descent_on_the_hyperbolic_saddle(lr, start):
    # GD on x^2 - y^2: x_t = (1 - 2 lr)^t x_0, y_t = (1 + 2 lr)^t y_0 (exactly, in exact arithmetic).
    margin, steps = 0.1, 1000
    t = np.arange(steps + 1)
    with np.errstate(over="ignore"):  # the escaped branch grows without bound: -inf is still an escape
        exact = start[0] ** 2 * (1 - 2 * lr) ** (2 * t) - start[1] ** 2 * (1 + 2 * lr) ** (2 * t)
    expected = int(np.argmax(exact <= -margin))
    cfg = sweep.SweepConfig(steps=steps, target_loss=-margin + 1e-12, divergence_bound=1e9)
    out = sweep.run_sweep(landscapes.hyperbolic, "sgd", sweep.grid([lr], [0], jnp.asarray(start)), config=cfg)
    losses = out["sgd"].losses
    assert diagnostics.escape_steps(exact, 0.0, margin) == expected
    assert abs(int(diagnostics.escape_steps(losses, 0.0, margin)[0]) - expected) <= 1  # float32 rounding
    assert out["sgd"].reached[0] and abs(int(out["sgd"].stop_step[0]) - expected) <= 1


def test_gradient_noise_along_is_the_std_of_a_batch_mean_without_replacement():
    # loss = mean(c_i * w0 + d_i * w1): per-example gradients (c_i, d_i), so a batch gradient is the batch
    # means, whose std without replacement is std(c) / sqrt(B) * sqrt((n - B) / (n - 1)).
    n, batch = 64, 8
    c, d = np.linspace(-1.0, 1.0, n), 3.0 * np.cos(np.arange(n))
    data = {"c": jnp.asarray(c, jnp.float32), "d": jnp.asarray(d, jnp.float32)}
    loss = lambda w, b: jnp.mean(b["c"] * w[0] + b["d"] * w[1])
    directions = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    std = diagnostics.gradient_noise_along(loss, jnp.zeros(2), data, batch, directions, num_batches=4000)
    shrink = np.sqrt((n - batch) / (n - 1) / batch)
    np.testing.assert_allclose(std[:2], [c.std() * shrink, d.std() * shrink], rtol=0.05)
    # along (1, 1) / sqrt(2): the std of (c_i + d_i) / sqrt(2)'s batch mean
    np.testing.assert_allclose(std[2], (c + d).std() / np.sqrt(2) * shrink, rtol=0.05)
    # a batch of every example: the same mean every time, up to the summation order's rounding
    assert diagnostics.gradient_noise_along(loss, jnp.zeros(2), data, n, [[1.0, 0.0]])[0] < 1e-7


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"params": jnp.zeros((2, 1))}, "params must be 1-D"),
    ({"directions": [[1.0, 0.0, 0.0]]}, r"directions \(k, 2\)"),
    ({"directions": [[0.0, 0.0]]}, "must be non-zero"),
    ({"batch_size": 9}, r"batch_size must lie in \[1, 8\]"),
])
def test_gradient_noise_along_rejects_bad_arguments(kwargs, message):
    args = {"params": jnp.zeros(2), "directions": [[1.0, 0.0]], "batch_size": 2}
    args.update(kwargs)
    loss = lambda w, b: jnp.mean(b["c"]) * jnp.sum(w)
    with pytest.raises(ValueError, match=message):
        diagnostics.gradient_noise_along(loss, args["params"], {"c": jnp.ones(8)}, args["batch_size"],
                                         args["directions"])


def test_no_escape_is_minus_one_and_nan_never_counts():
    np.testing.assert_array_equal(diagnostics.escape_steps([[0.0, 0.0, np.nan], [0.0, -0.5, np.nan]], 0.0, 0.1),
                                  [-1, 1])
    with pytest.raises(ValueError, match="margin must be > 0"):
        diagnostics.escape_steps([0.0], 0.0, 0.0)


def test_suggest_learning_rate_finds_the_steepest_point_and_the_minimum():
    lrs = np.geomspace(1e-4, 10, 300)
    x = np.log(lrs / 1e-2)
    losses = 2.0 - np.tanh(x) + np.where(lrs > 1.0, np.log(lrs) ** 3 * 50, 0.0)
    steepest, at_min = diagnostics.suggest_learning_rate(lrs, losses, smoothing=0.0)
    assert steepest == pytest.approx(1e-2, rel=0.05)
    assert 0.5 < at_min < 2.0


def test_lr_range_test_finds_the_stability_edge_of_a_regression():
    # Mini-batch GD on least squares is stable below 2 / lambda_max; the range test's loss minimum must
    # sit near that edge, and its steepest-descent suggestion below it.
    problem = landscapes.make_regression(0)
    edge = 2.0 / landscapes.regression_curvature(problem.data).max()
    rt = diagnostics.lr_range_test(landscapes.mse_loss, problem.data, landscapes.init_linear(5, 1.0), [0, 1, 2],
                                   min_lr=1e-4, max_lr=10.0, steps=200, batch_size=32)
    assert rt.losses.shape == (3, 200) and rt.learning_rates[0] == pytest.approx(1e-4)
    assert np.all(rt.min_loss_rates > 0.5 * edge) and np.all(rt.min_loss_rates < 2.0 * edge)
    assert np.all(rt.suggestions < rt.min_loss_rates) and rt.suggestion == np.median(rt.suggestions)


def test_bad_histories_are_rejected():
    with pytest.raises(ValueError, match="at least 2 entries"):
        diagnose(np.array([1.0]))
    with pytest.raises(ValueError, match="need 0 < min_lr < max_lr"):
        diagnostics.lr_range_test(lambda w, b: jnp.sum(w ** 2), None, jnp.ones(2), [0], min_lr=1.0, max_lr=0.1)


def test_loss_noise_ignores_rounding_at_a_floor_and_exact_zeros():
    floor = 0.0093 * (1 + 1e-8 * np.random.default_rng(1).normal(size=100))  # float32-level jitter
    assert diagnostics.loss_noise(floor)["increase_fraction"] == 0.0
    with_zero = diagnostics.loss_noise(np.array([1.0, 0.5, 0.25, 0.0, 0.125, 0.0625, 0.03125]))
    assert with_zero["roughness"] == pytest.approx(0.0)  # the triples touching 0 are skipped


def test_loss_noise_reversal_ignores_a_monotone_trend_and_counts_a_setback_twice():
    falling = np.exp(-np.linspace(0, 3, 20)) + 0.01 * np.linspace(0, 1, 20) ** 4  # changing slope, monotone
    assert diagnostics.loss_noise(falling)["reversal"] == pytest.approx(0.0, abs=1e-12)
    assert diagnostics.loss_noise(falling[::-1])["reversal"] == pytest.approx(0.0, abs=1e-12)  # overfitting
    bumpy = falling.copy()
    bumpy[10] = bumpy[9] * 2  # up by log 2, then down past it
    assert diagnostics.loss_noise(bumpy)["reversal"] == pytest.approx(2 * np.log(2))
    assert np.isnan(diagnostics.loss_noise(np.r_[falling[:5], np.inf, falling[6:]])["reversal"])  # diverged


def test_censored_steps_count_a_run_that_never_reached_the_target_as_the_whole_budget():
    reached = diagnostics.steps_to_target(np.array([[2.0] * 50, [2.0] * 10 + [0.1] * 40]), 1.0, 5)
    # Steps 9-13 average (2 + 2 + 3 x 0.1) / 5 = 0.86 < 1: the target is reached after 13 steps.
    assert reached == [None, 13] and diagnostics.censored_steps(reached, 50) == [50.0, 13.0]
