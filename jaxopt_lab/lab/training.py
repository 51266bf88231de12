"""The jitted training of the Flax classifiers of the real-data experiments: many runs in one program.

Layers, from the inside out (the first two in :mod:`jaxopt_lab.lab.fitting`, re-exported here):

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

from jaxopt_lab import parallel
from jaxopt_lab.lab.checks import positive_int
from jaxopt_lab.lab.data import Dataset, stratified_split
from jaxopt_lab.lab.fitting import (
    Batch,
    Budget,
    History,
    Probe,
    TrainResult,
    TrainState,
    TrainStep,
    check_seeds,
    create_train_state,
    cross_entropy,
    evaluate,
    evaluate_seeds,
    fit,
    history_from_records,
    initial_order,
    initial_variables,
    make_budget,
    make_train_step,
    mean_std,
    pct,
    run_intervals,
    seed_keys,
    state_from_variables,
    train_step,
    variables_for_keys,
)

__all__ = [
    "DEFAULT_CHUNK_STEPS",
    "ENDPOINT_FLOOR",
    "ENDPOINT_TOLERANCE",
    "ENDPOINT_WINDOW",
    "Batch",
    "Flatness",
    "History",
    "RateSearch",
    "TrainResult",
    "TrainState",
    "create_train_state",
    "cross_entropy",
    "diverged_at",
    "endpoint_rule",
    "evaluate",
    "evaluate_seeds",
    "examples_after_validation",
    "fit",
    "initial_variables",
    "loss_flattened",
    "make_train_step",
    "mean_std",
    "pct",
    "train_seeds",
    "train_step",
    "tune_learning_rate",
    "validation_split",
]

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


DEFAULT_CHUNK_STEPS = 200
"""The default ``chunk_steps`` of :func:`train_seeds` and :func:`tune_learning_rate`: whole evaluation
intervals adding up to at most this many optimizer steps per call (at least one interval). Its cost is
measured in docs/real_data_experiments.md ("Progress in chunks: what it costs")."""

Progress = Callable[[int], Any]


def _intervals_per_chunk(owner: str, budget: Budget, chunk_steps: int | None) -> int:
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


LaneTrainer = Callable[..., tuple[tuple[Any, ...], History]]


def _lane_trainer(owner: str, model: nn.Module, make_tx: Callable[[Any], optax.GradientTransformation], *,
                  budget: Budget, step_fn: TrainStep, probe: Probe | None,
                  chunk_steps: int | None) -> LaneTrainer:
    """``train(tx_args, variables, data_keys, train, test, validation, progress)``: every lane's run (leading
    lane axis on ``tx_args``, ``variables``, ``data_keys``), vmapped, in chunks. One jitted program serves
    every call with the same number of lanes (a rate search that widens its grid reuses it).

    The step loop runs ``k`` evaluation intervals per call of ONE jitted, vmapped program
    (:func:`_intervals_per_chunk`); the carry (each lane's arrays and batch order) goes from one call to the
    next. Every chunk is dispatched before the first is waited for, so the device never idles between
    chunks; ``progress`` is then called with each chunk's steps as it completes. The chunks run the same
    step and evaluation code on the same values as one call would, and the history is concatenated
    (exact), so the result does not depend on the chunking.

    ``train`` returns ``((step, params, opt_state, batch_stats), history)``, every leaf with the lane axis.
    The optimizer's state comes back as arrays: ``make_tx`` may close over a traced value (the rate).
    """
    per_chunk = _intervals_per_chunk(owner, budget, chunk_steps)
    arrays = lambda state: (jnp.asarray(state.step), state.params, state.opt_state, state.batch_stats)

    def start(variables: Any, tx_arg: Any) -> tuple[Any, Any]:
        state = state_from_variables(model, make_tx(tx_arg), variables)
        return arrays(state), None if probe is None else probe(state.params)

    def chunk(carry: tuple[Any, jax.Array], key: jax.Array, tx_arg: Any, first: jax.Array, train: Batch,
              test: Batch, validation: Batch | None) -> tuple[tuple[Any, jax.Array], Any]:
        (step, params, opt_state, batch_stats), order = carry
        state = TrainState(step=step, apply_fn=model.apply, params=params, tx=make_tx(tx_arg),
                           opt_state=opt_state, batch_stats=batch_stats)
        (state, order), records = run_intervals((state, order), key, first, per_chunk, train, test, validation,
                                                 budget=budget, step_fn=step_fn, probe=probe)
        return (arrays(state), order), records

    program = jax.jit(jax.vmap(chunk, in_axes=(0, 0, 0, None, None, None, None)))

    def train_lanes(tx_args: Any, variables: Any, data_keys: jax.Array, train: Batch, test: Batch,
                    validation: Batch | None, progress: Any) -> tuple[tuple[Any, ...], History]:
        report = _progress_callback(owner, progress)
        # The initial state (the optimizer's init, zeros and copies) runs op by op: no program to compile.
        state_arrays, initial_probe = jax.vmap(start)(variables, tx_args)
        orders = jnp.broadcast_to(initial_order(budget), (data_keys.shape[0], budget.per_epoch,
                                                          budget.batch_size))
        carry = (state_arrays, orders)
        firsts = range(0, budget.intervals, per_chunk)
        pieces = []
        for first in firsts:  # dispatched asynchronously: the calls queue up behind the running one
            carry, records = program(carry, data_keys, tx_args, np.int32(first), train, test, validation)
            pieces.append(records)
        if report is not None:
            for first, records in zip(firsts, pieces, strict=True):
                jax.block_until_ready(records)
                report(min((first + per_chunk) * budget.every, budget.total) - first * budget.every)
        records = pieces[0] if len(pieces) == 1 else jax.tree.map(
            lambda *parts: jnp.concatenate(parts, axis=1), *pieces)
        return carry[0], _lane_histories(budget, records, initial_probe)

    return train_lanes


@functools.partial(jax.jit, static_argnums=0)
def _lane_histories(budget: Budget, records: tuple[Any, ...], initial_probe: Any) -> History:
    # Module-level: compiled once per budget and shapes, whatever the model.
    return jax.vmap(functools.partial(history_from_records, budget))(records, initial_probe)


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
    seeds = check_seeds("train_seeds", seeds)
    count = len(dataset.y_train) if train_size is None else int(train_size)
    if not 0 < count <= len(dataset.y_train):
        raise ValueError(f"train_seeds: train_size must lie in [1, {len(dataset.y_train)}], got {train_size!r}")
    budget = make_budget("train_seeds", count, batch_size, epochs, steps, eval_every)  # before compiling
    _intervals_per_chunk("train_seeds", budget, chunk_steps)
    _progress_callback("train_seeds", progress)
    train = Batch(jnp.asarray(dataset.x_train[:count]), jnp.asarray(dataset.y_train[:count]))
    test = Batch(jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test))
    step_fn = _make_step_fn("train_seeds", batch_size, num_microbatches, unroll, data_parallel)
    data_keys, init_keys = seed_keys(seeds)
    variables = variables_for_keys(model, init_keys, train.images[:1])
    trainer = _lane_trainer("train_seeds", model, lambda _: tx, budget=budget, step_fn=step_fn, probe=probe,
                            chunk_steps=chunk_steps)
    (step, params, opt_state, batch_stats), history = trainer(None, variables, data_keys, train, test, None,
                                                              progress)
    state = TrainState(step=step, apply_fn=model.apply, params=params, tx=tx, opt_state=opt_state,
                       batch_stats=batch_stats)
    return TrainResult(state, history)


class RateSearch(NamedTuple):
    """:func:`tune_learning_rate`'s output.

    Attributes:
      learning_rate: the chosen rate.
      table: one dict per rate tried, in increasing order of rate: ``learning_rate``,
        ``validation_accuracy`` and ``validation_loss`` (``{"mean", "std", "values"}`` over seeds, at the
        end of training), ``final_train_loss`` (the same, the last evaluation interval's mean training
        loss), ``diverged`` (how many seeds' loss became NaN/inf), ``added`` (True for a rate the search
        added beyond the given grid) and ``chosen``.
      result: the chosen rate's runs (leading seeds axis), trained on the training set minus the
        validation split; ``history.test_*`` are on the test set, ``history.validation_*`` on the split.
      validation_size: examples in the validation split (carved from the training set).
      at_edge: ``"lowest"`` or ``"highest"`` when the chosen rate is still the lowest or highest rate tried
        (the search stopped at its limit), else ``None``: the choice is bracketed by rates on both sides.
      replicas: how many of ``result``'s runs (the last ones) are ``replicate_seeds`` trained at the chosen
        rate after the choice; the first ``len(seeds)`` are the search's own.
    """

    learning_rate: float
    table: list[dict[str, Any]]
    result: TrainResult
    validation_size: int
    at_edge: str | None = None
    replicas: int = 0


def examples_after_validation(num_examples: int, fraction: float) -> int:
    """How many of ``num_examples`` training examples :func:`validation_split` leaves to train on.

    >>> examples_after_validation(40, 0.2), len(validation_split(np.repeat(np.arange(4), 10), 0.2)[0])
    (32, 32)
    """
    return num_examples - math.ceil(fraction * num_examples)


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
                       widen: int = 0, widen_factor: float = 3.0, replicate_seeds: Sequence[int] = (),
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

    A rate chosen at the edge of its grid may be under-tuned: the optimum may lie beyond it. With
    ``widen=n``, while the chosen rate is the lowest (highest) rate tried, the search trains one more rate,
    ``widen_factor`` times below (above) it, and chooses again, at most ``n`` times; ``at_edge`` says
    whether the final choice is still at an edge. The added rates' runs are one more program of
    ``len(seeds)`` lanes, compiled once and reused.

    ``replicate_seeds`` are a second, disjoint seed set trained at the chosen rate on the same split after
    the choice (they never influence it): a replication of whatever the search's seeds show, at the cost of
    one more rate's runs. Their runs follow the search's in ``result``
    (:func:`jaxopt_lab.lab.verdicts.seed_sets` splits the two sets apart again).

    Args:
      model, dataset, seeds, batch_size, num_microbatches, unroll, data_parallel: see :func:`train_seeds`.
      make_tx: ``learning_rate -> optax.GradientTransformation``.
      learning_rates: the candidates (positive, finite; at least one).
      steps, eval_every: the budget and evaluation spacing of every run (see :func:`fit`).
      validation_fraction: the share of the training set held out for the choice.
      split_seed: the seed of the validation split.
      chunk_steps, progress: see :func:`train_seeds`; ``progress`` counts the steps of one run (every rate
        and seed takes each step together), so a bar's total is ``steps`` (plus ``steps`` per added rate).
      widen: the most rates the search may add beyond the grid's edges (0: the grid as given).
      widen_factor: the ratio between an edge rate and the rate added beyond it (> 1).
      replicate_seeds: seeds disjoint from ``seeds`` to train at the chosen rate (default none).

    Returns:
      A :class:`RateSearch`.

    Example:
      >>> import optax
      >>> from jaxopt_lab.lab import data, models
      >>> search = tune_learning_rate(models.Logistic(), optax.sgd, data.load_digits(), [0, 1],
      ...                             learning_rates=[1e-3, 0.1], batch_size=64, steps=100)
      >>> search.learning_rate, [row["diverged"] for row in search.table], search.at_edge
      (0.1, [0, 0], 'highest')
      >>> search.result.history.test_accuracy.shape     # (seeds, evaluation points), on the test set
      (2, 20)
      >>> wider = tune_learning_rate(models.Logistic(), optax.sgd, data.load_digits(), [0, 1],
      ...                            learning_rates=[1e-3, 0.1], batch_size=64, steps=100, widen=3)
      >>> [row["learning_rate"] for row in wider.table][-1] > 0.1, wider.at_edge
      (True, None)
      >>> replicated = tune_learning_rate(models.Logistic(), optax.sgd, data.load_digits(), [0, 1],
      ...                                 learning_rates=[1e-3, 0.1], batch_size=64, steps=100,
      ...                                 replicate_seeds=[2, 3])
      >>> replicated.result.history.test_accuracy.shape, replicated.replicas   # seeds 0, 1, then 2, 3
      ((4, 20), 2)
    """
    seeds = check_seeds("tune_learning_rate", seeds)
    replicate_seeds = [] if len(replicate_seeds) == 0 else check_seeds("tune_learning_rate", replicate_seeds)
    if set(replicate_seeds) & set(seeds) or len(set(replicate_seeds)) != len(replicate_seeds):
        raise ValueError(f"tune_learning_rate: replicate_seeds must be distinct and disjoint from seeds "
                         f"{seeds}, got {replicate_seeds}")
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
    if len(set(rates.tolist())) != rates.size:
        raise ValueError(f"tune_learning_rate: learning_rates must be distinct, got {rates.tolist()}")
    if isinstance(widen, bool) or not isinstance(widen, int) or widen < 0:
        raise ValueError(f"tune_learning_rate: widen must be an int >= 0 (rates to add at most), got {widen!r}")
    if isinstance(widen_factor, bool) or not isinstance(widen_factor, (int, float)) or not widen_factor > 1 \
            or not math.isfinite(widen_factor):
        raise ValueError(f"tune_learning_rate: widen_factor must be a finite number > 1, got {widen_factor!r}")
    train_idx, valid_idx = validation_split(dataset.y_train, validation_fraction, seed=split_seed)
    budget = make_budget("tune_learning_rate", len(train_idx), batch_size, None, steps, eval_every)
    _intervals_per_chunk("tune_learning_rate", budget, chunk_steps)
    _progress_callback("tune_learning_rate", progress)
    train = Batch(jnp.asarray(dataset.x_train[train_idx]), jnp.asarray(dataset.y_train[train_idx]))
    valid = Batch(jnp.asarray(dataset.x_train[valid_idx]), jnp.asarray(dataset.y_train[valid_idx]))
    test = Batch(jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test))
    step_fn = _make_step_fn("tune_learning_rate", batch_size, num_microbatches, unroll, data_parallel)
    trainer = _lane_trainer("tune_learning_rate", model, make_tx, budget=budget, step_fn=step_fn, probe=None,
                            chunk_steps=chunk_steps)

    def train_rates(block: np.ndarray, seeds: list[int]) -> list[_RateRuns]:
        """Every (rate, seed) of ``block`` in one call: rate-major lanes, lane = r * S + s."""
        data_keys, init_keys = seed_keys(seeds)
        variables = variables_for_keys(model, init_keys, train.images[:1])
        n_seeds = len(seeds)
        seed_of_lane = np.tile(np.arange(n_seeds), block.size)
        lanes = lambda tree: jax.tree.map(lambda a: a[seed_of_lane], tree)
        lane_rates = jnp.repeat(jnp.asarray(block, jnp.float32), n_seeds)
        arrays, history = trainer(lane_rates, lanes(variables), lanes(data_keys), train, test, valid, progress)
        of_rate = lambda tree, r: jax.tree.map(lambda a: a[r * n_seeds:(r + 1) * n_seeds], tree)
        return [_RateRuns.of(float(rate), of_rate(arrays, r), of_rate(history, r))
                for r, rate in enumerate(block)]

    runs = train_rates(rates, seeds)
    given = {runs_.rate for runs_ in runs}
    for _ in range(widen):
        edge = _edge(runs, _best(runs))
        if edge is None:
            break
        extreme = min(r.rate for r in runs) if edge == "lowest" else max(r.rate for r in runs)
        added = extreme / widen_factor if edge == "lowest" else extreme * widen_factor
        runs += train_rates(np.asarray([added]), seeds)
    best = _best(runs)
    ordered = sorted(runs, key=lambda r: r.rate)
    table = [{"learning_rate": r.rate, "validation_accuracy": mean_std(r.valid_acc),
              "validation_loss": mean_std(r.valid_loss), "final_train_loss": mean_std(r.train_loss),
              "diverged": r.diverged, "added": r.rate not in given, "chosen": r is best} for r in ordered]
    arrays, history = best.arrays, best.history
    if replicate_seeds:  # after the choice, which they must not influence
        (replica,) = train_rates(np.asarray([best.rate]), replicate_seeds)
        arrays, history = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), (arrays, history),
                                       (replica.arrays, replica.history))
    step, params, opt_state, batch_stats = arrays
    state = TrainState(step=step, apply_fn=model.apply, params=params, tx=make_tx(best.rate),
                       opt_state=opt_state, batch_stats=batch_stats)
    return RateSearch(best.rate, table, TrainResult(state, history), len(valid_idx), _edge(runs, best),
                      len(replicate_seeds))


