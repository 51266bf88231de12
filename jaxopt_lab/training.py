"""The one jitted training loop for the Flax classifiers of the real-data experiments.

Layers, from the inside out:

- :func:`make_train_step` -> ``train_step(state, batch) -> (state, metrics)``: ONE pure function (loss,
  gradients, optimizer update, batch-norm statistics), optionally over ``k`` micro-batches with
  :func:`jaxopt_lab.accumulation.microbatched_value_and_grad`. Being pure and batch-first, it is also
  what :func:`jaxopt_lab.parallel.data_parallel_step` shards over devices.
- :func:`train_seeds` splits each step's batch over all visible devices (``data_parallel``) with
  :func:`jaxopt_lab.parallel.batch_sharded`; on one device it is plain single-device training.
- :func:`fit`: ``epochs`` as a ``lax.scan``, each epoch a ``lax.scan`` of ``train_step`` over shuffled
  mini-batches (:func:`jaxopt_lab.data.shuffled_batches`), then a test evaluation.
- :func:`train_seeds`: ``jax.jit(jax.vmap(init + fit))`` over seeds: every seed's run is one lane of one
  compiled program (the batch size is fixed within a call, so the seeds share every shape).

A run whose loss becomes NaN/inf is not an error: its history carries the non-finite values, and
:func:`diverged_at` finds the step at which it happened.

>>> import optax
>>> from jaxopt_lab import data, models, training
>>> ds = data.load_digits()
>>> result = training.train_seeds(models.MLP(), optax.adam(1e-3), ds, seeds=[0, 1], epochs=1, batch_size=64)
>>> result.history.test_accuracy.shape      # (seeds, epochs)
(2, 1)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from jaxopt_lab import parallel
from jaxopt_lab.accumulation import microbatched_value_and_grad
from jaxopt_lab.data import Dataset, num_batches, shuffled_batches

__all__ = [
    "Batch",
    "History",
    "TrainResult",
    "TrainState",
    "create_train_state",
    "cross_entropy",
    "diverged_at",
    "evaluate",
    "evaluate_seeds",
    "fit",
    "make_train_step",
    "mean_std",
    "train_seeds",
    "train_step",
]

TrainStep = Callable[["TrainState", "Batch"], tuple["TrainState", dict[str, jax.Array]]]
Probe = Callable[[Any], Any]


class TrainState(train_state.TrainState):
    """Flax's ``TrainState`` plus the ``batch_stats`` collection (empty for models without batch norm)."""

    batch_stats: Any = struct.field(default_factory=dict)


class Batch(NamedTuple):
    """A mini-batch: images ``(B, H, W, C)`` and integer labels ``(B,)``. Leading axis = the batch."""

    images: jax.Array
    labels: jax.Array


class History(NamedTuple):
    """What :func:`fit` records (under :func:`train_seeds` every field gains a leading seeds axis).

    Attributes:
      step_loss: ``(steps,)`` training loss of every optimizer step (the mean over its batch).
      epoch_loss: ``(epochs,)`` mean training loss of each epoch.
      test_loss, test_accuracy: ``(epochs,)`` on the test set after each epoch (batch norm in eval mode).
      probes: ``probe(params)`` before training and after each epoch, leaves ``(epochs + 1, ...)``;
        ``None`` without a probe.
    """

    step_loss: jax.Array
    epoch_loss: jax.Array
    test_loss: jax.Array
    test_accuracy: jax.Array
    probes: Any = None


class TrainResult(NamedTuple):
    """:func:`train_seeds`' output: final states and histories, both with a leading seeds axis."""

    state: TrainState
    history: History

    @property
    def final_test_accuracy(self) -> np.ndarray:
        return np.asarray(self.history.test_accuracy[:, -1])

    @property
    def diverged(self) -> np.ndarray:
        """Per seed: did any step's loss become NaN or infinite."""
        return ~np.isfinite(np.asarray(self.history.step_loss)).all(axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer ``labels`` under ``logits``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       sample_images: jax.typing.ArrayLike) -> TrainState:
    """Initializes ``model`` (params and, if any, ``batch_stats``) and ``tx`` from ``key``."""
    return _state_from_variables(model, tx, model.init(key, sample_images, train=False))


