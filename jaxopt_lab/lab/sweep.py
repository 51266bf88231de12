"""The many-runs engine: a grid of training runs as ONE jitted, vmapped computation.

Every optimizer experiment asks the same question many times: "train this loss with that optimizer at
that rate from that start, under that noise — when does it reach the target, does it diverge?" This
module answers a whole grid of such questions in one XLA program:

* ``jax.vmap`` over runs (learning rates x seeds x starts x gradient-noise levels, flattened into one
  leading *runs* axis, see :func:`grid`), and a Python loop over optimizer *names* inside the traced
  function (their states differ in structure, so they cannot share a vmap, but they share one jit);
* ``lax.scan`` over steps;
* per-run stopping by masking: a run whose loss fell below ``target_loss`` or diverged (NaN/inf, or
  ``|loss| > divergence_bound``) stops updating — its parameters and optimizer state are frozen with
  ``jnp.where`` — and the step at which it stopped is recorded. Divergence is data, never an exception.

The learning rate is a *traced* value: optimizers are built with ``optax.inject_hyperparams`` so the rate
lives in the optimizer state. A Python-float rate would be baked into the program and each of the grid's
rates would compile its own copy.

Mini-batch noise comes from sampling each step's batch from the run's own PRNG key (a fresh permutation
per epoch, so "epoch" means every example seen once); additive Gaussian gradient noise (``gradient_noise``,
per run) is the analytic stand-in for landscapes without data.

Long sweeps run the scan in chunks so a progress bar can advance between them; the result is identical
to one chunk, and chunks stop early once every run has stopped.

>>> import jax.numpy as jnp
>>> from jaxopt_lab.lab import sweep
>>> loss = lambda w, batch: jnp.sum(w ** 2)          # no data: batch is None
>>> runs = sweep.grid(learning_rates=[0.1, 0.4, 1.1], seeds=[0], init_params=jnp.ones(2))
>>> cfg = sweep.SweepConfig(steps=100, target_loss=1e-3)
>>> out = sweep.run_sweep(loss, "sgd", runs, config=cfg)["sgd"]
>>> out.stop_step.tolist(), out.reached.tolist(), out.diverged.tolist()
([18, 3, 36], [True, True, False], [False, False, True])

References: optax ``inject_hyperparams``; the "many small runs in one vmap" pattern of the JAX
documentation's vectorization guide.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab import centralization

__all__ = [
    "MOMENTUM",
    "OPTIMIZERS",
    "OptimizerSpec",
    "RunSpec",
    "RunTrace",
    "SweepConfig",
    "available_optimizers",
    "check_sweep",
    "concatenate",
    "grid",
    "make_optimizer",
    "run_histories",
    "run_single",
    "run_sweep",
    "steps_per_epoch",
]

LossFn = Callable[[Any, Any], jax.Array]  # loss_fn(params, batch) -> scalar; batch is None without data

# Momentum coefficient of the "momentum" optimizer: 0.9 is the value of Sutskever et al. (2013)'s
# experiments, of Keras/PyTorch tutorials and of the GC paper's SGDM; the course notes do not say its value.
MOMENTUM = 0.9


class OptimizerSpec(NamedTuple):
    """An optax optimizer factory, the fixed hyper-parameters it is called with, and a one-line note."""

    factory: Callable[..., optax.GradientTransformation]
    hyperparams: Mapping[str, float]
    note: str


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(optax.sgd, {}, "optax.sgd: plain gradient descent"),
    "momentum": OptimizerSpec(optax.sgd, {"momentum": MOMENTUM},
                              f"optax.sgd(momentum={MOMENTUM}): heavy-ball momentum"),
    "rmsprop": OptimizerSpec(optax.rmsprop, {}, "optax.rmsprop defaults: decay 0.9, eps 1e-8"),
    "adam": OptimizerSpec(optax.adam, {}, "optax.adam defaults: b1 0.9, b2 0.999, eps 1e-8"),
}


# The GC variants: like optax's own optimizers, they take their rate through inject_hyperparams.
OPTIMIZERS.update({
    "sgd_gc": OptimizerSpec(centralization.sgd_gc, {}, "SGD with gradient centralization"),
    "momentum_gc": OptimizerSpec(centralization.sgd_gc, {"momentum": MOMENTUM},
                                 f"SGD(momentum={MOMENTUM}) with gradient centralization"),
    "adam_gc": OptimizerSpec(centralization.adam_gc, {}, "Adam with gradient centralization"),
    "adamw_gc": OptimizerSpec(centralization.adamw_gc, {}, "AdamW with gradient centralization"),
})


def available_optimizers() -> tuple[str, ...]:
    """The names :func:`make_optimizer` accepts."""
    return tuple(OPTIMIZERS)


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """The optax optimizer ``name`` with its learning rate injected into the state.

    ``optax.inject_hyperparams`` keeps the rate (and momentum) as arrays in the optimizer state, so the
    same compiled program serves every rate, and a traced rate can be vmapped over.

    Args:
      name: one of :func:`available_optimizers` (``sgd``, ``momentum``, ``rmsprop``, ``adam``, GC variants).
      learning_rate: a scalar (float or traced array) or a schedule ``count -> rate``.

    >>> opt = make_optimizer("momentum", 0.1)
    >>> round(float(opt.init(jnp.zeros(3)).hyperparams["momentum"]), 6)
    0.9
    """
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f"make_optimizer: unknown optimizer {name!r}; "
                         f"expected one of {available_optimizers()}")
    spec = OPTIMIZERS[name]
    factory = optax.inject_hyperparams(spec.factory)
    return factory(learning_rate=learning_rate, **spec.hyperparams)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The static part of a sweep: everything that shapes the compiled program (hashable).

    Attributes:
      steps: the step limit T; every run makes at most T updates and its history has T + 1 losses.
      target_loss: a run stops once its loss is *below* this (``None``: never stops early).
      divergence_bound: a loss that is NaN/inf or whose absolute value exceeds this marks divergence.
      batch_size: examples per step sampled from ``data`` (``None``: the full batch every step).
      evaluate_full_loss: with mini-batches, also evaluate the loss on all of ``data`` each step and use it
        for the history and the stop test (the objective, not the noisy batch loss). ``False`` saves that
        evaluation (for timing): the history is then the batch loss.
      record_params: also return the parameters at every step (trajectories; memory ~ runs x T x params).
      learning_rate_schedule: ``step -> multiplier`` of each run's rate (e.g. the exponential ramp of an LR
        range test); must be hashable (a module-level function or a frozen dataclass).
    """

    steps: int = 1000
    target_loss: float | None = None
    divergence_bound: float = 1e6
    batch_size: int | None = None
    evaluate_full_loss: bool = True
    record_params: bool = False
    learning_rate_schedule: Callable[[jax.Array], jax.Array] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SweepConfig: steps must be a positive int, got {self.steps!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"SweepConfig: batch_size must be None or a positive int, got {self.batch_size!r}")
        if not self.divergence_bound > 0:
            raise ValueError(f"SweepConfig: divergence_bound must be > 0, got {self.divergence_bound!r}")