class _RateRuns(NamedTuple):
    """One rate's runs of :func:`tune_learning_rate` (every seed) and what the choice reads from them."""

    rate: float
    arrays: tuple[Any, ...]
    history: History
    valid_acc: np.ndarray
    valid_loss: np.ndarray
    train_loss: np.ndarray
    diverged: int

    @classmethod
    def of(cls, rate: float, arrays: tuple[Any, ...], history: History) -> _RateRuns:
        return cls(rate, arrays, history, np.asarray(history.validation_accuracy)[:, -1],
                   np.asarray(history.validation_loss)[:, -1], np.asarray(history.train_loss)[:, -1],
                   int((~np.isfinite(np.asarray(history.step_loss))).any(axis=-1).sum()))

    def rank(self) -> tuple[int, float, float]:
        """Fewest diverged seeds, then the best mean validation accuracy, then the lower validation loss."""
        loss = np.where(np.isfinite(self.valid_loss), self.valid_loss, np.inf).mean()
        return self.diverged, -float(self.valid_acc.mean()), float(loss)


def _best(runs: Sequence[_RateRuns]) -> _RateRuns:
    # Ties go to the rate tried first (the given grid before the added rates), as before widening existed.
    return min(runs, key=_RateRuns.rank)


def _edge(runs: Sequence[_RateRuns], chosen: _RateRuns) -> str | None:
    """``"lowest"``/``"highest"`` when ``chosen`` is the lowest/highest rate of ``runs`` (and not the only
    one), else ``None``."""
    if len(runs) == 1:
        return "lowest"  # one rate is both edges; say it is unbracketed (a widening search adds below first)
    if chosen.rate == min(r.rate for r in runs):
        return "lowest"
    if chosen.rate == max(r.rate for r in runs):
        return "highest"
    return None


