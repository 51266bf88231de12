"""The benchmark suite behind ``jaxopt-lab bench [--quick] [--out DIR]`` (issues 7 and 13).

Each row times one of our code paths against the anchor it must match or beat, in the same process with
interleaved repetitions (:mod:`jaxopt_lab.lab.bench.timing`), and reports ours/anchor as the median of the
per-repetition ratios with their interquartile range; a target counts as met only when the pessimistic
(upper) quartile of the ratios meets it. The host's load average is recorded at the start and end of
every group. Rows:

- ``norms``: forward + backward of layer/instance/group/batch norm (jitted ``jax.vjp``, returning y and
  every cotangent) against ``flax.linen`` with its default one-pass variance and with
  ``use_fast_variance=False``, on several shapes and in bfloat16; achieved GB/s (4 bytes per element
  moved at least: read x and dy, write y and dx) against a streaming copy of the same array timed
  alongside, and, from the compiled HLO, the passes over memory (bytes accessed / bytes of x) and the
  full-size arrays written, ours and flax's. Target: ours <= flax's default. A missed row states the gap
  and its HLO-level cause.
- ``accumulation``: one optimizer step of effective batch 128: ``microbatched_value_and_grad`` 4 x 32
  against one batch of 128 (target <= 1.15x), and ``optax.MultiSteps`` 4 micro-steps against the same;
  the gradient against its physical floor, k separate jitted calls at the micro-batch size (target
  <= 1.05x), and its temporary memory (XLA's ``memory_analysis``) against the full batch's.
- ``gradient-centralization``: a training step with and without ``gradient_centralization`` (<= 1.05x).
- ``sweep``: the 16-run optimizer grid as one vmapped jit against a Python loop of jitted single runs
  (target: >= 10x faster).
- ``end-to-end``: wall time of ``jaxopt-lab run all --quick`` in a subprocess (full mode only).

A group whose library module does not exist yet is listed as unavailable, not failed. This module defines
no ``EXPERIMENT``: ``jaxopt-lab run all`` does not run it. ``python experiments/benchmarks.py --quick``
is the same as ``jaxopt-lab bench --quick``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["GROUP_NAMES", "BenchConfig", "Row", "collect_rows", "run_benchmarks"]

BENCH_DIR = "bench"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Sizes and repetition counts; :meth:`for_mode` gives the quick (CI) and full settings.

    ``nhwc_shapes`` are the (N, H, W, C) activations every norm runs on; ``tokens_shapes`` the (tokens,
    features) of a transformer's layer norm; ``bf16_shapes`` repeat the NHWC norms in bfloat16.
    """

    quick: bool
    repeats: int
    warmup: int
    min_sample_s: float
    nhwc_shapes: tuple[tuple[int, int, int, int], ...]
    tokens_shapes: tuple[tuple[int, int], ...]
    bf16_shapes: tuple[tuple[int, int, int, int], ...]
    sweep_steps: int
    effective_batch: int = 128
    num_microbatches: int = 4
    end_to_end: bool = False

    @classmethod
    def for_mode(cls, quick: bool) -> BenchConfig:
        if quick:
            return cls(quick=True, repeats=9, warmup=1, min_sample_s=0.005, nhwc_shapes=((8, 16, 16, 32),),
                       tokens_shapes=((64, 1024),), bf16_shapes=((8, 16, 16, 32),), sweep_steps=200)
        # (16, 56, 56, 64) is ResNet-50's first stage, (128, 56, 56, 64), with the batch cut 8x to fit.
        return cls(quick=False, repeats=31, warmup=2, min_sample_s=0.03,
                   nhwc_shapes=((8, 16, 16, 32), (32, 32, 32, 64), (16, 56, 56, 64)),
                   tokens_shapes=((64, 1024),), bf16_shapes=((32, 32, 32, 64),), sweep_steps=1000,
                   end_to_end=True)

    def timing(self) -> dict[str, Any]:
        return {"repeats": self.repeats, "warmup": self.warmup, "min_sample_s": self.min_sample_s}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: our path against an anchor (or a plain measurement when anchor is None).

    ``ratio`` is the median of the per-repetition ratios time(ours) / time(anchor) and ``ratio_iqr``
    their (lower, upper) quartiles; the target is met when the upper quartile meets it (three
    repetitions in four), not the median alone. A row without per-repetition ratios (a ratio of
    bytes, say) judges its one ratio.
    """

    group: str
    ours: str
    anchor: str | None
    shape: str
    ours_s: float
    anchor_s: float | None = None
    ratio: float | None = None  # time(ours) / time(anchor), median of paired repetitions
    target: Any = None  # a benchmarking.Target or None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    ratio_iqr: tuple[float, float] | None = None
    cause: str | None = None  # why a missed target was missed (set for the norms, from the HLO)
    unit: str = "s"  # of ours_s and anchor_s: "s" (seconds) or "bytes" (a memory row)

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.target.met(self.ratio if self.ratio_iqr is None else self.ratio_iqr[1])

    def as_dict(self) -> dict[str, Any]:
        return {"group": self.group, "ours": self.ours, "anchor": self.anchor, "shape": self.shape,
                "ours_s": self.ours_s, "anchor_s": self.anchor_s, "ratio": self.ratio,
                "ratio_q1": None if self.ratio_iqr is None else self.ratio_iqr[0],
                "ratio_q3": None if self.ratio_iqr is None else self.ratio_iqr[1],
                "speedup": None if self.ratio is None else 1.0 / self.ratio,
                "target": None if self.target is None else self.target.describe(), "met": self.met,
                "cause": self.cause, "unit": self.unit, **self.extra}


def _compared(group: str, ours: str, anchor: str, shape: str, comparison: Any, target: Any = None,
              cause: str | None = None, **extra: Any) -> Row:
    return Row(group, ours, anchor, shape, comparison.ours.median, comparison.anchor.median, comparison.ratio,
               target, {"ratios": comparison.ratios.tolist(), "ours_relative_iqr": comparison.ours.spread,
                        "anchor_relative_iqr": comparison.anchor.spread, **extra},
               ratio_iqr=comparison.ratio_quartiles, cause=cause)


# --- norms ----------------------------------------------------------------------------------------------


def _vjp_fn(apply: Callable[[Any, Any], Any]) -> Any:
    """Jitted forward + backward of ``apply(x, params) -> (y, aux)``: returns y, aux and (dx, dparams)."""
    import jax

    @jax.jit
    def fwd_bwd(x, params, dy):
        y, vjp, aux = jax.vjp(apply, x, params, has_aux=True)
        return y, aux, vjp(dy)

    return fwd_bwd


def group_norm_groups(channels: int) -> int:
    """The groups of the group-norm rows: 32 (Wu & He's default) where C allows 2+ channels a group."""
    return max(1, min(32, channels // 2))


@dataclasses.dataclass(frozen=True)
class NormCase:
    """One norm row: ours ``(x, params) -> (y, aux)`` and flax's module ``make_flax(use_fast_variance)``."""

    name: str
    shape: tuple[int, ...]
    dtype: Any
    ours: Callable[[Any, Any], Any]
    make_flax: Callable[[bool], Any]
    groups: int = 0

    @property
    def label(self) -> str:
        dtype = "" if self.dtype == "float32" else f" {self.dtype}"
        return "x".join(map(str, self.shape)) + dtype


def _norm_cases(cfg: BenchConfig) -> list[NormCase]:
    import flax.linen as nn
    import jax.numpy as jnp

    from jaxopt_lab import normalization as norm

    def nhwc_cases(shape: tuple[int, ...], dtype: Any) -> list[NormCase]:
        channels, groups = shape[-1], group_norm_groups(shape[-1])
        stats = norm.batch_norm_init(channels)
        name = jnp.dtype(dtype).name

        def ours_bn(x, p):
            return norm.batch_norm(x, stats, p["scale"], p["bias"], training=True, eps=1e-5)

        return [
            NormCase("layer_norm", shape, name,
                     lambda x, p: (norm.layer_norm(x, p["scale"], p["bias"], eps=1e-6), ()),
                     lambda fast: nn.LayerNorm(use_fast_variance=fast, dtype=dtype)),
            NormCase("instance_norm", shape, name,
                     lambda x, p: (norm.instance_norm(x, p["scale"], p["bias"], eps=1e-6), ()),
                     lambda fast: nn.InstanceNorm(use_fast_variance=fast, dtype=dtype)),
            NormCase("group_norm", shape, name,
                     lambda x, p: (norm.group_norm(x, groups, p["scale"], p["bias"], eps=1e-6), ()),
                     lambda fast: nn.GroupNorm(num_groups=groups, use_fast_variance=fast, dtype=dtype), groups),
            NormCase("batch_norm", shape, name, ours_bn,
                     lambda fast: nn.BatchNorm(use_running_average=False, epsilon=1e-5, use_fast_variance=fast,
                                               dtype=dtype)),
        ]

    cases = [NormCase("layer_norm", shape, "float32",
                      lambda x, p: (norm.layer_norm(x, p["scale"], p["bias"], eps=1e-6), ()),
                      lambda fast: nn.LayerNorm(use_fast_variance=fast)) for shape in cfg.tokens_shapes]
    for shape in cfg.nhwc_shapes:
        cases += nhwc_cases(shape, jnp.float32)
    for shape in cfg.bf16_shapes:
        cases += nhwc_cases(shape, jnp.bfloat16)
    return cases


def _pallas_path(case: NormCase) -> Callable[[Any, Any], Any] | None:
    """The fused Pallas kernel (:mod:`jaxopt_lab.normalization._pallas`) for ``case``, or None where it
    cannot compile here.

    Only layer norm (over the last axis) and group norm have kernels; they need a GPU backend
    (``pallas_norm.available()``) and a shape the Triton lowering takes (``pallas_norm.supported``).
    """
    from jaxopt_lab.normalization import _pallas as pallas_norm

    if case.name not in ("layer_norm", "group_norm") or not pallas_norm.available():
        return None
    if not pallas_norm.supported(case.shape, case.groups or None):
        return None
    if case.name == "layer_norm":
        return lambda x, p: (pallas_norm.layer_norm(x, p["scale"], p["bias"], eps=1e-6), ())
    return lambda x, p: (pallas_norm.group_norm(x, case.groups, p["scale"], p["bias"], eps=1e-6), ())


def _flax_apply(module: Any, x: Any) -> tuple[Callable, Any]:
    import jax

    variables = module.init(jax.random.key(0), x)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def apply(x, p):
        if not state:
            return module.apply({"params": p}, x), ()
        y, updates = module.apply({"params": p, **state}, x, mutable=list(state))
        return y, updates

    return apply, params


LARGE_OFFSET = 1e3  # the accuracy check's common offset (unit spread): one-pass variance fails here


def _reference_norm(x: Any, name: str, groups: int, eps: float) -> Any:
    """The norm in float64 NumPy (scale 1, bias 0, as initialized): the accuracy yardstick."""
    import numpy as np

    x = np.asarray(x, np.float64)
    spatial = tuple(range(1, x.ndim - 1))
    if name == "group_norm":
        grouped = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
        axes = (*spatial, grouped.ndim - 1)
        y = (grouped - grouped.mean(axes, keepdims=True)) / np.sqrt(grouped.var(axes, keepdims=True) + eps)
        return y.reshape(x.shape)
    axes = {"layer_norm": (-1,), "instance_norm": spatial, "batch_norm": tuple(range(x.ndim - 1))}[name]
    return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)


# What the compiled HLO and side-by-side prototypes showed about each norm on XLA:CPU (jaxlib 0.10.2,
# YNNPACK reduction fusions); docs/benchmarks.md has the measurements.
NORM_MECHANISMS = {
    "layer_norm": "the common case (statistics over trailing axes) has a backward that reads the saved "
                  "x - shift and writes dy * x_hat once, its per-row sums with scale matrix-vector products, "
                  "so no full-size broadcast is written; the general path (mask, other axes) writes x - "
                  "shift, the broadcasts of scale and 1/sigma, x_hat and dy * x_hat",
    "group_norm": "the common case reduces per (n, channel) first, then over each group, and its backward "
                  "reads the saved x - shift, so no reduction takes a broadcast operand; the remaining "
                  "full-size arrays are y, dx, x - shift (and bf16 dy in float32) (docs/normalization.md)",
    "instance_norm": "its statistics and backward have the shape of flax's; see docs/benchmarks.md",
    "batch_norm": "its statistics and backward have the shape of flax's; see docs/benchmarks.md",
}
# What our extra reductions compute (ours against flax's default one-pass variance).
EXTRA_REDUCTIONS = ("the accuracy shift (per statistic the mean of up to 64 spread samples, which keeps the "
                    "one-pass variance exact at large offsets, where flax's default loses every digit: see the "
                    "max-error column)")


def _norm_cause(name: str, quartiles: tuple[float, float], traffic: dict[str, Any]) -> str:
    """The gap of a missed norm row and its HLO-level cause: the compiled fwd+bwd of both sides compared
    (memory passes, full-size arrays, kernels, reductions), then what explains the difference."""
    (q1, q3), ours, flax = quartiles, traffic["ours"], traffic["flax"]
    text = f"{q3 - 1:+.0%} by upper quartile" + (" (its IQR spans 1)" if q1 <= 1 else "")
    text += (f"; HLO: ours {ours['passes']:.1f} passes over x's bytes, {ours['full_size_buffers']} full-size "
             f"arrays, {ours['kernels']} kernels, {ours['reductions']} reductions; flax {flax['passes']:.1f}, "
             f"{flax['full_size_buffers']}, {flax['kernels']}, {flax['reductions']}. ")
    if ours["passes"] <= 1.02 * flax["passes"] and ours["full_size_buffers"] <= flax["full_size_buffers"]:
        extra = ours["reductions"] - flax["reductions"]
        return text + ("Ours moves no more memory than flax, so the gap is compute, not traffic: " + (
            f"{extra} more reduction{'s' if extra > 1 else ''}, {EXTRA_REDUCTIONS}" if extra > 0 else
            "the same reductions; XLA:CPU's code for equal work"))
    return text + NORM_MECHANISMS[name]


def norm_rows(cfg: BenchConfig) -> list[Row]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxopt_lab.lab.bench import timing as bm

    rows = []
    for case in _norm_cases(cfg):
        kx, kd = jax.random.split(jax.random.key(1))
        x = (jax.random.normal(kx, case.shape, jnp.float32) * 2.0 + 5.0).astype(case.dtype)
        dy = jax.random.normal(kd, case.shape, jnp.float32).astype(case.dtype)
        flax_fast, params = _flax_apply(case.make_flax(True), x)
        flax_two_pass, _ = _flax_apply(case.make_flax(False), x)
        paths = {"ours": case.ours, "flax": flax_fast, "flax_two_pass": flax_two_pass}
        pallas = _pallas_path(case)
        if pallas is not None:  # the fused kernels, where this process can compile them (a GPU)
            paths["pallas"] = pallas
        # Compiled once, then timed and read (HLO) from the same program.
        compiled = {label: _vjp_fn(apply).lower(x, params, dy).compile() for label, apply in paths.items()}
        fns = {label: functools.partial(fn, x, params, dy) for label, fn in compiled.items()}
        fns["copy"] = functools.partial(bm.streaming_copy, x)  # the bandwidth floor, in the same run
        t = bm.time_interleaved(fns, **cfg.timing())
        moved = 4 * bm.nbytes(x)
        copy_gbps = bm.achieved_gbps(2 * bm.nbytes(x), t["copy"].median)
        gbps = {k: bm.achieved_gbps(moved, t[k].median) for k in ("ours", "flax", "flax_two_pass")}
        # What the compiled fwd+bwd does to memory (not timed): passes over x's bytes, full-size arrays.
        traffic = {k: bm.memory_traffic(compiled[k], (x, params, dy), x).as_dict() for k in ("ours", "flax")}
        # Accuracy on the same shape with a large common offset, against float64 (speed must not cost it).
        x_offset = (jax.random.normal(kx, case.shape, jnp.float32) + LARGE_OFFSET).astype(case.dtype)
        eps = 1e-5 if case.name == "batch_norm" else 1e-6
        reference = _reference_norm(x_offset, case.name, case.groups, eps)
        errors = {k: float(np.max(np.abs(np.asarray(jax.jit(apply)(x_offset, params)[0], np.float64)
                                         - reference))) for k, apply in paths.items()}
        pallas_error = errors.pop("pallas", None)
        error = errors
        extra = {"dtype": case.dtype, "gbps": gbps, "copy_gbps": copy_gbps,
                 "fraction_of_copy_bandwidth": {k: v / copy_gbps for k, v in gbps.items()},
                 "memory_traffic": traffic, "max_abs_error_at_large_offset": error}
        if case.groups:
            extra["groups"] = case.groups
        default = bm.Comparison(t["ours"], t["flax"])
        target = bm.Target("max_ratio", 1.0)
        cause = None if default.meets(target) else _norm_cause(case.name, default.ratio_quartiles, traffic)
        rows.append(_compared("norms", f"{case.name} fwd+bwd", "flax.linen default (fast variance)", case.label,
                              default, target, cause, **extra))
        if pallas is not None:
            comparison = bm.Comparison(t["pallas"], t["flax"])
            gap = (None if comparison.meets(target) else f"{comparison.ratio_quartiles[1] - 1:+.0%} by upper "
                   "quartile (a fused kernel: the HLO pass counts do not apply to its custom call)")
            rows.append(_compared(
                "norms", f"pallas_norm.{case.name} fwd+bwd", "flax.linen default (fast variance)", case.label,
                comparison, target, gap,
                **{**extra, "pallas_gbps": bm.achieved_gbps(moved, t["pallas"].median),
                   "pallas_max_abs_error_at_large_offset": pallas_error}))
        rows.append(_compared("norms", f"{case.name} fwd+bwd", "flax.linen use_fast_variance=False", case.label,
                              bm.Comparison(t["ours"], t["flax_two_pass"]), None, **extra))
    return rows


# --- a training step on digits-sized images (accumulation and GC rows) --------------------------------


def _digits_workload(cfg: BenchConfig, model: Any = None) -> tuple[Any, Any, Callable[[Any], Any]]:
    """A digits model of the real-data experiments (default: the CNN with batch norm) on a random
    (128, 8, 8, 1) batch. Returns ``(batch, momentum_sgd, state_for(tx))``; timings do not depend on
    the pixel values.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from jaxopt_lab.lab import models, training

    ki, kl, kp = jax.random.split(jax.random.key(2), 3)
    images = jax.random.normal(ki, (cfg.effective_batch, 8, 8, 1), jnp.float32)
    labels = jax.random.randint(kl, (cfg.effective_batch,), 0, 10)
    model = models.CNN() if model is None else model
    return (training.Batch(images, labels), optax.sgd(0.05, momentum=0.9),
            lambda tx: training.create_train_state(model, tx, kp, images[:1]))


def _steps(step: Callable, state: Any, batches: Sequence[Any]) -> Any:
    for batch in batches:
        state, _ = step(state, batch)
    return state


def accumulation_rows(cfg: BenchConfig) -> list[Row]:
    import jax
    import optax

    from jaxopt_lab.accumulation import microbatched_value_and_grad
    from jaxopt_lab.lab import models, training
    from jaxopt_lab.lab.bench import timing as bm

    k, n = cfg.num_microbatches, cfg.effective_batch
    target = bm.Target("max_ratio", 1.15)
    rows = []
    for label, model in (("CNN", models.CNN()), ("MLP", models.MLP())):
        batch, tx, state_for = _digits_workload(cfg, model)
        micro = jax.tree.map(lambda a: a.reshape(k, n // k, *a.shape[1:]), batch)
        micro_batches = [jax.tree.map(lambda a, i=i: a[i], micro) for i in range(k)]
        one_step = jax.jit(training.make_train_step())
        microbatched_step = jax.jit(training.make_train_step(num_microbatches=k))
        state, multi_state = state_for(tx), state_for(optax.MultiSteps(tx, every_k_schedule=k))
        fns = {
            "one batch": functools.partial(one_step, state, batch),
            "microbatched": functools.partial(microbatched_step, state, batch),
        }
        if label == "CNN":
            # As MultiSteps is used: k jitted calls, one per micro-batch, the state carried between them.
            fns["multisteps"] = functools.partial(_steps, one_step, multi_state, micro_batches)
        t = bm.time_interleaved(fns, **cfg.timing())
        shape = f"{label} (batch norm), {k}x{n // k} vs {n}"
        anchor = f"train step on one batch of {n}"
        rows.append(_compared("accumulation", f"train step, microbatched_value_and_grad {k}x{n // k}", anchor,
                              shape, bm.Comparison(t["microbatched"], t["one batch"]), target))
        if "multisteps" in t:
            rows.append(_compared("accumulation", f"train step, optax.MultiSteps {k} micro-steps", anchor,
                                  shape, bm.Comparison(t["multisteps"], t["one batch"])))

    # The gradient alone against optax's own micro-batching (a fori_loop; MEAN to match our mean loss).
    batch, _, state_for = _digits_workload(cfg, models.CNN(norm="group"))
    params = state_for(optax.identity()).params
    apply_fn = models.CNN(norm="group").apply

    def loss_fn(params, batch):
        return training.cross_entropy(apply_fn({"params": params}, batch.images, train=True), batch.labels)

    ours = jax.jit(microbatched_value_and_grad(loss_fn, k))
    optax_microbatched = jax.jit(optax.microbatch(
        jax.value_and_grad(loss_fn), argnums=1, microbatch_size=n // k,
        accumulator=optax.microbatching.AccumulationType.MEAN))
    t = bm.time_interleaved({"ours": functools.partial(ours, params, batch),
                             "optax": functools.partial(optax_microbatched, params, batch)}, **cfg.timing())
    rows.append(_compared("accumulation", f"microbatched_value_and_grad {k}x{n // k}",
                          "optax.microbatch (MEAN)", f"CNN (group norm), {k}x{n // k}",
                          bm.Comparison(t["ours"], t["optax"]), bm.Target("max_ratio", 1.05)))

    # The gradient alone against one batch of n and against its physical floor: k separate jitted calls
    # at the micro-batch size, each adding one micro-batch's (loss, gradient) to a buffer (the work
    # accumulation cannot avoid; one batch of n also profits from larger GEMMs, the floor does not). The
    # scan runs as a loop (bounded memory) and unrolled (XLA:CPU runs a conv backward inside a loop body
    # slowly, jax-ml/jax#12868; unrolling removes the loop). Memory: XLA's temporary bytes of each program.
    # Quick mode: the MLP only (the CNN's scan compiles for tens of seconds on a loaded 2-core machine).
    workloads: list[tuple[str, Any]] = [("MLP (layer norm)", models.MLP(norm="layer"))]
    if not cfg.quick:
        workloads.insert(0, ("CNN (group norm)", models.CNN(norm="group")))
    rows += [row for label, model in workloads for row in _gradient_rows(cfg, label, model, target)]
    return rows


def _accumulate_fn(loss_fn: Callable) -> Callable:
    """The floor's one jitted call: ``acc + (loss, grads)`` of one micro-batch."""
    import jax
    import jax.numpy as jnp

    value_and_grad = jax.value_and_grad(loss_fn)

    @jax.jit
    def accumulate(acc, params, micro_batch):
        return jax.tree.map(jnp.add, acc, value_and_grad(params, micro_batch))

    return accumulate


def _gradient_rows(cfg: BenchConfig, label: str, model: Any, target: Any) -> list[Row]:
    import jax
    import jax.numpy as jnp
    import optax

    from jaxopt_lab.accumulation import microbatched_value_and_grad
    from jaxopt_lab.lab import training
    from jaxopt_lab.lab.bench import timing as bm

    k, n = cfg.num_microbatches, cfg.effective_batch
    batch, _, state_for = _digits_workload(cfg, model)
    params = state_for(optax.identity()).params

    def loss_fn(params, batch):
        return training.cross_entropy(model.apply({"params": params}, batch.images, train=True), batch.labels)

    # Compiled once, then timed and read (memory_analysis) from the same program.
    looped, unrolled, full = (jax.jit(fn).lower(params, batch).compile() for fn in (
        microbatched_value_and_grad(loss_fn, k), microbatched_value_and_grad(loss_fn, k, unroll=True),
        jax.value_and_grad(loss_fn)))
    accumulate = _accumulate_fn(loss_fn)
    micro_batches = [jax.tree.map(lambda a, i=i: a[i * (n // k):(i + 1) * (n // k)], batch) for i in range(k)]
    zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), params))
    scale = jax.jit(lambda acc: jax.tree.map(lambda a: a / k, acc))

    def floor():
        acc = zeros
        for micro in micro_batches:
            acc = accumulate(acc, params, micro)
        return scale(acc)  # the mean, as microbatched_value_and_grad returns it

    t = bm.time_interleaved({"looped": functools.partial(looped, params, batch),
                             "unrolled": functools.partial(unrolled, params, batch),
                             "full": functools.partial(full, params, batch), "floor": floor}, **cfg.timing())
    shape = f"{label}, {k}x{n // k}"
    floor_anchor = f"floor: {k} jitted value_and_grad calls on {n // k}, summed"
    rows = []
    for variant, key in (("lax.scan loop", "looped"), ("unroll=True", "unrolled")):
        ours = f"microbatched_value_and_grad {k}x{n // k}, {variant}"
        rows.append(_compared("accumulation", ours, f"jax.value_and_grad on one batch of {n}", shape,
                              bm.Comparison(t[key], t["full"]), target))
        rows.append(_compared("accumulation", ours, floor_anchor, shape, bm.Comparison(t[key], t["floor"]),
                              bm.Target("max_ratio", 1.05)))
    # Memory: the micro-batched program should hold about one micro-batch's activations (1/k of the full
    # step's temporaries) plus the gradient buffer it accumulates into.
    memory = {key: bm.compiled_memory(fn, (params, batch))
              for key, fn in (("full", full), ("looped", looped), ("unrolled", unrolled))}
    grad_bytes = bm.nbytes(params)
    bound = memory["full"]["temp_bytes"] / k + grad_bytes
    for variant, key in (("lax.scan loop", "looped"), ("unroll=True", "unrolled")):
        temp = memory[key]["temp_bytes"]
        rows.append(Row("accumulation", f"temp memory, microbatched_value_and_grad {k}x{n // k}, {variant}",
                        f"full batch's temp / {k} + gradient buffer", shape, float(temp), bound, temp / bound,
                        bm.Target("max_ratio", 1.0), unit="bytes",
                        extra={"temp_bytes": memory, "gradient_bytes": grad_bytes, "bound_bytes": bound}))
    return rows


def gradient_centralization_rows(cfg: BenchConfig) -> list[Row]:
    import jax
    import optax

    from jaxopt_lab.centralization import gradient_centralization
    from jaxopt_lab.lab import training
    from jaxopt_lab.lab.bench import timing as bm

    batch, tx, state_for = _digits_workload(cfg)
    tx_gc = optax.chain(gradient_centralization(), tx)
    state, state_gc = state_for(tx), state_for(tx_gc)
    step = jax.jit(training.train_step)
    t = bm.time_interleaved({"plain": functools.partial(step, state, batch),
                             "gc": functools.partial(step, state_gc, batch)}, **cfg.timing())
    # The optimizer update alone (no forward/backward): GC's cost with nothing to hide it.
    grads = jax.tree.map(lambda p: p * 0.01, state.params)

    def update_fn(optimizer):
        @jax.jit
        def update(params, opt_state, grads):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return functools.partial(update, state.params, optimizer.init(state.params), grads)

    u = bm.time_interleaved({"plain": update_fn(tx), "gc": update_fn(tx_gc)}, **cfg.timing())
    shape = f"CNN, batch {cfg.effective_batch}"
    return [
        _compared("gradient-centralization", "train step with GC", "train step without GC (SGD momentum)",
                  shape, bm.Comparison(t["gc"], t["plain"]), bm.Target("max_ratio", 1.05)),
        _compared("gradient-centralization", "optimizer update with GC", "optimizer update without GC",
                  "CNN params", bm.Comparison(u["gc"], u["plain"])),
    ]


# --- the sweep engine -----------------------------------------------------------------------------------

SWEEP_OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
SWEEP_LEARNING_RATES = (0.001, 0.01, 0.1, 1.0)


def sweep_rows(cfg: BenchConfig) -> list[Row]:
    import jax

    from jaxopt_lab.lab import landscapes, sweep
    from jaxopt_lab.lab.bench import timing as bm

    # The optimizer grid of mission.md part F: 4 optimizers x 4 rates on the synthetic regression.
    problem = landscapes.make_regression(0)
    features = problem.data["x"].shape[1]
    specs = sweep.grid(SWEEP_LEARNING_RATES, seeds=[0], init_params=landscapes.init_linear(features))
    config = sweep.SweepConfig(steps=cfg.sweep_steps, target_loss=0.1)
    singles = [jax.tree.map(lambda a, i=i: a[i], specs) for i in range(len(SWEEP_LEARNING_RATES))]

    def vmapped():
        return sweep.run_sweep(landscapes.mse_loss, SWEEP_OPTIMIZERS, specs, problem.data, config)

    def loop():
        return [sweep.run_single(landscapes.mse_loss, name, spec, problem.data, config)
                for name in SWEEP_OPTIMIZERS for spec in singles]

    t = bm.time_interleaved({"vmapped": vmapped, "loop": loop}, **cfg.timing())
    runs = len(SWEEP_OPTIMIZERS) * len(SWEEP_LEARNING_RATES)
    return [_compared("sweep", f"{runs}-run grid, one vmapped jit", f"Python loop of {runs} jitted runs",
                      f"{runs} runs x {cfg.sweep_steps} steps", bm.Comparison(t["vmapped"], t["loop"]),
                      bm.Target("min_speedup", 10.0))]


# --- end to end -----------------------------------------------------------------------------------------


def end_to_end_rows(cfg: BenchConfig) -> list[Row]:
    if not cfg.end_to_end:
        return []
    from jaxopt_lab.lab.experiment import available_experiments

    names = list(available_experiments())
    with tempfile.TemporaryDirectory(prefix="jaxopt-lab-e2e-") as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "jaxopt_lab.lab.cli", "run", "all", "--quick",
                               "--out", out, "--no-progress"], capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    # A failing experiment is reported in its row, not allowed to discard every other measurement.
    ours = "jaxopt-lab run all --quick" + ("" if proc.returncode == 0 else f" (FAILED, exit {proc.returncode})")
    return [Row("end-to-end", ours, None, f"{len(names)} experiments", elapsed,
                extra={"experiments": names, "returncode": proc.returncode,
                       "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""})]


# --- the suite ------------------------------------------------------------------------------------------

# (group, the library modules it needs, the function producing its rows)
GROUPS: tuple[tuple[str, tuple[str, ...], Callable[[BenchConfig], list[Row]]], ...] = (
    ("norms", ("jaxopt_lab.normalization",), norm_rows),
    ("accumulation", ("jaxopt_lab.accumulation", "jaxopt_lab.lab.models", "jaxopt_lab.lab.training"),
     accumulation_rows),
    ("gradient-centralization",
     ("jaxopt_lab.centralization", "jaxopt_lab.lab.models", "jaxopt_lab.lab.training"),
     gradient_centralization_rows),
    ("sweep", ("jaxopt_lab.lab.sweep", "jaxopt_lab.lab.landscapes"), sweep_rows),
    ("end-to-end", (), end_to_end_rows),
)
GROUP_NAMES = tuple(group for group, _, _ in GROUPS)


def _missing_modules(modules: Sequence[str]) -> list[str]:
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # the module exists but is broken: that is a bug, not "not yet written"
                raise
            missing.append(module)
    return missing


def _check_groups(groups: Sequence[str] | None) -> tuple[str, ...]:
    names = tuple(group for group, _, _ in GROUPS)
    if groups is None:
        return names
    if isinstance(groups, str) or not all(isinstance(g, str) for g in groups):
        raise TypeError(f"groups must be a sequence of group names, got {groups!r}")
    unknown = [g for g in groups if g not in names]
    if unknown or not groups:
        raise ValueError(f"groups must be one or more of {', '.join(names)}; got {list(groups)!r}")
    return tuple(groups)


def collect_rows(cfg: BenchConfig, *, groups: Sequence[str] | None = None,
                 log: Callable[[str], None] = print) -> tuple[list[Row], dict[str, str]]:
    """Runs every selected group (default: all) whose modules exist; returns the rows and {group: why it
    was left out}."""
    from jaxopt_lab.lab.bench.timing import load_average

    selected = _check_groups(groups)
    rows, unavailable = [], {}
    for group, modules, make_rows in GROUPS:
        if group not in selected:
            unavailable[group] = "not selected (--group)"
            continue
        missing = _missing_modules(modules)
        if missing:
            unavailable[group] = f"not yet implemented: {', '.join(missing)}"
            log(f"[bench] {group}: skipped ({unavailable[group]})")
            continue
        start, load_before = time.perf_counter(), load_average()
        new = make_rows(cfg)
        load_after = load_average()
        for row in new:  # the machine's load while the row was measured (noisier ratios under load)
            row.extra["load_average"] = {"before": load_before, "after": load_after}
        rows += new
        log(f"[bench] {group}: {len(new)} rows in {time.perf_counter() - start:.1f} s, "
            f"load average {_fmt_load(load_before)} -> {_fmt_load(load_after)}")
    return rows, unavailable


def _figure(rows: list[Row]) -> Any:
    import numpy as np

    from jaxopt_lab.lab.plotting import new_figure

    compared = [r for r in rows if r.ratio is not None]
    norms = [r for r in rows if r.group == "norms" and r.anchor and "default" in r.anchor
             and not r.ours.startswith("pallas")]
    fig, axes = new_figure(1, 2, width=6.5, height=max(3.0, 0.35 * len(compared) + 1.2))
    ax = axes[0, 0]
    if compared:
        y = np.arange(len(compared))[::-1]
        colors = ["tab:gray" if r.met is None else ("tab:green" if r.met else "tab:red") for r in compared]
        ax.barh(y, [r.ratio for r in compared], color=colors)
        iqr = [(r.ratio - r.ratio_iqr[0], r.ratio_iqr[1] - r.ratio)
               if r.ratio_iqr is not None and r.ratio is not None else (0.0, 0.0) for r in compared]
        ax.errorbar([r.ratio for r in compared], y, xerr=np.array(iqr).T, fmt="none", ecolor="k",
                    elinewidth=0.8, capsize=2)
        for yi, r in zip(y, compared, strict=True):
            if r.target is not None:
                limit = r.target.value if r.target.kind == "max_ratio" else 1.0 / r.target.value
                ax.plot([limit, limit], [yi - 0.4, yi + 0.4], color="k", linewidth=2)
        ax.set_yticks(y, [f"{r.ours} [{r.shape}]\nvs {r.anchor}" for r in compared], fontsize=6)
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", linewidth=0.6, linestyle=":")
        ax.set_xlabel("ours / anchor, median and IQR of repetitions (lower is better; black tick = target)")
        ax.set_title("green: target met by the upper quartile, red: missed, gray: no target")
    else:
        ax.text(0.5, 0.5, "no comparison rows\n(library modules not yet available)", ha="center", va="center",
                transform=ax.transAxes)
    ax = axes[0, 1]
    if norms:
        labels = [f"{r.ours.split()[0]}\n{r.shape}" for r in norms]
        x = np.arange(len(norms))
        for i, (key, label) in enumerate((("ours", "ours"), ("flax", "flax default"),
                                          ("flax_two_pass", "flax two-pass"))):
            ax.bar(x + (i - 1) * 0.27, [100 * r.extra["fraction_of_copy_bandwidth"][key] for r in norms],
                   width=0.27, label=label)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("achieved GB/s, % of a streaming copy")
        ax.set_title("norm fwd+bwd against the memory-bandwidth floor")
        ax.legend()
    else:
        ax.set_axis_off()
    return fig


def _fmt_s(seconds: float | None, unit: str = "s") -> str:
    if seconds is None:
        return "-"
    if unit == "bytes":
        return f"{seconds / 2**20:.3g} MiB" if seconds >= 2**20 else f"{seconds / 2**10:.3g} KiB"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.1f} s"


def _fmt_load(load: Any) -> str:
    return "n/a" if load is None else "/".join(f"{v:.1f}" for v in load)


def _summary(cfg: BenchConfig, rows: list[Row], unavailable: dict[str, str], env: dict[str, Any],
             elapsed: float, load: dict[str, Any]) -> str:
    lines = ["# Benchmarks", "",
             f"Device: {env['device_count']}x {env['device_kind']} ({env['backend']}), {env['cpu_count']} CPU "
             f"cores; JAX {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, optax {env['optax']}. "
             f"Mode: {'quick' if cfg.quick else 'full'}: {cfg.repeats} interleaved repetitions per row; "
             f"ours/anchor is the median of the per-repetition ratios, IQR their quartiles, and a target is "
             f"met only when the upper quartile meets it. Load average (1/5/15 min) at the start "
             f"{_fmt_load(load['start'])}, at the end {_fmt_load(load['end'])}.", "",
             "| group | ours | anchor | shape | ours | anchor | ours/anchor | IQR | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else (f"{r.ratio:.3g}" if r.ratio >= 0.1 else f"{r.ratio:.3g} "
                                             f"({1 / r.ratio:.3g}x faster)")
        iqr = "-" if r.ratio_iqr is None else f"{r.ratio_iqr[0]:.3g}-{r.ratio_iqr[1]:.3g}"
        met = {None: "-", True: "met", False: "**missed**"}[r.met]
        lines.append(f"| {r.group} | {r.ours} | {r.anchor or '-'} | {r.shape} | {_fmt_s(r.ours_s, r.unit)} | "
                     f"{_fmt_s(r.anchor_s, r.unit)} | {ratio} | {iqr} | "
                     f"{r.target.describe() if r.target else '-'} | {met} |")
    norms = [r for r in rows if r.group == "norms" and r.anchor and "default" in r.anchor
             and not r.ours.startswith("pallas")]
    if norms:
        lines += ["", "Norms against the memory-bandwidth floor (GB/s; fwd+bwd moves at least 4x the bytes of "
                  "x: read x and dy, write y and dx; the copy reads and writes x once) and, from the compiled "
                  "fwd+bwd, passes over memory (XLA's bytes accessed / bytes of x; 4 is the floor) and "
                  "full-size arrays written (2 are the outputs y and dx):", "",
                  "| norm | shape | ours | flax default | flax two-pass | streaming copy | ours / copy "
                  "| passes ours / flax | full-size arrays ours / flax "
                  "| max error ours / flax default / two-pass |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in norms:
            g, e, m = r.extra["gbps"], r.extra["max_abs_error_at_large_offset"], r.extra["memory_traffic"]
            lines.append(f"| {r.ours.split()[0]} | {r.shape} | {g['ours']:.1f} | {g['flax']:.1f} | "
                         f"{g['flax_two_pass']:.1f} | {r.extra['copy_gbps']:.1f} | "
                         f"{100 * r.extra['fraction_of_copy_bandwidth']['ours']:.0f}% | "
                         f"{m['ours']['passes']:.1f} / {m['flax']['passes']:.1f} | "
                         f"{m['ours']['full_size_buffers']} / {m['flax']['full_size_buffers']} | "
                         f"{e['ours']:.2g} / {e['flax']:.2g} / {e['flax_two_pass']:.2g} |")
        lines += ["", f"Max error: max |y - y_float64| of the forward pass on the same shape with a common "
                  f"offset of {LARGE_OFFSET:g} and unit spread; the float64 reference normalizes the same "
                  f"input, so an exact float32 computation would be off by ~1e-7 (its rounding of y), a "
                  f"bfloat16 one by ~4e-3."]
        missed = [r for r in rows if r.group == "norms" and r.cause]
        if missed:
            lines += ["", "Norm rows that missed the target, with the gap and its HLO-level cause:", ""]
            lines += [f"* {r.ours.split()[0]} {r.shape}: {r.cause}." for r in missed]
    if unavailable:
        lines += ["", "Not measured: " + "; ".join(f"{g} ({why})" for g, why in unavailable.items()) + "."]
    lines += ["", "![ratios and bandwidth](ratios.png)", "", "---",
              f"*Measured by `jaxopt-lab bench{' --quick' if cfg.quick else ''}` in {elapsed:.1f} s.*"]
    return "\n".join(lines) + "\n"


def run_benchmarks(out: str | Path = "results", *, quick: bool = False, groups: Sequence[str] | None = None,
                   log: Callable[[str], None] = print) -> Path:
    """Runs the suite (or the named ``groups`` of :data:`GROUP_NAMES`) and writes
    ``out/bench/{metrics.json, ratios.png, summary.md}`` atomically."""
    from jaxopt_lab.lab import results
    from jaxopt_lab.lab.bench.timing import benchmark_environment, load_average

    selected = _check_groups(groups)
    cfg = BenchConfig.for_mode(quick)
    env = benchmark_environment()
    start = time.perf_counter()
    rows, unavailable = collect_rows(cfg, groups=selected, log=log)
    elapsed = time.perf_counter() - start
    load = {"start": env["load_average"], "end": load_average()}
    final = Path(out) / BENCH_DIR
    with results.staging_dir(final) as staged:
        results.save_figure(_figure(rows), staged / "ratios.png")
        results.atomic_write_json(staged / "metrics.json", {
            "benchmark": "jaxopt-lab bench", "quick": quick, "groups": list(selected), "elapsed_s": elapsed,
            "environment": env,
            "config": cfg, "load_average": load, "figures": ["ratios.png"],
            "rows": [r.as_dict() for r in rows], "unavailable": unavailable})
        results.atomic_write_text(staged / "summary.md", _summary(cfg, rows, unavailable, env, elapsed, load))
    return final

