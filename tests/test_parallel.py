"""Data parallel (jaxopt_lab.parallel) on 8 simulated CPU devices equals the single-device step.

The device count of a JAX process is fixed when its backend starts, so the 8-device checks run in one
subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (this file, run as a
script); each check is then reported as its own test. The checks below the divider run there.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab import parallel

N_DEVICES = 8
CHECKS: dict[str, Callable[[], None]] = {}


def _check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


# --- in this process (however many devices it has) -----------------------------------------------


def test_opt_out_gives_no_mesh_and_opt_in_spans_every_device():
    assert parallel.maybe_data_parallel_mesh(False) is None
    mesh = parallel.maybe_data_parallel_mesh(True)
    assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.size == jax.device_count()


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_data_parallel_flag_must_be_bool_or_none(bad):
    with pytest.raises(TypeError, match="data_parallel must be None, True or False"):
        parallel.maybe_data_parallel_mesh(bad)


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="at least one device"):
        parallel.data_parallel_mesh([])
    with pytest.raises(TypeError, match="train_step must be callable"):
        parallel.data_parallel_step("step", parallel.data_parallel_mesh())
    with pytest.raises(TypeError, match=r"jax\.sharding\.Mesh"):
        parallel.data_parallel_step(lambda s, b: s, mesh=None)
    with pytest.raises(TypeError, match="batch_sharded: mesh must be"):
        parallel.batch_sharded(lambda s, b: s, mesh="data")
    with pytest.raises(ValueError, match=r"\['x'\] has shape \(\)"):
        parallel.shard_batch({"x": np.float32(1.0)}, parallel.data_parallel_mesh())


# --- run in the 8-device subprocess ---------------------------------------------------------------


class _BatchNormNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> global pool -> Dense: batch statistics are the thing under test."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # No conv bias: BatchNorm cancels it, so its gradient is rounding noise that Adam would amplify.
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(10)(x)


MODEL = _BatchNormNet()


def _batch(size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # An offset and per-sample scale, so per-device statistics differ clearly from global ones.
    x = rng.normal(size=(size, 8, 8, 1)) * rng.uniform(0.5, 3.0, size=(size, 1, 1, 1)) + 2.0
    return {"x": x.astype(np.float32), "y": rng.integers(0, 10, size).astype(np.int32)}


def _train_step_fn(tx: optax.GradientTransformation,
                   value_and_grad: Callable = jax.value_and_grad) -> Callable:
    def loss_fn(params, batch_stats, batch):
        logits, updates = MODEL.apply({"params": params, "batch_stats": batch_stats}, batch["x"], train=True,
                                      mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, updates["batch_stats"]

    def train_step(state, batch):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = value_and_grad(loss_fn, has_aux=True)(params, batch_stats, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    return train_step


def _init_state(tx: optax.GradientTransformation):
    variables = MODEL.init(jax.random.key(0), _batch()["x"], train=False)
    return variables["params"], variables["batch_stats"], tx.init(variables["params"])


def _run(step: Callable, state, steps: int = 3):
    losses = []
    for i in range(steps):
        state, loss = step(state, _batch(seed=i))
        losses.append(loss)
    return state, jnp.stack(losses)


def _assert_dp_equals_single(train_step: Callable, state) -> None:
    mesh = parallel.data_parallel_mesh()
    single_state, single_losses = _run(jax.jit(train_step), state)
    dp_state, dp_losses = _run(parallel.data_parallel_step(train_step, mesh), state)
    chex.assert_trees_all_close(dp_losses, single_losses, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(dp_state, single_state, rtol=1e-4, atol=1e-6)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(dp_state))


@_check
def check_mesh_is_selected_automatically_over_all_devices():
    assert jax.device_count() == N_DEVICES
    mesh = parallel.maybe_data_parallel_mesh()
    assert mesh is not None and mesh.size == N_DEVICES and mesh.axis_names == ("data",)
    assert parallel.maybe_data_parallel_mesh(False) is None


@_check
def check_batch_is_split_on_leading_axis():
    mesh = parallel.data_parallel_mesh()
    batch = parallel.shard_batch(_batch(), mesh)
    for leaf in jax.tree.leaves(batch):
        shards = leaf.addressable_shards
        assert len({s.device for s in shards}) == N_DEVICES
        assert all(s.data.shape[0] == 32 // N_DEVICES for s in shards)
        np.testing.assert_array_equal(np.concatenate([np.asarray(s.data) for s in shards]), np.asarray(leaf))


@_check
def check_batch_not_divisible_by_devices_raises():
    mesh = parallel.data_parallel_mesh()
    try:
        parallel.shard_batch(_batch(size=12), mesh)
    except ValueError as err:
        assert "['x'] has shape (12, 8, 8, 1)" in str(err) and "8 local devices" in str(err), err
    else:
        raise AssertionError("a batch of 12 on 8 devices must raise ValueError")


@_check
def check_batchnorm_step_equals_single_device():
    tx = optax.adam(1e-2)
    _assert_dp_equals_single(_train_step_fn(tx), _init_state(tx))


@_check
def check_batchnorm_statistics_are_global_not_per_device():
    # Guards the check above: per-device statistics would differ measurably on this data, and the
    # compiled step must reduce across devices.
    tx = optax.sgd(0.1)
    train_step, state = _train_step_fn(tx), _init_state(tx)
    mesh = parallel.data_parallel_mesh()
    (_, dp_stats, _), _ = parallel.data_parallel_step(train_step, mesh)(state, _batch())
    first_device_rows = jax.tree.map(lambda a: a[: 32 // N_DEVICES], _batch())
    (_, local_stats, _), _ = jax.jit(train_step)(state, first_device_rows)
    (_, global_stats, _), _ = jax.jit(train_step)(state, _batch())
    chex.assert_trees_all_close(dp_stats, global_stats, rtol=1e-5, atol=1e-6)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(dp_stats), jax.tree.leaves(local_stats), strict=True))
    assert gap > 1e-2, f"per-device and global statistics should differ on this data, gap={gap}"
    hlo = jax.jit(train_step, in_shardings=(parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh))
                  ).lower(state, parallel.shard_batch(_batch(), mesh)).compile().as_text()
    assert "all-reduce" in hlo


@_check
def check_gradient_centralization_is_unchanged_under_data_parallel():
    from jaxopt_lab.centralization import gradient_centralization

    tx = optax.chain(gradient_centralization(), optax.sgd(0.1, momentum=0.9))
    _assert_dp_equals_single(_train_step_fn(tx), _init_state(tx))


@_check
def check_microbatching_is_unchanged_under_data_parallel():
    from jaxopt_lab.accumulation import microbatched_value_and_grad

    def microbatched(loss_fn, has_aux):
        # Batch norm statistics thread through the 4 micro-batches (carry), as in the digits train step.
        value_and_grad = microbatched_value_and_grad(lambda p, s, b: _with_carry(loss_fn(p, s, b)), 4,
                                                     has_aux=has_aux, batch_argnums=2, carry_argnum=1,
                                                     aux_mode="mean")

        def unwrapped(params, batch_stats, batch):
            (loss, (batch_stats, _)), grads = value_and_grad(params, batch_stats, batch)
            return (loss, batch_stats), grads

        return unwrapped

    tx = optax.adam(1e-2)
    _assert_dp_equals_single(_train_step_fn(tx, value_and_grad=microbatched), _init_state(tx))


def _with_carry(loss_and_stats):
    loss, batch_stats = loss_and_stats
    return loss, (batch_stats, jnp.zeros(()))


def _digits_state_and_batches(tx: optax.GradientTransformation):
    from jaxopt_lab.lab import models, training

    state = training.create_train_state(models.CNN(widths=(8, 16)), tx, jax.random.key(0), _batch()["x"][:1])
    return state, [training.Batch(b["x"], b["y"]) for b in (_batch(seed=i) for i in range(3))]


@_check
def check_digits_train_step_with_gc_and_microbatches_equals_single_device():
    from jaxopt_lab.centralization import gradient_centralization
    from jaxopt_lab.lab import training

    tx = optax.chain(gradient_centralization(), optax.sgd(0.05, momentum=0.9))
    mesh = parallel.data_parallel_mesh()
    for num_microbatches in (1, 4):
        train_step = training.make_train_step(num_microbatches=num_microbatches)
        state, batches = _digits_state_and_batches(tx)
        single, dp = state, state
        dp_step, single_step = parallel.data_parallel_step(train_step, mesh), jax.jit(train_step)
        for batch in batches:
            single, single_metrics = single_step(single, batch)
            dp, dp_metrics = dp_step(dp, batch)
            chex.assert_trees_all_close(dp_metrics, single_metrics, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close((dp.params, dp.batch_stats, dp.opt_state),
                                    (single.params, single.batch_stats, single.opt_state), rtol=1e-4, atol=1e-6)


# --- the 8-device checks, one test each ----------------------------------------------------------


@pytest.fixture(scope="module")
def outcomes_on_8_devices() -> dict[str, str | None]:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={N_DEVICES}",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"8-device subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_on_8_simulated_devices(outcomes_on_8_devices, name):
    assert set(outcomes_on_8_devices) == set(CHECKS)
    assert outcomes_on_8_devices[name] is None, outcomes_on_8_devices[name]



@_check
def check_batch_sharded_step_inside_a_jitted_scan_and_vmap_equals_single_device():
    tx = optax.adam(1e-2)
    train_step, state = _train_step_fn(tx), _init_state(tx)
    mesh = parallel.data_parallel_mesh()
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), *[_batch(seed=i) for i in range(3)])

    def loop(step):
        return jax.jit(lambda state, batches: jax.lax.scan(step, state, batches))

    single = loop(train_step)(state, batches)
    sharded_loop = loop(parallel.batch_sharded(train_step, mesh))
    chex.assert_trees_all_close(sharded_loop(state, batches), single, rtol=1e-4, atol=1e-6)
    assert "all-reduce" in sharded_loop.lower(state, batches).compile().as_text()
    # Under vmap (two copies of the run, as training.train_seeds vmaps seeds) the batch axis is still split.
    two = jax.tree.map(lambda a: jnp.stack([a, a]), (state, batches))
    vmapped = jax.jit(jax.vmap(lambda s, b: jax.lax.scan(parallel.batch_sharded(train_step, mesh), s, b)))
    chex.assert_trees_all_close(vmapped(*two), jax.tree.map(lambda a: jnp.stack([a, a]), single),
                                rtol=1e-4, atol=1e-6)


def _multihost_worker(process_id: int, port: int) -> None:
    """One of two processes (4 CPU devices each): the BN net's data-parallel step over all 8 devices,
    each process feeding its half of the batch, against one device on the whole batch."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    parallel.initialize_distributed(f"localhost:{port}", num_processes=2, process_id=process_id)
    tx = optax.adam(1e-2)
    train_step, state, batch = _train_step_fn(tx), _init_state(tx), _batch()
    half = jax.tree.map(lambda a: a[process_id * 16:(process_id + 1) * 16], batch)
    dp_state, dp_loss = parallel.data_parallel_step(train_step, parallel.data_parallel_mesh())(state, half)
    local_copy = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), (dp_state, dp_loss))
    single = jax.jit(train_step)(state, batch)
    chex.assert_trees_all_close(local_copy, single, rtol=1e-4, atol=1e-6)
    print(json.dumps({"process": process_id, "devices": jax.device_count(),
                      "local_devices": jax.local_device_count()}))


def test_two_processes_equal_one_device():
    """Multi-host for real: jax.distributed.initialize with 2 local processes, 4 CPU devices each."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, __file__, "multihost", str(i), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"worker failed:\n{out}\n{err[-3000:]}"
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["process"] for r in reports] == [0, 1]
    assert all(r["devices"] == 8 and r["local_devices"] == 4 for r in reports)


def _main() -> None:
    outcomes = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            outcomes[name] = None
        except Exception:
            outcomes[name] = traceback.format_exc()
    print(json.dumps(outcomes))


if __name__ == "__main__":
    if sys.argv[1:2] == ["multihost"]:
        _multihost_worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        _main()
