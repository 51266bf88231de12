"""The ``norms`` group: forward + backward of our norms against ``flax.linen``'s, in two contexts.

* ``vjp``: a jitted ``jax.vjp`` with a given cotangent (returning y and every cotangent) of layer,
  instance, group and batch norm against ``flax.linen`` with its default one-pass variance (the target:
  ours <= 1.0x) and with ``use_fast_variance=False``.
* ``loss``: a jitted ``jax.value_and_grad`` of the scalar ``sum(norm(x) ** 2)``, as in a training step,
  where XLA fuses the loss's cotangent into the backward; with params (gradient w.r.t. scale, bias and
  x) and x only (no scale or bias, gradient w.r.t. x), against flax's default.

On the shapes of :class:`~jaxopt_lab.lab.bench.rows.BenchConfig`, all paths of a case timed in one
interleaved run. Beside the time, a row records the achieved GB/s at the floor's traffic against a
streaming copy of the same array timed alongside, the passes over memory and full-size arrays of the
compiled HLO (ours and flax's) and their distance to :data:`PASS_FLOOR`, and (vjp) the forward's max error
at a large common offset against float64. A missed row states its gap and its HLO-level cause. "Ours" is
what a user's call runs (``implementation=None``). Where the fused Pallas kernels compile (a GPU), every
context also gets the kernel (``implementation="pallas"``) against flax and against the XLA path
(``implementation="xla"``): the figures :func:`pallas_decision` turns into the entries a run on a GPU may
add to ``_pallas.VERIFIED``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab import normalization as norm
from jaxopt_lab.lab.bench import timing as bm
from jaxopt_lab.lab.bench.rows import BenchConfig, Row, compared_row
from jaxopt_lab.normalization import _pallas as pallas_norm

__all__ = ["KERNEL", "LARGE_OFFSET", "LOSS_CONTEXT", "NORM_MECHANISMS", "PASS_FLOOR", "PASS_FLOOR_REASON",
           "VJP_CONTEXT", "XLA_ANCHOR", "NormCase", "group_norm_groups", "loss_context_paths", "norm_cases",
           "norm_cause", "norm_rows", "pallas_decision", "pallas_path", "xla_path"]

LARGE_OFFSET = 1e3  # the accuracy check's common offset (unit spread): one-pass variance fails here
ANCHOR = "flax.linen default (fast variance)"
XLA_ANCHOR = "jaxopt_lab XLA path (implementation='xla')"
KERNEL = "pallas_norm."  # the prefix of the kernel's rows
VJP_CONTEXT = "vjp"
LOSS_CONTEXT = "loss: value_and_grad of sum(y^2)"
# The passes over x's bytes below which no program of either context can go, and why.
PASS_FLOOR = 4.0
PASS_FLOOR_REASON = {
    VJP_CONTEXT: "read x and dy, write y and dx: every full-size argument and output once",
    LOSS_CONTEXT: "read x for the statistics, read it again for the loss and the backward's sums (dy = 2y is "
                  "recomputed, never an input), read it a third time to write dx: each reduction must finish "
                  "before the next stage, so an array that does not stay in cache is streamed three times, "
                  "plus dx's write",
}

# What the compiled HLO and side-by-side prototypes showed about each norm on XLA:CPU (YNNPACK reduction
# fusions); docs/benchmarks.md has the measurements.
NORM_MECHANISMS = {
    "layer_norm": "the common case (statistics over trailing axes) takes the row's mean before its centered "
                  "sums (one reduction and one dependent stage more than flax's one-pass variance) and writes "
                  "x - shift for them; its backward reads that saved x - shift and writes dy * x_hat once, its "
                  "per-row sums with scale matrix-vector products, so no full-size broadcast is written, and "
                  "without scale or bias takes x_hat as the forward computed it; the general path (mask, other "
                  "axes) writes x - shift, the broadcasts of scale and 1/sigma, x_hat and dy * x_hat",
    "group_norm": "the common case reduces per (n, channel) first, then over each group, and its backward "
                  "reads the saved x - shift, so no reduction takes a broadcast operand; the remaining "
                  "full-size arrays are y, dx, x - shift (and bf16 dy in float32) (docs/normalization.md)",
    "instance_norm": "its statistics and backward have the shape of flax's; see docs/benchmarks.md",
    "batch_norm": "its statistics and backward have the shape of flax's; see docs/benchmarks.md",
}
# What our extra reductions compute (ours against flax's default one-pass variance), per norm.
_SAMPLED_SHIFT = ("the accuracy shift (per statistic the mean of up to 64 spread samples, which keeps the "
                  "one-pass variance exact at large offsets, where flax's default loses every digit: see the "
                  "max-error column)")
EXTRA_REDUCTIONS = {
    "layer_norm": "the accuracy shift (the row's mean, summed before the centered sums, a dependent stage that "
                  "flax's one-pass E[x^2] - E[x]^2 does not have; it keeps y exact at large offsets, where "
                  "flax's default loses every digit: see the max-error column)",
    "instance_norm": _SAMPLED_SHIFT, "group_norm": _SAMPLED_SHIFT, "batch_norm": _SAMPLED_SHIFT,
}

Apply = Callable[[Any, Any], Any]  # (x, params) -> (y, aux)


def group_norm_groups(channels: int) -> int:
    """The groups of the group-norm rows: 32 (Wu & He's default) where C allows 2+ channels a group."""
    return max(1, min(32, channels // 2))


@dataclasses.dataclass(frozen=True)
class NormCase:
    """One norm row: ours ``(x, params) -> (y, aux)`` and flax's module ``make_flax(use_fast_variance,
    affine)``; ours without params takes ``{}`` and flax's then has ``use_scale=use_bias=False``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    ours: Apply
    make_flax: Callable[[bool, bool], Any]
    groups: int = 0

    @property
    def label(self) -> str:
        dtype = "" if self.dtype == "float32" else f" {self.dtype}"
        return "x".join(map(str, self.shape)) + dtype


def _cases_for_shape(shape: tuple[int, ...], dtype: Any, names: tuple[str, ...]) -> list[NormCase]:
    channels, groups = shape[-1], group_norm_groups(shape[-1])
    stats = norm.batch_norm_init(channels)
    dtype_name = jnp.dtype(dtype).name
    # params {} (no scale, no bias) gives None to ours: the "x only" loss context.
    ours: dict[str, Apply] = {
        "layer_norm": lambda x, p: (norm.layer_norm(x, p.get("scale"), p.get("bias"), eps=1e-6), ()),
        "instance_norm": lambda x, p: (norm.instance_norm(x, p.get("scale"), p.get("bias"), eps=1e-6), ()),
        "group_norm": lambda x, p: (norm.group_norm(x, groups, p.get("scale"), p.get("bias"), eps=1e-6), ()),
        "batch_norm": lambda x, p: norm.batch_norm(x, stats, p.get("scale"), p.get("bias"), training=True,
                                                   eps=1e-5),
    }
    flax: dict[str, Callable[[bool, bool], Any]] = {
        "layer_norm": lambda fast, affine: nn.LayerNorm(use_fast_variance=fast, use_scale=affine,
                                                        use_bias=affine, dtype=dtype),
        "instance_norm": lambda fast, affine: nn.InstanceNorm(use_fast_variance=fast, use_scale=affine,
                                                              use_bias=affine, dtype=dtype),
        "group_norm": lambda fast, affine: nn.GroupNorm(num_groups=groups, use_fast_variance=fast,
                                                        use_scale=affine, use_bias=affine, dtype=dtype),
        "batch_norm": lambda fast, affine: nn.BatchNorm(use_running_average=False, epsilon=1e-5,
                                                        use_fast_variance=fast, use_scale=affine,
                                                        use_bias=affine, dtype=dtype),
    }
    return [NormCase(name, shape, dtype_name, ours[name], flax[name], groups if name == "group_norm" else 0)
            for name in names]


def norm_cases(cfg: BenchConfig) -> list[NormCase]:
    """Layer norm on the tokens shapes, then all four norms on every NHWC shape (float32, then bfloat16)."""
    every_norm = ("layer_norm", "instance_norm", "group_norm", "batch_norm")
    plan: list[tuple[tuple[int, ...], Any, tuple[str, ...]]]
    plan = [(shape, jnp.float32, ("layer_norm",)) for shape in cfg.tokens_shapes]
    plan += [(shape, jnp.float32, every_norm) for shape in cfg.nhwc_shapes]
    plan += [(shape, jnp.bfloat16, every_norm) for shape in cfg.bf16_shapes]
    return [case for shape, dtype, names in plan for case in _cases_for_shape(shape, dtype, names)]


def _explicit_path(case: NormCase, implementation: pallas_norm.Implementation) -> Apply:
    """``case``'s norm with ``implementation`` given (layer and group norm have the keyword)."""
    if case.name == "layer_norm":
        return lambda x, p: (norm.layer_norm(x, p.get("scale"), p.get("bias"), eps=1e-6,
                                             implementation=implementation), ())
    return lambda x, p: (norm.group_norm(x, case.groups, p.get("scale"), p.get("bias"), eps=1e-6,
                                         implementation=implementation), ())


def pallas_path(case: NormCase) -> Apply | None:
    """``case``'s norm through the fused Pallas kernel (``implementation="pallas"``), or None where it
    cannot compile here.

    Only layer norm (over the last axis) and group norm have kernels; they need a GPU backend
    (``pallas_norm.available()``) and a shape the Triton lowering takes (``pallas_norm.supported``).
    """
    if case.name not in pallas_norm.KERNELS or not pallas_norm.available():
        return None
    if not pallas_norm.supported(case.shape, case.groups or None):
        return None
    return _explicit_path(case, "pallas")


def xla_path(case: NormCase) -> Apply:
    """``case``'s norm on the XLA path whatever ``_pallas.VERIFIED`` holds (``implementation="xla"`` where
    the norm has the keyword), the yardstick of the kernel."""
    return _explicit_path(case, "xla") if case.name in pallas_norm.KERNELS else case.ours


def _vjp_fn(apply: Apply) -> Any:
    """Jitted forward + backward of ``apply(x, params) -> (y, aux)``: returns y, aux and (dx, dparams)."""

    @jax.jit
    def fwd_bwd(x, params, dy):
        y, vjp, aux = jax.vjp(apply, x, params, has_aux=True)
        return y, aux, vjp(dy)

    return fwd_bwd


def _loss_context_fn(apply: Apply, with_params: bool) -> Any:
    """Jitted ``value_and_grad`` of ``sum(apply(x, params)[0] ** 2)`` as ``fn(params, x) -> ((loss, aux),
    grads)``: grads are (dparams, dx) with params, dx alone without."""

    def loss(params, x):
        y, aux = apply(x, params)
        return jnp.sum(y**2), aux  # jnp.sum accumulates a bfloat16 y in float32

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1) if with_params else 1, has_aux=True))


