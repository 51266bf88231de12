"""Timing side by side: warm-up, interleaved repetitions, medians, and bandwidth against a plain copy.

A benchmark here never asserts a time. It measures two (or more) jitted callables in the same process,
interleaving their repetitions so that a slow phase of the machine (another process, thermal throttling,
a garbage collection) hits all of them alike, and reports the *ratio* of their times: the median of the
per-repetition ratios, which a drift over the run cancels out of, with their interquartile range. A
target counts as met only when the *pessimistic quartile* of those ratios meets it (the upper quartile
for "ours/anchor <= v"), so one lucky median does not pass a noisy comparison. Every call is followed
by ``jax.block_until_ready``, because JAX dispatches asynchronously and a timer around an unblocked call
measures only the dispatch.

What a compiled function does to memory is read from XLA itself, not timed: :func:`memory_traffic`
(``cost_analysis()`` bytes accessed over the bytes of one array, i.e. how many times the program
streams an array of that size, and how many full-size arrays the optimized HLO writes) and
:func:`compiled_memory` (``memory_analysis()``: temporary, argument and output bytes, and their total).

Memory-bound operations (normalizations) are also set against the bandwidth of a plain streaming op
(read an array, write one of the same size) measured in the same run on the same device, so a number
says how far an op is from the memory-bandwidth floor of *this* machine, not of a datasheet.

>>> import jax, jax.numpy as jnp
>>> from jaxopt_lab.lab.bench import timing
>>> x = jnp.ones((256, 256))
>>> f, g = jax.jit(lambda x: x @ x), jax.jit(lambda x: jnp.tanh(x) @ x)
>>> cmp = timing.compare(lambda: f(x), lambda: g(x), repeats=3, min_sample_s=1e-3)
>>> cmp.ratio > 0
True
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.lab.checks import positive_int
from jaxopt_lab.lab.experiment import environment

__all__ = [
    "MAX_CALLS_PER_SAMPLE",
    "Comparison",
    "MemoryTraffic",
    "Target",
    "Timing",
    "achieved_gbps",
    "benchmark_environment",
    "compare",
    "compiled_memory",
    "copy_bandwidth",
    "load_average",
    "memory_traffic",
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
    def ratios(self) -> np.ndarray:
        """time(ours) / time(anchor) of each repetition (the two samples of one repetition are paired)."""
        if self.ours.samples.shape != self.anchor.samples.shape:
            raise ValueError(f"Comparison: ours has {self.ours.samples.shape} samples and anchor "
                             f"{self.anchor.samples.shape}; they must come from the same interleaved run")
        return self.ours.samples / self.anchor.samples

    @property
    def ratio(self) -> float:
        return float(np.median(self.ratios))

    @property
    def ratio_quartiles(self) -> tuple[float, float]:
        """(lower, upper) quartile of the per-repetition ratios: their spread, in the ratio's own units."""
        q1, q3 = np.percentile(self.ratios, [25, 75])
        return float(q1), float(q3)

    @property
    def speedup(self) -> float:
        """time(anchor) / time(ours): how many times faster ours is."""
        return 1.0 / self.ratio

    def meets(self, target: Target) -> bool:
        """Whether the *pessimistic* quartile of the ratios meets ``target`` (see :meth:`Target.met_by`)."""
        return target.met_by(self.ratios)


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
        """Whether ``ratio`` = time(ours) / time(anchor) (one number, e.g. a quartile) meets the target."""
        return ratio <= self.value if self.kind == "max_ratio" else 1.0 / ratio >= self.value

    def met_by(self, ratios: Any) -> bool:
        """Whether a sample of per-repetition ratios meets the target robustly: its upper quartile does.

        Both kinds bound time(ours) / time(anchor) from above (``min_speedup`` v is ``ratio <= 1/v``), so
        the pessimistic end of the sample is its upper quartile: three repetitions in four must meet the
        target, not just the median one.
        """
        ratios = np.asarray(ratios, dtype=float)
        if ratios.size == 0 or not np.all(np.isfinite(ratios)) or np.any(ratios <= 0):
            raise ValueError(f"Target.met_by: ratios must be a non-empty sample of positive finite numbers, "
                             f"got {ratios!r}")
        return self.met(float(np.percentile(ratios, 75)))

    def describe(self) -> str:
        return f"ours/anchor <= {self.value:g}" if self.kind == "max_ratio" else f"speed-up >= {self.value:g}x"


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
    repeats = positive_int(repeats, "time_interleaved", "repeats")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"time_interleaved: warmup must be a non-negative integer, got {warmup!r}")
    if not min_sample_s >= 0:
        raise ValueError(f"time_interleaved: min_sample_s must be >= 0, got {min_sample_s!r}")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"time_interleaved: fns[{name!r}] must be callable, got {type(fn).__name__}")

    if number is not None:
        number = positive_int(number, "time_interleaved", "number")

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


def load_average() -> tuple[float, float, float] | None:
    """The host's 1, 5 and 15 minute load averages (``os.getloadavg``), or None where there are none.

    Recorded beside every timing: a ratio measured with other processes on the cores is noisier.
    """
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):  # not on every platform
        return None
    return one, five, fifteen


