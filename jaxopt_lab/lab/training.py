"""The one jitted training loop for the Flax classifiers of the real-data experiments.

Layers, from the inside out:

- :func:`make_train_step` -> ``train_step(state, batch) -> (state, metrics)``: ONE pure function (loss,
  gradients, optimizer update, batch-norm statistics), optionally over ``k`` micro-batches with
  :func:`jaxopt_lab.accumulation.microbatched_value_and_grad`. Being pure and batch-first, it is also
  what :func:`jaxopt_lab.parallel.data_parallel_step` shards over devices.
- :func:`train_seeds` splits each step's batch over all visible devices (``data_parallel``) with
  :func:`jaxopt_lab.parallel.batch_sharded`; on one device it is plain single-device training.
- :func:`fit`: a budget of optimizer steps (``steps``, or whole ``epochs``) as a ``lax.scan`` over
  evaluation intervals, each a ``lax.scan`` of ``train_step`` over shuffled mini-batches
  (:func:`jaxopt_lab.lab.data.shuffled_batches`, a fresh order per epoch), then a test evaluation.
- :func:`train_seeds`: ``jax.jit(jax.vmap(init + fit))`` over seeds: every seed's run is one lane of one
  compiled program (the batch size is fixed within a call, so the seeds share every shape).
- :func:`tune_learning_rate`: the same program vmapped over learning rates x seeds (the rate is a traced
  value, so ONE compilation serves every rate), the rate chosen on a validation split carved from the
  training set, never on the test set.
- :func:`loss_flattened`: the endpoint evidence, whether the training loss had stopped falling.

A run whose loss becomes NaN/inf is not an error: its history carries the non-finite values, and
:func:`diverged_at` finds the step at which it happened.

>>> import optax
>>> from jaxopt_lab.lab import data, models, training
>>> ds = data.load_digits()
>>> result = training.train_seeds(models.MLP(), optax.adam(1e-3), ds, seeds=[0, 1], epochs=1, batch_size=64)
>>> result.history.test_accuracy.shape      # (seeds, epochs)
(2, 1)
>>> result = training.train_seeds(models.MLP(), optax.adam(1e-3), ds, seeds=[0], steps=50, batch_size=64,
...                               eval_every=20)
>>> result.history.steps.tolist()           # evaluated after these many steps (the budget is the last)
[[20, 40, 50]]
"""

from __future__ import annotations

import dataclasses
import math
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
from jaxopt_lab.lab.checks import positive_int
from jaxopt_lab.lab.data import Dataset, num_batches, shuffled_batches, stratified_split

