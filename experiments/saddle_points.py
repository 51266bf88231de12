"""saddle-points: GD, noisy SGD, momentum, RMSprop and Adam at x^3, x^2 - y^2 and (1 - ab)^2.

Tests claims of the course notes (docs/claims.md). Every (landscape) runs optimizers x starts x noise seeds x
{no noise, noise} as
one vmapped sweep; a run stops when it has *escaped*: its loss fell ``margin`` below the saddle's value
(:func:`jaxopt_lab.lab.diagnostics.escape_steps`). The course notes' two claims are tested on the escape table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxopt_lab.lab import diagnostics, sweep
from jaxopt_lab.lab.experiment import Experiment, RunContext, check_modes
from jaxopt_lab.lab.landscapes import SADDLES
from jaxopt_lab.lab.plotting import new_figure
from jaxopt_lab.lab.runner import main_for
from jaxopt_lab.lab.verdicts import reading

NAME = "saddle-points"
OPTIMIZER_NAMES = ("sgd", "momentum", "rmsprop", "adam")
# Starts per landscape: exactly on the stable manifold, and a small step off it towards the way out.
STARTS: dict[str, dict[str, tuple[float, ...]]] = {
    "cubic": {"at the saddle": (0.0,), "stable side, x0 = 0.5": (0.5,)},
    "hyperbolic": {"on the stable manifold": (1.0, 0.0), "1e-3 off it": (1.0, 1e-3)},
    "two_weight_net": {"on the stable manifold": (0.5, -0.5), "1e-3 off it": (0.5, -0.499)},
}
# How each start appears in the history names (``hyperbolic/adam/off_manifold/noise=0.1/loss``).
START_NAMES = {"at the saddle": "at_saddle", "stable side, x0 = 0.5": "stable_side",
               "on the stable manifold": "on_manifold", "1e-3 off it": "off_manifold"}
METHODS = {  # the five methods of the figures: (optimizer, noisy?)
    "GD": ("sgd", False), "SGD + gradient noise": ("sgd", True), "momentum": ("momentum", False),
    "RMSprop": ("rmsprop", False), "Adam": ("adam", False),
}


@dataclasses.dataclass(frozen=True)
class Config:
    learning_rate: float = 0.01
    gradient_noise: float = 0.1  # std of the Gaussian added to every gradient entry: the mini-batch noise
    noise_seeds: int = 64
    steps: int = 3000
    escape_margin: float = 0.1

    @classmethod
    def for_mode(cls, quick: bool, data: str | None = None) -> Config:
        """The quick or the full config (the problem is generated: ``data`` is not used)."""
        return cls(noise_seeds=16, steps=1500) if quick else cls()


def _escape_stats(steps: np.ndarray) -> dict:
    escaped = steps[steps >= 0]
    return {"escaped": int(escaped.size), "runs": int(steps.size),
            "median_steps": float(np.median(escaped)) if escaped.size else None,
            "p10_steps": float(np.percentile(escaped, 10)) if escaped.size else None,
            "p90_steps": float(np.percentile(escaped, 90)) if escaped.size else None}


def _noise_levels(cfg: Config) -> tuple[float, float]:
    return (0.0, cfg.gradient_noise)


def _seeds(cfg: Config, seed: int) -> list[int]:
    return [seed * 10_000 + i for i in range(cfg.noise_seeds)]


def _sweep_for(cfg: Config, land: str, seeds: list[int]) -> tuple[sweep.RunSpec, sweep.SweepConfig]:
    """The runs on one landscape: start-major, then seed, then noise level (sweep.grid's order)."""
    specs = sweep.concatenate(*(sweep.grid([cfg.learning_rate], seeds, jnp.asarray(x0, jnp.float32),
                                           gradient_noise=_noise_levels(cfg)) for x0 in STARTS[land].values()))
    config = sweep.SweepConfig(steps=cfg.steps, target_loss=SADDLES[land].value - cfg.escape_margin,
                               divergence_bound=1e6, record_params=True)
    return specs, config


def check_config(cfg: Config, label: str, data: str | None = None) -> None:
    """Builds every landscape's sweep of ``cfg`` and traces it abstractly (no training)."""
    for land, saddle in SADDLES.items():
        specs, config = _sweep_for(cfg, land, _seeds(cfg, 0))
        sweep.check_sweep(saddle.loss, OPTIMIZER_NAMES, specs, None, config)


def check_configs() -> None:
    """The quick and the full config, traced abstractly."""
    check_modes(Config.for_mode, check_config)


def run(ctx: RunContext) -> None:
    cfg = ctx.resolve_config(Config)
    seeds = _seeds(cfg, ctx.seed)
    noise = _noise_levels(cfg)
    results: dict[str, dict] = {}
    bar = ctx.progress(total=len(SADDLES) * (cfg.steps + 1), desc="3 landscapes x 4 optimizers, vmapped")
    with bar:
        for land, saddle in SADDLES.items():
            specs, config = _sweep_for(cfg, land, seeds)
            traces = sweep.run_sweep(saddle.loss, OPTIMIZER_NAMES, specs, None, config, chunk_size=500,
                                     progress=bar.update)
            results[land] = traces
    table: dict[str, dict] = {}
    for land, traces in results.items():
        table[land] = {}
        for name, trace in traces.items():
            steps = diagnostics.escape_steps(trace.losses, SADDLES[land].value, cfg.escape_margin)
            steps = steps.reshape(len(STARTS[land]), len(seeds), len(noise))
            table[land][name] = {start: {f"noise {sigma:g}": _escape_stats(steps[i, :, j])
                                         for j, sigma in enumerate(noise)}
                                 for i, start in enumerate(STARTS[land])}

    verdicts = _verdicts(cfg, table)
    ctx.set_metrics(dataclasses.asdict(cfg) | {"starts": STARTS, "seeds": seeds},
                    {"escape": table, "verdicts": verdicts})
    ctx.save_histories(_histories(cfg, results, len(seeds)))
    ctx.plot(EXPERIMENT)
    ctx.set_summary(_summary(cfg, table, verdicts))


def _run_prefix(land: str, optimizer: str, start: str, noise: float) -> str:
    """The history names' prefix of one (landscape, optimizer, start, noise level)."""
    return f"{land}/{optimizer}/{START_NAMES[start]}/noise={noise:g}"


def _histories(cfg: Config, results: dict[str, dict[str, sweep.RunTrace]],
               num_seeds: int) -> dict[str, np.ndarray]:
    """Every run's loss, trajectory (NaN after its stop), stop step and escape step, noise seed leading."""
    noise = _noise_levels(cfg)
    arrays = {"step": np.arange(cfg.steps + 1)}
    for land, traces in results.items():
        for name, trace in traces.items():
            # The runs are start-major, then seed, then noise level (see `_sweep_for`).
            grid_shape = (len(STARTS[land]), num_seeds, len(noise))
            escape = diagnostics.escape_steps(trace.losses, SADDLES[land].value, cfg.escape_margin)
            after_stop = np.arange(trace.losses.shape[1]) > trace.stop_step[:, None]
            trajectory = np.where(after_stop[..., None], np.nan, trace.params)
            losses, stops, trajectories, escape = (values.reshape(*grid_shape, *values.shape[1:]) for values
                                                   in (trace.losses, trace.stop_step, trajectory, escape))
            for i, start in enumerate(STARTS[land]):
                for j, sigma in enumerate(noise):
                    prefix = _run_prefix(land, name, start, sigma)
                    arrays[f"{prefix}/loss"] = losses[i, :, j]
                    arrays[f"{prefix}/trajectory"] = trajectories[i, :, j]
                    arrays[f"{prefix}/stop_step"] = stops[i, :, j]
                    arrays[f"{prefix}/escape_step"] = escape[i, :, j]
    return arrays


def plot(ctx: RunContext, histories: Mapping[str, np.ndarray], recorded: Mapping[str, Any]) -> None:
    """The trajectories of the first noise seed on the 2-D landscapes' contours and on x³, and the steps
    to escape over noise seeds (from the escape table)."""
    _plot_trajectories(ctx, recorded["config"], histories)
    _plot_escapes(ctx, recorded["config"], recorded["metrics"]["escape"])


def _first_seed_path(histories: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    """The first noise seed's trajectory up to and including its stop step."""
    return histories[f"{prefix}/trajectory"][0, : int(histories[f"{prefix}/stop_step"][0]) + 1]


def _method_noise(config: Mapping[str, Any], noisy: bool) -> float:
    return config["gradient_noise"] if noisy else 0.0


def _plot_trajectories(ctx: RunContext, config: Mapping[str, Any], histories: Mapping[str, np.ndarray]) -> None:
    fig, axes = new_figure(2, 2, width=5.5, height=4.6)
    for row, land in enumerate(("hyperbolic", "two_weight_net")):
        saddle = SADDLES[land]
        grid = np.linspace(-1.2, 1.2, 241)
        xx, yy = np.meshgrid(grid, grid)
        zz = np.asarray(saddle.loss(jnp.stack([jnp.asarray(xx), jnp.asarray(yy)])))
        for col, start in enumerate(config["starts"][land]):
            ax = axes[row, col]
            ax.contour(xx, yy, zz, levels=21, cmap="Greys", linewidths=0.6)
            ax.plot(*saddle.point, "k*", markersize=12, label="saddle")
            for method, (name, noisy) in METHODS.items():
                path = _first_seed_path(histories, _run_prefix(land, name, start, _method_noise(config, noisy)))
                ax.plot(path[:, 0], path[:, 1], linewidth=1.4, label=method)
                ax.plot(*path[-1], "o", color=ax.lines[-1].get_color(), markersize=4)
            ax.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), xlabel=(land == "hyperbolic" and "x") or "a",
                   ylabel=(land == "hyperbolic" and "y") or "b", aspect="equal",
                   title=f"{saddle.formula}, start {start}")
            ax.legend(fontsize="x-small", loc="lower left")
    fig.suptitle(f"Trajectories, lr = {config['learning_rate']:g}, {config['steps']} steps or until escaped "
                 f"(loss ≤ saddle − {config['escape_margin']:g}); dot = last point")
    fig.tight_layout()
    ctx.save_figure(fig, "saddle_trajectories.png")

    fig, axes = new_figure(1, 2, width=6, height=4)
    for col, start in enumerate(config["starts"]["cubic"]):
        ax = axes[0, col]
        for method, (name, noisy) in METHODS.items():
            path = _first_seed_path(histories, _run_prefix("cubic", name, start, _method_noise(config, noisy)))
            ax.plot(path[:, 0], label=method)
        ax.axhline(-config["escape_margin"] ** (1 / 3), color="k", linestyle=":", label="escaped (x³ ≤ −0.1)")
        ax.set(xlabel="step", ylabel="x", title=f"f(x) = x³, start {start}", xscale="symlog")
        ax.set_xlim(left=0)  # steps are never negative
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    ctx.save_figure(fig, "cubic_trajectories.png")


