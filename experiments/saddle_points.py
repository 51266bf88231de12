"""saddle-points: GD, noisy SGD, momentum, RMSprop and Adam at x^3, x^2 - y^2 and (1 - ab)^2.

Tests claims of the course notes (docs/claims.md). Every landscape runs optimizers x starts x noise seeds
under three noises: none, additive isotropic Gaussian gradient noise (the stand-in), and real mini-batch
noise: the landscape written as the mean of per-example losses over a data set
(:func:`jaxopt_lab.lab.landscapes.saddle_examples`) and each step's gradient taken on a sampled mini-batch.
Each noise is one vmapped sweep per landscape. A run has *escaped* once its loss (for the mini-batch runs:
the loss on all examples) fell ``margin`` below the saddle's value
(:func:`jaxopt_lab.lab.diagnostics.escape_steps`). The course notes' two claims are tested on the escape
table; claim 1's verdict rests on the real mini-batch noise of the two-weight net, the one landscape that
is a model's loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.lab import diagnostics, landscapes, sweep
from jaxopt_lab.lab.experiment import Experiment, RunContext, check_modes
from jaxopt_lab.lab.fitting import mean_std
from jaxopt_lab.lab.landscapes import SADDLES
from jaxopt_lab.lab.plotting import new_figure
from jaxopt_lab.lab.runner import main_for
from jaxopt_lab.lab.verdicts import NOT_SUPPORTED, SUPPORTED, UNCLEAR, difference, reading, verdict

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
NOISE_KINDS = ("none", "isotropic", "mini-batch")
METHODS = {  # the six methods of the trajectory figures: (optimizer, noise kind)
    "GD": ("sgd", "none"), "SGD + isotropic noise": ("sgd", "isotropic"),
    "SGD + mini-batches": ("sgd", "mini-batch"), "momentum": ("momentum", "none"),
    "RMSprop": ("rmsprop", "none"), "Adam": ("adam", "none"),
}
# The start on which claim 1 is tested, per landscape: exactly on the stable manifold (x^3: at the saddle).
ON_MANIFOLD = {"cubic": "at the saddle", "hyperbolic": "on the stable manifold",
               "two_weight_net": "on the stable manifold"}
NEAR_MANIFOLD = {"cubic": "stable side, x0 = 0.5", "hyperbolic": "1e-3 off it", "two_weight_net": "1e-3 off it"}
# Claim 1's verdict is read on this landscape: the only one that is a model's loss over examples.
REAL_MODEL = "two_weight_net"


@dataclasses.dataclass(frozen=True)
class Config:
    learning_rate: float = 0.01
    gradient_noise: float = 0.1  # std of the Gaussian added to every gradient entry: the isotropic stand-in
    noise_seeds: int = 64
    steps: int = 3000
    escape_margin: float = 0.1
    examples: int = 128  # the data set behind each landscape's mini-batch runs (landscapes.saddle_examples)
    batch_size: int = 16  # examples per mini-batch, drawn without replacement, a fresh permutation per epoch
    residual_std: float = 0.5  # the two-weight net's residual s: y = x + residual, mean loss (1 - ab)^2 + s^2
    noise_batches: int = 1000  # mini-batches over which the gradient noise's direction is measured

    @classmethod
    def for_mode(cls, quick: bool, data: str | None = None) -> Config:
        """The quick or the full config (the problem is generated: ``data`` is not used)."""
        # Quick: a smaller data set, because every mini-batch step draws a permutation of all examples.
        return cls(noise_seeds=16, steps=1500, examples=32, batch_size=8, noise_batches=200) if quick else cls()


def _escape_stats(steps: np.ndarray) -> dict:
    escaped = steps[steps >= 0]
    return {"escaped": int(escaped.size), "runs": int(steps.size),
            "median_steps": float(np.median(escaped)) if escaped.size else None,
            "p10_steps": float(np.percentile(escaped, 10)) if escaped.size else None,
            "p90_steps": float(np.percentile(escaped, 90)) if escaped.size else None}


def _noise_levels(cfg: Config) -> tuple[float, float]:
    return (0.0, cfg.gradient_noise)


def noise_labels(config: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Noise kind -> (its column in the escape table, its segment in the history names)."""
    sigma, batch = f"{config['gradient_noise']:g}", config["batch_size"]
    return {"none": ("noise 0", "noise=0"), "isotropic": (f"noise {sigma}", f"noise={sigma}"),
            "mini-batch": (f"mini-batch {batch}", f"batch={batch}")}


def _seeds(cfg: Config, seed: int) -> list[int]:
    return [seed * 10_000 + i for i in range(cfg.noise_seeds)]


def _starts(cfg: Config, land: str, seeds: list[int], noise: tuple[float, ...]) -> sweep.RunSpec:
    """The runs on one landscape: start-major, then seed, then noise level (sweep.grid's order)."""
    return sweep.concatenate(*(sweep.grid([cfg.learning_rate], seeds, jnp.asarray(x0, jnp.float32),
                                          gradient_noise=noise) for x0 in STARTS[land].values()))