def loss_context_paths(case: NormCase, x: jax.Array, kernel: Apply | None = None
                       ) -> dict[str, tuple[Any, Any]]:
    """The loss-context programs of ``case``: ``{"ours"|"flax"} + {"_loss" (with params)|"_loss_x" (x
    only)}`` -> ``(fn, params)``, ``fn(params, x)`` being :func:`_loss_context_fn` of that side; flax's
    default module, its initial params shared by every side. With ``kernel`` (:func:`pallas_path`) also
    ``"pallas"`` and ``"xla"`` (:func:`xla_path`) sides."""
    flax_affine, params = _flax_apply(case.make_flax(True, True), x)
    flax_x_only, no_params = _flax_apply(case.make_flax(True, False), x)
    ours: dict[str, Apply] = {"ours": case.ours}
    if kernel is not None:
        ours |= {"pallas": kernel, "xla": xla_path(case)}
    programs = {}
    for suffix, with_params, flax, side_params in (("_loss", True, flax_affine, params),
                                                   ("_loss_x", False, flax_x_only, no_params)):
        for side, apply in (ours | {"flax": flax}).items():
            programs[side + suffix] = (_loss_context_fn(apply, with_params), side_params)
    return programs


def _flax_apply(module: nn.Module, x: jax.Array) -> tuple[Apply, Any]:
    """``module`` as ``(x, params) -> (y, updated state)`` and its initial params (``{}`` for none)."""
    variables = module.init(jax.random.key(0), x)
    params, state = variables.get("params", {}), {k: v for k, v in variables.items() if k != "params"}

    def apply(x, p):
        if not state:
            return module.apply({"params": p}, x), ()
        return module.apply({"params": p, **state}, x, mutable=list(state))

    return apply, params