def _plot_escapes(ctx: RunContext, config: Mapping[str, Any], table: Mapping[str, Any]) -> None:
    fig, axes = new_figure(1, 3, width=5, height=5)
    for ax, (land, by_opt) in zip(axes.flat, table.items(), strict=True):
        labels, values = [], []
        for name in OPTIMIZER_NAMES:
            for start, by_noise in by_opt[name].items():
                for level, stats in by_noise.items():
                    labels.append(f"{name}, {START_NAMES[start].replace('_', ' ')}, {level}")
                    values.append((stats["median_steps"], stats["p10_steps"], stats["p90_steps"],
                                   stats["escaped"] / stats["runs"]))
        x = np.arange(len(values))
        med = np.array([np.nan if v[0] is None else v[0] for v in values])
        lo = np.array([np.nan if v[1] is None else v[1] for v in values])
        hi = np.array([np.nan if v[2] is None else v[2] for v in values])
        ax.errorbar(x, med, yerr=[med - lo, hi - med], fmt="o", capsize=2)
        for xi, v in zip(x, values, strict=True):
            if v[0] is None:
                ax.plot(xi, config["steps"], "rx")
        ax.set(yscale="log", ylabel="steps to escape (median, 10–90 %)", title=SADDLES[land].formula)
        ax.set_xticks(x, labels, fontsize=6.5, rotation=90)
    axes[0, 0].plot([], [], "rx", label="never escaped")
    axes[0, 0].legend(fontsize="small")
    fig.tight_layout()
    ctx.save_figure(fig, "escape_steps.png")


