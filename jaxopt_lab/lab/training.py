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
  (:func:`jaxopt_lab.lab.data.shuffled_batches`, a fresh order per epoch), then a test evaluation. Every
  interval has the same length; a shorter last one skips its steps past the budget (a ``lax.cond``), so
  the program holds one copy of the step loop.
- :func:`train_seeds`: ``jax.jit(jax.vmap(fit))`` over seeds: every seed's run is one lane of one compiled
  program (the batch size is fixed within a call, so the seeds share every shape). The program runs a
  chunk of evaluation intervals per call (``chunk_steps``), the carry passed from call to call, and
  ``progress`` hears of every chunk's steps: a progress bar advances during a long run, and the result is
  bitwise the same for every chunking.
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
import functools
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
    "DEFAULT_CHUNK_STEPS",
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


class _Budget(NamedTuple):
    """A run's step budget: ``total`` steps, evaluated every ``every`` steps at ``intervals`` points."""

    total: int
    every: int
    intervals: int  # ceil(total / every); the last interval is shorter when ``every`` does not divide ``total``
    per_epoch: int
    batch_size: int


def _budget(owner: str, count: int, batch_size: int, epochs: int | None, steps: int | None,
            eval_every: int | None) -> _Budget:
    per_epoch = num_batches(count, batch_size)  # a clear error for a batch larger than the training set
    total, every = _step_budget(owner, epochs, steps, eval_every, per_epoch)
    return _Budget(total, every, -(-total // every), per_epoch, batch_size)


def _initial_order(budget: _Budget) -> jax.Array:
    # Replaced at step 0 (the start of epoch 0) before it is read.
    return jnp.zeros((budget.per_epoch, budget.batch_size), jnp.int32)


def _run_intervals(carry: tuple[TrainState, jax.Array], key: jax.Array, first: jax.Array, count: int,
                   train: Batch, test: Batch, validation: Batch | None, *, budget: _Budget, step_fn: TrainStep,
                   probe: Probe | None) -> tuple[tuple[TrainState, jax.Array], tuple[Any, ...]]:
    """Evaluation intervals ``first, ..., first + count - 1`` of a run (a ``lax.scan``), from ``carry``.

    ``carry`` is ``(state, order)``, the epoch's batch order; ``first`` may be traced, so one compiled
    program runs every chunk of ``count`` intervals. Every interval is ``budget.every`` steps long; when
    that does not divide the budget, the steps past it (in the last interval) are skipped by a
    ``lax.cond`` on the step number, so the last interval needs no second copy of the step loop.

    Returns:
      The new carry and ``(losses (count, every), (test_loss, test_accuracy), validation metrics or
      None, probes or None)``, each with a leading axis of ``count``.
    """
    num_train = train.labels.shape[0]
    per_epoch, every = budget.per_epoch, budget.every

    def train_on(carry: tuple[TrainState, jax.Array], t: jax.Array) -> tuple[tuple[TrainState, jax.Array],
                                                                           jax.Array]:
        state, order = carry
        epoch, position = jnp.divmod(t, per_epoch)
        # A new order at the start of each epoch. The predicate depends on the step only (never on a
        # vmapped value), so under vmap this stays a real branch, taken once per epoch.
        order = jax.lax.cond(position == 0,
                             lambda: shuffled_batches(jax.random.fold_in(key, epoch), num_train,
                                                      budget.batch_size),
                             lambda: order)
        indices = order[position]
        state, metrics = step_fn(state, Batch(train.images[indices], train.labels[indices]))
        return (state, order), metrics["loss"]

    def one_step(carry: tuple[TrainState, jax.Array], t: jax.Array) -> tuple[tuple[TrainState, jax.Array],
                                                                           jax.Array]:
        if budget.total % every == 0:
            return train_on(carry, t)
        loss = jax.eval_shape(train_on, carry, t)[1]
        skip = lambda carry, t: (carry, jnp.zeros(loss.shape, loss.dtype))  # past the budget: no step
        return jax.lax.cond(t < budget.total, train_on, skip, carry, t)  # step-only predicate, as above

    def evaluation(state: TrainState) -> tuple[Any, ...]:
        test_metrics = evaluate(state, test.images, test.labels)
        valid_metrics = None if validation is None else evaluate(state, validation.images, validation.labels)
        probed = None if probe is None else probe(state.params)
        return test_metrics, valid_metrics, probed

    def interval(carry: tuple[TrainState, jax.Array], index: jax.Array) -> tuple[Any, Any]:
        carry, losses = jax.lax.scan(one_step, carry, index * every + jnp.arange(every))
        return carry, (losses, *evaluation(carry[0]))

    return jax.lax.scan(interval, carry, first + jnp.arange(count))


def _history(budget: _Budget, records: tuple[Any, ...], initial_probe: Any) -> History:
    """One run's :class:`History` from the records of all its intervals (and the probe before training)."""
    total, every, per_epoch = budget.total, budget.every, budget.per_epoch
    step_losses, (test_loss, test_accuracy), valid, probes = records
    losses = step_losses.reshape(-1)[:total]  # the skipped steps past the budget are dropped
    full = total // every
    train_loss = losses[: full * every].reshape(full, every).mean(axis=1)
    if total % every:  # the last, shorter interval
        train_loss = jnp.concatenate([train_loss, losses[full * every:].mean()[None]])
    if initial_probe is not None:
        probes = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), initial_probe, probes)
    full_epochs = total // per_epoch
    epoch_loss = losses[: full_epochs * per_epoch].reshape(full_epochs, per_epoch).mean(axis=1)
    eval_steps = np.minimum(np.arange(1, budget.intervals + 1) * every, total)
    return History(
        step_loss=losses, epoch_loss=epoch_loss,
        test_loss=test_loss, test_accuracy=test_accuracy, probes=probes, steps=jnp.asarray(eval_steps),
        train_loss=train_loss, validation_loss=None if valid is None else valid[0],
        validation_accuracy=None if valid is None else valid[1])


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

    Returns:
      ``(state, history)``: the state after the last step and a :class:`History`.

    ``fit`` is one traced computation (run it under ``jax.jit``, usually ``jax.vmap``-ed); for a progress
    bar during the run, :func:`train_seeds` and :func:`tune_learning_rate` call the same step loop in
    chunks.

    Example:
      >>> import optax
      >>> from jaxopt_lab.lab import data, models
      >>> ds = data.load_digits()
      >>> train, test = Batch(jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)), Batch(
      ...     jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))
      >>> state = create_train_state(models.Logistic(), optax.sgd(0.1), jax.random.key(0), ds.x_train[:1])
      >>> run = jax.jit(lambda state, key: fit(state, key, train, test, batch_size=64, steps=50, eval_every=20))
      >>> state, history = run(state, jax.random.key(1))
      >>> int(state.step), history.steps.tolist(), history.step_loss.shape
      (50, [20, 40, 50], (50,))
    """
    budget = _budget("fit", train.labels.shape[0], batch_size, epochs, steps, eval_every)
    initial_probe = None if probe is None else probe(state.params)
    (state, _), records = _run_intervals((state, _initial_order(budget)), key, jnp.asarray(0), budget.intervals,
                                         train, test, validation, budget=budget, step_fn=step_fn, probe=probe)
    return state, _history(budget, records, initial_probe)


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


DEFAULT_CHUNK_STEPS = 200
"""The default ``chunk_steps`` of :func:`train_seeds` and :func:`tune_learning_rate`: whole evaluation
intervals adding up to at most this many optimizer steps per call (at least one interval). Its cost is
measured in docs/real_data_experiments.md ("Progress in chunks: what it costs")."""

Progress = Callable[[int], Any]


def _intervals_per_chunk(owner: str, budget: _Budget, chunk_steps: int | None) -> int:
    """The evaluation intervals per compiled chunk: the most that divide the number of intervals (so every
    chunk has the same shape and one program serves them all) and span at most ``chunk_steps`` steps; at
    least one."""
    limit = DEFAULT_CHUNK_STEPS if chunk_steps is None else positive_int(chunk_steps, owner, "chunk_steps")
    most = max(1, min(budget.intervals, limit // budget.every))
    return max(k for k in range(1, most + 1) if budget.intervals % k == 0)


def _progress_callback(owner: str, progress: Any) -> Progress | None:
    """``progress`` itself when callable, else its ``update`` method (a tqdm bar), else an error."""
    if progress is None or callable(progress):
        return progress
    update = getattr(progress, "update", None)
    if not callable(update):
        raise TypeError(f"{owner}: progress must be callable with a number of steps or have an update(n) "
                        f"method (a tqdm bar), got {type(progress).__name__}")
    return update


def _train_lanes(owner: str, model: nn.Module, make_tx: Callable[[Any], optax.GradientTransformation],
                 tx_args: Any, variables: Any, data_keys: jax.Array, train: Batch, test: Batch,
                 validation: Batch | None, *, budget: _Budget, step_fn: TrainStep, probe: Probe | None,
                 chunk_steps: int | None, progress: Any) -> tuple[tuple[Any, ...], History]:
    """Every lane's run (leading lane axis on ``tx_args``, ``variables``, ``data_keys``), vmapped, in chunks.

    The step loop runs ``k`` evaluation intervals per call of ONE jitted, vmapped program
    (:func:`_intervals_per_chunk`); the carry (each lane's arrays and batch order) goes from one call to the
    next. Every chunk is dispatched before the first is waited for, so the device never idles between
    chunks; ``progress`` is then called with each chunk's steps as it completes. The chunks run the same
    step and evaluation code on the same values as one call would, and the history is concatenated
    (exact), so the result does not depend on the chunking.

    Returns:
      ``((step, params, opt_state, batch_stats), history)``, every leaf with the lane axis. The optimizer's
      state is returned as arrays: ``make_tx`` may close over a traced value (the learning rate).
    """
    report = _progress_callback(owner, progress)
    per_chunk = _intervals_per_chunk(owner, budget, chunk_steps)
    arrays = lambda state: (jnp.asarray(state.step), state.params, state.opt_state, state.batch_stats)

    def start(variables: Any, tx_arg: Any) -> tuple[Any, Any]:
        state = _state_from_variables(model, make_tx(tx_arg), variables)
        return arrays(state), None if probe is None else probe(state.params)

    def chunk(carry: tuple[Any, jax.Array], key: jax.Array, tx_arg: Any, first: jax.Array, train: Batch,
              test: Batch, validation: Batch | None) -> tuple[tuple[Any, jax.Array], Any]:
        (step, params, opt_state, batch_stats), order = carry
        state = TrainState(step=step, apply_fn=model.apply, params=params, tx=make_tx(tx_arg),
                           opt_state=opt_state, batch_stats=batch_stats)
        (state, order), records = _run_intervals((state, order), key, first, per_chunk, train, test, validation,
                                                 budget=budget, step_fn=step_fn, probe=probe)
        return (arrays(state), order), records

    # The initial state (the optimizer's init, zeros and copies) runs op by op: no program to compile.
    state_arrays, initial_probe = jax.vmap(start)(variables, tx_args)
    orders = jnp.broadcast_to(_initial_order(budget), (data_keys.shape[0], budget.per_epoch, budget.batch_size))
    carry = (state_arrays, orders)
    program = jax.jit(jax.vmap(chunk, in_axes=(0, 0, 0, None, None, None, None)))
    firsts = range(0, budget.intervals, per_chunk)
    pieces = []
    for first in firsts:  # dispatched asynchronously: the calls queue up behind the running one
        carry, records = program(carry, data_keys, tx_args, np.int32(first), train, test, validation)
        pieces.append(records)
    if report is not None:
        for first, records in zip(firsts, pieces, strict=True):
            jax.block_until_ready(records)
            report(min((first + per_chunk) * budget.every, budget.total) - first * budget.every)
    records = pieces[0] if len(pieces) == 1 else jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=1),
                                                               *pieces)
    return carry[0], _lane_histories(budget, records, initial_probe)


@functools.partial(jax.jit, static_argnums=0)
def _lane_histories(budget: _Budget, records: tuple[Any, ...], initial_probe: Any) -> History:
    # Module-level: compiled once per budget and shapes, whatever the model.
    return jax.vmap(functools.partial(_history, budget))(records, initial_probe)


def train_seeds(model: nn.Module, tx: optax.GradientTransformation, dataset: Dataset, seeds: Sequence[int], *,
                batch_size: int, epochs: int | None = None, steps: int | None = None,
                eval_every: int | None = None, num_microbatches: int = 1, probe: Probe | None = None,
                train_size: int | None = None, unroll: int | bool = 1, data_parallel: bool | None = None,
                chunk_steps: int | None = None, progress: Progress | Any = None) -> TrainResult:
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
      chunk_steps: the step loop runs in chunks of whole evaluation intervals, each one call of the same
        compiled program, of at most ``chunk_steps`` steps (at least one interval; the number of
        intervals per chunk divides the number of intervals, so every chunk has one shape). Default
        :data:`DEFAULT_CHUNK_STEPS`; a value at least the budget runs it in one call. The results do not
        depend on it (bitwise).
      progress: called with the number of optimizer steps of each chunk once it has run (they add up to
        the budget), e.g. a tqdm bar's ``update``; an object with an ``update(n)`` method (the bar itself)
        works too. ``None``: no reporting.

    Returns:
      A :class:`TrainResult`; every leaf has a leading axis of ``len(seeds)``.

    Example:
      >>> import optax
      >>> from jaxopt_lab.lab import data, models
      >>> done = []
      >>> result = train_seeds(models.Logistic(), optax.sgd(0.1), data.load_digits(), [0, 1], batch_size=64,
      ...                      steps=100, eval_every=10, chunk_steps=40, progress=done.append)
      >>> done         # 40 steps are 4 intervals, which do not divide the 10: chunks of 2
      [20, 20, 20, 20, 20]
    """
    seeds = _check_seeds("train_seeds", seeds)
    count = len(dataset.y_train) if train_size is None else int(train_size)
    if not 0 < count <= len(dataset.y_train):
        raise ValueError(f"train_seeds: train_size must lie in [1, {len(dataset.y_train)}], got {train_size!r}")
    budget = _budget("train_seeds", count, batch_size, epochs, steps, eval_every)  # before compiling
    _intervals_per_chunk("train_seeds", budget, chunk_steps)
    _progress_callback("train_seeds", progress)
    train = Batch(jnp.asarray(dataset.x_train[:count]), jnp.asarray(dataset.y_train[:count]))
    test = Batch(jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test))
    step_fn = _make_step_fn("train_seeds", batch_size, num_microbatches, unroll, data_parallel)
    data_keys, init_keys = _seed_keys(seeds)
    variables = _init_variables(model, init_keys, train.images[:1])
    (step, params, opt_state, batch_stats), history = _train_lanes(
        "train_seeds", model, lambda _: tx, None, variables, data_keys, train, test, None, budget=budget,
        step_fn=step_fn, probe=probe, chunk_steps=chunk_steps, progress=progress)
    state = TrainState(step=step, apply_fn=model.apply, params=params, tx=tx, opt_state=opt_state,
                       batch_stats=batch_stats)
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
                       data_parallel: bool | None = None, split_seed: int = 0, chunk_steps: int | None = None,
                       progress: Progress | Any = None) -> RateSearch:
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
      chunk_steps, progress: see :func:`train_seeds`; ``progress`` counts the steps of one run (every rate
        and seed takes each step together), so a bar's total is ``steps``.

    Returns:
      A :class:`RateSearch`.

    Example:
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
    budget = _budget("tune_learning_rate", len(train_idx), batch_size, None, steps, eval_every)
    _intervals_per_chunk("tune_learning_rate", budget, chunk_steps)
    _progress_callback("tune_learning_rate", progress)
    train = Batch(jnp.asarray(dataset.x_train[train_idx]), jnp.asarray(dataset.y_train[train_idx]))
    valid = Batch(jnp.asarray(dataset.x_train[valid_idx]), jnp.asarray(dataset.y_train[valid_idx]))
    test = Batch(jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test))
    step_fn = _make_step_fn("tune_learning_rate", batch_size, num_microbatches, unroll, data_parallel)

    data_keys, init_keys = _seed_keys(seeds)
    variables = _init_variables(model, init_keys, train.images[:1])
    seed_of_lane = np.tile(np.arange(len(seeds)), rates.size)
    lanes = lambda tree: jax.tree.map(lambda a: a[seed_of_lane], tree)
    lane_rates = jnp.repeat(jnp.asarray(rates, jnp.float32), len(seeds))  # rate-major: lane = r * S + s
    # `make_tx` gets the traced rate inside the program: the states come back as arrays, rebuilt below.
    arrays, history = _train_lanes("tune_learning_rate", model, make_tx, lane_rates, lanes(variables),
                                   lanes(data_keys), train, test, valid, budget=budget, step_fn=step_fn,
                                   probe=None, chunk_steps=chunk_steps, progress=progress)

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
