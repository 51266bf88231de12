"""What a bench run shows: the ratios figure (``ratios.png``) and the summary (``summary.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from jaxopt_lab.lab.bench.groups import GROUP_NAMES
from jaxopt_lab.lab.bench.norms import LARGE_OFFSET, LOSS_CONTEXT, PASS_FLOOR, PASS_FLOOR_REASON, VJP_CONTEXT
from jaxopt_lab.lab.bench.rows import BenchConfig, Row
from jaxopt_lab.lab.plotting import new_figure

__all__ = ["figure", "format_load", "summary"]

BANDWIDTH_SIDES = (("ours", "ours"), ("flax", "flax default"), ("flax_two_pass", "flax two-pass"))


def format_load(load: Sequence[float] | None) -> str:
    """A load average as ``1.0/0.5/0.2`` (1, 5, 15 min), or ``n/a``."""
    return "n/a" if load is None else "/".join(f"{v:.1f}" for v in load)


def _format_amount(value: float | None, unit: str = "s") -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return f"{value / 2**20:.3g} MiB" if value >= 2**20 else f"{value / 2**10:.3g} KiB"
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.1f} s"


def _norms_against_flax_default(rows: Sequence[Row], context: str = VJP_CONTEXT) -> list[Row]:
    """The XLA norm rows of ``context`` against flax's default: the ones with bandwidth and traffic
    columns (and, for the vjp, error columns)."""
    return [r for r in rows if r.group == "norms" and r.anchor and "default" in r.anchor
            and not r.ours.startswith("pallas") and r.extra.get("context") == context]


def _plot_ratios(ax: Any, compared: Sequence[Row]) -> None:
    y = np.arange(len(compared))[::-1]
    ratios = [r.ratio for r in compared]
    colors = ["tab:gray" if r.met is None else ("tab:green" if r.met else "tab:red") for r in compared]
    ax.barh(y, ratios, color=colors)
    iqr = [(r.ratio - r.ratio_iqr[0], r.ratio_iqr[1] - r.ratio)
           if r.ratio_iqr is not None and r.ratio is not None else (0.0, 0.0) for r in compared]
    ax.errorbar(ratios, y, xerr=np.array(iqr).T, fmt="none", ecolor="k", elinewidth=0.8, capsize=2)
    for yi, r in zip(y, compared, strict=True):
        if r.target is not None:
            limit = r.target.value if r.target.kind == "max_ratio" else 1.0 / r.target.value
            ax.plot([limit, limit], [yi - 0.4, yi + 0.4], color="k", linewidth=2)
    ax.set_yticks(y, [f"{r.ours} [{r.shape}]\nvs {r.anchor}" for r in compared], fontsize=6)
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", linewidth=0.6, linestyle=":")
    ax.set_xlabel("ours / anchor, median and IQR of repetitions (lower is better; black tick = target)")
    ax.set_title("green: target met by the upper quartile, red: missed, gray: no target")


def _plot_bandwidth(ax: Any, norms: Sequence[Row]) -> None:
    x = np.arange(len(norms))
    for i, (key, label) in enumerate(BANDWIDTH_SIDES):
        ax.bar(x + (i - 1) * 0.27, [100 * r.extra["fraction_of_copy_bandwidth"][key] for r in norms],
               width=0.27, label=label)
    ax.set_xticks(x, [f"{r.ours.split()[0]}\n{r.shape}" for r in norms], fontsize=7)
    ax.set_ylabel("achieved GB/s, % of a streaming copy")
    ax.set_title(f"norm fwd+bwd ({VJP_CONTEXT}) against the memory-bandwidth floor")
    ax.legend()


def figure(rows: Sequence[Row]) -> Figure:
    """Left: every compared row's ratio with its IQR and target; right: the norms' share of copy bandwidth."""
    compared = [r for r in rows if r.ratio is not None]
    norms = _norms_against_flax_default(rows)
    fig, axes = new_figure(1, 2, width=6.5, height=max(3.0, 0.35 * len(compared) + 1.2))
    if compared:
        _plot_ratios(axes[0, 0], compared)
    else:
        axes[0, 0].text(0.5, 0.5, "no comparison rows\n(no group with comparisons was selected)",
                        ha="center", va="center", transform=axes[0, 0].transAxes)
    if norms:
        _plot_bandwidth(axes[0, 1], norms)
    else:
        axes[0, 1].set_axis_off()
    return fig


def _row_line(r: Row) -> str:
    ratio = "-" if r.ratio is None else (f"{r.ratio:.3g}" if r.ratio >= 0.1 else f"{r.ratio:.3g} "
                                         f"({1 / r.ratio:.3g}x faster)")
    iqr = "-" if r.ratio_iqr is None else f"{r.ratio_iqr[0]:.3g}-{r.ratio_iqr[1]:.3g}"
    met = {None: "-", True: "met", False: "**missed**"}[r.met]
    return (f"| {r.group} | {r.ours} | {r.anchor or '-'} | {r.shape} | {_format_amount(r.ours_s, r.unit)} | "
            f"{_format_amount(r.anchor_s, r.unit)} | {ratio} | {iqr} | "
            f"{r.target.describe() if r.target else '-'} | {met} |")


def _norm_lines(rows: Sequence[Row]) -> list[str]:
    """The norms' bandwidth, HLO traffic and accuracy table, and every missed norm row's cause."""
    norms = _norms_against_flax_default(rows)
    if not norms:
        return []
    lines = ["", f"Norms ({VJP_CONTEXT}) against the memory-bandwidth floor (GB/s; fwd+bwd moves at least "
             "4x the bytes of x: read x and dy, write y and dx; the copy reads and writes x once) and, from "
             "the compiled fwd+bwd, passes over memory (XLA's bytes accessed / bytes of x; 4 is the floor) and "
             "full-size arrays written (2 are the outputs y and dx):", "",
             "| norm | shape | ours | flax default | flax two-pass | streaming copy | ours / copy "
             f"| passes ours / flax | passes / floor of {PASS_FLOOR:g}, ours / flax "
             "| full-size arrays ours / flax | max error ours / flax default / two-pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in norms:
        g, e, m = r.extra["gbps"], r.extra["max_abs_error_at_large_offset"], r.extra["memory_traffic"]
        lines.append(f"| {r.ours.split()[0]} | {r.shape} | {g['ours']:.1f} | {g['flax']:.1f} | "
                     f"{g['flax_two_pass']:.1f} | {r.extra['copy_gbps']:.1f} | "
                     f"{100 * r.extra['fraction_of_copy_bandwidth']['ours']:.0f}% | "
                     f"{m['ours']['passes']:.1f} / {m['flax']['passes']:.1f} | {_floor_cell(r)} | "
                     f"{m['ours']['full_size_buffers']} / {m['flax']['full_size_buffers']} | "
                     f"{e['ours']:.2g} / {e['flax']:.2g} / {e['flax_two_pass']:.2g} |")
    lines += ["", f"Max error: max |y - y_float64| of the forward pass on the same shape with a common "
              f"offset of {LARGE_OFFSET:g} and unit spread; the float64 reference normalizes the same "
              f"input, so an exact float32 computation would be off by ~1e-7 (its rounding of y), a "
              f"bfloat16 one by ~4e-3."]
    lines += _loss_context_lines(rows)
    missed = [r for r in rows if r.group == "norms" and r.cause]
    if missed:
        lines += ["", "Norm rows that missed the target, with the gap and its HLO-level cause:", ""]
        lines += [f"* {r.ours} {r.shape}: {r.cause}." for r in missed]
    return lines


def _floor_cell(r: Row) -> str:
    distance = r.extra["passes_over_floor"]
    return f"{distance['ours']:.1f}x / {distance['flax']:.1f}x"


def _loss_context_lines(rows: Sequence[Row]) -> list[str]:
    """The loss-context rows' ratio, HLO traffic and distance to the pass floor, with and without params."""
    loss = _norms_against_flax_default(rows, LOSS_CONTEXT)
    if not loss:
        return []
    lines = ["", f"Norms in a loss context ({LOSS_CONTEXT}, as in a training step; with params: gradient "
             f"w.r.t. scale, bias and x; x only: no scale or bias, gradient w.r.t. x) against flax's default. "
             f"GB/s count {PASS_FLOOR:g}x the bytes of x; the pass floor is {PASS_FLOOR:g}: "
             f"{PASS_FLOOR_REASON[LOSS_CONTEXT]} (vjp: {PASS_FLOOR_REASON[VJP_CONTEXT]}).", "",
             "| norm | params | shape | ours/flax | IQR | met | GB/s ours / flax / copy | passes ours / flax "
             f"| passes / floor of {PASS_FLOOR:g}, ours / flax | full-size arrays ours / flax |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in loss:
        g, m = r.extra["gbps"], r.extra["memory_traffic"]
        iqr = "-" if r.ratio_iqr is None else f"{r.ratio_iqr[0]:.3g}-{r.ratio_iqr[1]:.3g}"
        lines.append(f"| {r.ours.split()[0]} | {r.extra['params']} | {r.shape} | {r.ratio:.3g} | {iqr} | "
                     f"{'met' if r.met else '**missed**'} | {g['ours']:.1f} / {g['flax']:.1f} / "
                     f"{r.extra['copy_gbps']:.1f} | {m['ours']['passes']:.1f} / {m['flax']['passes']:.1f} | "
                     f"{_floor_cell(r)} | {m['ours']['full_size_buffers']} / "
                     f"{m['flax']['full_size_buffers']} |")
    return lines


def summary(cfg: BenchConfig, rows: Sequence[Row], not_selected: Sequence[str], env: dict[str, Any],
            elapsed: float, load: dict[str, Any]) -> str:
    """The markdown of ``summary.md``: the environment, every row, the norms' detail, what was not run."""
    lines = ["# Benchmarks", "",
             f"Device: {env['device_count']}x {env['device_kind']} ({env['backend']}), {env['cpu_count']} CPU "
             f"cores; JAX {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, optax {env['optax']}. "
             f"Mode: {'quick' if cfg.quick else 'full'}: {cfg.repeats} interleaved repetitions per row; "
             f"ours/anchor is the median of the per-repetition ratios, IQR their quartiles, and a target is "
             f"met only when the upper quartile meets it. Load average (1/5/15 min) at the start "
             f"{format_load(load['start'])}, at the end {format_load(load['end'])}.", "",
             "| group | ours | anchor | shape | ours | anchor | ours/anchor | IQR | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row_line(r) for r in rows]
    lines += _norm_lines(rows)
    if not_selected:
        lines += ["", f"Not measured (not selected with --group): {', '.join(not_selected)}."]
    command = "jaxopt-lab bench" + (" --quick" if cfg.quick else "")
    if not_selected:
        command += "".join(f" --group {g}" for g in GROUP_NAMES if g not in not_selected)
    lines += ["", "![ratios and bandwidth](ratios.png)", "", "---",
              f"*Measured by `{command}` in {elapsed:.1f} s.*"]
    return "\n".join(lines) + "\n"