def _verdicts(cfg: Config, table: dict) -> dict:
    on = {"cubic": "at the saddle", "hyperbolic": "on the stable manifold",
          "two_weight_net": "on the stable manifold"}
    near = {"cubic": "stable side, x0 = 0.5", "hyperbolic": "1e-3 off it", "two_weight_net": "1e-3 off it"}
    clean, noisy = "noise 0", f"noise {cfg.gradient_noise:g}"
    claim1 = {land: {name: {"without_noise": table[land][name][on[land]][clean]["escaped"],
                            "with_noise": table[land][name][on[land]][noisy]["escaped"],
                            "runs": table[land][name][on[land]][noisy]["runs"],
                            "median_steps_with_noise": table[land][name][on[land]][noisy]["median_steps"]}
                     for name in OPTIMIZER_NAMES} for land in table}
    claim2 = {land: {name: {"without_noise": table[land][name][near[land]][clean]["median_steps"],
                            "with_noise": table[land][name][near[land]][noisy]["median_steps"]}
                     for name in OPTIMIZER_NAMES} for land in table}
    trapped_without = all(v["without_noise"] == 0 for land in claim1.values() for v in land.values())
    slow_with_noise = [f"{name} on {SADDLES[land].formula} ({v['with_noise']}/{v['runs']})"
                       for land, by in claim1.items() for name, v in by.items()
                       if v["with_noise"] < v["runs"] / 2]
    speedups = {}
    for land, by in claim2.items():
        adam = by["adam"]["without_noise"]
        speedups[land] = {name: (None if adam is None or v["without_noise"] is None
                                 else v["without_noise"] / adam) for name, v in by.items() if name != "adam"}
    return {"claim1_noise": claim1, "claim1_trapped_without_noise": trapped_without,
            "claim1_escaped_in_under_half_with_noise": slow_with_noise,
            "claim2_adam": claim2, "claim2_steps_of_other_over_adam_without_noise": speedups}


