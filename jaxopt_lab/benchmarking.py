"""Timing side by side: warm-up, interleaved repetitions, medians, and bandwidth against a plain copy.

A benchmark here never asserts a time. It measures two (or more) jitted callables in the same process,
interleaving their repetitions so that a slow phase of the machine (another process, thermal throttling,
a garbage collection) hits all of them alike, and reports the *ratio* of their times: the median of the
per-repetition ratios, which a drift over the run cancels out of. Every call is followed by
``jax.block_until_ready``, because JAX dispatches asynchronously and a timer around an unblocked call
measures only the dispatch.

Memory-bound operations (normalizations) are also set against the bandwidth of a plain streaming op
(read an array, write one of the same size) measured in the same run on the same device, so a number
says how far an op is from the memory-bandwidth floor of *this* machine, not of a datasheet.

>>> import jax, jax.numpy as jnp
>>> from jaxopt_lab import benchmarking
>>> x = jnp.ones((256, 256))
>>> f, g = jax.jit(lambda x: x @ x), jax.jit(lambda x: jnp.tanh(x) @ x)
>>> cmp = benchmarking.compare(lambda: f(x), lambda: g(x), repeats=3, min_sample_s=1e-3)
>>> cmp.ratio > 0
True
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MAX_CALLS_PER_SAMPLE",
    "Comparison",
    "Target",
    "Timing",
    "achieved_gbps",
    "benchmark_environment",
    "compare",
    "copy_bandwidth",
    "nbytes",
    "streaming_copy",
    "time_interleaved",
]


# Bounds the calls in one sample when a callable is much faster than min_sample_s (e.g. returns at once).
MAX_CALLS_PER_SAMPLE = 10_000


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call of one callable: one sample per repetition, each the mean over ``number`` calls."""

    samples: np.ndarray
    number: int

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median: how noisy the samples were."""
        q1, q3 = np.percentile(self.samples, [25, 75])
        return float((q3 - q1) / self.median) if self.median > 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "relative_iqr": self.spread, "calls_per_sample": self.number,
                "samples_s": self.samples.tolist()}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """``ours`` against ``anchor``; ``ratio`` = time(ours) / time(anchor), the median of paired ratios."""

    ours: Timing
    anchor: Timing

    @property
    def ratio(self) -> float:
        return float(np.median(self.ours.samples / self.anchor.samples))

    @property
    def speedup(self) -> float:
        """time(anchor) / time(ours): how many times faster ours is."""
        return 1.0 / self.ratio


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal: ``max_ratio`` (ours/anchor <= value) or ``min_speedup`` (anchor/ours >= value)."""

    kind: Literal["max_ratio", "min_speedup"]
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("max_ratio", "min_speedup"):
            raise ValueError(f"Target: kind must be 'max_ratio' or 'min_speedup', got {self.kind!r}")
        if not (math.isfinite(self.value) and self.value > 0):
            raise ValueError(f"Target: value must be a positive finite number, got {self.value!r}")

    def met(self, ratio: float) -> bool:
        """Whether ``ratio`` = time(ours) / time(anchor) (e.g. :attr:`Comparison.ratio`) meets the target."""
        return ratio <= self.value if self.kind == "max_ratio" else 1.0 / ratio >= self.value

    def describe(self) -> str:
        return f"ours/anchor <= {self.value:g}" if self.kind == "max_ratio" else f"speed-up >= {self.value:g}x"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _call_blocked(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 7, warmup: int = 2,
                     min_sample_s: float = 0.02, number: int | None = None) -> dict[str, Timing]:
    """Times zero-argument callables side by side and returns seconds per call for each.

    Args:
      fns: name -> callable. Each is called with no arguments; its result is blocked on, so pass
        jitted functions closed over their (already placed) inputs.
      repeats: samples per callable. In repetition ``r`` the callables run in rotated order, so none of
        them always goes first (right after another's cache-thrashing run) or last.
      warmup: untimed calls per callable before timing (compilation, allocator warm-up).
      min_sample_s: each sample repeats a call ``number`` times, with ``number`` chosen from one timed
        call after the warm-up so that a sample lasts at least this long (at most
        :data:`MAX_CALLS_PER_SAMPLE` calls); fast ops then rise above timer resolution.
      number: calls per sample, fixed instead of chosen from ``min_sample_s`` (no sizing call then).

    Returns:
      name -> :class:`Timing`, ``samples[r]`` being repetition ``r`` (pair them across names).
    """
    if not fns:
        raise ValueError("time_interleaved: fns must name at least one callable, got none")
    repeats = _positive_int("time_interleaved: repeats", repeats)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"time_interleaved: warmup must be a non-negative integer, got {warmup!r}")
    if not min_sample_s >= 0:
        raise ValueError(f"time_interleaved: min_sample_s must be >= 0, got {min_sample_s!r}")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"time_interleaved: fns[{name!r}] must be callable, got {type(fn).__name__}")

    if number is not None:
        number = _positive_int("time_interleaved: number", number)

    names = list(fns)
    numbers = {}
    for name in names:
        for _ in range(warmup):
            _call_blocked(fns[name])
        if number is None:
            once = _call_blocked(fns[name])  # one more, timed, to size the samples
            numbers[name] = min(MAX_CALLS_PER_SAMPLE, max(1, math.ceil(min_sample_s / max(once, 1e-9))))
        else:
            numbers[name] = number
    samples = {name: np.empty(repeats) for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            total = sum(_call_blocked(fns[name]) for _ in range(numbers[name]))
            samples[name][r] = total / numbers[name]
    return {name: Timing(samples[name], numbers[name]) for name in names}


def compare(ours: Callable[[], Any], anchor: Callable[[], Any], **timing_kwargs: Any) -> Comparison:
    """:func:`time_interleaved` of two callables, as a :class:`Comparison` (ratio = ours / anchor)."""
    timings = time_interleaved({"ours": ours, "anchor": anchor}, **timing_kwargs)
    return Comparison(timings["ours"], timings["anchor"])


def nbytes(tree: Any) -> int:
    """Total bytes of the arrays in a pytree."""
    return sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def achieved_gbps(bytes_moved: int, seconds: float) -> float:
    """Bytes moved per second, in GB/s (10**9 bytes)."""
    if not seconds > 0:
        raise ValueError(f"achieved_gbps: seconds must be > 0, got {seconds!r}")
    return bytes_moved / seconds / 1e9


@jax.jit
def streaming_copy(x: jax.Array) -> jax.Array:
    """The reference memory-bound op: reads ``x`` once and writes an array of the same size."""
    # Reads x once and writes one array of the same size. Not `x + 0` or `x * 1`: XLA simplifies those
    # away, and an identity output is forwarded without any copy.
    return x + jnp.asarray(1, x.dtype)


def copy_bandwidth(shape: tuple[int, ...], dtype: Any = jnp.float32,
                   **timing_kwargs: Any) -> tuple[float, Timing]:
    """The achievable streaming bandwidth (GB/s, read + write) for an array of ``shape`` on this device.

    Returns ``(gbps, timing)``. Measure it in the same run as the op it is compared with.
    """
    x = jnp.zeros(shape, dtype)
    timing = time_interleaved({"copy": lambda: streaming_copy(x)}, **timing_kwargs)["copy"]
    return achieved_gbps(2 * nbytes(x), timing.median), timing


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def benchmark_environment() -> dict[str, Any]:
    """:func:`jaxopt_lab.experiment.environment` plus what a timing depends on: versions, cores, devices."""
    from jaxopt_lab.experiment import environment

    env = environment()
    env.update({
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "cpu_count": os.cpu_count(),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    })
    return env