def _state_from_variables(model: nn.Module, tx: optax.GradientTransformation, variables: Any) -> TrainState:
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}))


@functools.partial(jax.jit, static_argnums=0)
def _init_variables(model: nn.Module, keys: jax.Array, sample_images: jax.Array) -> Any:
    """``model.init`` for every key (vmapped), compiled once per model and input shape.

    Kept out of the training program: the initializers' random-bit generation is slow to compile on
    XLA:CPU (seconds for a small CNN), and experiments train one model under many optimizers and batch
    sizes, so a separate, cached initialization is compiled once instead of inside every program.
    """
    return jax.vmap(lambda key: model.init(key, sample_images, train=False))(keys)


def _classification_loss(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``loss_fn(params, batch, batch_stats) -> (loss, (new_batch_stats, accuracy))`` in train mode."""

    def loss_fn(params: Any, batch: Batch, batch_stats: Any) -> tuple[jax.Array, tuple[Any, jax.Array]]:
        logits, updates = apply_fn({"params": params, "batch_stats": batch_stats}, batch.images, train=True,
                                   mutable=["batch_stats"])
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch.labels)
        return cross_entropy(logits, batch.labels), (updates.get("batch_stats", batch_stats), accuracy)

    return loss_fn


def make_train_step(*, num_microbatches: int = 1, interleave: bool = False,
                    unroll: int | bool = 1) -> TrainStep:
    """``train_step(state, batch) -> (state, {"loss", "accuracy"})``: one optimizer step on ``batch``.

    Args:
      num_microbatches: ``1`` takes the gradient of the whole batch at once. ``k > 1`` splits the batch
        into ``k`` consecutive micro-batches and averages their gradients with
        :func:`~jaxopt_lab.accumulation.microbatched_value_and_grad` (a ``lax.scan``; activations of one
        micro-batch live at a time), threading ``batch_stats`` through them: batch norm then normalizes
        each micro-batch with its own statistics and updates its running averages ``k`` times.
      interleave: micro-batch ``i`` takes examples ``i, i + k, ...`` (keeps a batch sharded over devices
        sharded; see :func:`jaxopt_lab.accumulation.split_microbatches`).
      unroll: passed to the micro-batch ``lax.scan``; ``True`` sidesteps XLA:CPU's slow convolution
        backward inside loops (jax-ml/jax#12868) at the cost of the one-micro-batch memory bound.

    The function is pure and not jitted: :func:`fit` compiles it inside its scan, and
    :func:`jaxopt_lab.parallel.data_parallel_step` can compile it sharded over devices.
    """
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"make_train_step: num_microbatches must be a positive int, got {num_microbatches!r}")

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        loss_fn = _classification_loss(state.apply_fn)
        if num_microbatches == 1:
            value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
        else:
            value_and_grad = microbatched_value_and_grad(loss_fn, num_microbatches, has_aux=True,
                                                         carry_argnum=2, aux_mode="mean",
                                                         interleave=interleave, unroll=unroll)
        (loss, (batch_stats, accuracy)), grads = value_and_grad(state.params, batch, state.batch_stats)
        state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        return state, {"loss": loss, "accuracy": accuracy}

    return train_step


train_step: TrainStep = make_train_step()


def evaluate(state: TrainState, images: jax.Array, labels: jax.Array, *,
             batch_size: int = 1000) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy on ``(images, labels)`` in eval mode (batch norm: running stats).

    Evaluates ``batch_size`` examples at a time (a ``lax.map``), so a large test set never holds all its
    activations at once; the last chunk is padded and the padding masked out.
    """
    count = images.shape[0]
    chunk = min(batch_size, count)
    chunks = -(-count // chunk)
    pad = chunks * chunk - count
    padded_images = jnp.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
    padded_labels = jnp.pad(labels, (0, pad))
    weights = (jnp.arange(chunks * chunk) < count).astype(jnp.float32)
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def one_chunk(args: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        x, y, w = args
        logits = state.apply_fn(variables, x, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(w * losses), jnp.sum(w * (jnp.argmax(logits, -1) == y))

    reshape = lambda a: a.reshape(chunks, chunk, *a.shape[1:])
    loss_sums, correct = jax.lax.map(one_chunk, (reshape(padded_images), reshape(padded_labels),
                                                 reshape(weights)))
    return loss_sums.sum() / count, correct.sum() / count


def evaluate_seeds(state: TrainState, images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`evaluate` of every seed of a :func:`train_seeds` state (leading seeds axis), jitted.

    Returns ``(loss, accuracy)`` as NumPy arrays of shape ``(seeds,)``; e.g. a trained model on a test
    set changed after training.
    """
    loss, accuracy = _evaluate_seeds(state, jnp.asarray(images), jnp.asarray(labels))
    return np.asarray(loss), np.asarray(accuracy)


@jax.jit
def _evaluate_seeds(state: TrainState, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Module-level, so one state evaluated on several test sets of one shape compiles once.
    def one(params: Any, batch_stats: Any) -> tuple[jax.Array, jax.Array]:
        return evaluate(state.replace(params=params, batch_stats=batch_stats), images, labels)

    return jax.vmap(one)(state.params, state.batch_stats)


def mean_std(values: Any) -> dict[str, Any]:
    """``{"mean", "std", "values"}`` of per-seed numbers (std with ``ddof=1``; 0 for a single seed)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "values": values.tolist()}


def fit(state: TrainState, key: jax.Array, train: Batch, test: Batch, *, epochs: int, batch_size: int,
        step_fn: TrainStep = train_step, probe: Probe | None = None) -> tuple[TrainState, History]:
    """Trains ``state`` for ``epochs`` epochs of shuffled mini-batches; pure, jit- and vmap-friendly.

    Epoch ``e`` draws its order from ``fold_in(key, e)``, so two runs with the same key see the same
    batches whatever their optimizer, and a batch of 128 is exactly four consecutive batches of 32
    whenever both divide the training-set size.

    Args:
      state: from :func:`create_train_state`.
      key: the data-order key.
      train, test: the whole training and test sets (they stay on the device).
      epochs, batch_size: static; the last partial batch of an epoch is dropped.
      step_fn: from :func:`make_train_step` (default: no micro-batching).
      probe: optional ``probe(params) -> pytree`` recorded before training and after every epoch.
    """
    count = train.labels.shape[0]
    num_batches(count, batch_size)  # a clear error for a batch larger than the training set
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fit: epochs must be a positive int, got {epochs!r}")

    def one_step(state: TrainState, indices: jax.Array) -> tuple[TrainState, jax.Array]:
        state, metrics = step_fn(state, Batch(train.images[indices], train.labels[indices]))
        return state, metrics["loss"]

    def one_epoch(state: TrainState, epoch: jax.Array) -> tuple[TrainState, tuple[Any, ...]]:
        order = shuffled_batches(jax.random.fold_in(key, epoch), count, batch_size)
        state, losses = jax.lax.scan(one_step, state, order)
        test_loss, test_accuracy = evaluate(state, test.images, test.labels)
        probed = None if probe is None else probe(state.params)
        return state, (losses, test_loss, test_accuracy, probed)

    initial_probe = None if probe is None else probe(state.params)
    state, (losses, test_loss, test_accuracy, probes) = jax.lax.scan(one_epoch, state, jnp.arange(epochs))
    if probe is not None:
        probes = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), initial_probe, probes)
    return state, History(step_loss=losses.reshape(-1), epoch_loss=losses.mean(axis=1), test_loss=test_loss,
                          test_accuracy=test_accuracy, probes=probes)


def train_seeds(model: nn.Module, tx: optax.GradientTransformation, dataset: Dataset, seeds: Sequence[int], *,
                epochs: int, batch_size: int, num_microbatches: int = 1, probe: Probe | None = None,
                train_size: int | None = None, unroll: int | bool = 1,
                data_parallel: bool | None = None) -> TrainResult:
    """Trains one run per seed, all seeds vmapped in one jitted program.

    Seed ``s`` initializes the model from ``fold_in(key(s), 0)`` and orders the data with
    ``fold_in(key(s), 1)``: the same seed gives the same initial weights and batches for every model
    width-compatible optimizer and batch size, so variants differ only in what is compared.

    Args:
      model: a Flax module called as ``model(images, train=...)`` returning logits.
      tx: the optax optimizer.
      dataset: from :mod:`jaxopt_lab.data`.
      seeds: the runs (at least one).
      epochs, batch_size, num_microbatches, probe: see :func:`fit` and :func:`make_train_step`.
      train_size: use only the first ``train_size`` training examples (e.g. a multiple of every batch
        size compared), default all.
      unroll: see :func:`make_train_step`.
      data_parallel: ``None`` splits every step's batch over all devices when more than one is visible,
        ``True`` always uses a device mesh, ``False`` never (:func:`jaxopt_lab.parallel.batch_sharded`).
        The numbers are those of one device up to float reassociation. The batch size must be divisible
        by devices x ``num_microbatches``; if it is not, ``True`` raises and ``None`` trains on one device.
        Under a mesh micro-batch ``i`` holds examples ``i, i + k, ...`` (each device keeps its shard)
        instead of a contiguous slice: as random a split of the shuffled batch, but with batch norm a
        different one from a single-device run.

    Returns:
      A :class:`TrainResult`; every leaf has a leading axis of ``len(seeds)``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("train_seeds: seeds must name at least one seed, got none")
    count = len(dataset.y_train) if train_size is None else int(train_size)
    if not 0 < count <= len(dataset.y_train):
        raise ValueError(f"train_seeds: train_size must lie in [1, {len(dataset.y_train)}], got {train_size!r}")
    num_batches(count, batch_size)  # validates batch_size early, before compiling
    train = Batch(jnp.asarray(dataset.x_train[:count]), jnp.asarray(dataset.y_train[:count]))
    test = Batch(jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test))
    mesh = parallel.maybe_data_parallel_mesh(data_parallel)
    if mesh is not None and batch_size % (mesh.devices.size * num_microbatches):
        if data_parallel:
            raise ValueError(f"train_seeds: batch_size={batch_size} must be divisible by the "
                             f"{mesh.devices.size} devices x num_microbatches={num_microbatches} for "
                             "data-parallel training (pass data_parallel=False to train on one device)")
        mesh = None  # automatic mode: a batch that cannot be split evenly (e.g. 2 on 8 GPUs) stays on one
    # Interleaved micro-batches keep each device's shard local; contiguous ones would move data.
    step_fn = make_train_step(num_microbatches=num_microbatches, interleave=mesh is not None, unroll=unroll)
    if mesh is not None:
        step_fn = parallel.batch_sharded(step_fn, mesh)

    def one_run(variables: Any, seed_key: jax.Array, train: Batch, test: Batch) -> tuple[TrainState, History]:
        state = _state_from_variables(model, tx, variables)
        return fit(state, jax.random.fold_in(seed_key, 1), train, test, epochs=epochs, batch_size=batch_size,
                   step_fn=step_fn, probe=probe)

    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, dtype=jnp.uint32))
    init_keys = jax.vmap(lambda key: jax.random.fold_in(key, 0))(keys)
    variables = _init_variables(model, init_keys, train.images[:1])
    state, history = jax.jit(jax.vmap(one_run, in_axes=(0, 0, None, None)))(variables, keys, train, test)
    return TrainResult(state, history)


def diverged_at(step_loss: Any) -> list[int | None]:
    """Per run (rows of ``step_loss``), the first step whose loss is NaN/inf, or ``None``."""
    losses = np.atleast_2d(np.asarray(step_loss))
    bad = ~np.isfinite(losses)
    return [int(np.argmax(row)) if row.any() else None for row in bad]