__all__ = [
    "Batch",
    "Flatness",
    "History",
    "RateSearch",
    "TrainResult",
    "TrainState",
    "create_train_state",
    "cross_entropy",
    "diverged_at",
    "evaluate",
    "evaluate_seeds",
    "fit",
    "initial_variables",
    "loss_flattened",
    "make_train_step",
    "mean_std",
    "train_seeds",
    "train_step",
    "tune_learning_rate",
    "validation_split",
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

    Training is evaluated every ``eval_every`` optimizer steps and after the last one: ``E`` points.

    Attributes:
      step_loss: ``(steps,)`` training loss of every optimizer step (the mean over its batch).
      epoch_loss: ``(epochs,)`` mean training loss of each *complete* epoch (with a ``steps`` budget that
        is not a whole number of epochs, the partial last epoch is left out).
      test_loss, test_accuracy: ``(E,)`` on the test set at each evaluation point (batch norm in eval mode).
      steps: ``(E,)`` the number of optimizer steps done at each evaluation point (the last is the budget).
      train_loss: ``(E,)`` mean training loss of the steps since the previous evaluation point.
      validation_loss, validation_accuracy: ``(E,)`` on a validation set when :func:`fit` got one
        (:func:`tune_learning_rate`), else ``None``.
      probes: ``probe(params)`` before training and at each evaluation point, leaves ``(E + 1, ...)``;
        ``None`` without a probe.
    """

    step_loss: jax.Array
    epoch_loss: jax.Array
    test_loss: jax.Array
    test_accuracy: jax.Array
    probes: Any = None
    steps: Any = None
    train_loss: Any = None
    validation_loss: Any = None
    validation_accuracy: Any = None


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


def _init_variables(model: nn.Module, keys: jax.Array, sample_images: jax.Array) -> Any:
    """``model.init`` for every key (vmapped), compiled once per model and input shape.

    Kept out of the training program: the initializers' random-bit generation is slow to compile on
    XLA:CPU (seconds for a small CNN), and experiments train one model under many optimizers and batch
    sizes, so a separate, cached initialization is compiled once instead of inside every program. On CPU
    it is compiled without LLVM's optimizations, which compiles the threefry graphs several times faster
    (it runs once, in milliseconds either way; measured in docs/real_data_experiments.md): the same random
    bits, and values that differ from the optimized program's by at most one float32 rounding.
    """
    init = _init_fast_compile if jax.default_backend() == "cpu" else _init_default
    return init(model, keys, sample_images)


def initial_variables(model: nn.Module, seeds: Sequence[int], sample_images: jax.typing.ArrayLike) -> Any:
    """The variables each seed's run of :func:`train_seeds` / :func:`tune_learning_rate` starts from:
    ``model.init`` from ``fold_in(key(seed), 0)``, leaves with a leading seeds axis (compiled once per
    model and input shape, shared with training).

    >>> from jaxopt_lab.lab import models
    >>> variables = initial_variables(models.MLP(widths=(8,)), [0, 1], np.zeros((1, 8, 8, 1), np.float32))
    >>> variables["params"]["dense0"]["kernel"].shape
    (2, 64, 8)
    """
    _, init_keys = _seed_keys(_check_seeds("initial_variables", seeds))
    return _init_variables(model, init_keys, jnp.asarray(sample_images)[:1])


def _vmapped_init(model: nn.Module, keys: jax.Array, sample_images: jax.Array) -> Any:
    return jax.vmap(lambda key: model.init(key, sample_images, train=False))(keys)


_init_default = jax.jit(_vmapped_init, static_argnums=0)
# XLA's generic DebugOptions field; measured and used on CPU only.
_init_fast_compile = jax.jit(_vmapped_init, static_argnums=0,
                             compiler_options={"xla_backend_optimization_level": 0})


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



def _step_budget(owner: str, epochs: int | None, steps: int | None, eval_every: int | None,
                 steps_per_epoch: int) -> tuple[int, int]:
    """``(total steps, steps between evaluations)`` from exactly one of ``epochs``/``steps``.

    ``epochs`` evaluates after every epoch by default; ``steps`` at about 20 evenly spaced points (every
    ``ceil(steps / 20)`` steps, and after the last step).
    """
    if (epochs is None) == (steps is None):
        raise ValueError(f"{owner}: give exactly one of epochs or steps, got epochs={epochs!r}, "
                         f"steps={steps!r}")
    if epochs is not None:
        total = positive_int(epochs, owner, "epochs") * steps_per_epoch
        default_every = steps_per_epoch
    else:
        total = positive_int(steps, owner, "steps")
        default_every = math.ceil(total / 20)
    every = default_every if eval_every is None else positive_int(eval_every, owner, "eval_every")
    if every > total:
        raise ValueError(f"{owner}: eval_every={every} exceeds the budget of {total} steps")
    return total, every


def fit(state: TrainState, key: jax.Array, train: Batch, test: Batch, *, batch_size: int,
        epochs: int | None = None, steps: int | None = None, eval_every: int | None = None,
        step_fn: TrainStep = train_step, probe: Probe | None = None,
        validation: Batch | None = None) -> tuple[TrainState, History]:
    """Trains ``state`` for a budget of optimizer steps on shuffled mini-batches; pure, jit/vmap-friendly.

    Step ``t`` takes row ``t mod n`` of epoch ``t // n``'s order (``n`` batches per epoch), drawn from
    ``fold_in(key, epoch)``: two runs with the same key see the same batches whatever their optimizer or
    budget, and a batch of 128 is exactly four consecutive batches of 32 whenever both divide the
    training-set size. ``epochs=k`` is the budget ``steps=k * n`` evaluated after every epoch.

    Args:
      state: from :func:`create_train_state`.
      key: the data-order key.
      train, test: the whole training and test sets (they stay on the device).
      batch_size: static; the last partial batch of an epoch is dropped.
      epochs, steps: the budget, exactly one of them (static).
      eval_every: steps between evaluations on ``test`` (and ``validation``); default every epoch with
        ``epochs``, about 20 points with ``steps``. The last step is always evaluated.
      step_fn: from :func:`make_train_step` (default: no micro-batching).
      probe: optional ``probe(params) -> pytree`` recorded before training and at every evaluation.
      validation: an optional second held-out set evaluated alongside ``test``.
    """
    count = train.labels.shape[0]
    per_epoch = num_batches(count, batch_size)  # a clear error for a batch larger than the training set
    total, every = _step_budget("fit", epochs, steps, eval_every, per_epoch)
    chunks, tail = divmod(total, every)

    def one_step(carry: tuple[TrainState, jax.Array], t: jax.Array) -> tuple[tuple[TrainState, jax.Array],
                                                                          jax.Array]:
        state, order = carry
        epoch, position = jnp.divmod(t, per_epoch)
        # A new order at the start of each epoch. The predicate depends on the step only (never on a
        # vmapped value), so under vmap this stays a real branch, taken once per epoch.
        order = jax.lax.cond(position == 0,
                             lambda: shuffled_batches(jax.random.fold_in(key, epoch), count, batch_size),
                             lambda: order)
        indices = order[position]
        state, metrics = step_fn(state, Batch(train.images[indices], train.labels[indices]))
        return (state, order), metrics["loss"]

    def evaluation(state: TrainState) -> tuple[Any, ...]:
        test_metrics = evaluate(state, test.images, test.labels)
        valid_metrics = None if validation is None else evaluate(state, validation.images, validation.labels)
        probed = None if probe is None else probe(state.params)
        return test_metrics, valid_metrics, probed

    def interval(carry: tuple[TrainState, jax.Array], first: jax.Array, length: int) -> tuple[Any, Any]:
        carry, losses = jax.lax.scan(one_step, carry, first + jnp.arange(length))
        return carry, (losses, *evaluation(carry[0]))

    order = jnp.zeros((per_epoch, batch_size), jnp.int32)
    initial_probe = None if probe is None else probe(state.params)
    carry, records = jax.lax.scan(lambda c, first: interval(c, first, every), (state, order),
                                  jnp.arange(chunks) * every)
    losses = records[0].reshape(-1)
    train_loss = records[0].mean(axis=1)
    if tail:  # the last evaluation interval is shorter: one more scan of the remaining steps
        carry, last = interval(carry, jnp.asarray(chunks * every), tail)
        records = jax.tree.map(lambda rest, one: jnp.concatenate([rest, one[None]]), records[1:], last[1:])
        losses = jnp.concatenate([losses, last[0]])
        train_loss = jnp.concatenate([train_loss, last[0].mean()[None]])
    else:
        records = records[1:]
    (test_loss, test_accuracy), valid, probes = records
    if probe is not None:
        probes = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), initial_probe, probes)
    full_epochs = total // per_epoch
    eval_steps = np.minimum(np.arange(1, chunks + (tail > 0) + 1) * every, total)
    epoch_loss = losses[: full_epochs * per_epoch].reshape(full_epochs, per_epoch).mean(axis=1)
    return carry[0], History(
        step_loss=losses, epoch_loss=epoch_loss,
        test_loss=test_loss, test_accuracy=test_accuracy, probes=probes, steps=jnp.asarray(eval_steps),
        train_loss=train_loss, validation_loss=None if valid is None else valid[0],
        validation_accuracy=None if valid is None else valid[1])


def _make_step_fn(owner: str, batch_size: int, num_microbatches: int, unroll: int | bool,
                  data_parallel: bool | None) -> TrainStep:
    """The train step of :func:`train_seeds`/:func:`tune_learning_rate`: micro-batched, maybe data-parallel."""
    mesh = parallel.maybe_data_parallel_mesh(data_parallel)
    if mesh is not None and batch_size % (mesh.devices.size * num_microbatches):
        if data_parallel:
            raise ValueError(f"{owner}: batch_size={batch_size} must be divisible by the "
                             f"{mesh.devices.size} devices x num_microbatches={num_microbatches} for "
                             "data-parallel training (pass data_parallel=False to train on one device)")
        mesh = None  # automatic mode: a batch that cannot be split evenly (e.g. 2 on 8 GPUs) stays on one
    # Interleaved micro-batches keep each device's shard local; contiguous ones would move data.
    step_fn = make_train_step(num_microbatches=num_microbatches, interleave=mesh is not None, unroll=unroll)
    if mesh is not None:
        step_fn = parallel.batch_sharded(step_fn, mesh)
    return step_fn


def _seed_keys(seeds: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Each seed's data-order key ``fold_in(key(s), 1)`` and initialization key ``fold_in(key(s), 0)``."""
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, dtype=jnp.uint32))
    return (jax.vmap(lambda key: jax.random.fold_in(key, 1))(keys),
            jax.vmap(lambda key: jax.random.fold_in(key, 0))(keys))