def _sweep_for(cfg: Config, land: str, seeds: list[int]) -> tuple[sweep.RunSpec, sweep.SweepConfig]:
    """The noise-free and isotropic-noise runs on one landscape (the noise level varies fastest)."""
    config = sweep.SweepConfig(steps=cfg.steps, target_loss=SADDLES[land].value - cfg.escape_margin,
                               divergence_bound=1e6, record_params=True)
    return _starts(cfg, land, seeds, _noise_levels(cfg)), config


def _examples(cfg: Config, land: str, seed: int) -> landscapes.SaddleExamples:
    return landscapes.saddle_examples(land, cfg.examples, seed, residual_std=cfg.residual_std)


def _minibatch_sweep_for(cfg: Config, land: str, seeds: list[int]) -> tuple[sweep.RunSpec, sweep.SweepConfig]:
    """The mini-batch runs on one landscape: each step's gradient is that of ``batch_size`` sampled examples.

    They never stop early: the loss the sweep sees is the mini-batch's, and the escape test needs the loss
    on all examples, which the landscape plus the data set's offset gives exactly (tested). It is evaluated
    on the trajectory afterwards (:func:`_full_data_losses`), rather than on every example at every step.
    """
    config = sweep.SweepConfig(steps=cfg.steps, target_loss=None, divergence_bound=1e6,
                               batch_size=cfg.batch_size, evaluate_full_loss=False, record_params=True)
    return _starts(cfg, land, seeds, (0.0,)), config