ENDPOINT_WINDOW = 0.2
"""The share of the last training steps :func:`loss_flattened` judges."""
ENDPOINT_TOLERANCE = 0.05
"""How much the loss may change over the window, relative to its level, and still count as flat."""
ENDPOINT_FLOOR = 0.01
"""A loss level (nats) at or below which the training loss counts as flat whatever its relative change."""


def endpoint_rule(window_fraction: float = ENDPOINT_WINDOW, tolerance: float = ENDPOINT_TOLERANCE,
                  floor: float = ENDPOINT_FLOOR) -> str:
    """The endpoint rule of :func:`loss_flattened` with these arguments, in words, for summaries (the rule as
    applied, so a summary can state it exactly).

    >>> endpoint_rule()[:60]
    'flattened when, over the last 20% of steps, the median of th'
    """
    return (f"flattened when, over the last {window_fraction:.0%} of steps, the median of the seed-mean step "
            f"loss in the window's last quarter differs from the median in its first quarter by at most "
            f"{tolerance:.0%} of the window's median loss, or when that median is at most {floor:g} nats "
            "(medians, so that single spikes, e.g. Adam's, do not decide it)")


@dataclasses.dataclass(frozen=True)
class Flatness:
    """:func:`loss_flattened`'s verdict with its evidence; true in a boolean context when flattened.

    Attributes:
      flattened: the rule of :func:`endpoint_rule` held.
      relative_change: ``absolute_change / level``; NaN if a run diverged.
      absolute_change: the median loss of the window's last quarter minus that of its first quarter (nats).
      window_steps: the steps judged (the last ``window_fraction`` of training).
      level: the median loss over the window (nats); NaN if a run diverged.
      floor: the level at or below which the loss counts as flat.
    """

    flattened: bool
    relative_change: float
    absolute_change: float
    window_steps: int
    level: float = math.nan
    floor: float = ENDPOINT_FLOOR

    def __bool__(self) -> bool:
        return self.flattened

    def describe(self) -> str:
        """E.g. ``"yes (last 400 steps: -1.3%, -0.004 nats)"``, for summaries. A relative change beyond
        +-100% means nothing next to its level, so it is not shown; the evidence is then the level itself."""
        if not math.isfinite(self.relative_change):
            return f"no (a run diverged; last {self.window_steps} steps)"
        verdict = "yes" if self.flattened else "no"
        if self.level <= self.floor:
            return f"{verdict} (loss {self.level:.1e} <= floor {self.floor:g} nats)"
        percent = f"{100 * self.relative_change:+.1f}%, " if abs(self.relative_change) <= 1 else ""
        return f"{verdict} (last {self.window_steps} steps: {percent}{self.absolute_change:+.3f} nats)"


