"""Gradient accumulation: micro-batched value_and_grad and optax.MultiSteps equal the large batch."""

import doctest
import functools
import json
import os
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_lab import accumulation
from jaxopt_lab.accumulation import microbatched_value_and_grad, split_microbatches
from jaxopt_lab.centralization import adam_gc, sgd_gc

N, K = 128, 4          # effective batch and number of accumulation steps: micro-batches of 32


class ConvNet(nn.Module):
    """conv -> [norm] -> relu -> dense on 8x8 inputs; `norm` picks the batch-dependence under test."""

    norm: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(8, (3, 3))(x)
        if self.norm == "batch":
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        elif self.norm == "group":
            x = nn.GroupNorm(num_groups=2)(x)
        elif self.norm == "layer":
            x = nn.LayerNorm()(x)
        x = nn.relu(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def _data(seed=0, n=N):
    k_x, k_y = jax.random.split(jax.random.key(seed))
    return {"x": jax.random.normal(k_x, (n, 8, 8, 2)), "y": jax.random.randint(k_y, (n,), 0, 3)}


def _init(model, batch):
    return model.init(jax.random.key(1), batch["x"][:2])


def _loss_fn(model):
    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss_fn


def _as_micro_batches(batches, k=K):
    """Consecutive slices of N/k examples: the order a data loader of micro-batches yields them."""
    return [jax.tree.map(lambda x, i=i: x[i * (N // k):(i + 1) * (N // k)], b)
            for b in batches for i in range(k)]


# ------------------------------------------------------------------------------------------------
# microbatched_value_and_grad == jax.value_and_grad on the full batch.
# ------------------------------------------------------------------------------------------------


class MicrobatchedTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_full_batch_value_and_grad(self):
        model, batch = ConvNet(), _data()
        params = _init(model, batch)["params"]
        loss_fn = _loss_fn(model)
        want_loss, want_grads = jax.value_and_grad(loss_fn)(params, batch)
        for k in (1, K):
            loss, grads = self.variant(microbatched_value_and_grad(loss_fn, k))(params, batch)
            np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
            chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-6)
            chex.assert_trees_all_equal_dtypes(grads, want_grads)

    @chex.variants(with_jit=True)
    def test_aux_stacked_or_mean_and_several_argnums(self):
        def loss_fn(w, b, x, y):
            pred = x @ w + b
            per_example = (pred - y) ** 2
            return per_example.mean(), {"pred": pred, "mse": per_example.mean()}

        k_w, k_x, k_y = jax.random.split(jax.random.key(2), 3)
        w, b = jax.random.normal(k_w, (5, 1)), jnp.ones(1)
        x, y = jax.random.normal(k_x, (N, 5)), jax.random.normal(k_y, (N, 1))
        full = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (want_loss, want_aux), want_grads = full(w, b, x, y)

        f = microbatched_value_and_grad(loss_fn, K, has_aux=True, argnums=(0, 1), batch_argnums=(2, 3))
        (loss, aux), grads = self.variant(f)(w, b, x, y)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-6)
        chex.assert_shape(aux["pred"], (K, N // K, 1))
        chex.assert_trees_all_close(aux["pred"].reshape(N, 1), want_aux["pred"], rtol=1e-6)   # batch order kept
        chex.assert_shape(aux["mse"], (K,))
        np.testing.assert_allclose(aux["mse"].mean(), want_aux["mse"], rtol=1e-5)

        f_mean = microbatched_value_and_grad(loss_fn, K, has_aux=True, argnums=(0, 1), batch_argnums=(2, 3),
                                             aux_mode="mean")
        (_, aux_mean), _ = self.variant(f_mean)(w, b, x, y)
        np.testing.assert_allclose(aux_mean["mse"], want_aux["mse"], rtol=1e-5)

    def test_bfloat16_params_accumulate_in_float32(self):
        model, batch = ConvNet(), _data()
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _init(model, batch)["params"])
        f = microbatched_value_and_grad(_loss_fn(model), K)
        _, grads = jax.jit(f)(params, batch)
        chex.assert_trees_all_equal_dtypes(grads, params)           # returned like jax.value_and_grad
        scan = next(e for e in jax.make_jaxpr(f)(params, batch).jaxpr.eqns if e.primitive.name == "scan")
        carry = scan.outvars[: scan.params["num_carry"]]
        assert {str(v.aval.dtype) for v in carry} == {"float32"}    # loss and every gradient accumulator

    def test_errors_name_what_was_expected(self):
        model, batch = ConvNet(), _data(n=130)
        params = _init(model, batch)["params"]
        with pytest.raises(ValueError, match=r"batch size 130 is not divisible by num_microbatches=4"):
            microbatched_value_and_grad(_loss_fn(model), 4)(params, batch)
        bad = {"x": batch["x"], "y": batch["y"][:64]}
        with pytest.raises(ValueError, match=r"share their leading axis.*130.*64"):
            microbatched_value_and_grad(_loss_fn(model), 2)(params, bad)
        with pytest.raises(ValueError, match="num_microbatches must be >= 1, got 0"):
            microbatched_value_and_grad(_loss_fn(model), 0)
        with pytest.raises(TypeError, match="num_microbatches must be a Python int"):
            microbatched_value_and_grad(_loss_fn(model), 4.0)
        with pytest.raises(ValueError, match=r"argnums \[1\] are also batch_argnums"):
            microbatched_value_and_grad(_loss_fn(model), 4, argnums=1)
        with pytest.raises(ValueError, match="carry_argnum needs has_aux=True"):
            microbatched_value_and_grad(_loss_fn(model), 4, carry_argnum=2)

    def test_split_microbatches_contiguous_or_interleaved(self):
        batch = {"a": jnp.arange(12).reshape(6, 2)}
        np.testing.assert_array_equal(split_microbatches(batch, 3)["a"][1], [[4, 5], [6, 7]])
        np.testing.assert_array_equal(split_microbatches(batch, 3, interleave=True)["a"][1], [[2, 3], [8, 9]])

    @chex.variants(with_jit=True)
    def test_interleaved_microbatches_give_the_same_result(self):
        model, batch = ConvNet(), _data()
        params = _init(model, batch)["params"]
        want = self.variant(microbatched_value_and_grad(_loss_fn(model), K))(params, batch)
        got = self.variant(microbatched_value_and_grad(_loss_fn(model), K, interleave=True))(params, batch)
        chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)

    @chex.variants(with_jit=True)
    def test_unrolled_scan_gives_the_same_result(self):
        model, batch = ConvNet(), _data()
        params = _init(model, batch)["params"]
        want = self.variant(microbatched_value_and_grad(_loss_fn(model), K))(params, batch)
        got = self.variant(microbatched_value_and_grad(_loss_fn(model), K, unroll=True))(params, batch)
        chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)
        hlo = jax.jit(microbatched_value_and_grad(_loss_fn(model), K, unroll=True)).lower(
            params, batch).as_text()
        assert "while" not in hlo  # unrolled: no loop left for XLA:CPU to run slowly


@settings(max_examples=8, deadline=None)
@given(st.sampled_from([1, 2, 3, 6]), st.integers(0, 2**31 - 1), st.floats(0.1, 10.0))
def test_property_mean_loss_gives_the_full_batch_result_for_any_k(k, seed, temperature):
    """A keyword argument is passed whole to every micro-batch; the result never depends on k."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(24, 4)).astype(np.float32), rng.normal(size=(24, 2)).astype(np.float32)
    params = {"w": rng.normal(size=(4, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}

    def loss_fn(params, x, y, *, temperature):
        return jnp.mean(jnp.logaddexp(0.0, (x @ params["w"] + params["b"] - y) / temperature))

    want = jax.value_and_grad(loss_fn)(params, x, y, temperature=temperature)
    got = microbatched_value_and_grad(loss_fn, k, batch_argnums=(1, 2))(params, x, y, temperature=temperature)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxopt_lab.accumulation import microbatched_value_and_grad, split_microbatches

    mesh = Mesh(jax.devices(), ("data",))
    x = np.random.default_rng(0).normal(size=(128, 5)).astype(np.float32)
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    split = jax.jit(lambda b: split_microbatches(b, 4, interleave=True))(sharded)
    shard_shapes = sorted({s.data.shape for s in split.addressable_shards})
    loss_fn = lambda w, b: jnp.mean(jnp.tanh(b @ w) ** 2)
    w = jnp.ones((5, 2))
    got = jax.jit(microbatched_value_and_grad(loss_fn, 4, interleave=True))(w, sharded)
    want = jax.value_and_grad(loss_fn)(w, x)
    spec = [None if a is None else str(a) for a in split.sharding.spec]
    print(json.dumps({"devices": jax.device_count(), "spec": spec, "shard_shapes": shard_shapes,
                      "max_err": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))}))
""")