def _check_seeds(owner: str, seeds: Sequence[int]) -> list[int]:
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: seeds must be a sequence of ints, got {seeds!r}") from None
    if not seeds:
        raise ValueError(f"{owner}: seeds must name at least one seed, got none")
    return seeds


def train_seeds(model: nn.Module, tx: optax.GradientTransformation, dataset: Dataset, seeds: Sequence[int], *,
                batch_size: int, epochs: int | None = None, steps: int | None = None,
                eval_every: int | None = None, num_microbatches: int = 1, probe: Probe | None = None,
                train_size: int | None = None, unroll: int | bool = 1,
                data_parallel: bool | None = None) -> TrainResult:
    """Trains one run per seed, all seeds vmapped in one jitted program.

    Seed ``s`` initializes the model from ``fold_in(key(s), 0)`` and orders the data with
    ``fold_in(key(s), 1)``: the same seed gives the same initial weights and batches for every model
    width-compatible optimizer and batch size, so variants differ only in what is compared.

    Args:
      model: a Flax module called as ``model(images, train=...)`` returning logits.
      tx: the optax optimizer.
      dataset: from :mod:`jaxopt_lab.lab.data`.
      seeds: the runs (at least one).
      batch_size, epochs, steps, eval_every, probe: see :func:`fit` (exactly one of ``epochs``/``steps``).
      num_microbatches: see :func:`make_train_step`.
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
    seeds = _check_seeds("train_seeds", seeds)
    count = len(dataset.y_train) if train_size is None else int(train_size)
    if not 0 < count <= len(dataset.y_train):
        raise ValueError(f"train_seeds: train_size must lie in [1, {len(dataset.y_train)}], got {train_size!r}")
    _step_budget("train_seeds", epochs, steps, eval_every, num_batches(count, batch_size))  # before compiling
    train = Batch(jnp.asarray(dataset.x_train[:count]), jnp.asarray(dataset.y_train[:count]))
    test = Batch(jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test))
    step_fn = _make_step_fn("train_seeds", batch_size, num_microbatches, unroll, data_parallel)

    def one_run(variables: Any, data_key: jax.Array, train: Batch, test: Batch) -> tuple[TrainState, History]:
        state = _state_from_variables(model, tx, variables)
        return fit(state, data_key, train, test, batch_size=batch_size, epochs=epochs, steps=steps,
                   eval_every=eval_every, step_fn=step_fn, probe=probe)

    data_keys, init_keys = _seed_keys(seeds)
    variables = _init_variables(model, init_keys, train.images[:1])
    state, history = jax.jit(jax.vmap(one_run, in_axes=(0, 0, None, None)))(variables, data_keys, train, test)
    return TrainResult(state, history)


class RateSearch(NamedTuple):
    """:func:`tune_learning_rate`'s output.

    Attributes:
      learning_rate: the chosen rate.
      table: one dict per rate, in the order given: ``learning_rate``, ``validation_accuracy`` and
        ``validation_loss`` (``{"mean", "std", "values"}`` over seeds, at the end of training),
        ``final_train_loss`` (the same, the last evaluation interval's mean training loss), ``diverged``
        (how many seeds' loss became NaN/inf) and ``chosen``.
      result: the chosen rate's runs (leading seeds axis), trained on the training set minus the
        validation split; ``history.test_*`` are on the test set, ``history.validation_*`` on the split.
      validation_size: examples in the validation split (carved from the training set).
    """

    learning_rate: float
    table: list[dict[str, Any]]
    result: TrainResult
    validation_size: int


def validation_split(labels: Any, fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, validation)`` of a fixed, stratified split of ``labels`` (each class keeps its share).

    >>> train, valid = validation_split(np.repeat(np.arange(4), 10), 0.2)
    >>> len(train), len(valid), sorted(np.bincount(np.repeat(np.arange(4), 10)[valid]).tolist())
    (32, 8, [2, 2, 2, 2])
    """
    labels = np.asarray(labels)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_split: validation_fraction must lie in (0, 1), got {fraction!r}")
    try:
        train, valid = stratified_split(labels, fraction, seed=seed)
    except ValueError as err:  # too few examples of a class to stratify, or a split that would be empty
        raise ValueError(f"validation_split: cannot hold out {fraction!r} of {len(labels)} examples with "
                         f"every class in both parts ({err})") from None
    return np.sort(train), np.sort(valid)


def tune_learning_rate(model: nn.Module, make_tx: Callable[[Any], optax.GradientTransformation],
                       dataset: Dataset, seeds: Sequence[int], *, learning_rates: Sequence[float],
                       batch_size: int, steps: int, validation_fraction: float = 0.2,
                       eval_every: int | None = None, num_microbatches: int = 1, unroll: int | bool = 1,
                       data_parallel: bool | None = None, split_seed: int = 0) -> RateSearch:
    """Trains every (learning rate, seed) pair in ONE jitted, vmapped program and picks the rate on validation.

    A validation split (``validation_fraction`` of the training set, fixed by ``split_seed`` and stratified)
    is held out; every run trains on the rest for ``steps`` optimizer steps (:func:`fit`). ``make_tx`` is
    called with a *traced* rate inside the program (``lambda lr: optax.adam(lr)`` works as it is, as does
    ``optax.inject_hyperparams``), so the rates share one compilation. Seed ``s`` starts from the same
    weights and sees the same batches at every rate (as in :func:`train_seeds`).

    The chosen rate has the fewest diverged seeds (NaN/inf loss; recorded, never raised), then the best mean
    validation accuracy over seeds at the end of training, then the lower mean validation loss. The test
    set is evaluated for the returned runs' history but never consulted for the choice.

    Args:
      model, dataset, seeds, batch_size, num_microbatches, unroll, data_parallel: see :func:`train_seeds`.
      make_tx: ``learning_rate -> optax.GradientTransformation``.
      learning_rates: the candidates (positive, finite; at least one).
      steps, eval_every: the budget and evaluation spacing of every run (see :func:`fit`).
      validation_fraction: the share of the training set held out for the choice.
      split_seed: the seed of the validation split.

    >>> import optax
    >>> from jaxopt_lab.lab import data, models
    >>> search = tune_learning_rate(models.Logistic(), optax.sgd, data.load_digits(), [0, 1],
    ...                             learning_rates=[1e-3, 0.1], batch_size=64, steps=100)
    >>> search.learning_rate, [row["diverged"] for row in search.table]
    (0.1, [0, 0])
    >>> search.result.history.test_accuracy.shape     # (seeds, evaluation points), on the test set
    (2, 20)
    """
    seeds = _check_seeds("tune_learning_rate", seeds)
    if not callable(make_tx):
        raise TypeError(f"tune_learning_rate: make_tx must be callable learning_rate -> "
                        f"optax.GradientTransformation, got {type(make_tx).__name__}")
    try:
        rates = np.asarray(learning_rates, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"tune_learning_rate: learning_rates must be numbers, "
                         f"got {learning_rates!r}") from None
    if rates.size == 0 or not np.all(np.isfinite(rates)) or np.any(rates <= 0):
        raise ValueError(f"tune_learning_rate: learning_rates must be one or more finite numbers > 0, "
                         f"got {list(np.atleast_1d(learning_rates))!r}")
    train_idx, valid_idx = validation_split(dataset.y_train, validation_fraction, seed=split_seed)
    _step_budget("tune_learning_rate", None, steps, eval_every, num_batches(len(train_idx), batch_size))
    train = Batch(jnp.asarray(dataset.x_train[train_idx]), jnp.asarray(dataset.y_train[train_idx]))
    valid = Batch(jnp.asarray(dataset.x_train[valid_idx]), jnp.asarray(dataset.y_train[valid_idx]))
    test = Batch(jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test))
    step_fn = _make_step_fn("tune_learning_rate", batch_size, num_microbatches, unroll, data_parallel)

    def one_run(variables: Any, data_key: jax.Array, rate: jax.Array, train: Batch, valid: Batch,
                test: Batch) -> tuple[Any, History]:
        state = _state_from_variables(model, make_tx(rate), variables)
        state, history = fit(state, data_key, train, test, batch_size=batch_size, steps=steps,
                             eval_every=eval_every, step_fn=step_fn, validation=valid)
        # The state's `tx` closes over the traced rate: return only its arrays; rebuilt outside.
        return (state.step, state.params, state.opt_state, state.batch_stats), history

    data_keys, init_keys = _seed_keys(seeds)
    variables = _init_variables(model, init_keys, train.images[:1])
    seed_of_lane = np.tile(np.arange(len(seeds)), rates.size)
    lanes = lambda tree: jax.tree.map(lambda a: a[seed_of_lane], tree)
    lane_rates = jnp.repeat(jnp.asarray(rates, jnp.float32), len(seeds))  # rate-major: lane = r * S + s
    program = jax.jit(jax.vmap(one_run, in_axes=(0, 0, 0, None, None, None)))
    arrays, history = program(lanes(variables), lanes(data_keys), lane_rates, train, valid, test)

    per_rate = lambda a: np.asarray(a).reshape(rates.size, len(seeds), *np.shape(a)[1:])
    valid_acc = per_rate(history.validation_accuracy)[..., -1]
    valid_loss = per_rate(history.validation_loss)[..., -1]
    train_loss = per_rate(history.train_loss)[..., -1]
    diverged = (~np.isfinite(per_rate(history.step_loss))).any(axis=-1).sum(axis=1)
    mean_loss = np.where(np.isfinite(valid_loss), valid_loss, np.inf).mean(axis=1)
    best = min(range(rates.size), key=lambda r: (diverged[r], -valid_acc[r].mean(), mean_loss[r]))
    table = [{"learning_rate": float(rate), "validation_accuracy": mean_std(valid_acc[r]),
              "validation_loss": mean_std(valid_loss[r]), "final_train_loss": mean_std(train_loss[r]),
              "diverged": int(diverged[r]), "chosen": r == best} for r, rate in enumerate(rates)]
    chosen = slice(best * len(seeds), (best + 1) * len(seeds))
    step, params, opt_state, batch_stats = jax.tree.map(lambda a: a[chosen], arrays)
    state = TrainState(step=step, apply_fn=model.apply, params=params, tx=make_tx(float(rates[best])),
                       opt_state=opt_state, batch_stats=batch_stats)
    result = TrainResult(state, jax.tree.map(lambda a: a[chosen], history))
    return RateSearch(float(rates[best]), table, result, len(valid_idx))


@dataclasses.dataclass(frozen=True)
class Flatness:
    """:func:`loss_flattened`'s verdict with its evidence; true in a boolean context when flattened.

    Attributes:
      flattened: the training loss changed by less than the tolerance over the window.
      relative_change: the change of the loss over the window (a least-squares line through the seed-mean
        step losses, its rise over the window) divided by the mean loss in the window; NaN if a run diverged.
      absolute_change: the same change in loss units.
      window_steps: the steps the line was fitted to (the last ``window_fraction`` of training).
    """

    flattened: bool
    relative_change: float
    absolute_change: float
    window_steps: int

    def __bool__(self) -> bool:
        return self.flattened

    def describe(self) -> str:
        """E.g. ``"yes (last 400 steps: -1.3%, -0.004 nats)"``, for summaries."""
        if not math.isfinite(self.relative_change):
            return f"no (a run diverged; last {self.window_steps} steps)"
        verdict = "yes" if self.flattened else "no"
        return (f"{verdict} (last {self.window_steps} steps: {100 * self.relative_change:+.1f}%, "
                f"{self.absolute_change:+.3f} nats)")


def loss_flattened(step_loss: Any, *, window_fraction: float = 0.2, tolerance: float = 0.05,
                   atol: float = 0.01) -> Flatness:
    """Whether the training loss had flattened by the end: the endpoint evidence of a step budget.

    Averages ``step_loss`` (``(steps,)``, or ``(seeds, steps)`` averaged over seeds), fits a least-squares
    line to its last ``window_fraction`` of steps, and calls it flattened when the line's change over that
    window is within ``tolerance`` of the window's mean loss, or within ``atol`` nats (a loss near zero
    whose relative change is large but whose absolute change is negligible). A diverged run (NaN/inf)
    never counts as flattened.

    >>> import numpy as np
    >>> steps = np.arange(1000)
    >>> bool(loss_flattened(2.0 * np.exp(-steps / 50) + 0.3)), bool(loss_flattened(2.0 - steps / 1000))
    (True, False)
    >>> loss_flattened(2.0 - steps / 1000).describe()
    'no (last 200 steps: -18.1%, -0.199 nats)'
    """
    losses = np.asarray(step_loss, dtype=np.float64)
    if losses.ndim not in (1, 2) or losses.shape[-1] < 2:
        raise ValueError(f"loss_flattened: step_loss must be (steps,) or (seeds, steps) with >= 2 steps, "
                         f"got shape {losses.shape}")
    if not 0.0 < window_fraction <= 1.0:
        raise ValueError(f"loss_flattened: window_fraction must lie in (0, 1], got {window_fraction!r}")
    if not tolerance >= 0 or not atol >= 0:
        raise ValueError(f"loss_flattened: tolerance and atol must be >= 0, got {tolerance!r}, {atol!r}")
    curve = losses.reshape(-1, losses.shape[-1]).mean(axis=0)
    window = max(2, math.ceil(window_fraction * curve.size))
    tail = curve[-window:]
    if not np.isfinite(tail).all() or not np.isfinite(curve).all():
        return Flatness(False, math.nan, math.nan, window)
    slope = np.polyfit(np.arange(window, dtype=np.float64), tail, 1)[0]
    change = float(slope * (window - 1))
    level = float(abs(tail.mean()))
    relative = change / level if level > 0 else (0.0 if change == 0 else math.inf)
    flattened = abs(change) <= max(tolerance * level, atol)
    return Flatness(bool(flattened), float(relative), change, window)


def diverged_at(step_loss: Any) -> list[int | None]:
    """Per run (rows of ``step_loss``), the first step whose loss is NaN/inf, or ``None``."""
    losses = np.atleast_2d(np.asarray(step_loss))
    bad = ~np.isfinite(losses)
    return [int(np.argmax(row)) if row.any() else None for row in bad]
