"""The gradient-accumulation experiment's control and readings: the reordered batch, the chaos floor, memory."""

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.lab import models, training
from jaxopt_lab.lab.bench import timing as bench_timing

accumulation = importlib.import_module("jaxopt_lab.lab.experiments.gradient_accumulation")

X = jax.random.normal(jax.random.key(0), (32, 8, 8, 1))
Y = jax.random.randint(jax.random.key(1), (32,), 0, 10)


def test_a_reordered_batch_is_the_same_model_up_to_the_order_of_its_sums():
    model = models.MLP(norm="batch")  # batch statistics: a sum over the batch in the forward pass too
    reordered = accumulation.PermutedBatch(model, seed=3)
    variables = model.init(jax.random.key(2), X)
    chex.assert_trees_all_equal(variables, reordered.init(jax.random.key(2), X))  # same names, same start
    apply = jax.jit(lambda m, train: m.apply(variables, X, train=train, mutable=["batch_stats"]),
                    static_argnums=(0, 1))
    for train in (False, True):  # outputs back in X's order, the same running statistics
        chex.assert_trees_all_close(apply(model, train), apply(reordered, train), rtol=1e-5, atol=1e-6)
    # One training step: the same update to float32 rounding (only the sums over the batch are reordered).
    step = jax.jit(training.make_train_step())
    one, _ = step(training.create_train_state(model, optax.sgd(0.1), jax.random.key(2), X[:1]),
                  training.Batch(X, Y))
    other, _ = step(training.create_train_state(reordered, optax.sgd(0.1), jax.random.key(2), X[:1]),
                    training.Batch(X, Y))
    chex.assert_trees_all_close(one.params, other.params, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(one.batch_stats, other.batch_stats, rtol=1e-5, atol=1e-7)


def test_distances_are_judged_against_the_floor_on_a_log_scale():
    floor = {"values": [1e-7, 3e-7, 2e-7]}
    judge = accumulation.against_floor
    assert judge({"values": [1e-1, 2e-1, 1.5e-1]}, floor)["outcome"] == accumulation.ABOVE
    assert judge({"values": [1e-10, 3e-10, 2e-10]}, floor)["outcome"] == accumulation.BELOW
    # one seed far off, two at the floor: the spread over seeds keeps it within two standard errors
    spread = judge({"values": [1e-3, 1e-7, 2e-7]}, floor)
    assert spread["outcome"] == accumulation.AT and spread["log10_ratio_to_floor"] > 1
    # bitwise-equal parameters (distance 0) count as the smallest distance, never as log(0)
    exact = judge({"values": [0.0, 0.0, 0.0]}, {"values": [0.0, 0.0, 0.0]})
    assert exact["outcome"] == accumulation.AT and exact["geometric_mean"] == accumulation.SMALLEST_DISTANCE
    assert np.isclose(judge({"values": [2e-7, 6e-7, 4e-7]}, floor)["log10_ratio_to_floor"], np.log10(2))


def _step_memory(multi_steps, batch_size):
    model = models.MLP()
    tx = optax.sgd(0.1, momentum=0.9)
    tx = optax.MultiSteps(tx, every_k_schedule=4) if multi_steps else tx
    state = training.create_train_state(model, tx, jax.random.key(0), X[:1])
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    batch = training.Batch(jnp.ones((batch_size, 8, 8, 1)), jnp.zeros(batch_size, jnp.int32))
    return bench_timing.compiled_memory(jax.jit(training.make_train_step()), (state, batch)), params_bytes


def test_the_footprint_of_a_multisteps_step_holds_its_accumulator_whatever_its_temp_says():
    multi, params_bytes = _step_memory(True, 32)
    plain, _ = _step_memory(False, 32)
    for memory in (multi, plain):
        parts = memory["argument_bytes"] + memory["output_bytes"] + memory["temp_bytes"]
        assert memory["total_bytes"] == parts - memory["alias_bytes"]
    # MultiSteps carries a parameter-sized accumulator in and out of every call.
    assert multi["argument_bytes"] - plain["argument_bytes"] >= params_bytes
    assert multi["output_bytes"] - plain["output_bytes"] >= params_bytes
    assert multi["total_bytes"] > plain["total_bytes"] + params_bytes


def test_stability_is_judged_on_the_models_where_no_run_diverged():
    c, d = accumulation.STABILITY_ARMS
    steady, noisy = {"values": [0.1, 0.2, 0.1]}, {"values": [0.5, 0.6, 0.4]}
    diverged = {"values": [0.1, float("nan"), 0.2]}
    judged = accumulation.judge_stability({"MLP": {c: steady, d: noisy}, "CNN": {c: diverged, d: noisy}})
    assert judged["models"] == ["MLP"] and judged["excluded"] == ["CNN"] and judged["verdict"] == "supported"
    assert round(judged["difference"], 6) == 0.366667
    assert accumulation.judge_stability({"MLP": {c: noisy, d: steady}})["verdict"] == "not supported"
    assert accumulation.judge_stability({"MLP": {c: steady, d: {"values": [0.2, 0.1, 0.1]}}})["verdict"] == \
        "unclear"
    nothing = accumulation.judge_stability({"CNN": {c: diverged, d: noisy}})
    assert nothing["difference"] is None and nothing["verdict"] == "unclear"