def test_interleaved_split_keeps_a_batch_sharding_on_8_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    # (4, 128/4, 5) sharded along the micro-batch axis: every device holds 32/8 = 4 rows of each of the
    # 4 micro-batches, so no device waits while another computes its micro-batch, and nothing is gathered.
    assert result["spec"][:2] == [None, "data"] and not any(result["spec"][2:])
    assert result["shard_shapes"] == [[4, 4, 5]]
    assert result["max_err"] < 1e-6


def test_optax_microbatch_sums_by_default_ours_is_the_mean():
    model, batch = ConvNet(), _data()
    params = _init(model, batch)["params"]
    vg = jax.value_and_grad(_loss_fn(model))
    ours = jax.jit(microbatched_value_and_grad(_loss_fn(model), K))(params, batch)
    summed = jax.jit(optax.microbatch(vg, argnums=1, microbatch_size=N // K))(params, batch)
    mean = jax.jit(optax.microbatch(vg, argnums=1, microbatch_size=N // K,
                                    accumulator=optax.microbatching.AccumulationType.MEAN))(params, batch)
    chex.assert_trees_all_close(mean, ours, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(summed, jax.tree.map(lambda x: K * x, ours), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Batch-dependent layers: BN is not equivalent (and its running stats are threaded); GN/LN are.
# ------------------------------------------------------------------------------------------------


def _bn_loss(model):
    def loss_fn(params, batch_stats, batch):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"],
                                      mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, (updates["batch_stats"], logits)
    return loss_fn


def test_batch_norm_is_not_equivalent_and_running_stats_are_threaded():
    model, batch = ConvNet(norm="batch"), _data()
    variables = _init(model, batch)
    params, stats = variables["params"], variables["batch_stats"]
    loss_fn = _bn_loss(model)

    (_, (full_stats, _)), full_grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, batch)
    f = microbatched_value_and_grad(loss_fn, K, has_aux=True, batch_argnums=2, carry_argnum=1)
    (_, (stats_out, logits)), grads = jax.jit(f)(params, stats, batch)
    chex.assert_shape(logits, (K, N // K, 3))

    # Each micro-batch is normalized with its own mean/variance: the gradient is NOT the big batch's.
    rel = optax.tree.norm(jax.tree.map(jnp.subtract, grads, full_grads)) / optax.tree.norm(full_grads)
    assert rel > 1e-2, rel

    # The running stats went through K sequential updates, one per micro-batch, in order.
    expected_stats, micro_step = stats, jax.jit(loss_fn)
    for micro in _as_micro_batches([batch]):
        _, (expected_stats, _) = micro_step(params, expected_stats, micro)
    chex.assert_trees_all_close(stats_out, expected_stats, rtol=1e-5, atol=1e-6)
    assert not np.allclose(stats_out["BatchNorm_0"]["var"], full_stats["BatchNorm_0"]["var"], rtol=1e-3)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_group_and_layer_norm_are_exactly_equivalent(norm):
    model, batch = ConvNet(norm=norm), _data()
    params = _init(model, batch)["params"]
    want = jax.value_and_grad(_loss_fn(model))(params, batch)
    got = jax.jit(microbatched_value_and_grad(_loss_fn(model), K))(params, batch)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# optax.MultiSteps: K micro-steps of N/K == one step on N, for 128 = 4 x 32.
# ------------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "sgd_gc": lambda: sgd_gc(0.1, momentum=0.9, weight_decay=1e-3),
    "adam_gc_update": lambda: adam_gc(1e-2),
    "adam_gc_gradient": lambda: adam_gc(1e-2, placement="gradient"),
}


def _train_large_batch(tx, params, batches, loss_fn):
    grad_fn = jax.jit(jax.grad(loss_fn))
    state = tx.init(params)
    for batch in batches:
        updates, state = tx.update(grad_fn(params, batch), state, params)
        params = optax.apply_updates(params, updates)
    return params


def _train_multisteps(tx, params, micro_batches, loss_fn):
    grad_fn = jax.jit(jax.grad(loss_fn))
    state = tx.init(params)

    @jax.jit
    def micro_step(params, state, batch):
        updates, state = tx.update(grad_fn(params, batch), state, params)
        return optax.apply_updates(params, updates), state

    for batch in micro_batches:
        params, state = micro_step(params, state, batch)
    return params, state


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_multisteps_equals_large_batch(name):
    model = ConvNet()
    batches = [_data(seed) for seed in (10, 11, 12)]
    params0 = _init(model, batches[0])["params"]
    loss_fn = _loss_fn(model)

    want = _train_large_batch(OPTIMIZERS[name](), params0, batches, loss_fn)
    got, _ = _train_multisteps(optax.MultiSteps(OPTIMIZERS[name](), every_k_schedule=K), params0,
                               _as_micro_batches(batches), loss_fn)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
    moved = optax.tree.norm(jax.tree.map(jnp.subtract, want, params0))
    assert moved > 1e-2                                                 # the steps were not trivial


def test_learning_rate_schedule_counts_optimizer_steps_not_micro_steps():
    model = ConvNet()
    batches = [_data(seed) for seed in (20, 21)]
    params0 = _init(model, batches[0])["params"]
    loss_fn = _loss_fn(model)
    schedule = optax.piecewise_constant_schedule(0.5, {1: 0.01})      # 0.5 for step 0, then 0.01

    want = _train_large_batch(optax.sgd(schedule), params0, batches, loss_fn)
    got, state = _train_multisteps(optax.MultiSteps(optax.sgd(schedule), every_k_schedule=K), params0,
                                   _as_micro_batches(batches), loss_fn)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
    assert int(state.gradient_step) == 2
    assert int(optax.tree_utils.tree_get(state.inner_opt_state, "count")) == 2


@pytest.mark.parametrize("skip", [True, False])
def test_non_finite_micro_batch_is_skipped_without_poisoning_the_buffer(skip):
    model = ConvNet()
    batch = _data(30)
    params0 = _init(model, batch)["params"]
    loss_fn = _loss_fn(model)
    micro = _as_micro_batches([batch])
    poisoned = {"x": micro[0]["x"].at[0, 0, 0, 0].set(jnp.nan), "y": micro[0]["y"]}

    tx = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=K,
                          should_skip_update_fn=optax.skip_not_finite if skip else None)
    got, _ = _train_multisteps(tx, params0, [micro[0], poisoned, *micro[1:]], loss_fn)
    finite = all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(got))
    if skip:
        want = _train_large_batch(optax.adam(1e-2), params0, [batch], loss_fn)
        chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
    else:
        assert not finite                        # without the skip, one NaN example poisons every weight


def test_microbatched_step_equals_multisteps_and_large_batch_with_gc():
    model, batch = ConvNet(), _data(40)
    params0 = _init(model, batch)["params"]
    loss_fn = _loss_fn(model)
    tx = sgd_gc(0.1, momentum=0.9)

    @jax.jit
    def step(params, state, batch):
        _, grads = microbatched_value_and_grad(loss_fn, K)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    got, _ = step(params0, tx.init(params0), batch)
    want = _train_large_batch(tx, params0, [batch], loss_fn)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Memory: XLA's buffer assignment for the micro-batched step tracks the micro-batch.
# ------------------------------------------------------------------------------------------------


class ActivationHeavyCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Dense(1)(x.mean(axis=(1, 2)))


@functools.cache
def _temp_bytes(num_microbatches):
    model = ActivationHeavyCNN()
    batch = {"x": jnp.ones((N, 16, 16, 3)), "y": jnp.ones((N, 1))}
    params = model.init(jax.random.key(0), batch["x"][:1])["params"]

    def loss_fn(p, b):
        return jnp.mean((model.apply({"params": p}, b["x"]) - b["y"]) ** 2)

    f = jax.jit(microbatched_value_and_grad(loss_fn, num_microbatches))
    return f.lower(params, batch).compile().memory_analysis().temp_size_in_bytes


def test_temporary_memory_tracks_the_micro_batch():
    one, four = _temp_bytes(1), _temp_bytes(K)
    # Activations dominate this model: 4x smaller micro-batches need about 4x less scratch memory.
    assert four < 0.35 * one, (one, four)


def test_docstring_examples_run():
    result = doctest.testmod(accumulation, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
