"""The suite: which function measures each group, and the run that writes ``OUT/bench/``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxopt_lab.lab import results
from jaxopt_lab.lab.bench.accumulation import accumulation_rows
from jaxopt_lab.lab.bench.centralization import gradient_centralization_rows
from jaxopt_lab.lab.bench.end_to_end import end_to_end_rows
from jaxopt_lab.lab.bench.groups import GROUP_NAMES, check_groups
from jaxopt_lab.lab.bench.norms import norm_rows
from jaxopt_lab.lab.bench.report import figure, format_load, summary
from jaxopt_lab.lab.bench.rows import BenchConfig, Row
from jaxopt_lab.lab.bench.sweep import sweep_rows
from jaxopt_lab.lab.bench.timing import benchmark_environment, load_average

__all__ = ["BENCH_DIR", "GROUPS", "collect_rows", "run_benchmarks"]

BENCH_DIR = "bench"

# group name -> the function producing its rows; the keys are GROUP_NAMES, in order (a test checks).
GROUPS: dict[str, Callable[[BenchConfig], list[Row]]] = {
    "norms": norm_rows,
    "accumulation": accumulation_rows,
    "gradient-centralization": gradient_centralization_rows,
    "sweep": sweep_rows,
    "end-to-end": end_to_end_rows,
}


def collect_rows(cfg: BenchConfig, *, groups: Sequence[str] | None = None,
                 log: Callable[[str], None] = print) -> list[Row]:
    """Runs every selected group (default: all) and returns their rows, each with the host's load average
    before and after its group (ratios measured under load are noisier)."""
    selected = check_groups(groups)
    rows: list[Row] = []
    for group in GROUP_NAMES:
        if group not in selected:
            continue
        start, load_before = time.perf_counter(), load_average()
        new = GROUPS[group](cfg)
        load_after = load_average()
        for row in new:
            row.extra["load_average"] = {"before": load_before, "after": load_after}
        rows += new
        log(f"[bench] {group}: {len(new)} rows in {time.perf_counter() - start:.1f} s, "
            f"load average {format_load(load_before)} -> {format_load(load_after)}")
    return rows


def run_benchmarks(out: str | Path = "results", *, quick: bool = False, groups: Sequence[str] | None = None,
                   log: Callable[[str], None] = print) -> Path:
    """Runs the suite (or the named ``groups`` of :data:`GROUP_NAMES`) and writes
    ``out/bench/{metrics.json, ratios.png, summary.md}`` atomically; returns ``out/bench``."""
    selected = check_groups(groups)
    not_selected = [g for g in GROUP_NAMES if g not in selected]
    cfg = BenchConfig.for_mode(quick)
    env = benchmark_environment()
    start = time.perf_counter()
    rows = collect_rows(cfg, groups=selected, log=log)
    elapsed = time.perf_counter() - start
    load = {"start": env["load_average"], "end": load_average()}
    final = Path(out) / BENCH_DIR
    with results.staging_dir(final) as staged:
        results.save_figure(figure(rows), staged / "ratios.png")
        results.atomic_write_json(staged / "metrics.json", {
            "benchmark": "jaxopt-lab bench", "quick": quick, "groups": list(selected),
            "not_selected": not_selected, "elapsed_s": elapsed, "environment": env, "config": cfg,
            "load_average": load, "figures": ["ratios.png"], "rows": [r.as_dict() for r in rows]})
        results.atomic_write_text(staged / "summary.md", summary(cfg, rows, not_selected, env, elapsed, load))
    return final