def check_config(cfg: Config, label: str, data: str | None = None) -> None:
    """Builds every landscape's sweeps of ``cfg`` and traces them abstractly (no training)."""
    for name in ("noise_seeds", "steps", "examples", "batch_size", "noise_batches"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label}: {name} must be a positive int, got {value!r}")
    if not cfg.batch_size <= cfg.examples:
        raise ValueError(f"{label}: batch_size={cfg.batch_size} must be at most examples={cfg.examples}")
    for name in ("gradient_noise", "residual_std"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{label}: {name} must be >= 0, got {getattr(cfg, name)!r}")
    if not cfg.escape_margin > 0:
        raise ValueError(f"{label}: escape_margin must be > 0, got {cfg.escape_margin!r}")
    for land, saddle in SADDLES.items():
        specs, config = _sweep_for(cfg, land, _seeds(cfg, 0))
        sweep.check_sweep(saddle.loss, OPTIMIZER_NAMES, specs, None, config)
        examples = _examples(cfg, land, 0)
        specs, config = _minibatch_sweep_for(cfg, land, _seeds(cfg, 0))
        sweep.check_sweep(examples.loss, OPTIMIZER_NAMES, specs, examples.data, config)


def check_configs() -> None:
    """The quick and the full config, traced abstractly."""
    check_modes(Config.for_mode, check_config)


class _Runs(NamedTuple):
    """One noise kind's runs on one landscape, as the escape table and the histories read them."""

    losses: np.ndarray  # (starts, seeds, T + 1): the loss on all examples; NaN after the stop
    trajectories: np.ndarray  # (starts, seeds, T + 1, D); NaN after the stop
    stop_step: np.ndarray  # (starts, seeds)
    escape_step: np.ndarray  # (starts, seeds); -1: never


def _full_data_losses(land: str, trajectories: np.ndarray, offset: float) -> np.ndarray:
    """The mean loss over all examples along trajectories ``(..., D)``: the landscape plus the offset."""
    flat = jnp.asarray(trajectories.reshape(-1, trajectories.shape[-1]))
    values = np.asarray(jax.vmap(SADDLES[land].loss)(flat)) + offset
    return values.reshape(trajectories.shape[:-1])


def _stopped_at(values: np.ndarray, stop_step: np.ndarray) -> np.ndarray:
    """``values`` (runs, T + 1, ...) with NaN after each run's ``stop_step``."""
    after = np.arange(values.shape[1]) > stop_step[:, None]
    return np.where(after.reshape(*after.shape, *([1] * (values.ndim - 2))), np.nan, values)


def _noise_runs(cfg: Config, land: str, trace: sweep.RunTrace, num_seeds: int) -> dict[str, _Runs]:
    """The noise-free and isotropic runs of one optimizer's sweep, split by noise level."""
    shape = (len(STARTS[land]), num_seeds, 2)  # start-major, then seed, then noise level (`_sweep_for`)
    escape = diagnostics.escape_steps(trace.losses, SADDLES[land].value, cfg.escape_margin)
    arrays = (trace.losses, _stopped_at(trace.params, trace.stop_step), trace.stop_step, escape)
    split = [a.reshape(*shape, *a.shape[1:]) for a in arrays]
    return {kind: _Runs(*(a[:, :, j] for a in split)) for j, kind in enumerate(("none", "isotropic"))}


def _minibatch_runs(cfg: Config, land: str, trace: sweep.RunTrace, offset: float, num_seeds: int) -> _Runs:
    """The mini-batch runs of one optimizer's sweep, stopped at their escape like the other noises' runs."""
    losses = _full_data_losses(land, trace.params, offset)
    escape = diagnostics.escape_steps(losses, SADDLES[land].value + offset, cfg.escape_margin)
    stop = np.where(escape >= 0, np.minimum(escape, trace.stop_step), trace.stop_step)
    arrays = (_stopped_at(losses, stop), _stopped_at(trace.params, stop), stop, escape)
    return _Runs(*(a.reshape(len(STARTS[land]), num_seeds, *a.shape[1:]) for a in arrays))


def _noise_directions(cfg: Config, land: str, examples: landscapes.SaddleExamples) -> dict:
    """The mini-batch gradient noise's std along the way out and along the stable manifold, at claim 1's start
    (x^3: at the saddle, where both directions are the one axis)."""
    saddle = SADDLES[land]
    directions = {"unstable": saddle.unstable_direction, "stable": saddle.stable_direction}
    std = diagnostics.gradient_noise_along(examples.loss, jnp.asarray(STARTS[land][ON_MANIFOLD[land]]),
                                           examples.data, cfg.batch_size, list(directions.values()),
                                           num_batches=cfg.noise_batches)
    return {"mini-batch": dict(zip(directions, std.tolist(), strict=True)),
            "isotropic": dict.fromkeys(directions, cfg.gradient_noise)}


def run(ctx: RunContext) -> None:
    cfg = ctx.resolve_config(Config)
    seeds = _seeds(cfg, ctx.seed)
    runs: dict[str, dict[str, dict[str, _Runs]]] = {}  # landscape -> optimizer -> noise kind -> runs
    data_sets: dict[str, dict] = {}
    bar = ctx.progress(total=2 * len(SADDLES) * (cfg.steps + 1),
                       desc="3 landscapes x 4 optimizers x {isotropic, mini-batch}, vmapped")
    with bar:
        for land, saddle in SADDLES.items():
            specs, config = _sweep_for(cfg, land, seeds)
            # One chunk per sweep: the on-manifold noise-free runs never escape, so no sweep could stop
            # early, and a shorter last chunk would compile a second program.
            traces = sweep.run_sweep(saddle.loss, OPTIMIZER_NAMES, specs, None, config, progress=bar.update)
            examples = _examples(cfg, land, ctx.seed)
            specs, config = _minibatch_sweep_for(cfg, land, seeds)
            batched = sweep.run_sweep(examples.loss, OPTIMIZER_NAMES, specs, examples.data, config,
                                      progress=bar.update)
            runs[land] = {name: _noise_runs(cfg, land, traces[name], len(seeds)) | {
                "mini-batch": _minibatch_runs(cfg, land, batched[name], examples.offset, len(seeds))}
                for name in OPTIMIZER_NAMES}
            data_sets[land] = {"per_example_loss": examples.per_example, "offset": examples.offset,
                               "value_at_saddle": examples.value,
                               "gradient_noise_std": _noise_directions(cfg, land, examples)}
    labels = noise_labels(dataclasses.asdict(cfg))
    table = {land: {name: {start: {labels[kind][0]: _escape_stats(r.escape_step[i])
                                   for kind, r in by_kind.items()}
                           for i, start in enumerate(STARTS[land])}
                    for name, by_kind in by_opt.items()}
             for land, by_opt in runs.items()}
    verdicts = _verdicts(cfg, table, runs)
    verdicts["claim1_shown_verdict"] = ctx.verdict(verdicts["claim1_verdict"])
    verdicts["claim2_shown_verdict"] = ctx.verdict(verdicts["claim2_verdict"])
    ctx.set_metrics(dataclasses.asdict(cfg) | {"starts": STARTS, "seeds": seeds},
                    {"escape": table, "data_sets": data_sets, "verdicts": verdicts})
    ctx.save_histories(_histories(cfg, runs))
    ctx.plot(EXPERIMENT)
    ctx.set_summary(_summary(cfg, table, data_sets, verdicts))


def _run_prefix(land: str, optimizer: str, start: str, noise: str) -> str:
    """The history names' prefix of one (landscape, optimizer, start, noise), ``noise`` a history segment
    of :func:`noise_labels` (``hyperbolic/adam/off_manifold/noise=0.1``, ``.../batch=16``)."""
    return f"{land}/{optimizer}/{START_NAMES[start]}/{noise}"


def _histories(cfg: Config, runs: dict[str, dict[str, dict[str, _Runs]]]) -> dict[str, np.ndarray]:
    """Every run's loss, trajectory (NaN after its stop), stop step and escape step, noise seed leading."""
    labels = noise_labels(dataclasses.asdict(cfg))
    arrays = {"step": np.arange(cfg.steps + 1)}
    for land, by_opt in runs.items():
        for name, by_kind in by_opt.items():
            for kind, r in by_kind.items():
                for i, start in enumerate(STARTS[land]):
                    prefix = _run_prefix(land, name, start, labels[kind][1])
                    arrays[f"{prefix}/loss"] = r.losses[i]
                    arrays[f"{prefix}/trajectory"] = r.trajectories[i]
                    arrays[f"{prefix}/stop_step"] = r.stop_step[i]
                    arrays[f"{prefix}/escape_step"] = r.escape_step[i]
    return arrays


def plot(ctx: RunContext, histories: Mapping[str, np.ndarray], recorded: Mapping[str, Any]) -> None:
    """The trajectories of the first noise seed on the 2-D landscapes' contours and on x³, and the steps
    to escape over noise seeds (from the escape table)."""
    _plot_trajectories(ctx, recorded["config"], histories)
    _plot_escapes(ctx, recorded["config"], recorded["metrics"]["escape"])


def _first_seed_path(histories: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    """The first noise seed's trajectory up to and including its stop step."""
    return histories[f"{prefix}/trajectory"][0, : int(histories[f"{prefix}/stop_step"][0]) + 1]


def _method_prefix(config: Mapping[str, Any], land: str, start: str, method: str) -> str:
    name, kind = METHODS[method]
    return _run_prefix(land, name, start, noise_labels(config)[kind][1])


def _line_style(method: str) -> dict[str, Any]:
    """Mini-batch paths dotted, thick and on top: on a stable manifold they run under GD's."""
    if METHODS[method][1] == "mini-batch":
        return {"linestyle": ":", "linewidth": 2.6, "zorder": 5}
    return {"linewidth": 1.4}


def _plot_trajectories(ctx: RunContext, config: Mapping[str, Any], histories: Mapping[str, np.ndarray]) -> None:
    fig, axes = new_figure(2, 2, width=5.5, height=4.8)
    for row, land in enumerate(("hyperbolic", "two_weight_net")):
        saddle = SADDLES[land]
        grid = np.linspace(-1.2, 1.2, 241)
        xx, yy = np.meshgrid(grid, grid)
        zz = np.asarray(saddle.loss(jnp.stack([jnp.asarray(xx), jnp.asarray(yy)])))
        for col, start in enumerate(config["starts"][land]):
            ax = axes[row, col]
            ax.contour(xx, yy, zz, levels=21, cmap="Greys", linewidths=0.6)
            ax.plot(*saddle.point, "k*", markersize=12, label="saddle")
            for method in METHODS:
                path = _first_seed_path(histories, _method_prefix(config, land, start, method))
                ax.plot(path[:, 0], path[:, 1], label=method, **_line_style(method))
                ax.plot(*path[-1], "o", color=ax.lines[-1].get_color(), markersize=4)
            ax.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), xlabel=(land == "hyperbolic" and "x") or "a",
                   ylabel=(land == "hyperbolic" and "y") or "b", aspect="equal",
                   title=f"{saddle.formula}, start {start}")
            ax.legend(fontsize="x-small", loc="lower left")
    fig.suptitle(f"Trajectories of the first noise seed, lr = {config['learning_rate']:g}, "
                 f"{config['steps']} steps or until escaped (loss ≤ saddle − {config['escape_margin']:g}); "
                 "dot = last point\n"
                 f"isotropic noise σ = {config['gradient_noise']:g}; mini-batches of {config['batch_size']} of "
                 f"{config['examples']} examples")
    fig.tight_layout()
    ctx.save_figure(fig, "saddle_trajectories.png")

    fig, axes = new_figure(1, 2, width=6, height=4)
    for col, start in enumerate(config["starts"]["cubic"]):
        ax = axes[0, col]
        for method in METHODS:
            path = _first_seed_path(histories, _method_prefix(config, "cubic", start, method))
            ax.plot(path[:, 0], label=method, **_line_style(method))
        ax.axhline(-config["escape_margin"] ** (1 / 3), color="k", linestyle=":", label="escaped (x³ ≤ −0.1)")
        ax.set(xlabel="step", ylabel="x", title=f"f(x) = x³, start {start}", xscale="symlog")
        ax.set_xlim(left=0)  # steps are never negative
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    ctx.save_figure(fig, "cubic_trajectories.png")


