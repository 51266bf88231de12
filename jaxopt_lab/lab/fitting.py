"""One training run of a Flax classifier: its state, its step, its loop and its evaluation.

- :func:`make_train_step` -> ``train_step(state, batch) -> (state, metrics)``: ONE pure function (loss,
  gradients, optimizer update, batch-norm statistics), optionally over ``k`` micro-batches with
  :func:`jaxopt_lab.accumulation.microbatched_value_and_grad`. Being pure and batch-first, it is also
  what :func:`jaxopt_lab.parallel.data_parallel_step` shards over devices.
- :func:`fit`: a budget of optimizer steps (``steps``, or whole ``epochs``) as a ``lax.scan`` over
  evaluation intervals, each a ``lax.scan`` of ``train_step`` over shuffled mini-batches
  (:func:`jaxopt_lab.lab.data.shuffled_batches`, a fresh order per epoch), then a test evaluation. Every
  interval has the same length; a shorter last one skips its steps past the budget (a ``lax.cond``), so
  the program holds one copy of the step loop.

:mod:`jaxopt_lab.lab.training` runs this over seeds and learning rates in one program; the names there are
the ones experiments use (it re-exports the public names of this module).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from jaxopt_lab.accumulation import microbatched_value_and_grad
from jaxopt_lab.lab.checks import positive_int
from jaxopt_lab.lab.data import num_batches, shuffled_batches

__all__ = [
    "Batch",
    "History",
    "TrainResult",
    "TrainState",
    "create_train_state",
    "cross_entropy",
    "evaluate",
    "evaluate_seeds",
    "fit",
    "initial_variables",
    "make_train_step",
    "mean_std",
    "pct",
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
    return state_from_variables(model, tx, model.init(key, sample_images, train=False))


def state_from_variables(model: nn.Module, tx: optax.GradientTransformation, variables: Any) -> TrainState:
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}))


def variables_for_keys(model: nn.Module, keys: jax.Array, sample_images: jax.Array) -> Any:
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
    _, init_keys = seed_keys(check_seeds("initial_variables", seeds))
    return variables_for_keys(model, init_keys, jnp.asarray(sample_images)[:1])


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


def pct(stats: Mapping[str, Any]) -> str:
    """``99.1 ± 0.3``: a :func:`mean_std` of accuracies (fractions) in percent."""
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


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


class Budget(NamedTuple):
    """A run's step budget: ``total`` steps, evaluated every ``every`` steps at ``intervals`` points."""

    total: int
    every: int
    intervals: int  # ceil(total / every); the last interval is shorter when ``every`` does not divide ``total``
    per_epoch: int
    batch_size: int


def make_budget(owner: str, count: int, batch_size: int, epochs: int | None, steps: int | None,
            eval_every: int | None) -> Budget:
    per_epoch = num_batches(count, batch_size)  # a clear error for a batch larger than the training set
    total, every = _step_budget(owner, epochs, steps, eval_every, per_epoch)
    return Budget(total, every, -(-total // every), per_epoch, batch_size)


def initial_order(budget: Budget) -> jax.Array:
    # Replaced at step 0 (the start of epoch 0) before it is read.
    return jnp.zeros((budget.per_epoch, budget.batch_size), jnp.int32)


def run_intervals(carry: tuple[TrainState, jax.Array], key: jax.Array, first: jax.Array, count: int,
                   train: Batch, test: Batch, validation: Batch | None, *, budget: Budget, step_fn: TrainStep,
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


def history_from_records(budget: Budget, records: tuple[Any, ...], initial_probe: Any) -> History:
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
    budget = make_budget("fit", train.labels.shape[0], batch_size, epochs, steps, eval_every)
    initial_probe = None if probe is None else probe(state.params)
    (state, _), records = run_intervals((state, initial_order(budget)), key, jnp.asarray(0), budget.intervals,
                                         train, test, validation, budget=budget, step_fn=step_fn, probe=probe)
    return state, history_from_records(budget, records, initial_probe)


def seed_keys(seeds: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Each seed's data-order key ``fold_in(key(s), 1)`` and initialization key ``fold_in(key(s), 0)``."""
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, dtype=jnp.uint32))
    return (jax.vmap(lambda key: jax.random.fold_in(key, 1))(keys),
            jax.vmap(lambda key: jax.random.fold_in(key, 0))(keys))


def check_seeds(owner: str, seeds: Sequence[int]) -> list[int]:
    """``seeds`` as a list of ints, at least one; ``ValueError`` naming ``owner`` otherwise."""
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: seeds must be a sequence of ints, got {seeds!r}") from None
    if not seeds:
        raise ValueError(f"{owner}: seeds must name at least one seed, got none")
    return seeds
