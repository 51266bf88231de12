"""learning-rate: too high, too low and a good rate on one problem; `diagnose`; the LR range test.

Tests claims of the course notes (docs/claims.md). A fine log grid of rates x init seeds for SGD and momentum
runs as one
vmapped sweep; every history is labelled by :func:`jaxopt_lab.lab.diagnostics.diagnose` (the "how can we
detect it" half of the question), and Smith's LR range test — one run per seed with an exponentially
growing rate, vmapped over seeds — suggests a rate that is set against the grid's best.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxopt_lab.lab import diagnostics, landscapes, sweep
from jaxopt_lab.lab.experiment import Experiment, RunContext, check_modes
from jaxopt_lab.lab.plotting import new_figure, plot_loss_curves
from jaxopt_lab.lab.runner import main_for
from jaxopt_lab.lab.verdicts import reading

NAME = "learning-rate"
OPTIMIZER_NAMES = ("sgd", "momentum")
LABEL_COLORS = {"ok": "tab:green", "too slow": "tab:blue", "stalled": "tab:purple", "oscillating": "tab:orange",
                "diverging": "tab:red"}


@dataclasses.dataclass(frozen=True)
class Config:
    min_rate: float = 1e-3
    max_rate: float = 3.0
    num_rates: int = 31
    init_seeds: int = 5
    steps: int = 1000
    target_loss: float = 0.1
    too_low_rate: float = 0.001
    too_high_rate: float = 1.0
    num_samples: int = 200
    num_features: int = 5
    init_scale: float = 0.5
    range_test_seeds: int = 8
    range_test_steps: int = 300
    range_test_batch: int = 32
    range_test_min: float = 1e-4
    range_test_max: float = 10.0

    @classmethod
    def for_mode(cls, quick: bool, data: str | None = None) -> Config:
        """The quick or the full config (the problem is generated: ``data`` is not used)."""
        return cls(num_rates=13, init_seeds=2, range_test_seeds=4, range_test_steps=200) if quick else cls()


def _range_test_seeds(cfg: Config, seed: int) -> list[int]:
    return [seed * 1000 + 500 + i for i in range(cfg.range_test_seeds)]


def _range_test_kwargs(cfg: Config) -> dict:
    return {"min_lr": cfg.range_test_min, "max_lr": cfg.range_test_max, "steps": cfg.range_test_steps,
            "batch_size": cfg.range_test_batch}


def _setup(cfg: Config, seed: int) -> tuple[landscapes.Regression, np.ndarray, list[int], Any,
                                             sweep.RunSpec, sweep.SweepConfig]:
    """The problem, rates, seeds, start and the sweep that :func:`run` trains (and :func:`check_configs`
    checks)."""
    problem = landscapes.make_regression(seed, cfg.num_samples, cfg.num_features)
    rates = np.geomspace(cfg.min_rate, cfg.max_rate, cfg.num_rates)
    rates = np.unique(np.concatenate([rates, [cfg.too_low_rate, cfg.too_high_rate]])).astype(np.float32)
    seeds = [seed * 1000 + i for i in range(cfg.init_seeds)]
    init = landscapes.init_linear(cfg.num_features, cfg.init_scale)
    specs = sweep.grid(rates, seeds, init)
    config = sweep.SweepConfig(steps=cfg.steps, target_loss=cfg.target_loss)
    return problem, rates, seeds, init, specs, config


def check_config(cfg: Config, label: str, data: str | None = None) -> None:
    """Builds the rate sweep and the LR range test of ``cfg`` and traces both abstractly (no training)."""
    problem, rates, _, init, specs, config = _setup(cfg, seed=0)
    if len({sweep.rate_name(lr) for lr in rates}) < len(rates):
        raise ValueError(f"{label}: rates closer than 4 significant digits cannot be told apart in the "
                         f"history names: {rates.tolist()}")
    sweep.check_sweep(landscapes.mse_loss, OPTIMIZER_NAMES, specs, problem.data, config)
    range_specs, range_config = diagnostics.lr_range_test_sweep(init, _range_test_seeds(cfg, 0),
                                                                **_range_test_kwargs(cfg))
    sweep.check_sweep(landscapes.mse_loss, "sgd", range_specs, problem.data, range_config)


def check_configs() -> None:
    """The quick and the full config, traced abstractly."""
    check_modes(Config.for_mode, check_config)


def run(ctx: RunContext) -> None:
    cfg = ctx.resolve_config(Config)
    problem, rates, seeds, init, specs, config = _setup(cfg, ctx.seed)
    curvature = landscapes.regression_curvature(problem.data)
    edge, balanced = 2.0 / curvature.max(), 2.0 / (curvature.min() + curvature.max())
    desc = f"{len(rates)} rates x {len(seeds)} seeds x SGD, momentum"
    with ctx.progress(total=cfg.steps + 1, desc=desc) as bar:
        traces = sweep.run_sweep(landscapes.mse_loss, OPTIMIZER_NAMES, specs, problem.data, config,
                                 chunk_size=100, progress=bar.update)

    # Per optimizer and rate: median steps to target over seeds, and the diagnosis of every run.
    n = len(seeds)
    table: dict[str, list[dict]] = {}
    for name, trace in traces.items():
        histories = sweep.run_histories(trace)
        rows = []
        for i, lr in enumerate(rates):
            runs = range(i * n, (i + 1) * n)
            found = [diagnostics.diagnose(histories[r], target=cfg.target_loss) for r in runs]
            reached = [int(trace.stop_step[r]) for r in runs if trace.reached[r]]
            rows.append({"learning_rate": float(lr), "labels": [d.label for d in found],
                         "median_steps": float(np.median(reached)) if len(reached) == n else None,
                         "diagnosis_first_seed": str(found[0])})
        table[name] = rows
    best = {name: min((r for r in rows if r["median_steps"] is not None), key=lambda r: r["median_steps"])
            for name, rows in table.items()}

    with ctx.progress(total=1, desc="LR range test, vmapped over seeds") as bar:
        range_test = diagnostics.lr_range_test(landscapes.mse_loss, problem.data, init,
                                               _range_test_seeds(cfg, ctx.seed), **_range_test_kwargs(cfg))
        bar.update(1)

    # The three example curves of the course notes' plot: too low, good (the grid's best), too high.
    examples = {"too low": cfg.too_low_rate, "good (grid's best)": best["sgd"]["learning_rate"],
                "too high": cfg.too_high_rate}
    sgd = traces["sgd"]
    picks = [int(np.argmin(np.abs(rates - lr))) * n for lr in examples.values()]
    example_diagnoses = {k: str(diagnostics.diagnose(sweep.run_histories(sgd)[p], target=cfg.target_loss))
                         for k, p in zip(examples, picks, strict=True)}

    label_counts = {name: dict(collections.Counter(lbl for row in rows for lbl in row["labels"]))
                    for name, rows in table.items()}
    min_loss_rate = float(np.median(range_test.min_loss_rates))
    metrics = {"stability_limit_2_over_lambda_max": edge, "grid": table, "best": best,
               "examples": {k: {"learning_rate": lr, "diagnosis": example_diagnoses[k]}
                            for k, lr in examples.items()},
               "label_counts": label_counts,
               "range_test": {"suggestion_steepest": range_test.suggestion,
                              "suggestions_per_seed": range_test.suggestions,
                              "min_loss_rates": range_test.min_loss_rates,
                              "min_loss_rate_over_10": min_loss_rate / 10}}
    ctx.set_metrics(dataclasses.asdict(cfg), metrics)
    ctx.save_histories(_histories(traces, rates, n, range_test))
    ctx.plot(EXPERIMENT)

    def steps_at(name: str, lr: float) -> str:
        row = min(table[name], key=lambda r: abs(r["learning_rate"] - lr))
        return "not reached" if row["median_steps"] is None else f"{row['median_steps']:g} steps"

    diag_rows = "\n".join(f"| {k} | {lr:.3g} | {example_diagnoses[k]} |" for k, lr in examples.items())
    held = (example_diagnoses["too high"].startswith("diverging"),
            example_diagnoses["too low"].startswith("too slow"))
    claims_reading = reading(str(held), {
        "(True, True)": "Both hold here, and `diagnose` names them from the loss history alone:",
        "(True, False)": "The first holds here; the too-low rate was not labelled `too slow` (see its row):",
        "(False, True)": "The second holds here; the too-high rate was not labelled `diverging` (see its row):",
        "(False, False)": "Neither example was labelled as the claims predict (see the rows):"})
    unused = [label for label in ("oscillating", "stalled")
              if not any(counts.get(label) for counts in label_counts.values())]
    unused_reading = reading(str(len(unused)), {
        "2": "No run here is labelled `oscillating` or `stalled`: full-batch gradient descent on a convex "
             "quadratic lowers the loss monotonically for every stable rate.",
        "1": f"No run here is labelled `{unused[0] if unused else ''}`.",
        "0": "Runs here were labelled `oscillating` and `stalled` (counts above)."})
    ctx.set_summary(f"""# learning-rate — too high, too low, and how to tell