class RunSpec(NamedTuple):
    """What varies between runs. Batched: every leaf has a leading runs axis (see :func:`grid`)."""

    learning_rate: jax.Array  # () float32
    key: jax.Array  # (2,) uint32: mini-batch order and gradient noise
    init_params: Any  # pytree
    gradient_noise: jax.Array  # () float32: std of Gaussian noise added to every gradient entry


class RunTrace(NamedTuple):
    """One run's (or, batched, every run's) outcome, as host NumPy arrays.

    ``losses[t]`` is the loss at the parameters after ``t`` updates, for ``t = 0..stop_step``; entries
    after the stop are NaN (not drawn by :func:`jaxopt_lab.lab.plotting.plot_loss_curves`). ``stop_step`` is
    the number of updates made: the step the target was reached or divergence seen, else ``steps``.
    """

    losses: np.ndarray  # (T + 1,)
    batch_losses: np.ndarray  # (T + 1,): loss on the step's mini-batch (== losses for the full batch)
    stop_step: np.ndarray  # () int32
    reached: np.ndarray  # () bool: loss fell below target_loss
    diverged: np.ndarray  # () bool
    final_params: Any
    params: Any  # (T + 1, ...) per leaf when config.record_params, else None


class _Carry(NamedTuple):
    params: Any
    opt_state: Any
    active: jax.Array
    reached: jax.Array
    diverged: jax.Array
    stop_step: jax.Array