def _reference_norm(x: Any, name: str, groups: int, eps: float) -> np.ndarray:
    """The norm in float64 NumPy (scale 1, bias 0, as initialized): the accuracy yardstick."""
    x = np.asarray(x, np.float64)
    spatial = tuple(range(1, x.ndim - 1))
    if name == "group_norm":
        grouped = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
        axes = (*spatial, grouped.ndim - 1)
        y = (grouped - grouped.mean(axes, keepdims=True)) / np.sqrt(grouped.var(axes, keepdims=True) + eps)
        return y.reshape(x.shape)
    axes = {"layer_norm": (-1,), "instance_norm": spatial, "batch_norm": tuple(range(x.ndim - 1))}[name]
    return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)


def norm_cause(name: str, quartiles: tuple[float, float], traffic: dict[str, Any]) -> str:
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
            f"{extra} more reduction{'s' if extra > 1 else ''}, {EXTRA_REDUCTIONS[name]}" if extra > 0 else
            "the same reductions; XLA:CPU's code for equal work"))
    return text + NORM_MECHANISMS[name]


def _max_errors(case: NormCase, paths: dict[str, Apply], params: Any, key: jax.Array) -> dict[str, float]:
    """max |y - y_float64| of each path's forward at :data:`LARGE_OFFSET` (speed must not cost accuracy)."""
    x = (jax.random.normal(key, case.shape, jnp.float32) + LARGE_OFFSET).astype(case.dtype)
    eps = 1e-5 if case.name == "batch_norm" else 1e-6
    reference = _reference_norm(x, case.name, case.groups, eps)
    return {k: float(np.max(np.abs(np.asarray(jax.jit(apply)(x, params)[0], np.float64) - reference)))
            for k, apply in paths.items()}


