"""The jitted training loop: it learns, vmapped seeds equal single runs, accumulation is exact where it
should be, divergence is recorded, evaluation chunks, data-parallel on one device equals plain."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab.lab import data, fitting, models, training

MLP = models.MLP(widths=(32,))


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load_digits()


@pytest.fixture(scope="module")
def two_seeds(digits) -> training.TrainResult:
    return training.train_seeds(MLP, optax.adam(3e-3), digits, seeds=[0, 1], epochs=2, batch_size=64,
                                probe=lambda p: p["head"]["kernel"].mean())


def test_train_seeds_learns_and_records_a_history_per_seed(two_seeds):
    history = two_seeds.history
    assert history.step_loss.shape == (2, 2 * (1347 // 64)) and history.test_accuracy.shape == (2, 2)
    assert history.probes.shape == (2, 3)  # before training and after each epoch
    assert np.all(two_seeds.final_test_accuracy > 0.8)  # chance is 0.1
    assert np.all(np.asarray(history.epoch_loss[:, 1]) < np.asarray(history.step_loss[:, 0]))
    assert not two_seeds.diverged.any() and training.diverged_at(history.step_loss) == [None, None]


def test_a_vmapped_seed_equals_its_run_alone(digits, two_seeds):
    alone = training.train_seeds(MLP, optax.adam(3e-3), digits, seeds=[1], epochs=2, batch_size=64,
                                 probe=lambda p: p["head"]["kernel"].mean())
    lane = jax.tree.map(lambda a: a[1:], (two_seeds.state.params, two_seeds.history))
    chex.assert_trees_all_close(lane, (alone.state.params, alone.history), rtol=1e-5, atol=1e-6)


def test_evaluate_seeds_equals_evaluate_per_seed_and_compiles_once_per_state(digits, two_seeds):
    compiled = fitting._evaluate_seeds._cache_size()
    for images in (digits.x_test, digits.x_test[:, ::-1]):  # the test set and a flipped copy
        loss, accuracy = training.evaluate_seeds(two_seeds.state, images, digits.y_test)
        assert fitting._evaluate_seeds._cache_size() == compiled + 1
        for i in range(2):
            state = jax.tree.map(lambda a, i=i: a[i], two_seeds.state)
            expected = training.evaluate(state, images, digits.y_test)
            chex.assert_trees_all_close((loss[i], accuracy[i]), expected, rtol=1e-5, atol=1e-6)


def test_each_seed_starts_from_create_train_state_and_the_init_compiles_once_per_model(digits):
    model = models.MLP(widths=(24,))  # a model no other test initializes
    cache_size = lambda: fitting._init_fast_compile._cache_size() + fitting._init_default._cache_size()
    compiled = cache_size()
    runs = {}
    for lr in (0.0, 0.1):
        runs[lr] = training.train_seeds(model, optax.sgd(lr), digits, seeds=[3, 4], epochs=1, batch_size=64)
        # The initialization is shared by every optimizer: compiled for the first, reused by the second.
        assert cache_size() == compiled + 1
    for i, seed in enumerate((3, 4)):  # a zero learning rate leaves the initial parameters
        alone = training.create_train_state(model, optax.sgd(0.0), jax.random.fold_in(jax.random.key(seed), 0),
                                            digits.x_train[:1])
        chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], runs[0.0].state.params), alone.params)


def _one_step(model, images, labels, num_microbatches, key=0):
    state = training.create_train_state(model, optax.sgd(0.1), jax.random.key(key), images[:1])
    step = jax.jit(training.make_train_step(num_microbatches=num_microbatches))
    return step(state, training.Batch(images, labels))


@pytest.mark.parametrize("norm, exact", [("group", True), ("batch", False)])
def test_microbatched_step_equals_the_full_batch_step_unless_batch_norm(digits, norm, exact):
    model = models.MLP(norm=norm, widths=(16,), num_groups=4)
    images, labels = digits.x_train[:32], digits.y_train[:32]
    (full, full_metrics), (micro, micro_metrics) = (_one_step(model, images, labels, k) for k in (1, 4))
    if exact:
        chex.assert_trees_all_close(micro.params, full.params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(micro_metrics, full_metrics, rtol=1e-5, atol=1e-6)
    else:  # each micro-batch normalized with its own 8-example statistics: a different gradient
        difference = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), micro.params, full.params)
        assert max(jax.tree.leaves(difference)) > 1e-4


def test_multisteps_over_small_batches_equals_large_batches_without_batch_norm(digits):
    """Same key: the 128-example batches are the 32-example batches taken four at a time."""
    run = lambda tx, batch_size: training.train_seeds(
        MLP, tx, digits, seeds=[0], epochs=1, batch_size=batch_size, train_size=512)
    large = run(optax.sgd(0.1), 128)
    accumulated = run(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=4), 32)
    chex.assert_trees_all_close(accumulated.state.params, large.state.params, rtol=1e-4, atol=1e-6)


def test_a_diverging_run_is_recorded_not_raised(digits):
    result = training.train_seeds(MLP, optax.sgd(1e6), digits, seeds=[0], epochs=1, batch_size=256)
    assert result.diverged.tolist() == [True]
    assert isinstance(training.diverged_at(result.history.step_loss)[0], int)


def test_evaluate_in_chunks_equals_one_pass(digits, two_seeds):
    state = jax.tree.map(lambda a: a[0], two_seeds.state)
    images, labels = digits.x_test, digits.y_test
    chex.assert_trees_all_close(training.evaluate(state, images, labels, batch_size=7),
                                training.evaluate(state, images, labels), rtol=1e-5)


def test_data_parallel_on_a_one_device_mesh_equals_plain_training(digits):
    run = lambda data_parallel: training.train_seeds(
        models.MLP(norm="batch", widths=(16,)), optax.adam(1e-2), digits, seeds=[0], epochs=1, batch_size=64,
        train_size=256, data_parallel=data_parallel)
    chex.assert_trees_all_close(run(True).state.params, run(False).state.params, rtol=1e-5, atol=1e-6)


_TWO_DEVICES = """
import chex, optax
from jaxopt_lab.lab import data, models, training
ds = data.load_digits()
def run(data_parallel, norm="batch", batch_size=16, num_microbatches=1):
    # SGD, not Adam: Adam maps a rounding-level gradient (e.g. one batch norm makes ~0) to a full step.
    return training.train_seeds(models.MLP(norm=norm, widths=(16,)), optax.sgd(0.1), ds, seeds=[0, 1],
                                epochs=1, batch_size=batch_size, num_microbatches=num_microbatches,
                                train_size=64, data_parallel=data_parallel)