def grid(learning_rates: Sequence[float] | np.ndarray, seeds: Sequence[int] | np.ndarray, init_params: Any,
         gradient_noise: Sequence[float] | np.ndarray | float = 0.0) -> RunSpec:
    """The cartesian product rates x seeds x noise levels as one batched :class:`RunSpec`.

    Runs are ordered rate-major: ``run = (rate_index * len(seeds) + seed_index) * len(noise) + noise_index``.
    ``init_params`` is one pytree (shared by all runs), or a callable ``key -> params`` called with each
    seed's key (different starts per seed).

    >>> spec = grid([0.1, 1.0], seeds=[0, 1, 2], init_params=jnp.zeros(4))
    >>> spec.learning_rate.shape, spec.init_params.shape
    ((6,), (6, 4))
    """
    rates = np.asarray(learning_rates, dtype=np.float32).reshape(-1)
    seeds = [int(s) for s in np.asarray(seeds).reshape(-1)]
    noise = np.asarray(gradient_noise, dtype=np.float32).reshape(-1)
    if rates.size == 0 or not seeds or noise.size == 0:
        raise ValueError(f"grid: learning_rates, seeds and gradient_noise must be non-empty, got "
                         f"{rates.size}, {len(seeds)}, {noise.size} values")
    if not np.all(np.isfinite(rates)) or np.any(rates <= 0):
        raise ValueError(f"grid: learning rates must be finite and > 0, got {rates.tolist()}")
    if np.any(noise < 0):
        raise ValueError(f"grid: gradient_noise must be >= 0, got {noise.tolist()}")
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    if callable(init_params):
        starts = jax.vmap(init_params)(jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))
    else:
        starts = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (len(seeds), *jnp.shape(x))),
                              init_params)
    r, s, n = rates.size, len(seeds), noise.size
    rate_idx, seed_idx, noise_idx = (a.reshape(-1) for a in np.meshgrid(np.arange(r), np.arange(s),
                                                                          np.arange(n), indexing="ij"))
    return RunSpec(
        learning_rate=jnp.asarray(rates[rate_idx]),
        key=keys[seed_idx],
        init_params=jax.tree.map(lambda x: x[seed_idx], starts),
        gradient_noise=jnp.asarray(noise[noise_idx]),
    )


def concatenate(*specs: RunSpec) -> RunSpec:
    """Several batched :class:`RunSpec` as one (e.g. grids from different starts), in the given order."""
    if not specs or not all(isinstance(s, RunSpec) for s in specs):
        raise TypeError(f"concatenate: expected one or more RunSpec, got {[type(s).__name__ for s in specs]}")
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *specs)


def _sample_batch(data: Any, key: jax.Array, step: jax.Array, batch_size: int) -> Any:
    """The ``step``-th mini-batch: a fresh permutation of the examples per epoch, sliced in order."""
    num_examples = jax.tree.leaves(data)[0].shape[0]
    steps_per_epoch = num_examples // batch_size
    epoch, position = jnp.divmod(step, steps_per_epoch)
    order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    idx = jax.lax.dynamic_slice_in_dim(order, position * batch_size, batch_size)
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)


def _optimizer_for(name: str, spec: RunSpec, config: SweepConfig) -> optax.GradientTransformation:
    if config.learning_rate_schedule is None:
        return make_optimizer(name, spec.learning_rate)
    schedule = config.learning_rate_schedule
    return make_optimizer(name, lambda count: spec.learning_rate * schedule(count))


def _init_carry(name: str, spec: RunSpec, config: SweepConfig) -> _Carry:
    opt_state = _optimizer_for(name, spec, config).init(spec.init_params)
    false = jnp.zeros((), bool)
    return _Carry(spec.init_params, opt_state, jnp.ones((), bool), false, false,
                  jnp.asarray(config.steps, jnp.int32))