def _plot_escapes(ctx: RunContext, config: Mapping[str, Any], table: Mapping[str, Any]) -> None:
    """Per landscape, one group per (optimizer, start) and one marker per noise in it: the median steps to
    escape with a 10-90 % bar; x at the step limit: no run escaped; a fraction: only that many did."""
    fig, axes = new_figure(1, 3, width=5.6, height=4.6)
    columns = [label for label, _ in noise_labels(config).values()]
    offsets = np.linspace(-0.25, 0.25, len(columns))
    colors = [f"C{i}" for i in range(len(columns))]
    for ax, (land, by_opt) in zip(axes.flat, table.items(), strict=True):
        groups = [(name, start) for name in OPTIMIZER_NAMES for start in by_opt[name]]
        for column, offset, color in zip(columns, offsets, colors, strict=True):
            for g, (name, start) in enumerate(groups):
                stats, x = by_opt[name][start][column], g + offset
                if stats["median_steps"] is None:
                    ax.plot(x, config["steps"], "x", color=color, markersize=7, markeredgewidth=2)
                    continue
                med, lo, hi = stats["median_steps"], stats["p10_steps"], stats["p90_steps"]
                ax.errorbar(x, med, yerr=[[med - lo], [hi - med]], fmt="o", color=color, capsize=2)
                if stats["escaped"] < stats["runs"]:
                    ax.annotate(f"{stats['escaped']}/{stats['runs']}", (x, lo), xytext=(0, -4),
                                textcoords="offset points", ha="center", va="top", fontsize=7, color=color)
        ax.axhline(config["steps"], color="grey", linewidth=0.6, linestyle=":")
        ax.set(yscale="log", ylabel="steps to escape (median, 10–90 %)", title=SADDLES[land].formula)
        ax.set_xticks(range(len(groups)), [f"{name}\n{START_NAMES[start].replace('_', ' ')}"
                                           for name, start in groups], fontsize=7, rotation=45, ha="right",
                      rotation_mode="anchor")
        for g in range(1, len(groups)):
            ax.axvline(g - 0.5, color="0.9", linewidth=0.8, zorder=0)
    for column, color in zip(columns, colors, strict=True):
        axes[0, 0].plot([], [], "o", color=color, label=column)
    axes[0, 0].plot([], [], "x", color="k", markeredgewidth=2,
                    label=f"no run escaped (drawn at {config['steps']} steps)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=len(columns) + 1,
               fontsize="small")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    ctx.save_figure(fig, "escape_steps.png")