def assert_same(**kwargs):
    (dp, single) = (run(mode, **kwargs).state for mode in (True, False))
    chex.assert_trees_all_close((dp.params, dp.batch_stats, dp.opt_state),
                                (single.params, single.batch_stats, single.opt_state), rtol=1e-4, atol=1e-5)
# BN statistics of the whole batch, all-reduced across the 2 devices: equal to one device.
assert_same()
# Micro-batches (interleaved under the mesh, so a different but equally random split) without BN: equal.
assert_same(norm="none", num_microbatches=2)
run(None, batch_size=3)  # automatic: 3 examples cannot be split over 2 devices -> trains on one
try:
    run(True, batch_size=3)
except ValueError as err:
    assert "divisible" in str(err)
else:
    raise AssertionError("data_parallel=True with an unsplittable batch must raise")
print("ok")
"""


def test_data_parallel_on_two_simulated_devices_equals_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("kwargs, message", [
    (dict(seeds=[]), "at least one seed"), (dict(batch_size=2000), "exceeds"),
    (dict(epochs=0), "epochs must be a positive int"), (dict(train_size=0), "train_size"),
    (dict(num_microbatches=0), "num_microbatches"),
])
def test_bad_arguments_raise_value_error(digits, kwargs, message):
    args = dict(seeds=[0], epochs=1, batch_size=64) | kwargs
    with pytest.raises(ValueError, match=message):
        training.train_seeds(MLP, optax.sgd(0.1), digits, **args)


# --- step budgets, learning-rate tuning, the flattening test -------------------------------------------


@pytest.fixture(scope="module")
def by_steps(digits) -> training.TrainResult:
    # 1347 // 64 = 21 batches per epoch: 3 epochs are 63 steps.
    return training.train_seeds(MLP, optax.adam(3e-3), digits, seeds=[0, 1], steps=63, eval_every=21,
                                batch_size=64, probe=lambda p: p["head"]["kernel"].mean())


def test_a_budget_of_whole_epochs_in_steps_equals_the_epochs_run(digits, by_steps):
    by_epochs = training.train_seeds(MLP, optax.adam(3e-3), digits, seeds=[0, 1], epochs=3, batch_size=64,
                                     probe=lambda p: p["head"]["kernel"].mean())
    # Same batches in the same order and the same evaluation points: the same numbers.
    compared = lambda r: (r.state.params, r.history.step_loss, r.history.epoch_loss, r.history.test_accuracy,
                          r.history.probes)
    chex.assert_trees_all_close(compared(by_steps), compared(by_epochs), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(by_epochs.history.steps, [[21, 42, 63]] * 2)
    np.testing.assert_allclose(by_epochs.history.train_loss, by_epochs.history.epoch_loss, rtol=1e-6)


def test_a_budget_that_is_not_whole_epochs_trains_exactly_that_many_steps(digits, by_steps):
    part = training.train_seeds(MLP, optax.adam(3e-3), digits, seeds=[0, 1], steps=50, eval_every=20,
                                batch_size=64)
    history = part.history
    assert history.step_loss.shape == (2, 50) and part.state.step.tolist() == [50, 50]
    np.testing.assert_array_equal(history.steps, [[20, 40, 50]] * 2)  # the last, short interval too
    assert history.epoch_loss.shape == (2, 2)  # two complete epochs of 21 steps
    # The first 50 steps of the longer run: a budget only cuts the same trajectory (epoch 3 reshuffled).
    np.testing.assert_allclose(history.step_loss, by_steps.history.step_loss[:, :50], rtol=1e-6)
    np.testing.assert_allclose(history.train_loss[:, -1], history.step_loss[:, 40:].mean(axis=1), rtol=1e-6)


@pytest.fixture(scope="module")
def search(digits):
    traced = []

    def make_tx(learning_rate):
        traced.append(isinstance(learning_rate, jax.core.Tracer))
        return optax.sgd(learning_rate)

    # 1e4 diverges with plain SGD; 1e-5 barely moves; the middle rates learn.
    rates = [1e-5, 0.03, 0.3, 1e4]
    result = training.tune_learning_rate(MLP, make_tx, digits, [0, 1], learning_rates=rates, batch_size=64,
                                         steps=120)
    return result, traced


def test_tuning_compiles_one_program_for_every_rate_and_records_divergence(search):
    result, traced = search
    # make_tx was called with the traced rates twice (whatever their number): for the optimizer's initial
    # states and inside the training program; then once with the chosen float to rebuild the returned state.
    assert traced[:-1] == [True, True] and traced[-1] is False
    table = {row["learning_rate"]: row for row in result.table}
    assert [row["learning_rate"] for row in result.table] == pytest.approx([1e-5, 0.03, 0.3, 1e4])
    assert table[1e4]["diverged"] >= 1 and not table[1e4]["chosen"]  # a ReLU net may die instead
    assert table[1e-5]["diverged"] == 0 and sum(row["chosen"] for row in result.table) == 1
    assert result.result.history.step_loss.shape == (2, 120)
    assert result.result.history.steps[0].tolist() == list(range(6, 121, 6))  # 20 points by default
    assert np.isfinite(result.result.history.step_loss).all()


def test_the_chosen_rate_is_the_best_on_validation(search):
    result, _ = search
    mean_accuracy = {row["learning_rate"]: row["validation_accuracy"]["mean"] for row in result.table
                     if row["diverged"] == 0}
    assert result.learning_rate == max(mean_accuracy, key=mean_accuracy.get)
    assert result.learning_rate in (pytest.approx(0.03), pytest.approx(0.3))
    history = result.result.history
    # The table's numbers are the chosen runs' last validation point; the runs also carry the test set.
    chosen = next(row for row in result.table if row["chosen"])
    np.testing.assert_allclose(chosen["validation_accuracy"]["values"], history.validation_accuracy[:, -1])
    assert result.validation_size == 270  # 20% of the 1347 training images, stratified
    np.testing.assert_allclose(result.result.final_test_accuracy, history.test_accuracy[:, -1])
    assert np.all(result.result.final_test_accuracy > 0.8)


def test_the_returned_state_is_the_chosen_runs_and_can_keep_training(digits, search):
    result, _ = search
    _, accuracy = training.evaluate_seeds(result.result.state, digits.x_test, digits.y_test)
    np.testing.assert_allclose(accuracy, result.result.final_test_accuracy, rtol=1e-6)
    one = jax.tree.map(lambda a: a[0], result.result.state)
    stepped = one.apply_gradients(grads=jax.tree.map(np.zeros_like, one.params))
    assert int(stepped.step) == 121


def test_tuning_never_looks_at_the_test_set(digits, search):
    result, _ = search
    rng = np.random.default_rng(0)
    scrambled = data.Dataset("scrambled", digits.x_train, digits.y_train, rng.normal(size=digits.x_test.shape)
                             .astype(np.float32), rng.permutation(digits.y_test), 10, digits.pixel_mean,
                             digits.pixel_std)
    again = training.tune_learning_rate(MLP, optax.sgd, scrambled, [0, 1], batch_size=64, steps=120,
                                        learning_rates=[1e-5, 0.03, 0.3, 1e4])
    assert again.learning_rate == result.learning_rate
    assert json.dumps(again.table) == json.dumps(result.table)  # (NaN != NaN: compare the text)
    assert np.all(again.result.final_test_accuracy < 0.3)  # the test set did change


def test_loss_flattened_reads_the_end_of_training():
    steps = np.arange(2000)
    rng = np.random.default_rng(0)
    converged = 1.5 * np.exp(-steps / 100) + 0.2 + 0.05 * rng.normal(size=(3, 2000))  # noisy, flat at the end
    still_falling = 2.0 - steps / 2000
    assert training.loss_flattened(converged)
    verdict = training.loss_flattened(still_falling)
    # Window 400 steps; its quarters' medians are 300 steps apart: -0.15 nats against a median level of 1.1.
    assert not verdict and verdict.window_steps == 400
    np.testing.assert_allclose([verdict.absolute_change, verdict.level], [-0.15, 1.1], rtol=1e-2)
    np.testing.assert_allclose(verdict.relative_change, -0.15 / 1.1, rtol=1e-2)
    near_zero = 1e-3 * np.exp(-steps / 2000)  # falls by a fifth, but by a ten-thousandth of a nat
    assert training.loss_flattened(near_zero) and not training.loss_flattened(near_zero, floor=0.0)
    assert "<= floor 0.01" in training.loss_flattened(near_zero).describe()
    diverged = still_falling.copy()
    diverged[-5:] = np.nan
    assert not training.loss_flattened(diverged) and "diverged" in training.loss_flattened(diverged).describe()


def test_loss_flattened_is_not_decided_by_spikes():
    """Adam near a minimum: a flat loss of 0.05 with rare spikes up to 4 nats on one seed. A least-squares
    line (the previous rule) would read a spike in the window's last steps as a rise; the medians do not."""
    steps = np.arange(3000)
    flat = np.full((3, 3000), 0.05)
    flat[0, [2500, 2900, 2990]] = 4.0
    assert training.loss_flattened(flat)
    rising = flat + np.where(steps > 2700, 0.05, 0.0)  # a real rise: the level doubles in the last 300 steps
    result = training.loss_flattened(rising)
    assert not result and result.absolute_change > 0.04