def _floor_distance(traffic: dict[str, Any]) -> dict[str, float]:
    """Each side's passes over x's bytes as a multiple of :data:`PASS_FLOOR` (1.0: at the floor)."""
    return {side: t["passes"] / PASS_FLOOR for side, t in traffic.items()}


def _context_extras(context: str, traffic: dict[str, Any]) -> dict[str, Any]:
    return {"context": context, "memory_traffic": traffic, "pass_floor": PASS_FLOOR,
            "pass_floor_reason": PASS_FLOOR_REASON[context], "passes_over_floor": _floor_distance(traffic)}


def _case_rows(cfg: BenchConfig, case: NormCase) -> list[Row]:
    kx, kd = jax.random.split(jax.random.key(1))
    x = (jax.random.normal(kx, case.shape, jnp.float32) * 2.0 + 5.0).astype(case.dtype)
    dy = jax.random.normal(kd, case.shape, jnp.float32).astype(case.dtype)
    flax_fast, params = _flax_apply(case.make_flax(True, True), x)
    flax_two_pass, _ = _flax_apply(case.make_flax(False, True), x)
    paths = {"ours": case.ours, "flax": flax_fast, "flax_two_pass": flax_two_pass}
    pallas = pallas_path(case)
    if pallas is not None:  # the fused kernels where this process compiles them (a GPU), and their yardstick
        paths |= {"pallas": pallas, "xla": xla_path(case)}
    # Compiled once, then timed and read (HLO) from the same program.
    compiled = {label: _vjp_fn(apply).lower(x, params, dy).compile() for label, apply in paths.items()}
    fns = {label: functools.partial(fn, x, params, dy) for label, fn in compiled.items()}
    loss_args: dict[str, tuple[Any, ...]] = {}
    if cfg.loss_context_at(case.shape, case.dtype):
        for label, (fn, fn_params) in loss_context_paths(case, x, pallas).items():
            loss_args[label] = (fn_params, x)
            compiled[label] = fn.lower(fn_params, x).compile()
            fns[label] = functools.partial(compiled[label], fn_params, x)
    fns["copy"] = functools.partial(bm.streaming_copy, x)  # the bandwidth floor, in the same run
    t = bm.time_interleaved(fns, **cfg.timing())
    moved = int(PASS_FLOOR) * bm.nbytes(x)
    copy_gbps = bm.achieved_gbps(2 * bm.nbytes(x), t["copy"].median)
    gbps = {k: bm.achieved_gbps(moved, t[k].median) for k in ("ours", "flax", "flax_two_pass")}
    # What the compiled fwd+bwd does to memory (not timed): passes over x's bytes, full-size arrays.
    traffic = {k: bm.memory_traffic(compiled[k], (x, params, dy), x).as_dict() for k in ("ours", "flax")}
    errors = _max_errors(case, paths, params, kx)
    pallas_error = errors.pop("pallas", None)
    errors.pop("xla", None)
    common: dict[str, Any] = {"dtype": case.dtype, "copy_gbps": copy_gbps}
    if case.groups:
        common["groups"] = case.groups
    extra: dict[str, Any] = {**common, "gbps": gbps, **_context_extras(VJP_CONTEXT, traffic),
                             "fraction_of_copy_bandwidth": {k: v / copy_gbps for k, v in gbps.items()},
                             "max_abs_error_at_large_offset": errors}

    target = bm.Target("max_ratio", 1.0)
    default = bm.Comparison(t["ours"], t["flax"])
    cause = None if default.meets(target) else norm_cause(case.name, default.ratio_quartiles, traffic)
    vjp_name = f"{case.name} fwd+bwd ({VJP_CONTEXT})"
    rows = [compared_row("norms", vjp_name, ANCHOR, case.label, default, target, cause, **extra)]
    if pallas is not None:
        rows += _kernel_rows(t, "", vjp_name, case, **extra,
                             pallas_gbps=bm.achieved_gbps(moved, t["pallas"].median),
                             pallas_max_abs_error_at_large_offset=pallas_error)
    rows.append(compared_row("norms", vjp_name, "flax.linen use_fast_variance=False", case.label,
                             bm.Comparison(t["ours"], t["flax_two_pass"]), **extra))

    for suffix, params_label in (("_loss", "with params"), ("_loss_x", "x only")):
        if "ours" + suffix not in loss_args:
            continue
        ours_key, flax_key = "ours" + suffix, "flax" + suffix
        traffic = {side: bm.memory_traffic(compiled[key], loss_args[key], x).as_dict()
                   for side, key in (("ours", ours_key), ("flax", flax_key))}
        loss_gbps = {side: bm.achieved_gbps(moved, t[key].median)
                     for side, key in (("ours", ours_key), ("flax", flax_key))}
        comparison = bm.Comparison(t[ours_key], t[flax_key])
        cause = None if comparison.meets(target) else norm_cause(case.name, comparison.ratio_quartiles, traffic)
        loss_extra = {**common, **_context_extras(LOSS_CONTEXT, traffic), "params": params_label}
        loss_name = f"{case.name} {LOSS_CONTEXT}, {params_label}"
        rows.append(compared_row("norms", loss_name, ANCHOR, case.label, comparison, target, cause,
                                 **loss_extra, gbps=loss_gbps,
                                 fraction_of_copy_bandwidth={k: v / copy_gbps for k, v in loss_gbps.items()}))
        if pallas is not None:
            rows += _kernel_rows(t, suffix, loss_name, case, **loss_extra)
    return rows