def _claim2_reading(ratios: dict, steps: dict) -> str:
    """Why Adam helps where it does, each sentence kept only where the escape table shows it."""
    near = [land for land in ("hyperbolic", "two_weight_net") if land in ratios]
    faster = [land for land in near if (ratios[land]["sgd"] or 0) > 1]
    text = ""
    if faster:
        where = " and ".join(SADDLES[land].formula for land in faster)
        text += (" Dividing by √v makes a step about lr long whatever the gradient's size, so a run that "
                 f"starts a tiny distance off the manifold of {where} "
                 "leaves at a constant speed instead of GD's exponential creep from its small offset.")
        like_adam = [land for land in faster if ratios[land]["rmsprop"] is not None
                     and ratios[land]["rmsprop"] <= 2]
        text += reading(str(like_adam == faster), {
            "True": " RMSprop (the second moment alone) escapes as fast as Adam there, or within 2x of its "
                    "steps, so the help comes from the second moment, not from Adam's first.",
            "False": " RMSprop (the second moment alone) takes more than 2x Adam's steps on at least one of "
                     "them, so the second moment alone does not explain Adam's help."})
    if "cubic" in ratios:
        cubic = steps["cubic"]
        helps = (ratios["cubic"]["sgd"] or 0) > 1
        text += reading(str(helps), {
            "True": " On x³ from the stable side Adam also escapes faster than GD.",
            "False": " On x³ from the stable side the normalisation does *not* help: the gradient 3x² fades as "
                     "the run nears the flat point, √v remembers the larger past gradients, and the run creeps "
                     "towards 0 like GD (x ~ 1/(3·lr·t))."})
        through = [n for n in OPTIMIZER_NAMES if cubic[n]["without_noise"] is not None]
        text += reading(str(through == ["momentum"]), {
            "True": " Only momentum's velocity carries a noise-free run through x = 0; noise (claim 1) frees "
                    "the others.",
            "False": " Noise-free, " + (", ".join(through) or "no method") + " got through x = 0."})
    return text


def _fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:g}"