def test_flatness_describe_never_shows_a_meaningless_percentage():
    # Level above the floor, change more than the level: the percentage would exceed 100%.
    jump = np.concatenate([np.full(800, 0.02), np.full(200, 0.5)])
    flat = training.loss_flattened(jump, window_fraction=0.4)
    assert abs(flat.relative_change) > 1 and not flat
    assert "%" not in flat.describe() and "nats" in flat.describe()
    assert "%" in training.loss_flattened(np.linspace(2.0, 1.0, 1000)).describe()


def test_endpoint_rule_states_the_arguments_it_is_given():
    text = training.endpoint_rule(0.3, 0.1, 0.02)
    assert "30%" in text and "10%" in text and "0.02 nats" in text


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=1, steps=10), "exactly one of epochs or steps"), (dict(), "exactly one of epochs or steps"),
    (dict(steps=0), "steps must be a positive int"), (dict(steps=10, eval_every=0), "eval_every"),
    (dict(steps=10, eval_every=11), "eval_every=11 exceeds"), (dict(steps=2.5), "steps must be a positive int"),
])
def test_bad_budgets_raise_value_error(digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        training.train_seeds(MLP, optax.sgd(0.1), digits, seeds=[0], batch_size=64, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rates=[]), "learning_rates"), (dict(learning_rates=[0.1, -1.0]), "learning_rates"),
    (dict(learning_rates=[float("nan")]), "learning_rates"),
    (dict(validation_fraction=1.0), "validation_fraction"),
    (dict(seeds=[]), "at least one seed"), (dict(steps=0), "steps"), (dict(batch_size=5000), "exceeds"),
])
def test_bad_tuning_arguments_raise_value_error(digits, kwargs, message):
    args = dict(seeds=[0], learning_rates=[0.1], batch_size=64, steps=10) | kwargs
    with pytest.raises(ValueError, match=message):
        training.tune_learning_rate(MLP, optax.sgd, digits, **args)
    with pytest.raises(ValueError, match="window_fraction"):
        training.loss_flattened(np.ones(10), window_fraction=0.0)