NO_RUN_ESCAPED = "no run escaped"


def escape_outcome(with_noise: np.ndarray, without_noise: np.ndarray) -> str:
    """Whether a noise raises the share of runs that escape (per-seed 0/1 flags), by the 2-SE rule.

    :data:`NO_RUN_ESCAPED` when no run escaped either way: the rule's "within noise", but exactly.

    >>> escape_outcome(np.ones(8), np.zeros(8)), escape_outcome(np.zeros(8), np.zeros(8))
    ('supported', 'no run escaped')
    """
    diff, se = difference(mean_std(with_noise), mean_std(without_noise))
    outcome = verdict(diff, se)
    if outcome == UNCLEAR and not np.any(with_noise) and not np.any(without_noise):
        return NO_RUN_ESCAPED
    return outcome


# Claim 1's verdict from the outcome of the real mini-batch noise on the real model.
CLAIM1_VERDICTS = {SUPPORTED: SUPPORTED, NOT_SUPPORTED: NOT_SUPPORTED, UNCLEAR: UNCLEAR,
                   NO_RUN_ESCAPED: NOT_SUPPORTED}


PARTLY_SUPPORTED = "partly supported"


def claim2_verdict(speedups: Mapping[str, Mapping[str, float | None]]) -> str:
    """Claim 2's label from each landscape's noise-free steps of every other method over Adam's (None: one
    of the two never escaped): supported when Adam escapes and beats every other method everywhere, not
    supported when it beats GD nowhere, partly supported in between.

    >>> claim2_verdict({"a": {"sgd": 5.6, "rmsprop": 1.1}, "b": {"sgd": 1.4, "rmsprop": 2.0}})
    'supported'
    >>> claim2_verdict({"a": {"sgd": 5.6, "rmsprop": 0.9}, "b": {"sgd": None, "rmsprop": None}})
    'partly supported'
    >>> claim2_verdict({"a": {"sgd": 0.8, "rmsprop": 0.9}, "b": {"sgd": None, "rmsprop": None}})
    'not supported'
    """
    beats_gd, beats_all = adam_wins(speedups)
    if len(beats_all) == len(speedups):
        return SUPPORTED
    return PARTLY_SUPPORTED if beats_gd else NOT_SUPPORTED


def adam_wins(speedups: Mapping[str, Mapping[str, float | None]]) -> tuple[list[str], list[str]]:
    """The landscapes where Adam escapes faster than GD, and those where it escapes faster than every other
    method (``speedups`` as in :func:`claim2_verdict`)."""
    faster = lambda r: r is not None and r > 1
    return ([land for land, by in speedups.items() if faster(by["sgd"])],
            [land for land, by in speedups.items() if all(faster(r) for r in by.values())])