def _kernel_rows(t: Mapping[str, bm.Timing], suffix: str, name: str, case: NormCase, **extra: Any) -> list[Row]:
    """The kernel's rows of one context (keys ``"pallas" + suffix`` ...): against flax's default and against
    the XLA path, the latter what :func:`pallas_decision` reads. A missed row states its gap only: the HLO
    pass counts do not see into the kernel's custom call."""
    target, rows = bm.Target("max_ratio", 1.0), []
    for anchor, key in ((ANCHOR, "flax"), (XLA_ANCHOR, "xla")):
        comparison = bm.Comparison(t["pallas" + suffix], t[key + suffix])
        gap = (None if comparison.meets(target) else
               f"{comparison.ratio_quartiles[1] - 1:+.0%} by upper quartile (a fused kernel)")
        rows.append(compared_row("norms", KERNEL + name, anchor, case.label, comparison, target, gap,
                                 kernel=case.name, **extra))
    return rows


def pallas_decision(rows: Sequence[Mapping[str, Any]], backend: str) -> str:
    """Markdown: per kernel, dtype, shape and context, the kernel against the XLA path and flax, and the
    ``_pallas.VERIFIED`` keys these rows justify on ``backend``.

    ``rows`` are the ``rows`` of a ``jaxopt-lab bench --group norms`` ``metrics.json``, run where the kernels
    compile. A ``(norm, backend, dtype)`` is justified when its kernel met ``<= 1.0x`` the XLA path by the
    upper quartile in every row (every supported shape, the vjp and both loss contexts); its compiled tests
    (``JAXOPT_LAB_PALLAS_COMPILED=1 pytest tests/test_pallas_norm.py``) must have passed as well.
    """
    kernel = [r for r in rows if r.get("group") == "norms" and r["ours"].startswith(KERNEL)]
    against_flax = {(r["ours"], r["shape"]): r for r in kernel if r["anchor"] == ANCHOR}
    lines = ["| norm | dtype | shape | context | kernel / XLA path (IQR) | kernel / flax (IQR) | met |",
             "|---|---|---|---|---|---|---|"]
    verdicts: dict[tuple[str, str], bool] = {}
    for r in (r for r in kernel if r["anchor"] == XLA_ANCHOR):
        flax = against_flax.get((r["ours"], r["shape"]))
        context = r["context"] + (f", {r['params']}" if r.get("params") else "")
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['shape']} | {context} | {_ratio_cell(r)} | "
                     f"{_ratio_cell(flax)} | {'met' if r['met'] else '**missed**'} |")
        key = (r["kernel"], r["dtype"])
        verdicts[key] = verdicts.get(key, True) and bool(r["met"])
    if not verdicts:
        return "No kernel rows: the Pallas kernels do not compile where this bench ran (no GPU backend).\n"
    justified = [f"Verified({name!r}, {backend!r}, {dtype!r})" for (name, dtype), ok in verdicts.items() if ok]
    lines += ["", "Justified VERIFIED keys (met in every row of that norm and dtype): "
              + (", ".join(justified) if justified else "none")]
    return "\n".join(lines) + "\n"


def _ratio_cell(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "-"
    return f"{row['ratio']:.2f} ({row['ratio_q1']:.2f}-{row['ratio_q3']:.2f})"


def norm_rows(cfg: BenchConfig) -> list[Row]:
    """The ``norms`` group: per case, the vjp against flax's default (and the Pallas kernels where they
    compile), then against flax's two-pass variance, then (where ``cfg.loss_context_at``) the loss context
    with params and x only against flax's default."""
    return [row for case in norm_cases(cfg) for row in _case_rows(cfg, case)]