# --- the step loop in chunks, with progress ------------------------------------------------------------


def _backend_compiles(run):
    """``(run(), how many programs XLA compiled meanwhile)``."""
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        return run(), len(compiled)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_chunked_training_is_bitwise_one_program_and_reports_every_step(digits):
    # 50 steps evaluated every 6: 9 intervals, the last one 2 steps long (its other 4 are skipped).
    # chunk_steps=18 is 3 intervals: chunks of 18, 18 and 14 steps, a budget that is not a multiple of the
    # chunk; 12 would be 2 intervals, which do not divide 9, so it runs 1; 1 is below an interval (1 too).
    run = lambda chunk_steps, progress=None: training.train_seeds(
        models.MLP(norm="batch", widths=(16,)), optax.adam(3e-3), digits, seeds=[0, 1], steps=50, eval_every=6,
        batch_size=64, probe=lambda p: p["head"]["kernel"].mean(), chunk_steps=chunk_steps, progress=progress)
    whole = run(10_000)
    assert whole.history.step_loss.shape == (2, 50) and whole.state.step.tolist() == [50, 50]
    np.testing.assert_array_equal(whole.history.steps, [[*range(6, 49, 6), 50]] * 2)
    expected_updates = {10_000: [50], 18: [18, 18, 14], 12: [6] * 8 + [2], 1: [6] * 8 + [2]}
    for chunk_steps, updates in expected_updates.items():
        reported = []
        chunked = run(chunk_steps, reported.append)
        assert reported == updates, chunk_steps
        for got, want in zip(jax.tree.leaves((chunked.state, chunked.history)),
                             jax.tree.leaves((whole.state, whole.history)), strict=True):
            np.testing.assert_array_equal(got, want)
    # A call compiles one training program however many chunks it runs (the rest is cached by then).
    _, compiled = _backend_compiles(lambda: run(18))
    assert compiled == 1