def _verdicts(cfg: Config, table: dict, runs: dict[str, dict[str, dict[str, _Runs]]]) -> dict:
    columns = {kind: label for kind, (label, _) in noise_labels(dataclasses.asdict(cfg)).items()}
    claim1: dict[str, dict] = {}
    claim2: dict[str, dict] = {}
    outcomes: dict[str, dict] = {}
    for land, by_opt in table.items():
        on = ON_MANIFOLD[land]
        claim1[land] = {name: {"runs": by_opt[name][on][columns["none"]]["runs"]}
                        | {kind: by_opt[name][on][columns[kind]]["escaped"] for kind in NOISE_KINDS}
                        | {f"median_steps_{kind}": by_opt[name][on][columns[kind]]["median_steps"]
                           for kind in NOISE_KINDS}
                        for name in OPTIMIZER_NAMES}
        claim2[land] = {name: {kind: by_opt[name][NEAR_MANIFOLD[land]][columns[kind]]["median_steps"]
                               for kind in NOISE_KINDS} for name in OPTIMIZER_NAMES}
        start = list(STARTS[land]).index(on)
        escaped = {kind: runs[land]["sgd"][kind].escape_step[start] >= 0 for kind in NOISE_KINDS}
        outcomes[land] = {kind: escape_outcome(escaped[kind], escaped["none"])
                          for kind in ("isotropic", "mini-batch")}
    trapped_without = all(v["none"] == 0 for land in claim1.values() for v in land.values())
    slow_with_noise = [f"{name} on {SADDLES[land].formula} ({v['isotropic']}/{v['runs']})"
                       for land, by in claim1.items() for name, v in by.items()
                       if v["isotropic"] < v["runs"] / 2]
    speedups = {}
    for land, by in claim2.items():
        adam = by["adam"]["none"]
        speedups[land] = {name: (None if adam is None or v["none"] is None else v["none"] / adam)
                          for name, v in by.items() if name != "adam"}
    return {"claim1_noise": claim1, "claim1_trapped_without_noise": trapped_without,
            "claim1_sgd_outcome_against_no_noise": outcomes,
            "claim1_verdict": CLAIM1_VERDICTS[outcomes[REAL_MODEL]["mini-batch"]],
            "claim1_isotropic_escaped_in_under_half": slow_with_noise,
            "claim2_adam": claim2, "claim2_steps_of_other_over_adam_without_noise": speedups,
            "claim2_verdict": claim2_verdict(speedups)}


def _claim2_reading(ratios: dict, steps: dict) -> str:
    """Why Adam helps where it does, each sentence kept only where the escape table shows it."""
    beats_gd = adam_wins(ratios)[0]
    faster = [land for land in beats_gd if land in ("hyperbolic", "two_weight_net")]
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
        helps = "cubic" in beats_gd
        text += reading(str(helps), {
            "True": " On x³ from the stable side Adam also escapes faster than GD.",
            "False": " On x³ from the stable side the normalisation does *not* help: the gradient 3x² fades as "
                     "the run nears the flat point, √v remembers the larger past gradients, and the run creeps "
                     "towards 0 like GD (x ~ 1/(3·lr·t))."})
        through = {kind: [n for n in OPTIMIZER_NAMES if cubic[n][kind] is not None] for kind in NOISE_KINDS}
        text += reading(str(through["none"] == ["momentum"]), {
            "True": " Only momentum's velocity carries a noise-free run through x = 0.",
            "False": " Noise-free, " + (", ".join(through["none"]) or "no method") + " got through x = 0."})
        freed = {kind: [n for n in through[kind] if n not in through["none"]]
                 for kind in ("isotropic", "mini-batch")}
        text += (" Of the others, isotropic noise frees " + (", ".join(freed["isotropic"]) or "none")
                 + "; real mini-batch noise frees " + (", ".join(freed["mini-batch"]) or "none")
                 + reading(str(bool(freed["isotropic"]) and not freed["mini-batch"]), {
                     "True": ": each example's gradient 3u_i²x² shrinks with the full one as x nears 0, so the "
                             "mini-batches only rescale the creep.",
                     "False": "."}))
    return text


def _fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:g}"


