"""Cross-device batch norm (also masked, with axis_index_groups) on 8 simulated CPU devices, in a subprocess.

The device count of the CPU backend is fixed when JAX starts, so the checks run in a fresh interpreter
(this file executed as a script) with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; the
pytest test below starts it and fails with its output when any check fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

NUM_DEVICES = 8


def test_cross_device_batch_norm_equals_single_device_on_the_global_batch():
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={NUM_DEVICES}",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all cross-device checks passed" in result.stdout


def _checks() -> None:

    import chex
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxopt_lab import normalization as norm

    assert jax.device_count() == NUM_DEVICES, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    keys = jax.random.split(jax.random.key(0), 4)
    # Each device's shard has its own large offset (1e3 + 10 * device): the per-device means differ, so
    # only correctly combined statistics match, and the offset makes a naive combination lose digits.
    device_offsets = 1e3 + 10.0 * jnp.repeat(jnp.arange(NUM_DEVICES, dtype=jnp.float32), 2)
    x = device_offsets[:, None, None, None] + jax.random.normal(keys[0], (2 * NUM_DEVICES, 3, 3, 5))
    scale = 1.0 + 0.2 * jax.random.normal(keys[1], (5,))
    bias = jax.random.normal(keys[2], (5,))
    cotangent = jax.random.normal(keys[3], x.shape)
    stats = norm.BatchNormStats(jnp.full(5, 0.5), jnp.full(5, 2.0))

    def loss(x, scale, bias, axis_name=None):
        y, new_stats = norm.batch_norm(x, stats, scale, bias, training=True, axis_name=axis_name)
        return jnp.sum(y * cotangent_of(x, axis_name)), (y, new_stats)

    def cotangent_of(x, axis_name):
        if axis_name is None:
            return cotangent
        index = jax.lax.axis_index(axis_name)
        return jax.lax.dynamic_slice_in_dim(cotangent, index * x.shape[0], x.shape[0])

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, (y_single, stats_single)), grads_single = jax.jit(grad_fn)(x, scale, bias)

    # 1. shard_map with axis_name: global statistics from one collective, and the right gradients.
    def per_device(x, scale, bias):
        (_, (y, new_stats)), (dx, dscale, dbias) = grad_fn(x, scale, bias, axis_name="data")
        # scale and bias enter replicated, so shard_map's autodiff already sums their gradients over
        # the devices (the transpose of the implicit broadcast): they come out global.
        return y, new_stats, dx, dscale, dbias

    sharded = jax.jit(jax.shard_map(
        per_device, mesh=mesh, in_specs=(PartitionSpec("data"), PartitionSpec(), PartitionSpec()),
        out_specs=(PartitionSpec("data"), PartitionSpec(), PartitionSpec("data"), PartitionSpec(),
                   PartitionSpec())))
    y, new_stats, dx, dscale, dbias = sharded(x, scale, bias)
    chex.assert_trees_all_close(y, y_single, atol=2e-4)
    chex.assert_trees_all_close(new_stats, stats_single, rtol=1e-5)
    chex.assert_trees_all_close((dx, dscale, dbias), grads_single, atol=2e-4, rtol=2e-4)
    # And both equal the float64 reference on the global batch.
    x64 = np.asarray(x, np.float64)
    reference = (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-5) * scale + bias
    np.testing.assert_allclose(y, reference, atol=2e-4)
    np.testing.assert_allclose(new_stats.var, 0.9 * 2.0 + 0.1 * x64.var((0, 1, 2)), rtol=1e-5)

    # The statistics travel in one collective: exactly one all-reduce in the forward program.
    hlo = jax.jit(jax.shard_map(
        lambda x: norm.batch_norm(x, stats, training=True, axis_name="data"), mesh=mesh,
        in_specs=PartitionSpec("data"), out_specs=(PartitionSpec("data"), PartitionSpec()))
    ).lower(x).as_text()
    collectives = re.findall(r"\b(all_gather|all_reduce|all_to_all|collective_permute|reduce_scatter)\b", hlo)
    assert collectives == ["all_reduce"], collectives

    # 2. plain jit with the batch sharded over the devices: no axis_name, XLA makes it global.
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    (_, (y_jit, stats_jit)), grads_jit = jax.jit(grad_fn)(x_sharded, scale, bias)
    assert len(y_jit.sharding.device_set) == NUM_DEVICES
    chex.assert_trees_all_close((y_jit, stats_jit, grads_jit), (y_single, stats_single, grads_single),
                                atol=2e-4, rtol=2e-4)
    # 3. The per-sample norms inside shard_map (no axis_name needed: their statistics never cross a
    # sample), replicated scale and bias: the custom backward must give x's gradient per device and the
    # parameters' summed over devices, as autodiff of the plain formula would on one device.
    per_sample_norms = {
        "layer_norm": lambda x, s, b: norm.layer_norm(x, s, b),
        "instance_norm": lambda x, s, b: norm.instance_norm(x, s, b),
        "group_norm": lambda x, s, b: norm.group_norm(x, None, s, b, group_size=1),
    }
    for name, f in per_sample_norms.items():
        def norm_grads(x, scale, bias, cotangent, f=f):
            return jax.grad(lambda *a: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2))(x, scale, bias)

        expected = jax.jit(norm_grads)(x, scale, bias, cotangent)
        got = jax.jit(jax.shard_map(
            norm_grads, mesh=mesh,
            in_specs=(PartitionSpec("data"), PartitionSpec(), PartitionSpec(), PartitionSpec("data")),
            out_specs=(PartitionSpec("data"), PartitionSpec(), PartitionSpec())))(x, scale, bias, cotangent)
        chex.assert_trees_all_close(got, expected, atol=2e-4, rtol=2e-4, custom_message=name)

    # 4. The linen module: nn.BatchNorm(axis_name=...) inside shard_map, parameters replicated, equals the
    # module on one device and the global batch (loss, batch_stats and parameter gradients).
    from jaxopt_lab import nn

    variables = nn.BatchNorm().init(jax.random.key(1), x, use_running_average=True)

    def module_step(module, x, cotangent):
        def module_loss(params):
            y, updates = module.apply({**variables, "params": params}, x, use_running_average=False,
                                      mutable=["batch_stats"])
            return jnp.sum(y * cotangent), updates
        return jax.value_and_grad(module_loss, has_aux=True)(variables["params"])

    (loss_single, updates_single), grads_single = jax.jit(
        lambda x: module_step(nn.BatchNorm(), x, cotangent))(x)

    def module_per_device(x, cotangent):
        (loss, updates), grads = module_step(nn.BatchNorm(axis_name="data"), x, cotangent)
        return jax.lax.psum(loss, "data"), updates, grads

    loss, updates, grads = jax.jit(jax.shard_map(
        module_per_device, mesh=mesh, in_specs=(PartitionSpec("data"), PartitionSpec("data")),
        out_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec())))(x, cotangent)
    chex.assert_trees_all_close((loss, updates, grads), (loss_single, updates_single, grads_single),
                                atol=2e-4, rtol=2e-4)
    # 5. A mask leaving the devices different numbers of elements: the pooled statistics are exactly
    # those of all unmasked elements (flax would average the per-device means, devices weighted alike).
    mask = jax.random.bernoulli(jax.random.key(7), 0.5, x.shape[:1])[:, None, None, None]
    mask = mask.at[::2].set(True)  # every device keeps at least one sample, most keep a different count
    masked = jax.jit(jax.shard_map(
        lambda x, m: norm.batch_norm(x, stats, training=True, mask=m, axis_name="data"), mesh=mesh,
        in_specs=(PartitionSpec("data"), PartitionSpec("data")),
        out_specs=(PartitionSpec("data"), PartitionSpec())))
    y_masked, stats_masked = masked(x, mask)
    kept = x64[np.asarray(mask[:, 0, 0, 0])]
    reference = (x64 - kept.mean((0, 1, 2))) / np.sqrt(kept.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(y_masked, reference, atol=2e-4)
    np.testing.assert_allclose(stats_masked.var, 0.9 * 2.0 + 0.1 * kept.var((0, 1, 2)), rtol=1e-5)

    # 6. axis_index_groups (pmap; shard_map does not support it, for flax either): devices 0-3 and 4-7
    # are normalized as two separate batches, and the groups reach the collective.
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    y_groups, stats_groups = jax.pmap(
        lambda x: norm.batch_norm(x, stats, training=True, axis_name="data", axis_index_groups=groups),
        axis_name="data")(x.reshape(NUM_DEVICES, 2, 3, 3, 5))
    for members in groups:
        part = x64.reshape(NUM_DEVICES, 2, 3, 3, 5)[members].reshape(-1, 3, 3, 5)
        expected = (part - part.mean((0, 1, 2))) / np.sqrt(part.var((0, 1, 2)) + 1e-5)
        got = np.asarray(y_groups[members[0]:members[-1] + 1]).reshape(part.shape)
        np.testing.assert_allclose(got, expected, atol=2e-4)
        for d in members:
            np.testing.assert_allclose(stats_groups.var[d], 0.9 * 2.0 + 0.1 * part.var((0, 1, 2)), rtol=1e-5)
    print("all cross-device checks passed")


if __name__ == "__main__":
    _checks()