def _summary(cfg: Config, table: dict, verdicts: dict) -> str:
    rows = []
    for land, by_opt in table.items():
        for name in OPTIMIZER_NAMES:
            for start, by_noise in by_opt[name].items():
                cells = [f"{s['escaped']}/{s['runs']}: {_fmt(s['median_steps'])}" for s in by_noise.values()]
                rows.append(f"| {SADDLES[land].formula} | {start} | {name} | {' | '.join(cells)} |")
    c1, c2 = verdicts["claim1_noise"], verdicts["claim2_adam"]
    slow = verdicts["claim1_escaped_in_under_half_with_noise"]
    claim1_verdict = "supported" if verdicts["claim1_trapped_without_noise"] else "not supported"
    claim1_caveat = "" if not slow else (
        f" Caveat: within {cfg.steps} steps fewer than half of the noisy runs escaped for {', '.join(slow)}:"
        " at x³'s flat point the noise first has to random-walk to the descending side, and from a small"
        " negative x the drift needs about 1/(3·lr·|x|) steps to run away.")
    ratios = verdicts["claim2_steps_of_other_over_adam_without_noise"]
    c2_ratio_lines = "\n".join(
        f"- {SADDLES[land].formula}: "
        + ", ".join(f"{n} {'–' if r is None else f'{r:.2g}x'}" for n, r in by.items())
        for land, by in ratios.items())
    beats_gd = [SADDLES[land].formula for land, by in ratios.items() if by["sgd"] is not None and by["sgd"] > 1]
    beats_all = [SADDLES[land].formula for land, by in ratios.items()
                 if all(r is not None and r > 1 for r in by.values())]
    adam_never = [SADDLES[land].formula for land, by in c2.items() if by["adam"]["without_noise"] is None]
    claim2_verdict = (f"partly supported: Adam beats GD on {', '.join(beats_gd) or 'no landscape'}, beats every"
                      f" other method on {', '.join(beats_all) or 'no landscape'}"
                      + (f", and never escapes noise-free on {', '.join(adam_never)}" if adam_never else ""))
    claim1_reading = reading(claim1_verdict, {
        "supported": "without noise no optimizer ever leaves (Adam included: 0/(√0 + ε) = 0, the zero "
                     "gradient is normalised to a zero step); with noise the runs do leave: the noise only has "
                     "to put a non-zero component on the unstable direction, which the negative curvature then "
                     "amplifies.",
        "not supported": "some noise-free run left the manifold (see the counts above), so an exactly zero "
                         "gradient did not trap every optimizer here."})
    claim2_reading = _claim2_reading(ratios, c2)
    c1_lines = "\n".join(
        f"- {SADDLES[land].formula}: without noise " + ", ".join(f"{n} {v['without_noise']}/{v['runs']}"
                                                                   for n, v in by.items())
        + "; with noise " + ", ".join(f"{n} {v['with_noise']}/{v['runs']} "
                                       f"(median {_fmt(v['median_steps_with_noise'])} steps)"
                                       for n, v in by.items())
        for land, by in c1.items())
    c2_lines = "\n".join(
        f"- {SADDLES[land].formula}: " + ", ".join(f"{n} {_fmt(v['without_noise'])} / {_fmt(v['with_noise'])}"
                                                   for n, v in by.items())
        for land, by in c2.items())
    return f"""# saddle-points — do noise and Adam get optimizers off a saddle?

Landscapes: f(x) = x³ (flat inflection at 0), f(x, y) = x² − y² (Hessian diag(2, −2); stable manifold
y = 0) and f(a, b) = (1 − ab)², the squared error of the two-weight linear net y = a·b·x on (1, 1): a saddle
of a real model at the origin (Hessian [[0, −2], [−2, 0]]; stable manifold a = −b). All optimizers at
lr = {cfg.learning_rate:g} (optax defaults otherwise; momentum 0.9), {cfg.steps} steps, each run x
{cfg.noise_seeds} noise seeds x {{no noise, Gaussian gradient noise σ = {cfg.gradient_noise:g}}} — the
noise is the stand-in for mini-batch sampling — all one vmapped sweep per landscape.

**Escape criterion.** A run has escaped at the first step where its loss is ≤ f(saddle) − {cfg.escape_margin:g}:
only a move along a descent direction out of the saddle gets there (x ≤ −0.46 on x³; |y| ≥ √(0.1 + x²) on
x² − y²; ab ≥ 0.05 on (1 − ab)²), and it works for the unbounded x³ too. The run stops there.

Escape table: escaped/runs: median steps to escape (noise-free runs are identical across seeds).

| landscape | start | optimizer | no noise | σ = {cfg.gradient_noise:g} |
|---|---|---|---|---|
{chr(10).join(rows)}

**Claim 1 — "mini-batch noise makes an exactly zero gradient unlikely".** Started exactly on the stable
manifold (or at the x³ saddle), the gradient's escape component is exactly zero, and it stays zero:
{c1_lines}

Verdict: **{claim1_verdict}** — {claim1_reading}{claim1_caveat}

**Claim 2 — "Adam's two moments help it escape".** Median steps to escape from the near-manifold start
(x0 = 0.5 for x³), no noise / with noise:
{c2_lines}

Steps of each optimizer / steps of Adam, no noise (> 1: Adam is faster; "–": one of them never escaped):
{c2_ratio_lines}

Verdict: **{claim2_verdict}**.{claim2_reading}

![trajectories on contour plots](saddle_trajectories.png)

![x^3 trajectories](cubic_trajectories.png)

![steps to escape over noise seeds](escape_steps.png)
"""


EXPERIMENT = Experiment(NAME, "GD/SGD+noise/momentum/RMSprop/Adam at x^3, x^2-y^2 and (1-ab)^2: escape table",
                        run, check_configs,
                        config=Config, check_config=check_config, plot=plot)

if __name__ == "__main__":
    raise SystemExit(main_for(EXPERIMENT))
