"""The sweep engine: vmapped runs equal single runs, stop and divergence masks, no recompiles per rate."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_lab.lab import landscapes, sweep
from jaxopt_lab.lab.sweep import RunSpec, SweepConfig

PROBLEM = landscapes.make_regression(3, num_samples=24, num_features=3)
INIT = landscapes.init_linear(3, scale=1.0)
NOISY_MINIBATCH = SweepConfig(steps=12, target_loss=0.5, batch_size=8, divergence_bound=1e4)


def quadratic(w, batch):
    del batch
    return jnp.sum(w ** 2)


def _unbatch(specs: RunSpec, i: int) -> RunSpec:
    return jax.tree.map(lambda x: x[i], specs)


@pytest.mark.parametrize("name", ["sgd", "momentum", "rmsprop", "adam"])
def test_vmapped_sweep_equals_runs_one_by_one(name):
    specs = sweep.grid([0.01, 0.3, 3.0], seeds=[0, 1], init_params=INIT, gradient_noise=[0.0, 0.5])
    batched = sweep.run_sweep(landscapes.mse_loss, name, specs, PROBLEM.data, NOISY_MINIBATCH)[name]
    assert batched.losses.shape == (12, NOISY_MINIBATCH.steps + 1)
    for i in range(12):
        single = sweep.run_single(landscapes.mse_loss, name, _unbatch(specs, i), PROBLEM.data, NOISY_MINIBATCH)
        chex.assert_trees_all_close(single, jax.tree.map(lambda x, i=i: x[i], batched), rtol=1e-5, atol=1e-6)


@settings(max_examples=4, deadline=None)
@given(rates=st.lists(st.floats(1e-3, 2.0), min_size=2, max_size=2),
       noise=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_sweep_equals_single_runs_for_random_rates_and_noise(rates, noise, seed):
    specs = sweep.grid(rates, seeds=[seed], init_params=INIT, gradient_noise=noise)
    batched = sweep.run_sweep(landscapes.mse_loss, "adam", specs, PROBLEM.data, NOISY_MINIBATCH)["adam"]
    for i in range(2):
        single = sweep.run_single(landscapes.mse_loss, "adam", _unbatch(specs, i), PROBLEM.data,
                                  NOISY_MINIBATCH)
        chex.assert_trees_all_close(single.losses, batched.losses[i], rtol=1e-5, atol=1e-6)
        assert single.stop_step == batched.stop_step[i]


def test_several_optimizers_in_one_program_equal_separate_sweeps():
    specs = sweep.grid([0.05, 0.5], seeds=[0, 1], init_params=INIT)
    cfg = SweepConfig(steps=40, target_loss=0.1)
    together = sweep.run_sweep(landscapes.mse_loss, ("sgd", "adam"), specs, PROBLEM.data, cfg)
    for name in ("sgd", "adam"):
        alone = sweep.run_sweep(landscapes.mse_loss, name, specs, PROBLEM.data, cfg)[name]
        chex.assert_trees_all_close(together[name], alone)


def test_chunks_and_early_exit_do_not_change_the_result():
    specs = sweep.grid([0.1, 0.45], seeds=[0], init_params=jnp.ones(3))
    cfg = SweepConfig(steps=200, target_loss=1e-4, record_params=True)
    whole = sweep.run_sweep(quadratic, "momentum", specs, config=cfg)["momentum"]
    done = []
    chunked = sweep.run_sweep(quadratic, "momentum", specs, config=cfg, chunk_size=7, progress=done.append)
    chex.assert_trees_all_close(whole, chunked["momentum"])
    assert all(whole.reached) and sum(done) < cfg.steps + 1  # stopped before the step limit


def test_chunks_that_do_not_divide_the_steps_run_one_program_and_drop_the_overrun():
    specs = sweep.grid([0.05, 0.2], seeds=[0, 1], init_params=jnp.ones(3))
    cfg = SweepConfig(steps=100, divergence_bound=1e6, record_params=True)  # a config no other test compiles
    whole = sweep.run_sweep(quadratic, "adam", specs, config=cfg)["adam"]
    compiled, done = sweep._advance_all._cache_size(), []
    chunked = sweep.run_sweep(quadratic, "adam", specs, config=cfg, chunk_size=30, progress=done.append)
    assert sweep._advance_all._cache_size() == compiled + 1  # 101 steps as 4 chunks of 26 (the last: 23)
    assert done == [26, 26, 26, 23]
    chex.assert_trees_all_close(whole, chunked["adam"])
    assert chunked["adam"].losses.shape == (4, 101) and (chunked["adam"].stop_step == 100).all()


def test_stop_mask_freezes_a_run_at_its_target():
    # GD on sum(w^2): w_t = (1 - 2 lr)^t w_0, so loss_t = 3 (1 - 2 lr)^(2t); target 1e-3 at the first t with
    # 3 (1 - 2 lr)^(2t) < 1e-3.
    rates = np.array([0.05, 0.1, 0.2])
    cfg = SweepConfig(steps=300, target_loss=1e-3, record_params=True)
    out = sweep.run_sweep(quadratic, "sgd", sweep.grid(rates, [0], jnp.ones(3)), config=cfg)["sgd"]
    t = np.arange(cfg.steps + 1)
    expected = [int(np.argmax(3 * (1 - 2 * lr) ** (2 * t) < 1e-3)) for lr in rates]
    np.testing.assert_array_equal(out.stop_step, expected)
    assert out.reached.all() and not out.diverged.any()
    for i, stop in enumerate(expected):
        assert np.all(np.isfinite(out.losses[i, : stop + 1])) and np.all(np.isnan(out.losses[i, stop + 1:]))
        assert out.losses[i, stop] < 1e-3 <= out.losses[i, stop - 1]
        frozen = np.broadcast_to(out.final_params[i], (cfg.steps + 1 - stop, 3))
        np.testing.assert_array_equal(out.params[i, stop:], frozen)


def test_divergence_is_recorded_not_raised():
    def nan_when_negative(w, batch):  # sum(w^2), but NaN once w < 0: a divergence by NaN, not by size
        del batch
        return jnp.sum(w ** 2 + 0.0 * jnp.log(w))

    cfg = SweepConfig(steps=50, target_loss=1e-6, divergence_bound=1e3)
    out = sweep.run_sweep(quadratic, "sgd", sweep.grid([0.1, 1.5], [0], jnp.ones(2)), config=cfg)["sgd"]
    # lr 1.5: w_t = (-2)^t, loss 2 * 4^t > 1e3 first at t = 5.
    assert out.diverged.tolist() == [False, True] and out.reached.tolist() == [True, False]
    assert out.stop_step[1] == 5 and out.losses[1, 5] > 1e3 and np.isnan(out.losses[1, 6:]).all()
    # lr 0.75: w_1 = 1 - 1.5 = -0.5, so the loss after one step is NaN.
    nan_run = sweep.run_sweep(nan_when_negative, "sgd", sweep.grid([0.75], [0], jnp.ones(2)), config=cfg)["sgd"]
    assert nan_run.diverged[0] and nan_run.stop_step[0] == 1 and np.isnan(nan_run.losses[0, 1])
    assert np.all(np.isfinite(nan_run.final_params))  # the update that produced NaN was not applied


def test_rates_are_traced_so_new_rates_do_not_recompile():
    cfg = SweepConfig(steps=5)
    sweep.run_sweep(quadratic, "adam", sweep.grid([0.1, 0.2], [0], jnp.ones(2)), config=cfg)
    before = sweep._advance_all._cache_size()
    sweep.run_sweep(quadratic, "adam", sweep.grid([0.7, 3.0], [5], jnp.ones(2)), config=cfg)
    assert sweep._advance_all._cache_size() == before


def test_minibatches_cover_every_example_once_per_epoch():
    data = {"i": jnp.arange(12)}
    key = jax.random.PRNGKey(0)
    batch = lambda t: np.asarray(sweep._sample_batch(data, key, jnp.int32(t), 4)["i"])
    epoch0 = np.concatenate([batch(t) for t in range(3)])
    epoch1 = np.concatenate([batch(t) for t in range(3, 6)])
    assert sorted(epoch0) == list(range(12)) == sorted(epoch1)
    assert not np.array_equal(epoch0, epoch1)  # reshuffled


def test_gradient_noise_moves_a_run_off_an_exact_saddle():
    cfg = SweepConfig(steps=50)
    out = sweep.run_sweep(landscapes.hyperbolic, "sgd",
                          sweep.grid([0.1], [0, 1], jnp.zeros(2), gradient_noise=[0.0, 0.1]), config=cfg)["sgd"]
    np.testing.assert_array_equal(out.final_params[0], 0.0)  # no noise: the zero gradient keeps it there
    assert np.abs(out.final_params[1, 1]) > 0.1


def test_gradient_centralization_variants_run_when_available():
    assert {"sgd", "momentum", "rmsprop", "adam"} <= set(sweep.available_optimizers())
    if "adam_gc" not in sweep.available_optimizers():
        pytest.fail("jaxopt_lab.centralization is committed, so the GC variants must be registered")
    params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}

    def loss(p, batch):
        del batch
        return jnp.sum((p["kernel"] - jnp.arange(6.0).reshape(3, 2)) ** 2) + jnp.sum(p["bias"] ** 2)

    out = sweep.run_sweep(loss, ("sgd_gc", "adam_gc"), sweep.grid([0.05], [0], params),
                          config=SweepConfig(steps=20))
    for trace in out.values():  # GC keeps each output unit's mean weight where it started
        np.testing.assert_allclose(np.asarray(trace.final_params["kernel"][0]).mean(axis=0), 1.0, atol=1e-5)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: sweep.make_optimizer("lion", 0.1), "unknown optimizer 'lion'"),
    (lambda: sweep.grid([0.1, -1.0], [0], jnp.ones(2)), "learning rates must be finite and > 0"),
    (lambda: sweep.grid([], [0], jnp.ones(2)), "must be non-empty"),
    (lambda: SweepConfig(steps=0), "steps must be a positive int"),
    (lambda: sweep.run_sweep(quadratic, "sgd", sweep.grid([0.1], [0], jnp.ones(2)), {"x": jnp.ones(4)},
                             SweepConfig(batch_size=8)), "batch_size=8 exceeds the 4 examples"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_specs_must_be_a_runspec():
    with pytest.raises(TypeError, match="specs must be a RunSpec"):
        sweep.run_sweep(quadratic, "sgd", {"learning_rate": 0.1})


def test_check_sweep_accepts_what_run_sweep_runs_and_trains_nothing():
    specs = sweep.grid([0.1, 1.0], seeds=[0, 1], init_params=INIT)
    compiled = sweep._init_all._cache_size(), sweep._advance_all._cache_size()
    sweep.check_sweep(landscapes.mse_loss, ["sgd", "adam"], specs, PROBLEM.data, NOISY_MINIBATCH)
    # eval_shape traces only: no program was compiled or run
    assert (sweep._init_all._cache_size(), sweep._advance_all._cache_size()) == compiled


@pytest.mark.parametrize("case", ["loss_shape", "batch_too_large", "optimizer", "specs"])
def test_check_sweep_rejects_what_run_sweep_could_not_run(case):
    specs = sweep.grid([0.1], seeds=[0], init_params=INIT)
    loss, name, data, config = landscapes.mse_loss, "sgd", PROBLEM.data, NOISY_MINIBATCH
    if case == "loss_shape":  # parameters of the wrong width for the data: fails inside the traced step
        specs = sweep.grid([0.1], seeds=[0], init_params=landscapes.init_linear(5, scale=1.0))
    elif case == "batch_too_large":
        config = SweepConfig(steps=3, batch_size=25)
    elif case == "optimizer":
        name = "adamw?"
    else:
        specs = {"learning_rate": 0.1}
    with pytest.raises((ValueError, TypeError)):
        sweep.check_sweep(loss, name, specs, data, config)