def loss_flattened(step_loss: Any, *, window_fraction: float = ENDPOINT_WINDOW,
                   tolerance: float = ENDPOINT_TOLERANCE, floor: float = ENDPOINT_FLOOR) -> Flatness:
    """Whether the training loss had flattened by the end: the endpoint evidence of a step budget.

    The rule, as :func:`endpoint_rule` states it: average ``step_loss`` over seeds (``(steps,)`` or
    ``(seeds, steps)``), take the last ``window_fraction`` of steps, and compare the median loss of the
    window's last quarter with that of its first quarter. Flattened when the change is at most
    ``tolerance`` of the window's median loss, or when that median is at most ``floor`` nats (a loss near
    zero whose relative change is large but meaningless). Medians make one spike (Adam's near a minimum)
    unable to decide it. A diverged run (NaN/inf) never counts as flattened.

    >>> import numpy as np
    >>> steps = np.arange(1000)
    >>> bool(loss_flattened(2.0 * np.exp(-steps / 50) + 0.3)), bool(loss_flattened(2.0 - steps / 1000))
    (True, False)
    >>> loss_flattened(2.0 - steps / 1000).describe()
    'no (last 200 steps: -13.6%, -0.150 nats)'
    >>> spiky = 0.3 + np.where(steps % 97 == 0, 5.0, 0.0)   # flat, with a spike every 97 steps
    >>> bool(loss_flattened(spiky))
    True
    """
    losses = np.asarray(step_loss, dtype=np.float64)
    if losses.ndim not in (1, 2) or losses.shape[-1] < 2:
        raise ValueError(f"loss_flattened: step_loss must be (steps,) or (seeds, steps) with >= 2 steps, "
                         f"got shape {losses.shape}")
    if not 0.0 < window_fraction <= 1.0:
        raise ValueError(f"loss_flattened: window_fraction must lie in (0, 1], got {window_fraction!r}")
    if not tolerance >= 0 or not floor >= 0:
        raise ValueError(f"loss_flattened: tolerance and floor must be >= 0, got {tolerance!r}, {floor!r}")
    curve = losses.reshape(-1, losses.shape[-1]).mean(axis=0)
    window = max(4, math.ceil(window_fraction * curve.size)) if curve.size >= 4 else curve.size
    tail = curve[-window:]
    if not np.isfinite(curve).all():
        return Flatness(False, math.nan, math.nan, window, math.nan, floor)
    quarter = max(1, window // 4)
    change = float(np.median(tail[-quarter:]) - np.median(tail[:quarter]))
    level = float(abs(np.median(tail)))
    relative = change / level if level > 0 else (0.0 if change == 0 else math.inf)
    flattened = level <= floor or abs(change) <= tolerance * level
    return Flatness(bool(flattened), float(relative), change, window, level, floor)


def diverged_at(step_loss: Any) -> list[int | None]:
    """Per run (rows of ``step_loss``), the first step whose loss is NaN/inf, or ``None``."""
    losses = np.atleast_2d(np.asarray(step_loss))
    bad = ~np.isfinite(losses)
    return [int(np.argmax(row)) if row.any() else None for row in bad]