def _claim1_reading(cfg: Config, verdicts: dict, data_sets: dict) -> str:
    """What the real and the isotropic noise did on claim 1's start, each sentence chosen by the numbers."""
    outcomes, counts = verdicts["claim1_sgd_outcome_against_no_noise"], verdicts["claim1_noise"]
    net, sgd = outcomes[REAL_MODEL], counts[REAL_MODEL]["sgd"]
    noise = data_sets[REAL_MODEL]["gradient_noise_std"]["mini-batch"]
    formula = SADDLES[REAL_MODEL].formula
    real, iso = f"{sgd['mini-batch']}/{sgd['runs']}", f"{sgd['isotropic']}/{sgd['runs']}"
    others = ", ".join(f"{counts[REAL_MODEL][n]['mini-batch']}/{sgd['runs']}" for n in OPTIMIZER_NAMES[1:])
    text = reading(str(verdicts["claim1_trapped_without_noise"]), {
        "True": "Without noise no optimizer ever leaves (Adam included: 0/(√0 + ε) = 0, the zero gradient is "
                "normalised to a zero step). ",
        "False": "Some noise-free run left its start (see the counts above), so an exactly zero escape "
                 "component did not trap every optimizer here. "})
    text += reading(net["mini-batch"], {
        NO_RUN_ESCAPED: f"**With real mini-batch noise no SGD run leaves the stable manifold of {formula}** "
                        f"({real}; momentum, RMSprop, Adam: {others}) ",
        SUPPORTED: f"With real mini-batch noise more SGD runs leave the stable manifold of {formula} than "
                   f"without, beyond two standard errors ({real}) ",
        NOT_SUPPORTED: f"With real mini-batch noise fewer SGD runs leave {formula}'s manifold than without "
                       f"({real}) ",
        UNCLEAR: f"With real mini-batch noise {real} SGD runs escape, within two standard errors of the "
                 "noise-free count "})
    measured = (f"std {noise['unstable']:.2g} across the manifold, {noise['stable']:.2g} along it, over "
                f"{cfg.noise_batches} mini-batches of {cfg.batch_size}")
    text += reading(str(noise["unstable"] == 0.0), {
        "True": f"— the measured noise has no component across the manifold ({measured}), as the model "
                "implies: every example's loss depends on (a, b) through ab alone, so its gradient c_i·(b, a) "
                "is c_i·(−a, a) on a = −b, along the manifold, for any data. The runs slide to the saddle, "
                "where every example's gradient is zero. ",
        "False": f"— the measured noise: {measured}. "})
    text += reading(str(net["isotropic"] == SUPPORTED and net["mini-batch"] != SUPPORTED), {
        "True": f"The isotropic stand-in (σ = {cfg.gradient_noise:g} on every entry) frees {iso} SGD runs "
                "there only because it pushes across the manifold, where this model's sampled examples never "
                "do: it overstates what mini-batch noise does at this saddle.",
        "False": f"The isotropic stand-in frees {iso} SGD runs there ({net['isotropic']} against no noise)."})
    synthetic = [land for land in outcomes if land != REAL_MODEL]
    trapped = [land for land in synthetic if outcomes[land]["mini-batch"] == NO_RUN_ESCAPED]
    text += reading(str(trapped == synthetic), {
        "True": " On " + " and ".join(SADDLES[land].formula for land in synthetic) + ", which are no model's "
                "loss, the per-example split is a choice: with the split used here (every example shares the "
                "saddle and its stable manifold, as the net's examples must) the real noise frees no run "
                "either, while examples with their own linear terms (saddles at scattered points) would give "
                "a gradient noise independent of the parameters: the isotropic stand-in's kind.",
        "False": " On " + ", ".join(f"{SADDLES[land].formula} ({outcomes[land]['mini-batch']})"
                                    for land in synthetic)
                 + ", with the split used here (every example shares the saddle and its stable manifold), "
                   "the real noise gives the outcomes in parentheses."})
    return text