def test_a_masked_last_interval_traces_one_step_loop(digits):
    # Evaluating every 7 of 50 steps leaves a last interval of 1 step: it reuses the loop of the others.
    train = training.Batch(jnp.asarray(digits.x_train[:256]), jnp.asarray(digits.y_train[:256]))
    test = training.Batch(jnp.asarray(digits.x_test[:64]), jnp.asarray(digits.y_test[:64]))
    state = training.create_train_state(MLP, optax.sgd(0.1), jax.random.key(0), digits.x_train[:1])
    loops = lambda steps: str(jax.make_jaxpr(lambda s: training.fit(
        s, jax.random.key(1), train, test, batch_size=64, steps=steps, eval_every=7))(state)).count("scan[")
    # The intervals, the steps of one interval, the test set's evaluation chunks (a second copy of the last
    # two, for a shorter last interval, would make 5).
    assert loops(50) == loops(49) == 3


def test_tuning_in_chunks_equals_one_program_and_updates_a_bar(digits, search):
    class Bar:  # what tqdm offers: update(n)
        def __init__(self):
            self.updates = []

        def update(self, n):
            self.updates.append(n)

    bar = Bar()
    result, _ = search  # 120 steps, evaluated every 6: the default chunk runs them in one program
    chunked = training.tune_learning_rate(MLP, optax.sgd, digits, [0, 1], learning_rates=[1e-5, 0.03, 0.3, 1e4],
                                          batch_size=64, steps=120, chunk_steps=30, progress=bar)
    assert bar.updates == [30] * 4
    assert json.dumps(chunked.table) == json.dumps(result.table)
    for got, want in zip(jax.tree.leaves((chunked.result.state, chunked.result.history)),
                         jax.tree.leaves((result.result.state, result.result.history)), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(chunk_steps=0), ValueError, "chunk_steps must be a positive int"),
    (dict(progress=3), TypeError, "progress must be callable"),
])
def test_bad_chunking_arguments_raise(digits, kwargs, error, message):
    with pytest.raises(error, match=message):
        training.train_seeds(MLP, optax.sgd(0.1), digits, seeds=[0], steps=10, batch_size=64, **kwargs)


# --- a rate search that brackets its optimum ----------------------------------------------------------