def _compiled(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    if hasattr(fn, "cost_analysis") and hasattr(fn, "memory_analysis"):  # already compiled (jax.stages)
        return fn
    lower = getattr(fn, "lower", None)
    if lower is None:
        lower = jax.jit(fn).lower
    return lower(*args).compile()


@dataclasses.dataclass(frozen=True)
class MemoryTraffic:
    """What one compiled program does to memory, in units of one array's bytes (see :func:`memory_traffic`)."""

    passes: float  # bytes read and written / bytes of the array
    full_size_buffers: int  # top-level HLO instructions writing an array of that size (outputs included)
    kernels: int = 0  # top-level HLO instructions (fusions, custom calls, copies): what the program launches
    reductions: int = 0  # reduce instructions in the optimized module, inside fusions included

    def as_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "full_size_buffers": self.full_size_buffers, "kernels": self.kernels,
                "reductions": self.reductions}


def memory_traffic(fn: Callable[..., Any], args: tuple[Any, ...], array: Any) -> MemoryTraffic:
    """How many times the compiled ``fn(*args)`` streams an array the size of ``array``, from XLA's HLO.

    * ``passes``: the optimized program's ``cost_analysis()["bytes accessed"]`` (each top-level fusion
      counts its operands and outputs once) over :func:`nbytes` of ``array``. A norm's forward + backward
      needs at least 4 (read x and dy, write y and dx).
    * ``full_size_buffers``: the instructions of the entry computation (fusions, custom calls, copies;
      not parameters, bitcasts, tuples and constants) that write an array with as many elements as
      ``array``, the outputs included. A norm's fused forward + backward writes two (y and dx); every
      other one is an intermediate XLA materialized instead of fusing it into its consumers.
    * ``kernels``: those top-level instructions, whatever they write; ``reductions``: the ``reduce``
      instructions of the whole optimized module. Equal traffic but more kernels or reductions is a gap in
      compute and scheduling, not in memory.

    ``fn`` is jitted if it is not, and compiled (not timed); pass ``jax.jit(f).lower(*args).compile()``
    to reuse a program already compiled for timing.
    """
    compiled = _compiled(fn, args)
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jaxlibs: one dict per computation
        cost = cost[0]
    size = math.prod(np.shape(array))
    text = compiled.as_text()
    entry = text[text.index("\nENTRY"):]
    entry = entry[: entry.index("\n}")]
    skip = {"parameter", "bitcast", "tuple", "get-tuple-element", "constant"}
    buffers = kernels = 0
    for line in entry.splitlines()[1:]:
        match = re.match(r"\s*(?:ROOT )?%\S+ = (\(.*?\)|\S+) ([\w-]+)\(", line)
        if match is None or match.group(2) in skip:
            continue
        kernels += 1
        dims = re.findall(r"\w+\[([\d,]*)\]", match.group(1))
        if any(math.prod(int(d) for d in dim.split(",") if d) == size for dim in dims):
            buffers += 1
    reductions = len(re.findall(r" reduce\(", text))
    return MemoryTraffic(float(cost["bytes accessed"]) / nbytes(array), buffers, kernels, reductions)


def compiled_memory(fn: Callable[..., Any], args: tuple[Any, ...]) -> dict[str, int]:
    """XLA's ``memory_analysis()`` of ``fn(*args)``: temporary, argument, output and alias bytes, and the total.

    ``temp_bytes`` is what the program allocates beyond its argument and output buffers (activations kept
    for the backward, intermediate buffers), the figure micro-batching exists to reduce. It is not all the
    scratch the program uses: XLA's buffer assignment may place a temporary inside an output buffer whose
    value is written only after that temporary is dead, and such a temporary is counted in
    ``output_bytes``. So a program with large late-written outputs can report little or no temp (an
    ``optax.MultiSteps`` step: parameters, optimizer state and accumulator are all selected at its end).
    ``total_bytes`` = arguments + outputs + temp - aliased (donated) bytes is the whole footprint of one
    call. ``fn`` may be a jitted or plain function, or an already compiled program.
    """
    stats = _compiled(fn, args).memory_analysis()
    if stats is None:
        raise ValueError("compiled_memory: this backend gives no memory_analysis() for compiled programs")
    sizes = {f"{name}_bytes": int(getattr(stats, f"{name}_size_in_bytes"))
             for name in ("temp", "argument", "output", "alias")}
    total = sizes["argument_bytes"] + sizes["output_bytes"] + sizes["temp_bytes"] - sizes["alias_bytes"]
    return {**sizes, "total_bytes": total}


def benchmark_environment() -> dict[str, Any]:
    """The software and hardware a timing was measured on: an experiment's record
    (:func:`jaxopt_lab.lab.experiment.environment`) plus versions, cores, devices, ``XLA_FLAGS`` and load.
    """
    devices = jax.devices()
    return {
        **environment(),
        "cpu_count": os.cpu_count(),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in devices],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": load_average(),
    }