def _scan_steps(loss_fn: LossFn, name: str, config: SweepConfig, spec: RunSpec, data: Any,
                carry: _Carry, first_step: jax.Array, num_steps: int, noisy: bool) -> tuple[_Carry, tuple]:
    """``num_steps`` steps of one run from ``first_step`` (the unbatched core; vmapped by the callers).

    ``noisy`` (static) says whether any run has gradient noise: without it the per-step normal draws,
    the costliest part of a small problem's step, are left out of the program.
    """
    optimizer = _optimizer_for(name, spec, config)
    data_key, noise_key = jax.random.split(spec.key)
    value_and_grad = jax.value_and_grad(loss_fn)

    def step(carry: _Carry, t: jax.Array) -> tuple[_Carry, tuple]:
        if config.batch_size is None:
            batch_loss, grads = value_and_grad(carry.params, data)
            loss = batch_loss
        else:
            batch = _sample_batch(data, data_key, t, config.batch_size)
            batch_loss, grads = value_and_grad(carry.params, batch)
            loss = loss_fn(carry.params, data) if config.evaluate_full_loss else batch_loss
        diverged = ~jnp.isfinite(loss) | (jnp.abs(loss) > config.divergence_bound)
        reached = ~diverged & (loss < config.target_loss if config.target_loss is not None else False)
        stopping = carry.active & (diverged | reached | (t >= config.steps))
        update = carry.active & ~stopping
        if noisy:  # an exactly-zero gradient (a run sitting on a saddle) gets kicked off it
            noise_keys = jax.random.split(jax.random.fold_in(noise_key, t), len(jax.tree.leaves(grads)))
            noise = [jax.random.normal(k, g.shape, g.dtype) for k, g in
                     zip(noise_keys, jax.tree.leaves(grads), strict=True)]
            grads = jax.tree.map(lambda g, z: g + spec.gradient_noise.astype(g.dtype) * z,
                                 grads, jax.tree.unflatten(jax.tree.structure(grads), noise))
        updates, new_opt_state = optimizer.update(grads, carry.opt_state, carry.params)
        new_params = optax.apply_updates(carry.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(update, n, o), new, old)
        new_carry = _Carry(
            params=keep(new_params, carry.params),
            opt_state=keep(new_opt_state, carry.opt_state),
            active=update,
            reached=carry.reached | (stopping & reached),
            diverged=carry.diverged | (stopping & diverged),
            stop_step=jnp.where(stopping, t.astype(jnp.int32), carry.stop_step),
        )
        nan = jnp.full_like(loss, jnp.nan)
        record = (jnp.where(carry.active, loss, nan), jnp.where(carry.active, batch_loss, nan),
                  carry.params if config.record_params else None)
        return new_carry, record

    steps = first_step + jnp.arange(num_steps, dtype=jnp.int32)
    return jax.lax.scan(step, carry, steps)


def _check_sweep_inputs(fn: str, loss_fn: Any, names: tuple[str, ...], specs: Any, data: Any,
                        config: Any) -> None:
    """The argument checks shared by :func:`run_sweep`, :func:`run_single` and :func:`check_sweep`."""
    _check_inputs(loss_fn, names, config)
    _check_data(data, config)
    if not isinstance(specs, RunSpec):
        raise TypeError(f"{fn}: specs must be a RunSpec (see sweep.grid), got {type(specs).__name__}")