def test_widening_adds_rates_beyond_the_edge_until_the_choice_is_bracketed(digits):
    # SGD on the logistic model: 1e-3 and 3e-3 are far too low for 60 steps, so the choice sits at the top
    # edge and the search climbs by 3x until a rate above the choice does worse (or diverges).
    grid = [1e-3, 3e-3]
    search = training.tune_learning_rate(models.Logistic(), optax.sgd, digits, [0, 1], learning_rates=grid,
                                         batch_size=64, steps=60, widen=8)
    rates = [row["learning_rate"] for row in search.table]
    assert rates == sorted(rates) and rates[:2] == grid and len(rates) > 3
    np.testing.assert_allclose(rates[2:], [3e-3 * 3 ** k for k in range(1, len(rates) - 1)], rtol=1e-12)
    assert [row["added"] for row in search.table] == [False, False] + [True] * (len(rates) - 2)
    assert search.at_edge is None and grid[-1] < search.learning_rate < rates[-1]
    assert sum(row["chosen"] for row in search.table) == 1
    # The chosen runs are those the same search over the final grid gives, without widening.
    direct = training.tune_learning_rate(models.Logistic(), optax.sgd, digits, [0, 1], learning_rates=rates,
                                         batch_size=64, steps=60)
    assert direct.learning_rate == search.learning_rate and direct.at_edge is None
    chex.assert_trees_all_close(direct.result.history.validation_accuracy,
                                search.result.history.validation_accuracy, atol=1e-6)


def test_widening_stops_at_its_limit_and_says_the_choice_is_at_an_edge(digits):
    search = training.tune_learning_rate(models.Logistic(), optax.sgd, digits, [0], learning_rates=[1e-4, 3e-4],
                                         batch_size=64, steps=20, widen=1)
    assert len(search.table) == 3 and search.at_edge == "highest" and search.learning_rate == 9e-4 * (1 + 0)
    unwidened = training.tune_learning_rate(models.Logistic(), optax.sgd, digits, [0], learning_rates=[1e-4],
                                            batch_size=64, steps=20)
    assert unwidened.at_edge == "lowest" and [r["added"] for r in unwidened.table] == [False]


def test_a_collapsing_rate_beyond_the_edge_brackets_the_choice(digits):
    # SGD on the MLP: 0.9 beats 0.3, and 2.7 (added) collapses to chance: the widening stops there.
    search = training.tune_learning_rate(MLP, optax.sgd, digits, [0], learning_rates=[0.3, 0.9], batch_size=64,
                                         steps=40, widen=4)
    assert [row["added"] for row in search.table] == [False, False, True]
    assert search.learning_rate == 0.9 and search.at_edge is None
    assert search.table[-1]["validation_accuracy"]["mean"] < 0.2


@pytest.mark.parametrize("kwargs, message", [
    (dict(widen=-1), "widen must be an int >= 0"), (dict(widen=1.5), "widen must be an int"),
    (dict(widen_factor=1.0), "widen_factor must be a finite number > 1"),
    (dict(widen_factor=float("inf")), "widen_factor"),
    (dict(learning_rates=[0.1, 0.1]), "distinct"),
])
def test_bad_widening_arguments_raise_value_error(digits, kwargs, message):
    args = dict(learning_rates=[0.1], batch_size=64, steps=10) | kwargs
    with pytest.raises(ValueError, match=message):
        training.tune_learning_rate(MLP, optax.sgd, digits, [0], **args)


def test_replicate_seeds_train_at_the_chosen_rate_without_influencing_it(digits):
    args = dict(learning_rates=[0.03, 0.3], batch_size=64, steps=40)
    alone = training.tune_learning_rate(MLP, optax.sgd, digits, [0, 1], **args)
    both = training.tune_learning_rate(MLP, optax.sgd, digits, [0, 1], replicate_seeds=[7, 8], **args)
    assert both.table == alone.table and both.learning_rate == alone.learning_rate and both.replicas == 2
    history = both.result.history
    assert history.test_accuracy.shape[0] == 4
    chex.assert_trees_all_close(history.step_loss[:2], alone.result.history.step_loss)
    # The replicas are what a search over the chosen rate alone gives those seeds (same split, same code).
    direct = training.tune_learning_rate(MLP, optax.sgd, digits, [7, 8], **(args | dict(
        learning_rates=[alone.learning_rate])))
    chex.assert_trees_all_close(history.step_loss[2:], direct.result.history.step_loss, rtol=1e-5)
    assert not np.allclose(history.step_loss[2:], history.step_loss[:2])  # other seeds, other runs
    with pytest.raises(ValueError, match="disjoint"):
        training.tune_learning_rate(MLP, optax.sgd, digits, [0, 1], replicate_seeds=[1, 2], **args)