Problem: the synthetic linear regression of `optimizer-grid` (n = {cfg.num_samples}, d = {cfg.num_features}),
full-batch, target loss {cfg.target_loss:g}, {cfg.steps} steps; {len(rates)} rates from {rates[0]:.3g} to
{rates[-1]:.3g} (log grid) x {len(seeds)} init seeds x {{SGD, momentum 0.9}}, all one vmapped jit.
Gradient descent on this quadratic is stable iff lr < 2/λ_max = {edge:.3g}.


**The course notes' claims (a, b).** Too high a rate overshoots and diverges; too low a rate crawls.
{claims_reading}

| curve | lr | `diagnose(history, target={cfg.target_loss:g})` |
|---|---|---|
{diag_rows}

Over the whole grid, labels (runs): SGD {label_counts['sgd']}; momentum {label_counts['momentum']}.
The grid's best rate: SGD {best['sgd']['learning_rate']:.3g} ({best['sgd']['median_steps']:g} steps),
momentum {best['momentum']['learning_rate']:.3g} ({best['momentum']['median_steps']:g} steps).
For a quadratic, theory puts SGD's fastest rate at 2/(λ_min + λ_max) = {balanced:.3g}, the rate that
shrinks the slowest and the fastest direction equally; beyond 2/λ_max = {edge:.3g} it diverges.
{unused_reading} The `oscillating` and `stalled` rules are also exercised on constructed histories in
`tests/test_diagnostics.py`.

