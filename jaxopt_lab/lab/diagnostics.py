"""Reading loss histories: learning-rate diagnosis, the LR range test, and saddle-escape detection.

The "how can we detect it" half of the learning-rate claims (docs/claims.md): :func:`diagnose` labels one
loss history
(``diverging``, ``oscillating``, ``stalled``, ``too slow``, ``ok``) and returns the numbers it used, so a
label can always be checked. :func:`loss_noise` quantifies how jagged a curve is (one measure, used both
by ``diagnose`` and to tell full-batch from mini-batch curves). :func:`lr_range_test` runs the exponential
learning-rate ramp of Smith (2017), "Cyclical Learning Rates for Training Neural Networks", §3.3, vmapped
over seeds on the sweep engine, and :func:`suggest_learning_rate` reads a rate off it. :func:`escape_steps`
finds when a run left a saddle, :func:`steps_to_target` when a training loss reached a target, and
:func:`gradient_noise_along` how much mini-batch noise points along given directions (off a saddle's stable
manifold, or along it). Two readings of trained classifiers: :func:`learned` (did a run learn at all?) and
:func:`bn_statistics_gap` (batch norm at test time with running vs batch statistics).

>>> import numpy as np
>>> diagnose(np.array([10.0, 5.0, 2.5, 1.2, 0.6, 0.3, 0.15, 0.07]), target=0.1).label
'ok'
>>> diagnose(np.array([1.0, 3.0, 9.0, 27.0, np.inf])).label
'diverging'
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.lab import sweep, training
from jaxopt_lab.lab.data import Dataset

__all__ = [
    "LABELS",
    "NOT_LEARNED",
    "Diagnosis",
    "ExponentialRamp",
    "LRRangeTest",
    "bn_statistics_gap",
    "censored_steps",
    "diagnose",
    "escape_steps",
    "gradient_noise_along",
    "learned",
    "loss_noise",
    "loss_reversals",
    "lr_range_test",
    "steps_to_target",
    "suggest_learning_rate",
]

LABELS = ("diverging", "oscillating", "stalled", "too slow", "ok")


class Diagnosis(NamedTuple):
    """A label from :data:`LABELS` and the evidence behind it (``evidence["rule"]`` says which rule fired)."""

    label: str
    evidence: dict[str, Any]

    def __str__(self) -> str:
        numbers = ", ".join(f"{k}={_fmt(v)}" for k, v in self.evidence.items() if k != "rule")
        return f"{self.label}: {self.evidence['rule']} ({numbers})"


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _as_history(history: Any, name: str) -> np.ndarray:
    h = np.asarray(history, dtype=np.float64)
    if h.ndim != 1 or h.size < 2:
        raise ValueError(f"{name}: expected a 1-D loss history with at least 2 entries, got shape {h.shape}")
    return h


def loss_noise(history: Any, *, rtol: float = 1e-6) -> dict[str, float]:
    """How jagged a loss curve is, independent of its scale.

    Returns:
      ``increase_fraction``: share of steps on which the loss went *up* by more than ``rtol`` (relative):
      0 for full-batch gradient descent on a smooth convex problem with a stable rate, near 0.5 for pure
      noise. The tolerance keeps float32 rounding at a converged loss floor from counting as a rise.
      ``roughness``: standard deviation of the second difference of ``log(loss)`` — how much the slope on a
      log plot changes from one step to the next: ~0 for any smooth curve (geometric decay, a bend into a
      plateau), large for a jagged one. Entries with a non-positive loss are skipped (a one-example batch
      can fit exactly); NaN when fewer than 3 positive neighbours are left.
      ``reversal``: how far ``log(loss)`` went against its own net direction: its total variation minus
      its net change. 0 for a curve that only falls, or only rises (as an overfitting test loss may),
      whatever its shape; a rise and the fall back add twice their size. Non-positive entries are skipped
      as above; NaN for a history with a non-finite entry (a diverged run).

    >>> {k: round(v, 3) for k, v in loss_noise([1.0, 0.5, 0.25, 0.5, 0.25]).items()}  # up log 2, down again
    {'increase_fraction': 0.25, 'roughness': 1.132, 'reversal': 1.386}
    """
    h = _as_history(history, "loss_noise")
    steps = np.diff(h)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(np.where(h > 0, h, np.nan))
    curvature = np.diff(logs, n=2)
    curvature = curvature[np.isfinite(curvature)]
    roughness = float(np.std(curvature)) if curvature.size else math.nan
    positive = logs[np.isfinite(logs)]
    # Never below 0: the total variation is at least the net change, but its float sum may round below it.
    reversal = (max(0.0, float(np.abs(np.diff(positive)).sum() - abs(positive[-1] - positive[0])))
                if np.isfinite(h).all() and positive.size else math.nan)
    return {"increase_fraction": float(np.mean(steps > rtol * np.abs(h[:-1]))), "roughness": roughness,
            "reversal": reversal}


def loss_reversals(histories: Any) -> np.ndarray:
    """Each history's ``reversal`` (:func:`loss_noise`): ``histories`` ``(runs, points)``, one value per run.

    >>> loss_reversals([[1.0, 0.5, 0.25], [1.0, 2.0, 1.0]]).round(3).tolist()
    [0.0, 1.386]
    """
    return np.array([loss_noise(history)["reversal"] for history in np.asarray(histories, dtype=np.float64)])


def diagnose(history: Any, *, target: float | None = None, blowup_factor: float = 10.0,
             oscillation_fraction: float = 0.3, stall_tolerance: float = 1e-3,
             window: int | None = None) -> Diagnosis:
    """Labels one loss history and says why.

    Rules, in order (``window`` = the last quarter of the history, at least 5 steps):

    1. ``diverging``: a NaN/inf loss, or a final loss ``blowup_factor`` times the first one.
    2. ``ok``: the loss fell below ``target`` (evidence: the step, and the peak/first ratio, so a run that
       spiked before converging — the course notes' SGD at 0.1 — is visible).
    3. ``oscillating``: in the window the loss rose on at least ``oscillation_fraction`` of the steps.
    4. ``stalled``: over the window the loss fell by less than ``stall_tolerance`` (relative) — stuck at a
       bad value (a too-high rate bouncing in a valley, or a too-low rate near a plateau or saddle).
    5. ``too slow``: still falling steadily but the target was not reached; the evidence extrapolates the
       window's geometric rate to the steps the target would take. Without a target: the loss did not
       halve over the run.
    6. ``ok`` otherwise.

    Args:
      history: losses ``L_0..L_t`` of one run (e.g. :func:`jaxopt_lab.lab.sweep.run_histories`).
      target: the loss a run should reach, if any.

    Returns:
      A :class:`Diagnosis`.
    """
    h = _as_history(history, "diagnose")
    n = h.size
    bad = np.flatnonzero(~np.isfinite(h))
    if bad.size:
        return Diagnosis("diverging", {"rule": "non-finite loss", "first_nonfinite_step": int(bad[0]),
                                       "last_finite_loss": float(h[bad[0] - 1]) if bad[0] else math.nan})
    first, last = float(h[0]), float(h[-1])
    scale = max(abs(first), 1e-12)
    peak_ratio = float(np.max(h)) / scale
    if last > blowup_factor * scale:
        return Diagnosis("diverging", {"rule": f"final loss > {blowup_factor:g} x first",
                                       "growth": last / scale, "peak_ratio": peak_ratio})
    if target is not None:
        below = np.flatnonzero(h < target)
        if below.size:
            return Diagnosis("ok", {"rule": f"reached target {target:g}", "step": int(below[0]),
                                    "peak_ratio": peak_ratio})
    w = min(n, max(5, n // 4)) if window is None else min(n, int(window))
    tail = h[-w:]
    noise = loss_noise(tail)
    if noise["increase_fraction"] >= oscillation_fraction:
        return Diagnosis("oscillating", {"rule": f"loss rose on >= {oscillation_fraction:g} of the last "
                                                 f"{w} steps", **noise, "final_loss": last})
    decrease = (float(tail[0]) - last) / max(abs(float(tail[0])), 1e-12)
    if decrease < stall_tolerance:
        return Diagnosis("stalled", {"rule": f"loss fell < {stall_tolerance:g} (relative) over the last {w} "
                                             f"steps", "window_decrease": decrease, "final_loss": last})
    if target is not None:
        rate = math.log(float(tail[0]) / last) / (w - 1) if tail[0] > 0 and last > 0 else math.nan
        more = math.log(last / target) / rate if rate > 0 and last > 0 else math.inf
        return Diagnosis("too slow", {"rule": f"target {target:g} not reached in {n - 1} steps",
                                      "final_loss": last, "log_decrease_per_step": rate,
                                      "projected_extra_steps": more})
    total_decrease = (first - last) / scale
    if total_decrease < 0.5:
        return Diagnosis("too slow", {"rule": "loss fell by less than half over the run",
                                      "total_decrease": total_decrease, "final_loss": last})
    return Diagnosis("ok", {"rule": "steady decrease", "total_decrease": total_decrease, "final_loss": last})


def escape_steps(losses: Any, saddle_value: float, margin: float) -> np.ndarray:
    """First step at which each run's loss is at or below ``saddle_value - margin``; ``-1`` if never.

    The escape criterion of the saddle experiments: a run has left a saddle once it descended ``margin``
    below the saddle's value — only a step along a descent direction gets there, and it is defined for
    unbounded landscapes (x^3) too. ``losses`` has the steps on its last axis; NaN never counts.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim < 1 or losses.shape[-1] == 0:
        raise ValueError(f"escape_steps: losses need a non-empty steps axis, got shape {losses.shape}")
    if not margin > 0:
        raise ValueError(f"escape_steps: margin must be > 0, got {margin!r}")
    escaped = losses <= saddle_value - margin  # NaN compares False
    return np.where(escaped.any(axis=-1), escaped.argmax(axis=-1), -1)


def gradient_noise_along(loss_fn: sweep.LossFn, params: Any, data: Any, batch_size: int, directions: Any, *,
                         num_batches: int = 1000, seed: int = 0) -> np.ndarray:
    """Standard deviation, over mini-batches, of the mini-batch gradient's component along each direction.

    Each mini-batch is ``batch_size`` examples drawn without replacement, as a step of
    :func:`jaxopt_lab.lab.sweep.run_sweep` draws them; the ``num_batches`` gradients are one vmapped call.

    Args:
      loss_fn: ``(params, batch) -> scalar``, the mean of per-example losses over ``batch``.
      params: a 1-D array (the point where the noise is measured).
      data: a pytree of arrays with a shared leading examples axis.
      batch_size: examples per mini-batch (at most the number of examples).
      directions: ``(k, params.size)``; each row is normalized to unit length.

    Returns:
      ``(k,)``: the noise's standard deviation along each direction.

    >>> loss = lambda w, batch: jnp.mean(batch["c"] * w[0] ** 2 + batch["d"] * w[1])
    >>> data = {"c": jnp.linspace(0.0, 2.0, 64), "d": jnp.zeros(64)}
    >>> gradient_noise_along(loss, jnp.array([1.0, 0.0]), data, 8, [[0.0, 1.0]]).tolist()  # d = 0: none
    [0.0]
    """
    params = jnp.asarray(params)
    unit = np.asarray(directions, dtype=np.float64)
    if params.ndim != 1 or unit.ndim != 2 or unit.shape[1] != params.size:
        raise ValueError(f"gradient_noise_along: params must be 1-D and directions (k, {params.size}), got "
                         f"{params.shape} and {unit.shape}")
    if not np.all(np.linalg.norm(unit, axis=1) > 0):
        raise ValueError("gradient_noise_along: every direction must be non-zero")
    num_examples = jax.tree.leaves(data)[0].shape[0]
    if not 1 <= batch_size <= num_examples:
        raise ValueError(f"gradient_noise_along: batch_size must lie in [1, {num_examples}], "
                         f"got {batch_size!r}")
    unit_rows = jnp.asarray(unit / np.linalg.norm(unit, axis=1, keepdims=True), params.dtype)

    def batch_gradient(key: jax.Array) -> jax.Array:
        idx = jax.random.permutation(key, num_examples)[:batch_size]
        return jax.grad(loss_fn)(params, jax.tree.map(lambda a: a[idx], data))

    keys = jax.random.split(jax.random.PRNGKey(seed), num_batches)
    grads = jax.jit(jax.vmap(batch_gradient))(keys)
    return np.asarray(jnp.std(grads @ unit_rows.T, axis=0), dtype=np.float64)


def steps_to_target(step_loss: Any, target: float, window: int) -> list[int | None]:
    """Per run (rows of ``step_loss``), the first step at which the ``window``-step moving average of the
    training loss is below ``target`` (counted in steps from the start: the window's last step + 1), or
    ``None`` if it never is. NaN/inf never counts as below.

    >>> steps_to_target([[2.0, 1.0, 0.4, 0.2, 0.1], [2.0, 2.0, 2.0, 2.0, 2.0]], target=0.5, window=2)
    [4, None]
    """
    losses = np.atleast_2d(np.asarray(step_loss, dtype=np.float64))
    if losses.ndim != 2 or losses.shape[-1] == 0:
        raise ValueError(f"steps_to_target: step_loss must be (steps,) or (runs, steps), "
                         f"got shape {losses.shape}")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= losses.shape[-1]:
        raise ValueError(f"steps_to_target: window must be an int in [1, {losses.shape[-1]}], got {window!r}")
    out: list[int | None] = []
    for row in losses:
        smooth = np.convolve(np.where(np.isfinite(row), row, np.inf), np.ones(window) / window, mode="valid")
        hit = np.flatnonzero(smooth < target)
        out.append(int(hit[0]) + window if hit.size else None)
    return out


def censored_steps(reached: Sequence[int | None], budget: int) -> list[float]:
    """Steps to a target per run (:func:`steps_to_target`) as numbers a test can average: a run that never
    reached the target counts as the whole ``budget``, a lower bound that can only understate the slower
    arm's steps.

    >>> censored_steps([40, None], 600)
    [40.0, 600.0]
    """
    return [float(budget if s is None else s) for s in reached]


@dataclasses.dataclass(frozen=True)
class ExponentialRamp:
    """Learning-rate multiplier ``ratio ** (count / steps)``: from 1 to ``ratio`` over ``steps`` updates."""

    ratio: float
    steps: int

    def __call__(self, count: jax.Array) -> jax.Array:
        return jnp.asarray(self.ratio, jnp.float32) ** (count.astype(jnp.float32) / self.steps)


class LRRangeTest(NamedTuple):
    """An LR range test: the rate of each update, the loss after it per seed, and the suggested rates."""

    learning_rates: np.ndarray  # (T,): rate of update t
    losses: np.ndarray  # (seeds, T): loss after update t (NaN once a run diverged)
    suggestions: np.ndarray  # (seeds,): steepest-descent rate per seed
    suggestion: float  # median over seeds
    min_loss_rates: np.ndarray  # (seeds,): rate at the smoothed loss minimum (the "min / 10" heuristic's input)


def suggest_learning_rate(learning_rates: Any, losses: Any, *, smoothing: float = 0.9,
                          divergence_factor: float = 4.0) -> tuple[float, float]:
    """Reads an LR range test curve: the rate where the loss falls fastest, and the rate at its minimum.

    The curve is smoothed with a bias-corrected exponential moving average (fast.ai's ``lr_find``), cut
    where it exceeds ``divergence_factor`` x its minimum, and differentiated against ``log(rate)``. The
    steepest-descent rate is the usual suggestion; the minimum's rate is the edge of stability.

    Returns:
      ``(steepest_rate, min_loss_rate)``.
    """
    lrs = np.asarray(learning_rates, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if lrs.ndim != 1 or loss.shape != lrs.shape or lrs.size < 3:
        raise ValueError(f"suggest_learning_rate: need 1-D rates and losses of the same length >= 3, got "
                         f"{lrs.shape} and {loss.shape}")
    finite = np.flatnonzero(~np.isfinite(loss))
    end = int(finite[0]) if finite.size else loss.size
    if end < 3:
        raise ValueError(f"suggest_learning_rate: the loss diverged after {end} steps; lower the minimum rate")
    lrs, loss = lrs[:end], loss[:end]
    avg, smooth = 0.0, np.empty_like(loss)
    for i, value in enumerate(loss):
        avg = smoothing * avg + (1 - smoothing) * value
        smooth[i] = avg / (1 - smoothing ** (i + 1))
    best = int(np.argmin(smooth))
    above = np.flatnonzero(smooth[best:] > divergence_factor * smooth[best])
    stop = best + int(above[0]) if above.size else smooth.size
    slope = np.gradient(smooth[:stop], np.log(lrs[:stop])) if stop >= 2 else np.zeros(1)
    return float(lrs[int(np.argmin(slope))]), float(lrs[best])


def lr_range_test_sweep(init_params: Any, seeds: Sequence[int], *, min_lr: float = 1e-4, max_lr: float = 10.0,
                        steps: int = 200, batch_size: int | None = None
                        ) -> tuple[sweep.RunSpec, sweep.SweepConfig]:
    """The runs and the sweep config of :func:`lr_range_test` (for :func:`jaxopt_lab.lab.sweep.check_sweep`)."""
    if not 0 < min_lr < max_lr:
        raise ValueError(f"lr_range_test: need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    config = sweep.SweepConfig(steps=steps, batch_size=batch_size, divergence_bound=1e12,
                               learning_rate_schedule=ExponentialRamp(max_lr / min_lr, steps))
    return sweep.grid([min_lr], seeds, init_params), config


def lr_range_test(loss_fn: sweep.LossFn, data: Any, init_params: Any, seeds: Sequence[int], *,
                  optimizer: str = "sgd", min_lr: float = 1e-4, max_lr: float = 10.0, steps: int = 200,
                  batch_size: int | None = None) -> LRRangeTest:
    """Smith's LR range test, every seed in one vmapped run of the sweep engine.

    The rate grows exponentially from ``min_lr`` to ``max_lr`` over ``steps`` updates; each seed has its
    own start (``init_params`` may be ``key -> params``) and, with ``batch_size``, its own batch order.
    """
    specs, config = lr_range_test_sweep(init_params, seeds, min_lr=min_lr, max_lr=max_lr, steps=steps,
                                        batch_size=batch_size)
    trace = sweep.run_sweep(loss_fn, optimizer, specs, data, config)[optimizer]
    rates = min_lr * (max_lr / min_lr) ** (np.arange(steps) / steps)
    losses = np.asarray(trace.losses)[:, 1:]  # the loss after update t, made at rates[t]
    picks = [suggest_learning_rate(rates, row) for row in losses]
    steepest = np.array([p[0] for p in picks])
    return LRRangeTest(rates, losses, steepest, float(np.median(steepest)), np.array([p[1] for p in picks]))


@functools.partial(jax.jit, static_argnames="batch_size")
def _batch_statistics_accuracy(state: training.TrainState, images: jax.Array, labels: jax.Array, *,
                               batch_size: int) -> jax.Array:
    """Per seed: accuracy when batch norm normalizes each test batch of ``batch_size`` with its OWN
    statistics (train mode, running averages untouched): what the network saw during training."""
    chunks = images.shape[0] // batch_size
    xs = images[: chunks * batch_size].reshape(chunks, batch_size, *images.shape[1:])
    ys = labels[: chunks * batch_size].reshape(chunks, batch_size)

    def one_seed(params: Any, batch_stats: Any) -> jax.Array:
        def one_batch(args: tuple[jax.Array, jax.Array]) -> jax.Array:
            logits, _ = state.apply_fn({"params": params, "batch_stats": batch_stats}, args[0], train=True,
                                       mutable=["batch_stats"])
            return jnp.sum(jnp.argmax(logits, -1) == args[1])

        return jax.lax.map(one_batch, (xs, ys)).sum() / (chunks * batch_size)

    return jax.vmap(one_seed)(state.params, state.batch_stats)


def bn_statistics_gap(state: training.TrainState, ds: Dataset, batch_size: int) -> dict:
    """Batch norm at test time with its running statistics vs with the statistics of test batches of its
    training batch size, on the same (shuffled, fixed) test examples: ``{"running", "batch", "gap"}`` (per-seed
    accuracies, ``gap = running - batch``) and ``"examples"``. ``state`` holds one run per seed (a leading
    seed axis, as :func:`jaxopt_lab.lab.training.train_seeds` returns it); a positive gap is the accuracy
    that normalizing with the noisy statistics of ``batch_size`` examples costs at test time."""
    order = np.random.default_rng(0).permutation(len(ds.y_test))  # the test set is not class-mixed
    used = order[: (len(order) // batch_size) * batch_size]
    x, y = jnp.asarray(ds.x_test[used]), jnp.asarray(ds.y_test[used])
    running = training.evaluate_seeds(state, x, y)[1]
    batch = np.asarray(_batch_statistics_accuracy(state, x, y, batch_size=batch_size))
    return {"running": training.mean_std(running), "batch": training.mean_std(batch),
            "gap": training.mean_std(running - batch), "examples": len(used)}


NOT_LEARNED = "no verdict: a model did not learn"


def learned(record: Mapping[str, Any], num_classes: int) -> bool:
    """Whether a run learned: its final training loss (seed mean) is below half of ``ln(num_classes)``,
    the loss of a uniform guess. A claim about a model that did not learn gets no verdict.

    >>> learned({"final_train_loss": {"mean": 0.3}}, 10), learned({"final_train_loss": {"mean": 2.1}}, 10)
    (True, False)
    """
    return record["final_train_loss"]["mean"] < 0.5 * math.log(num_classes)