def _summary(cfg: Config, table: dict, data_sets: dict, verdicts: dict) -> str:
    columns = [label for label, _ in noise_labels(dataclasses.asdict(cfg)).values()]
    rows = []
    for land, by_opt in table.items():
        for name in OPTIMIZER_NAMES:
            for start, by_noise in by_opt[name].items():
                cells = [f"{by_noise[c]['escaped']}/{by_noise[c]['runs']}: {_fmt(by_noise[c]['median_steps'])}"
                         for c in columns]
                rows.append(f"| {SADDLES[land].formula} | {start} | {name} | {' | '.join(cells)} |")
    c1, c2 = verdicts["claim1_noise"], verdicts["claim2_adam"]
    slow = verdicts["claim1_isotropic_escaped_in_under_half"]
    claim1_caveat = "" if not slow else (
        f" Caveat: within {cfg.steps} steps fewer than half of the isotropic-noise runs escaped for "
        f"{', '.join(slow)}: at x³'s flat point the noise first has to random-walk to the descending side, and "
        "from a small negative x the drift needs about 1/(3·lr·|x|) steps to run away.")
    ratios = verdicts["claim2_steps_of_other_over_adam_without_noise"]
    c2_ratio_lines = "\n".join(
        f"- {SADDLES[land].formula}: "
        + ", ".join(f"{n} {'–' if r is None else f'{r:.2g}x'}" for n, r in by.items())
        for land, by in ratios.items())
    beats_gd, beats_all = ([SADDLES[land].formula for land in lands] for lands in adam_wins(ratios))
    adam_never = [SADDLES[land].formula for land, by in c2.items() if by["adam"]["none"] is None]
    claim2_line = (f"{verdicts['claim2_shown_verdict']}: Adam beats GD on "
                   f"{', '.join(beats_gd) or 'no landscape'}, beats every other method on "
                   f"{', '.join(beats_all) or 'no landscape'}"
                   + (f", and never escapes noise-free on {', '.join(adam_never)}" if adam_never else ""))
    claim2_reading = _claim2_reading(ratios, c2)
    outcomes = verdicts["claim1_sgd_outcome_against_no_noise"]
    c1_lines = "\n".join(
        f"- {SADDLES[land].formula}: " + "; ".join(
            f"{label}: " + ", ".join(f"{n} {v[kind]}/{v['runs']}" for n, v in by.items())
            + ("" if kind == "none" else f" (SGD against no noise: {outcomes[land][kind]})")
            for kind, (label, _) in noise_labels(dataclasses.asdict(cfg)).items())
        for land, by in c1.items())
    noise_lines = "\n".join(
        f"| {SADDLES[land].formula} | {ON_MANIFOLD[land]} | {d['per_example_loss']} | {d['offset']:.3g} | "
        + " | ".join(f"{d['gradient_noise_std']['mini-batch'][way]:.2g}" for way in ("unstable", "stable"))
        + f" | {cfg.gradient_noise:g} |" for land, d in data_sets.items())
    c2_lines = "\n".join(
        f"- {SADDLES[land].formula}: " + ", ".join(f"{n} " + " / ".join(_fmt(v[kind]) for kind in NOISE_KINDS)
                                                   for n, v in by.items())
        for land, by in c2.items())
    noise_header = ("| landscape | claim 1's start | per-example loss | mean − landscape | mini-batch noise "
                    "std: across the manifold (the way out) | along it | isotropic noise std, any direction |")
    return f"""# saddle-points — do noise and Adam get optimizers off a saddle?

Landscapes: f(x) = x³ (flat inflection at 0), f(x, y) = x² − y² (Hessian diag(2, −2); stable manifold
y = 0) and f(a, b) = (1 − ab)², the squared error of the two-weight linear net y = a·b·x on (1, 1): a saddle
of a real model at the origin (Hessian [[0, −2], [−2, 0]]; stable manifold a = −b). All optimizers at
lr = {cfg.learning_rate:g} (optax defaults otherwise; momentum 0.9), {cfg.steps} steps, each run x
{cfg.noise_seeds} noise seeds under three noises, one vmapped sweep per landscape and noise source:

- **no noise**: the landscape's exact gradient;
- **isotropic noise σ = {cfg.gradient_noise:g}**: a Gaussian added to every gradient entry, the usual stand-in
  for mini-batch sampling;
- **mini-batch {cfg.batch_size}**: the real thing. Each landscape is written as the mean of per-example
  losses over {cfg.examples} examples (`landscapes.saddle_examples`), and each step's gradient is that of
  {cfg.batch_size} examples drawn without replacement (a fresh permutation per epoch). For the net the
  per-example loss is its squared error (y_i − a·b·x_i)², with y = x + a residual of std
  s = {cfg.residual_std:g} orthogonal to x and mean(x²) = mean(xy) = 1, so the mean is (1 − ab)² + s²: the
  landscape plus a constant.

{noise_header}
|---|---|---|---|---|---|---|
{noise_lines}

(noise std: of the mini-batch gradient's component along the unit vector, over {cfg.noise_batches} mini-batches
at claim 1's start; on x³ both columns are the one axis.)

**Escape criterion.** A run has escaped at the first step where its loss (mini-batch runs: the loss on all
examples) is ≤ its value at the saddle − {cfg.escape_margin:g}: only a move along a descent direction out
of the saddle gets there (x ≤ −0.46 on x³; |y| ≥ √(0.1 + x²) on x² − y²; ab ≥ 0.05 on (1 − ab)²), and it works
for the unbounded x³ too. The run stops there.

Escape table: escaped/runs: median steps to escape (noise-free runs are identical across seeds).

| landscape | start | optimizer | {' | '.join(columns)} |
|---|---|---|{'---|' * len(columns)}
{chr(10).join(rows)}

**Claim 1 — "mini-batch noise makes an exactly zero gradient unlikely, so SGD does not stay on a saddle".**
Started exactly on the stable manifold (or at the x³ saddle), the exact gradient's escape component is
zero, and it stays zero. Escaped runs per noise, and SGD's escape share against no noise by the 2-SE rule:
{c1_lines}

Verdict (real mini-batch noise on {SADDLES[REAL_MODEL].formula}, the one landscape that is a model's loss):
**{verdicts['claim1_shown_verdict']}**. {_claim1_reading(cfg, verdicts, data_sets)}{claim1_caveat}

**Claim 2 — "Adam's two moments help it escape".** Median steps to escape from the near-manifold start
(x0 = 0.5 for x³), {' / '.join(columns)}:
{c2_lines}

Steps of each optimizer / steps of Adam, no noise (> 1: Adam is faster; "–": one of them never escaped):
{c2_ratio_lines}

Verdict: **{claim2_line}**.{claim2_reading}

![trajectories on contour plots](saddle_trajectories.png)

![x^3 trajectories](cubic_trajectories.png)

![steps to escape over noise seeds](escape_steps.png)
"""


EXPERIMENT = Experiment(NAME, "GD/SGD/momentum/RMSprop/Adam at x^3, x^2-y^2 and (1-ab)^2, no noise, isotropic "
                        "noise and real mini-batches: escape table",
                        run, check_configs,
                        config=Config, check_config=check_config, plot=plot)

if __name__ == "__main__":
    raise SystemExit(main_for(EXPERIMENT))