**How `diagnose` decides** (rules in order; each label comes with the numbers it used): non-finite loss or a
final loss 10x the first → `diverging`; target reached → `ok` (with the peak/initial ratio, so a spike
before converging shows); loss rose on ≥ 30 % of the last quarter's steps → `oscillating`; fell < 0.1 %
over the last quarter → `stalled` (stuck at a bad value); otherwise, target not reached → `too slow`, with
the steps the current geometric rate would still need.

**LR range test** (Smith 2017; SGD, mini-batches of {cfg.range_test_batch}, rate x{(cfg.range_test_max /
cfg.range_test_min) ** (1 / cfg.range_test_steps):.4f} per step from {cfg.range_test_min:g} to
{cfg.range_test_max:g}, {cfg.range_test_seeds} seeds vmapped):
- steepest-descent suggestion (median over seeds): **{range_test.suggestion:.3g}** (per seed
  {', '.join(f'{s:.3g}' for s in range_test.suggestions)}) → {steps_at('sgd', range_test.suggestion)}
  in the grid;
- rate at the loss minimum: {min_loss_rate:.3g} (≈ the stability edge {edge:.3g}); the "minimum / 10" rule
  gives {min_loss_rate / 10:.3g} → {steps_at('sgd', min_loss_rate / 10)};
- the grid's best: **{best['sgd']['learning_rate']:.3g}** ({best['sgd']['median_steps']:g} steps).

Verdict: on this convex problem the range test's *minimum* locates the stability edge well, but its
steepest-descent suggestion is conservative: while the rate is still small the ramp has already removed most
of the loss, so the steepest drop happens early, at
{best['sgd']['learning_rate'] / range_test.suggestion:.2g}x below the best fixed rate. It is a safe starting
rate, not the fastest one.

![too high, too low and good rates; diagnose over the grid; the LR range test](learning_rate.png)
""")


def _histories(traces: dict[str, sweep.RunTrace], rates: np.ndarray, num_seeds: int,
               range_test: diagnostics.LRRangeTest) -> dict[str, np.ndarray]:
    """Every run of the rate grid (``OPTIMIZER/lr=RATE/...``, init seed leading) and the range test's curves."""
    return {"step": np.arange(next(iter(traces.values())).losses.shape[1]), "learning_rates": rates,
            "range_test/learning_rate": range_test.learning_rates, "range_test/loss": range_test.losses,
            **sweep.grid_histories(traces, rates, num_seeds)}