def _check_inputs(loss_fn: Any, names: tuple[str, ...], config: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(f"sweep: loss_fn must be callable (params, batch) -> loss, "
                        f"got {type(loss_fn).__name__}")
    if not isinstance(config, SweepConfig):
        raise TypeError(f"sweep: config must be a SweepConfig, got {type(config).__name__}")
    for name in names:
        if name not in OPTIMIZERS:
            raise ValueError(f"sweep: unknown optimizer {name!r}; expected one of {available_optimizers()}")


def _check_data(data: Any, config: SweepConfig) -> None:
    if config.batch_size is None:
        return
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError(f"sweep: batch_size={config.batch_size} needs data to sample from, got {data!r}")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    (n, *others) = sizes
    if others or n is None:
        raise ValueError(f"sweep: every data array needs the same leading (examples) axis, got sizes {sizes}")
    if config.batch_size > n:
        raise ValueError(f"sweep: batch_size={config.batch_size} exceeds the {n} examples in data")


@functools.partial(jax.jit, static_argnames=("loss_fn", "names", "config"))
def _init_all(loss_fn: LossFn, names: tuple[str, ...], config: SweepConfig, specs: RunSpec) -> dict:
    del loss_fn  # part of the cache key only
    return {name: jax.vmap(lambda s, n=name: _init_carry(n, s, config))(specs) for name in names}


@functools.partial(jax.jit, static_argnames=("loss_fn", "names", "config", "num_steps", "noisy"))
def _advance_all(loss_fn: LossFn, names: tuple[str, ...], config: SweepConfig, specs: RunSpec, data: Any,
                 carries: dict, first_step: jax.Array, num_steps: int, noisy: bool) -> tuple[dict, dict]:
    """One chunk of every optimizer's runs: the whole grid in one program."""
    new, records = {}, {}
    for name in names:
        scan = lambda s, c, n=name: _scan_steps(loss_fn, n, config, s, data, c, first_step, num_steps, noisy)
        new[name], records[name] = jax.vmap(scan)(specs, carries[name])
    return new, records


def _has_noise(specs: RunSpec) -> bool:
    return bool(np.any(np.asarray(specs.gradient_noise) > 0))


def run_sweep(loss_fn: LossFn, optimizers: str | Sequence[str], specs: RunSpec, data: Any = None,
              config: SweepConfig | None = None, *, chunk_size: int | None = None,
              progress: Callable[[int], Any] | None = None) -> dict[str, RunTrace]:
    """Runs every optimizer on every run of ``specs`` as one jitted, vmapped computation.

    Args:
      loss_fn: ``(params, batch) -> scalar``; ``batch`` is ``data``, a mini-batch of it, or ``None``.
        Hashable and stable (a module-level function) so the compiled program is reused.
      optimizers: a name or names from :func:`available_optimizers`; all share one jit.
      specs: the batched runs, e.g. from :func:`grid`.
      data: a pytree of arrays with a shared leading examples axis, or ``None``.
      config: a :class:`SweepConfig` (default: 1000 steps, no target).
      chunk_size: at most this many steps per chunk (default: all at once), evened out so that every chunk
        runs the same compiled program. Chunks let ``progress`` advance and stop early once every run has
        stopped; results do not depend on them.
      progress: called with the number of steps done after each chunk (e.g. a tqdm bar's ``update``).

    Returns:
      ``{name: RunTrace}`` with a leading runs axis on every leaf, as host numpy arrays.
    """
    config = SweepConfig() if config is None else config
    names = (optimizers,) if isinstance(optimizers, str) else tuple(optimizers)
    _check_sweep_inputs("run_sweep", loss_fn, names, specs, data, config)
    total = config.steps + 1  # step T only evaluates the final loss
    chunk = total if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"run_sweep: chunk_size must be a positive int, got {chunk_size!r}")
    # Equal chunks, so one compiled program: the last one runs past step T, where every run has stopped
    # (its carry frozen, its records NaN), and those records are dropped. Evening the chunks out keeps
    # that overrun below one step per chunk.
    num_chunks = -(-total // chunk)
    chunk = -(-total // num_chunks)
    carries = _init_all(loss_fn, names, config, specs)
    noisy = _has_noise(specs)
    pieces: dict[str, list] = {name: [] for name in names}
    done = 0
    while done < total:
        n = min(chunk, total - done)
        carries, records = _advance_all(loss_fn, names, config, specs, data, carries,
                                        jnp.asarray(done, jnp.int32), chunk, noisy)
        for name in names:
            pieces[name].append(jax.tree.map(lambda r, n=n: r[:, :n], jax.device_get(records[name])))
        done += n
        if progress is not None:
            progress(n)
        if done < total and not any(bool(jnp.any(c.active)) for c in carries.values()):
            break  # every run stopped: the rest of the history is NaN and the params are frozen
    return {name: _assemble(pieces[name], jax.device_get(carries[name]), total, config) for name in names}


def _assemble(pieces: list, carry: _Carry, total: int, config: SweepConfig, axis: int = 1) -> RunTrace:
    losses = np.concatenate([p[0] for p in pieces], axis=axis)
    batch_losses = np.concatenate([p[1] for p in pieces], axis=axis)
    params = None
    if config.record_params:
        params = jax.tree.map(lambda *xs: np.concatenate(xs, axis=axis), *[p[2] for p in pieces])
    missing = total - losses.shape[axis]
    if missing:  # stopped early: pad with what the remaining steps would have recorded
        pad = [(0, 0)] * losses.ndim
        pad[axis] = (0, missing)
        losses = np.pad(losses, pad, constant_values=np.nan)
        batch_losses = np.pad(batch_losses, pad, constant_values=np.nan)
        if params is not None:
            params = jax.tree.map(lambda p, f: np.concatenate(
                [p, np.repeat(np.expand_dims(f, axis), missing, axis=axis)], axis=axis), params, carry.params)
    return RunTrace(losses, batch_losses, np.asarray(carry.stop_step), np.asarray(carry.reached),
                    np.asarray(carry.diverged), carry.params, params)


@functools.partial(jax.jit, static_argnames=("loss_fn", "name", "config", "noisy"))
def _run_single_jit(loss_fn: LossFn, name: str, config: SweepConfig, spec: RunSpec, data: Any,
                    noisy: bool) -> tuple:
    carry = _init_carry(name, spec, config)
    carry, records = _scan_steps(loss_fn, name, config, spec, data, carry, jnp.zeros((), jnp.int32),
                                 config.steps + 1, noisy)
    return carry, records


def run_single(loss_fn: LossFn, optimizer: str, spec: RunSpec, data: Any = None,
               config: SweepConfig | None = None) -> RunTrace:
    """One run (an unbatched :class:`RunSpec`) as its own jitted computation.

    The same step function as :func:`run_sweep` without the vmap: looping this over a grid is the
    baseline the vmapped sweep is benchmarked against, and the reference it is tested against.
    """
    config = SweepConfig() if config is None else config
    _check_sweep_inputs("run_single", loss_fn, (optimizer,), spec, data, config)
    carry, records = jax.device_get(_run_single_jit(loss_fn, optimizer, config, spec, data, _has_noise(spec)))
    return _assemble([records], carry, config.steps + 1, config, axis=0)


def check_sweep(loss_fn: LossFn, optimizers: str | Sequence[str], specs: RunSpec, data: Any = None,
                config: SweepConfig | None = None) -> None:
    """Raises if :func:`run_sweep` with these arguments could not run; trains nothing.

    The argument checks of :func:`run_sweep`, then the whole program traced abstractly
    (``jax.eval_shape`` of the initialization and of one step of every optimizer on every run): a loss
    that does not accept the data's shapes, parameters that the optimizer cannot hold, a batch larger
    than the data all fail here in milliseconds instead of after a long run. The experiments' config
    checks (``check_configs``) are built on it.

    >>> import jax.numpy as jnp
    >>> from jaxopt_lab.lab import sweep
    >>> runs = sweep.grid([0.1], seeds=[0], init_params=jnp.ones(3))
    >>> data = (jnp.ones((8, 3)), jnp.ones(8))
    >>> loss = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
    >>> sweep.check_sweep(loss, "adam", runs, data, sweep.SweepConfig(steps=10, batch_size=4))
    >>> sweep.check_sweep(loss, "adam", runs, data, sweep.SweepConfig(steps=10, batch_size=16))
    Traceback (most recent call last):
    ...
    ValueError: sweep: batch_size=16 exceeds the 8 examples in data
    """
    config = SweepConfig() if config is None else config
    names = (optimizers,) if isinstance(optimizers, str) else tuple(optimizers)
    _check_sweep_inputs("check_sweep", loss_fn, names, specs, data, config)
    carries = jax.eval_shape(functools.partial(_init_all, loss_fn, names, config), specs)
    jax.eval_shape(functools.partial(_advance_all, loss_fn, names, config, num_steps=1,
                                     noisy=_has_noise(specs)),
                   specs, data, carries, jnp.zeros((), jnp.int32))


def run_histories(trace: RunTrace) -> list[np.ndarray]:
    """Each run's loss history up to and including its stop step (what :func:`diagnose` reads)."""
    losses = np.asarray(trace.losses)
    stops = np.asarray(trace.stop_step).reshape(-1)
    losses = losses.reshape(stops.size, -1)
    return [losses[i, : int(stops[i]) + 1] for i in range(stops.size)]


def steps_per_epoch(num_examples: int, batch_size: int | None) -> int:
    """Updates per pass over the data (mini-batches drop the remainder; full batch: 1)."""
    return 1 if batch_size is None else max(1, math.floor(num_examples / batch_size))


def rate_name(learning_rate: float) -> str:
    """How a rate appears in history names, to 4 significant digits: ``lr=0.1``, ``lr=0.4634``.

    >>> rate_name(0.1), rate_name(1.0), rate_name(0.46341)
    ('lr=0.1', 'lr=1', 'lr=0.4634')
    """
    return f"lr={learning_rate:.4g}"


def grid_histories(traces: Mapping[str, RunTrace], learning_rates: Sequence[float] | np.ndarray,
                   num_seeds: int) -> dict[str, np.ndarray]:
    """Every run of a rates x seeds grid (:func:`grid`'s order) as named arrays, the seed leading:
    ``OPTIMIZER/lr=RATE/loss`` ``(seeds, steps + 1)``, and ``.../stop_step``, ``.../reached``,
    ``.../diverged`` ``(seeds,)``."""
    arrays: dict[str, np.ndarray] = {}
    for name, trace in traces.items():
        for i, lr in enumerate(learning_rates):
            runs, prefix = slice(i * num_seeds, (i + 1) * num_seeds), f"{name}/{rate_name(lr)}"
            arrays[f"{prefix}/loss"] = np.asarray(trace.losses[runs])
            arrays[f"{prefix}/stop_step"] = np.asarray(trace.stop_step[runs])
            arrays[f"{prefix}/reached"] = np.asarray(trace.reached[runs])
            arrays[f"{prefix}/diverged"] = np.asarray(trace.diverged[runs])
    return arrays