def plot(ctx: RunContext, histories: Mapping[str, np.ndarray], recorded: Mapping[str, Any]) -> None:
    """Three panels: SGD at too low, a good and too high a rate (first init seed); `diagnose` over the rate
    grid; the LR range test's curves with its suggestions and the grid's best rate."""
    config, metrics = recorded["config"], recorded["metrics"]
    target, steps = config["target_loss"], config["steps"]
    best_sgd_rate = metrics["best"]["sgd"]["learning_rate"]
    suggestion = metrics["range_test"]["suggestion_steepest"]
    edge = metrics["stability_limit_2_over_lambda_max"]
    rates = histories["learning_rates"]
    examples = {label: example["learning_rate"] for label, example in metrics["examples"].items()}
    picks = [f"sgd/{sweep.rate_name(rates[int(np.argmin(np.abs(rates - lr)))])}" for lr in examples.values()]

    fig, axes = new_figure(1, 3, width=5.6, height=4.2)
    ax = axes[0, 0]
    plot_loss_curves(ax, np.stack([histories[f"{p}/loss"][0] for p in picks]),
                     [f"{k}: lr = {lr:.3g}" for k, lr in examples.items()], steps=histories["step"],
                     diverged_at=[int(histories[f"{p}/stop_step"][0]) if histories[f"{p}/diverged"][0] else None
                                  for p in picks], logy=True)
    ax.axhline(target, color="k", linestyle=":", linewidth=1)
    ax.set_ylim(1e-2, 1e7)
    ax.set(title="SGD: too low, good and too high a rate", xlabel="step", ylabel="training MSE (log)")
    ax = axes[0, 1]
    for name, marker in zip(OPTIMIZER_NAMES, ("o", "s"), strict=True):
        for row in metrics["grid"][name]:
            label = collections.Counter(row["labels"]).most_common(1)[0][0]
            y = row["median_steps"] if row["median_steps"] is not None else steps * 1.3
            ax.scatter(row["learning_rate"], y, marker=marker, color=LABEL_COLORS[label], s=28,
                       facecolors="none" if name == "momentum" else LABEL_COLORS[label])
    for label, color in LABEL_COLORS.items():
        ax.scatter([], [], color=color, label=label)
    ax.scatter([], [], marker="o", color="gray", label="SGD")
    ax.scatter([], [], marker="s", facecolors="none", color="gray", label="momentum 0.9")
    ax.axvline(edge, color="k", linestyle="--", linewidth=1, label=f"2/λ_max = {edge:.2f}")
    ax.axvline(suggestion, color="tab:cyan", linewidth=1.5, label=f"range test (steepest) {suggestion:.3g}")
    ax.axhline(steps * 1.3, color="gray", linewidth=0.5)
    ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="median steps to loss < 0.1",
           title="diagnose() over the rate grid (top row: target not reached)")
    ax.legend(ncols=2, fontsize="x-small")
    ax = axes[0, 2]
    for i, row in enumerate(histories["range_test/loss"]):
        ax.plot(histories["range_test/learning_rate"], row, alpha=0.6,
                label="one run per seed" if i == 0 else None)
    ax.axvline(suggestion, color="tab:cyan", linewidth=1.5, label="steepest descent (median)")
    ax.axvline(float(np.median(metrics["range_test"]["min_loss_rates"])), color="tab:red", linestyle="--",
               label="loss minimum (median)")
    ax.axvline(best_sgd_rate, color="tab:green", linestyle=":", label="grid's best rate")
    ax.set(xscale="log", yscale="log", xlabel="learning rate (grows each step)", ylabel="training MSE",
           title=f"LR range test: SGD, batch {config['range_test_batch']}, {config['range_test_steps']} steps")
    ax.set_ylim(1e-3, 1e4)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    ctx.save_figure(fig, "learning_rate.png")


EXPERIMENT = Experiment(NAME, "too high / too low learning rates, diagnose() with evidence, LR range test", run,
                        check_configs,
                        config=Config, check_config=check_config, plot=plot)

if __name__ == "__main__":
    raise SystemExit(main_for(EXPERIMENT))
