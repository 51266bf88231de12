"""gradient-centralization: SGD, SGD+momentum, Adam, AdamW with and without GC on real digits.

the course notes (docs/claims.md) (Yong et al., ECCV 2020). Every optimizer runs plain, with our GC
(:func:`jaxopt_lab.centralization.with_gradient_centralization`, the paper's placement: centralize the
gradient, then the optimizer) and with ``optax.centralize`` chained first (the anchor; it centres over
every axis but the FIRST, PyTorch's output axis, so on Flax kernels it is a different projection), on a
CNN with batch norm and on an MLP. Each (model, optimizer, variant) trains for a fixed budget of optimizer
steps at its OWN best learning rate, chosen by a vmapped sweep on a validation split that widens its grid
until the choice is bracketed (:func:`jaxopt_lab.lab.training.tune_learning_rate`), so GC and plain are
compared each at its best rate. A second, disjoint seed set is trained at the chosen rate after the choice,
and every verdict is replicated on it (:func:`jaxopt_lab.lab.verdicts.judge`: "unstable" where the sets
disagree). Speed is judged at ONE rate for both arms, plain's tuned rate, as steps to a training-loss target
and as test accuracy after a few steps. Reports test accuracy, the chosen rates, whether the loss
flattened, and the weight-space constraint: each layer's per-output mean weight at the end vs at
initialization. ``--data mnist1d`` runs it on MNIST-1D.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optax

from jaxopt_lab.centralization import with_gradient_centralization
from jaxopt_lab.lab import data, diagnostics, models, training
from jaxopt_lab.lab.experiment import Experiment, RunContext, check_modes, check_training_config
from jaxopt_lab.lab.plotting import new_figure, plot_loss_curves
from jaxopt_lab.lab.runner import main_for
from jaxopt_lab.lab.verdicts import (
    NOT_SUPPORTED,
    SUPPORTED,
    UNCLEAR,
    UNSTABLE,
    judge,
    paired_difference,
    reading,
    verdict,
)

NAME = "gradient-centralization"
PLAIN, GC = "plain", "GC (ours)"
VARIANTS = (PLAIN, GC, "optax.centralize")
# GC trained at plain's chosen rate: the common rate of the speed comparison (only where GC chose another).
GC_AT_PLAIN_RATE = "GC (ours) at plain's rate"
SUPPORTED_DATA = data.BUILTIN_DATASETS
# name -> learning_rate -> optimizer; the rate may be a traced value (one program sweeps every rate) or a
# schedule of one.
OPTIMIZERS: dict[str, Callable[[Any], optax.GradientTransformation]] = {
    "SGD": lambda lr: optax.sgd(lr),
    "SGD+momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "Adam": lambda lr: optax.adam(lr),
    "AdamW": lambda lr: optax.adamw(lr, weight_decay=1e-2),
}
# The rates each optimizer's sweep starts from (a factor ~3 apart, around the usual defaults); the search
# adds rates 3x beyond an edge while the choice sits there (Config.widen).
RATES = {"SGD": (0.03, 0.1, 0.3), "SGD+momentum": (0.01, 0.03, 0.1), "Adam": (3e-4, 1e-3, 3e-3),
         "AdamW": (3e-4, 1e-3, 3e-3)}
# "constant": the chosen rate throughout; "cosine": decayed from it to 0 over the budget
# (optax.cosine_decay_schedule); "step": divided by 10 at 30%, 60% and 90% of the budget.
SCHEDULES = ("constant", "cosine", "step")
STEP_DECAY_AT = (0.3, 0.6, 0.9)
# Yong et al. (2020), ImageNet top-1 error (%) of ResNet-50, 100 epochs, SGD+momentum, without -> with GC
# (their Table 3), quoted from the paper; not re-measured here.
PAPER_IMAGENET = {"ResNet-50 (BN)": (23.71, 23.21), "ResNet-50 (GN)": (24.00, 23.48)}


@dataclasses.dataclass(frozen=True)
class Config:
    optimizers: tuple[str, ...]
    steps: int  # optimizer steps of every run
    seeds: int  # per seed set: the search's seeds; each further set replicates at the chosen rate
    seed_sets: int = 2  # disjoint seed sets every verdict is judged on (1: no replication)
    rates_per_optimizer: int = 3  # the n largest of RATES[name]
    widen: int = 3  # rates the search may add beyond its grid's edges (training.tune_learning_rate)
    schedule: str = "constant"  # one of SCHEDULES
    batch_size: int = 32
    loss_target: float = 0.5
    smoothing_steps: int = 20
    speed_steps: int = 60  # the second speed measure: test accuracy after this many steps (an evaluation)
    validation_fraction: float = 0.2
    # The CNN's conv widths and pooling: None = models.CNN's defaults (four conv layers).
    cnn_widths: tuple[int, ...] | None = None
    cnn_pool_after: tuple[int, ...] | None = None

    @classmethod
    def for_mode(cls, quick: bool, data: str | None = None) -> Config:
        """The config of a run: :data:`QUICK`, or :data:`FULL` with ``data``'s overrides
        (:data:`FULL_BY_DATA`; ``None`` or a ``.npz`` file: none)."""
        return QUICK if quick else FULL_BY_DATA.get(data or "", FULL)


# Quick: a two-conv-layer CNN (half the compile time of the default four; quick runs are compile-bound),
# one starting rate per optimizer that the search widens: its added rates and the replication share one
# compiled program with the start, so a job compiles once.
QUICK = Config(optimizers=("SGD+momentum", "Adam"), steps=160, seeds=2, rates_per_optimizer=1, widen=2,
               speed_steps=32, cnn_widths=(16, 32), cnn_pool_after=(0,))
FULL = Config(optimizers=tuple(OPTIMIZERS), steps=600, seeds=5)
# MNIST-1D: 3x the training examples, a harder task, cheaper 1-D convolutions. 30 epochs with the rate
# cosine-decayed to 0: at 10 epochs the loss was still falling at the end in most pairs, constant or
# decayed (the measurements: docs/mnist1d.md).
FULL_BY_DATA = {"mnist1d": dataclasses.replace(FULL, steps=3000, speed_steps=150, schedule="cosine")}


def rates(cfg: Config, name: str) -> tuple[float, ...]:
    """The learning rates the search for optimizer ``name`` starts from under ``cfg``."""
    return RATES[name][len(RATES[name]) - min(cfg.rates_per_optimizer, len(RATES[name])):]


def evaluation_every(cfg: Config) -> int:
    """The steps between two evaluations of a run (about 20 evaluations per run)."""
    return math.ceil(cfg.steps / 20)


def learning_rate_schedule(learning_rate: Any, schedule: str, steps: int) -> Any:
    """``learning_rate`` (``"constant"``), a cosine decay from it to 0 over ``steps`` (``"cosine"``), or
    divided by 10 at each fraction of ``steps`` in :data:`STEP_DECAY_AT` (``"step"``).

    >>> [round(float(learning_rate_schedule(0.1, "cosine", 100)(step)), 4) for step in (0, 50, 100)]
    [0.1, 0.05, 0.0]
    >>> [round(float(learning_rate_schedule(0.1, "step", 100)(step)), 5) for step in (29, 30, 60, 99)]
    [0.1, 0.01, 0.001, 0.0001]
    """
    if schedule == "constant":
        return learning_rate
    if schedule == "cosine":
        return optax.cosine_decay_schedule(learning_rate, steps)
    if schedule == "step":
        return optax.piecewise_constant_schedule(learning_rate, {round(f * steps): 0.1 for f in STEP_DECAY_AT})
    raise ValueError(f"learning_rate_schedule: schedule must be one of {SCHEDULES}, got {schedule!r}")


def optimizer(name: str, variant: str, learning_rate: Any = None, *, schedule: str = "constant",
              steps: int = 1) -> optax.GradientTransformation:
    """``name`` from :data:`OPTIMIZERS`, ``variant`` from :data:`VARIANTS`, at ``learning_rate``
    (default: the middle of the optimizer's :data:`RATES`) under ``schedule`` over ``steps``."""
    rate = RATES[name][1] if learning_rate is None else learning_rate
    base = OPTIMIZERS[name](learning_rate_schedule(rate, schedule, steps))
    if variant == PLAIN:
        return base
    if variant == GC:
        return with_gradient_centralization(base)
    return optax.chain(optax.centralize(), base)


def model_zoo(num_classes: int, cfg: Config = FULL) -> dict[str, Any]:
    """The two models: ``models.CNN`` with batch norm (the config's widths, else its defaults), and
    ``models.MLP``'s defaults."""
    arch: dict[str, Any] = {k: v for k, v in (("widths", cfg.cnn_widths), ("pool_after", cfg.cnn_pool_after))
                            if v is not None}
    return {"CNN (batch norm)": models.CNN(norm="batch", num_classes=num_classes, **arch),
            "MLP": models.MLP(num_classes=num_classes)}


def check_config(cfg: Config, label: str, data_name: str | None = None) -> None:
    """Builds every (model, optimizer, variant) of ``cfg`` abstractly on ``data_name`` (``None``: every
    supported dataset); ``ValueError`` naming ``label`` and the field if one cannot run."""
    unknown = [o for o in cfg.optimizers if o not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"{label}: unknown optimizers {unknown}; known: {list(OPTIMIZERS)}")
    if cfg.seeds < 1 or cfg.seed_sets < 1 or cfg.steps < 2 * cfg.smoothing_steps or cfg.rates_per_optimizer < 1:
        raise ValueError(f"{label}: needs seeds >= 1, seed_sets >= 1, rates_per_optimizer >= 1 and steps more "
                         f"than 2 x smoothing_steps, got seeds={cfg.seeds}, seed_sets={cfg.seed_sets}, "
                         f"rates_per_optimizer={cfg.rates_per_optimizer}, steps={cfg.steps}")
    if cfg.widen < 0:
        raise ValueError(f"{label}: widen must be >= 0 (rates the search may add), got {cfg.widen}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"{label}: schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if not (0 < cfg.speed_steps <= cfg.steps and cfg.speed_steps % evaluation_every(cfg) == 0):
        raise ValueError(f"{label}: speed_steps must be an evaluation step, a multiple of "
                         f"{evaluation_every(cfg)} in [1, steps={cfg.steps}], got {cfg.speed_steps}")
    if not cfg.loss_target > 0:
        raise ValueError(f"{label}: loss_target must be > 0 nats, got {cfg.loss_target}")
    for name in SUPPORTED_DATA if data_name is None else (data_name,):
        ds = data.load_dataset(name)
        train_size = training.examples_after_validation(len(ds.y_train), cfg.validation_fraction)
        for model_name, model in model_zoo(ds.num_classes, cfg).items():
            for opt in cfg.optimizers:
                for variant in VARIANTS:
                    tx = optimizer(opt, variant, schedule=cfg.schedule, steps=cfg.steps)
                    check_training_config(model, tx, ds.image_shape, batch_sizes=[cfg.batch_size],
                                          train_size=train_size,
                                          where=f"{label}: {model_name}, {opt}, {variant} on {name}")


def check_configs() -> None:
    """The quick and the full config of every supported dataset, without training (a few seconds)."""
    check_modes(Config.for_mode, check_config, SUPPORTED_DATA)


def per_output_means(params: Any) -> dict[str, np.ndarray]:
    """Each kernel's mean over every axis but the last (Flax's output features), per seed:
    ``{layer: (seeds, outputs)}`` for parameters with a leading seeds axis."""
    return {layer: np.asarray(leaves["kernel"]).reshape(len(leaves["kernel"]), -1, leaves["kernel"].shape[-1])
            .mean(axis=1) for layer, leaves in params.items() if "kernel" in leaves}


def run(ctx: RunContext) -> None:
    ds = data.load_dataset(None if ctx.data_path is None else str(ctx.data_path))
    cfg = ctx.resolve_config(Config, ds.name)
    all_seeds = [ctx.seed + i for i in range(cfg.seeds * cfg.seed_sets)]
    model_for = model_zoo(ds.num_classes, cfg)
    start_means = {m: per_output_means(training.initial_variables(model, all_seeds, ds.x_train)["params"])
                   for m, model in model_for.items()}
    pairs = [(m, o) for m in model_for for o in cfg.optimizers]
    rows: list[dict] = []
    speed: list[dict] = []
    stability: list[dict] = []
    histories: dict[str, np.ndarray] = {}

    def train(model_name: str, opt_name: str, variant: str, fixed_rate: float | None = None,
              name: str | None = None) -> dict:
        """One job (cached): ``variant`` at its tuned rate, or at ``fixed_rate``, recorded as ``name``."""
        name = name or variant
        label = f"{model_name} {opt_name} {name}"
        key = {"config": cfg, "data": ds.describe(), "job": [model_name, opt_name, variant, fixed_rate]}
        with ctx.progress(total=cfg.steps * cfg.seed_sets, desc=f"{label}, steps") as bar:
            unit = ctx.cached(label, key, functools.partial(
                _train_job, cfg, ds, all_seeds, model_for[model_name], (model_name, opt_name, variant),
                start_means[model_name], ctx.data_parallel, bar.update, fixed_rate))
        histories.update({f"{model_name}/{opt_name}/{name}/{history}": value
                          for history, value in unit["histories"].items()})
        return unit["row"]

    for model_name, opt_name in ctx.progress(pairs, desc="model x optimizer pairs"):
        by_variant = {v: train(model_name, opt_name, v) for v in VARIANTS}
        rows += by_variant.values()
        plain, gc = by_variant[PLAIN], by_variant[GC]
        # The speed test needs both arms at one rate: GC at plain's rate (trained here if GC chose another).
        gc_common = gc if gc["learning_rate"] == plain["learning_rate"] else \
            train(model_name, opt_name, GC, plain["learning_rate"], GC_AT_PLAIN_RATE)
        speed.append(_speed(ctx, cfg, plain, gc, gc_common))
        stability.append(_stability(ctx, cfg, plain, gc, gc_common))

    accuracy = _accuracy_verdicts(ctx, cfg, rows)
    best = [r for r in rows if r["variant"] == PLAIN]
    flat = sum(bool(r["flattened"]["flattened"]) for r in best)
    ctx.set_endpoint(f"{cfg.steps} optimizer steps at batch {cfg.batch_size} for every run, "
                     f"{_schedule_words(cfg)}, each (model, optimizer, variant) at its own rate chosen on a "
                     f"{cfg.validation_fraction:.0%} validation split; plain runs' training loss flattened in "
                     f"{flat} of {len(best)} model x optimizer pairs")
    ctx.set_metrics({**dataclasses.asdict(cfg), "seeds_used": all_seeds, "data": ds.describe(),
                     "learning_rates_swept": {o: rates(cfg, o) for o in cfg.optimizers},
                     "models": {m: repr(model) for m, model in model_for.items()},
                     "paper_imagenet_top1_error": PAPER_IMAGENET},
                    {"runs": rows, "gc_vs_plain": accuracy, "speed": speed, "stability": stability})
    ctx.save_histories(histories)
    ctx.plot(EXPERIMENT)
    ctx.set_summary(_summary(ctx, cfg, ds, rows, accuracy, speed, stability, FIGURES))


FIGURES = ("loss_curves.png", "weight_mean_drift.png")


def _train_job(cfg: Config, ds: data.Dataset, seeds: list[int], model: Any, job: tuple[str, str, str],
               start_means: dict[str, np.ndarray], data_parallel: bool | None, progress: Any = None,
               fixed_rate: float | None = None) -> dict:
    """One (model, optimizer, variant) at its tuned rate (or at ``fixed_rate``): its row and histories.

    ``seeds`` are every seed set's, in order: the first set searches the rate, the others replicate it.
    """
    model_name, opt_name, variant = job
    make_tx = functools.partial(optimizer, opt_name, variant, schedule=cfg.schedule, steps=cfg.steps)
    search = training.tune_learning_rate(
        model, make_tx, ds, seeds[:cfg.seeds], replicate_seeds=seeds[cfg.seeds:],
        learning_rates=rates(cfg, opt_name) if fixed_rate is None else [fixed_rate],
        widen=cfg.widen if fixed_rate is None else 0, batch_size=cfg.batch_size, steps=cfg.steps,
        eval_every=evaluation_every(cfg), validation_fraction=cfg.validation_fraction,
        data_parallel=data_parallel, progress=progress)
    result = search.result
    step_loss = np.asarray(result.history.step_loss)
    # |per-output mean at the end - at initialization|, averaged over outputs and seeds, per layer.
    end_means = per_output_means(result.state.params)
    drift = {layer: float(np.abs(end_means[layer] - start_means[layer]).mean()) for layer in end_means}
    reached = diagnostics.steps_to_target(step_loss, cfg.loss_target, cfg.smoothing_steps)
    early = int(np.flatnonzero(np.asarray(result.history.steps)[0] == cfg.speed_steps)[0])
    row = {"model": model_name, "optimizer": opt_name, "variant": variant,
           "learning_rate": search.learning_rate, "at_edge": None if fixed_rate is not None else search.at_edge,
           "rate_table": search.table,
           "test_accuracy": training.mean_std(result.final_test_accuracy),
           "accuracy_after_speed_steps": training.mean_std(np.asarray(result.history.test_accuracy)[:, early]),
           "final_train_loss": training.mean_std(np.asarray(result.history.train_loss)[:, -1]),
           "flattened": dataclasses.asdict(training.loss_flattened(step_loss)),
           "steps_to_target": reached,
           "diverged": training.diverged_at(step_loss),
           "weight_mean_drift": drift,
           "max_weight_mean_drift": max(drift.values()),
           "test_loss_reversal": training.mean_std(diagnostics.loss_reversals(result.history.test_loss))}
    return {"row": row, "histories": {"step_loss": step_loss, "eval_steps": np.asarray(result.history.steps)[0],
                                      "train_loss": np.asarray(result.history.train_loss),
                                      "test_accuracy": np.asarray(result.history.test_accuracy),
                                      "test_loss": np.asarray(result.history.test_loss)}}


def _judged(ctx: RunContext, cfg: Config, a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """``a`` minus ``b``, paired by seed (every variant of a seed starts from the same weights and sees the
    same batches), on every seed and on each disjoint seed set (:func:`jaxopt_lab.lab.verdicts.judge`)."""
    j = judge([(a, b)], paired=True, sets=cfg.seed_sets)
    return {"difference": j.difference, "standard_error": j.standard_error,
            "set_verdicts": list(j.set_verdicts), "verdict": j.verdict, "shown_verdict": ctx.verdict(j.verdict)}


def _accuracy_verdicts(ctx: RunContext, cfg: Config, rows: list[dict]) -> list[dict]:
    """"GC improves generalization": GC (ours) minus plain test accuracy per (model, optimizer), each at its
    own best rate."""
    by = {(r["model"], r["optimizer"], r["variant"]): r for r in rows}
    return [{"model": r["model"], "optimizer": r["optimizer"],
             **_judged(ctx, cfg, r["test_accuracy"], by[r["model"], r["optimizer"], PLAIN]["test_accuracy"])}
            for r in rows if r["variant"] == GC]


def _speed(ctx: RunContext, cfg: Config, plain: dict, gc: dict, gc_common: dict) -> dict[str, Any]:
    """"GC makes training faster", two measures: steps to the loss target (plain minus GC) and test accuracy
    after ``speed_steps`` steps (GC minus plain). Judged at plain's rate for both arms (the common rate: a
    speed difference there is not a difference of rates, and the only bias it has favours plain); at each
    arm's own rate it is recorded beside, as a number."""
    arms = {PLAIN: plain, GC: gc, GC_AT_PLAIN_RATE: gc_common}
    steps = {arm: {"values": diagnostics.censored_steps(r["steps_to_target"], cfg.steps)}
             for arm, r in arms.items()}
    early = {arm: r["accuracy_after_speed_steps"] for arm, r in arms.items()}
    # At the arms' own rates a number, not a verdict: the all-seed paired difference alone.
    own_steps = paired_difference([(steps[PLAIN], steps[GC])])
    own_early = paired_difference([(early[GC], early[PLAIN])])
    return {"model": plain["model"], "optimizer": plain["optimizer"], "plain_rate": plain["learning_rate"],
            "gc_rate": gc["learning_rate"], "steps": {arm: v["values"] for arm, v in steps.items()},
            "accuracy_after_speed_steps": {arm: v["values"] for arm, v in early.items()},
            "own_rates": {"steps_difference": own_steps[0], "steps_standard_error": own_steps[1],
                          "accuracy_difference": own_early[0], "accuracy_standard_error": own_early[1]},
            "common_rate_steps": _judged(ctx, cfg, steps[PLAIN], steps[GC_AT_PLAIN_RATE]),
            "common_rate_accuracy": _judged(ctx, cfg, early[GC_AT_PLAIN_RATE], early[PLAIN])}


NO_VERDICT = "no verdict (a run diverged)"


def _stability(ctx: RunContext, cfg: Config, plain: dict, gc: dict, gc_common: dict) -> dict[str, Any]:
    """"GC makes training more stable": the test loss's reversals (``diagnostics.loss_noise``), plain minus
    GC, judged at plain's rate for both arms (a smaller rate alone steadies a curve, so at the arms' own
    rates a difference may be one of rates; recorded beside, as a number). Without a finite reversal in
    every run of both arms (a run diverged) there is no verdict."""
    own = paired_difference([(plain["test_loss_reversal"], gc["test_loss_reversal"])])
    arms = {PLAIN: plain, GC: gc, GC_AT_PLAIN_RATE: gc_common}
    finite = all(np.isfinite(arms[a]["test_loss_reversal"]["values"]).all() for a in (PLAIN, GC_AT_PLAIN_RATE))
    common = (_judged(ctx, cfg, plain["test_loss_reversal"], gc_common["test_loss_reversal"]) if finite else
              {"difference": math.nan, "standard_error": math.nan, "set_verdicts": [], "verdict": NO_VERDICT,
               "shown_verdict": NO_VERDICT})
    return {"model": plain["model"], "optimizer": plain["optimizer"],
            "reversal": {arm: r["test_loss_reversal"]["values"] for arm, r in arms.items()},
            "own_rates": {"difference": own[0], "standard_error": own[1]},
            "common_rate": common}


def plot(ctx: RunContext, histories: Mapping[str, np.ndarray], recorded: Mapping[str, Any]) -> None:
    """Every figure of the experiment, from ``histories.npz`` and ``metrics.json`` alone."""
    config, rows = recorded["config"], recorded["metrics"]["runs"]
    model_names = list(dict.fromkeys(r["model"] for r in rows))
    _loss_figure(ctx, config, rows, histories, model_names)
    _drift_figure(ctx, config, rows, model_names)


def _loss_figure(ctx, config, rows, histories, model_names) -> str:
    fig, axes = new_figure(len(model_names), len(config["optimizers"]), width=4.6, height=3.4)
    window = config["smoothing_steps"]
    for i, m in enumerate(model_names):
        for j, o in enumerate(config["optimizers"]):
            rate = {r["variant"]: r["learning_rate"] for r in rows if (r["model"], r["optimizer"]) == (m, o)}
            rate[GC_AT_PLAIN_RATE] = rate[PLAIN]
            shown = [v for v in (*VARIANTS, GC_AT_PLAIN_RATE) if f"{m}/{o}/{v}/step_loss" in histories]
            losses = [histories[f"{m}/{o}/{v}/step_loss"] for v in shown]  # each (seeds, steps)
            smooth = np.stack([np.convolve(np.nanmean(v, axis=0), np.ones(window) / window, mode="valid")
                               for v in losses])
            first_bad = [next((d for d in training.diverged_at(v) if d is not None), None) for v in losses]
            # The average of steps 1..t is drawn at step t, where steps_to_target reads it.
            plot_loss_curves(axes[i, j], smooth, [f"{v} ({rate[v]:.3g})" for v in shown],
                             steps=np.arange(window, window + smooth.shape[1]), diverged_at=first_bad,
                             logy=True)
            axes[i, j].axhline(config["loss_target"], color="grey", linewidth=0.8, linestyle=":")
            axes[i, j].set_title(f"{m}, {o}", fontsize="medium")
            axes[i, j].set_xlabel("step")
            axes[i, j].legend(fontsize="x-small")
    axes[0, 0].set_ylabel("training loss (moving average, mean of seeds)")
    fig.tight_layout()
    return ctx.save_figure(fig, "loss_curves.png")


def _drift_figure(ctx, config, rows, model_names) -> str:
    fig, axes = new_figure(1, len(model_names), width=5.2, height=3.6)
    for ax, m in zip(axes[0], model_names, strict=True):
        for k, variant in enumerate(VARIANTS):
            values = [next(r["max_weight_mean_drift"] for r in rows if (r["model"], r["optimizer"],
                                                                         r["variant"]) == (m, o, variant))
                      for o in config["optimizers"]]
            ax.bar(np.arange(len(values)) + (k - 1) * 0.27, values, 0.27, label=variant)
        ax.set_xticks(np.arange(len(config["optimizers"])), config["optimizers"])
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 30)  # headroom for the legend above the bars
        ax.set_title(m, fontsize="medium")
        ax.legend(fontsize="x-small", loc="upper center", ncols=len(VARIANTS))
    axes[0, 0].set_ylabel("|per-output mean weight - initial|\n(mean over outputs, largest layer)")
    fig.tight_layout()
    return ctx.save_figure(fig, "weight_mean_drift.png")


def _schedule_words(cfg: Config) -> str:
    words = {"constant": "a constant rate", "cosine": "the rate cosine-decayed to 0 over the budget",
             "step": f"the rate divided by 10 at {', '.join(f'{f:.0%}' for f in STEP_DECAY_AT)} of the budget"}
    return words[cfg.schedule]


def _rate(r: dict) -> str:
    """The chosen rate, marked when it is still at an edge of the rates the search tried."""
    return f"{r['learning_rate']:.3g}" + (f" ({r['at_edge']} tried)" if r["at_edge"] else "")


def _sets(v: dict) -> str:
    return " / ".join(v["set_verdicts"])


def _stability_lines(stability: list[dict], quick: bool) -> list[str]:
    """Claim GC4's table and count, judged at plain's rate."""
    mean = lambda values: f"{np.mean(values):.3f}" if np.isfinite(values).all() else "diverged"
    lines = ["**Stability** (GC makes training more stable), judged with both arms at **plain's rate**, as "
             "speed is: a smaller rate alone steadies a curve. Measured on the test loss at each evaluation "
             "point: its *reversals*, the total variation of its log minus its net change (0 for a curve "
             "that only falls, or only rises), plain minus GC, paired by seed (supported: GC reverses less).",
             "", "| model | optimizer | own rates: plain / GC | difference | at plain's rate: plain / GC | "
             "difference (all seeds) | seed sets | verdict |", "|---|---|---|---|---|---|---|---|"]
    for s in stability:
        own, common, r = s["own_rates"], s["common_rate"], s["reversal"]
        lines.append(f"| {s['model']} | {s['optimizer']} | {mean(r[PLAIN])} / {mean(r[GC])} | "
                     f"{own['difference']:+.3f} ± {own['standard_error']:.3f} | "
                     f"{mean(r[PLAIN])} / {mean(r[GC_AT_PLAIN_RATE])} | "
                     f"{common['difference']:+.3f} ± {common['standard_error']:.3f} | {_sets(common)} | "
                     f"{common['shown_verdict']} |")
    return [*lines, "", _count_line([s["common_rate"] for s in stability], "GC steadier", "GC less steady",
                                    quick)]


def _summary(ctx, cfg, ds, rows, accuracy, speed, stability, figures) -> str:
    by = {(r["model"], r["optimizer"], r["variant"]): r for r in rows}
    total = cfg.seeds * cfg.seed_sets
    at_edge = [r for r in rows if r["at_edge"]]
    lines = [f"# {NAME} — GC on four optimizers, two models, and the weight-space constraint",
             "",
             f"Data: {ds.describe()}. Batch {cfg.batch_size}, **{cfg.steps} optimizer steps** per run at "
             f"{_schedule_words(cfg)}, mean ± std over {total} seeds: {cfg.seed_sets} disjoint sets of "
             f"{cfg.seeds}. Each (model, optimizer, variant) is trained at its own learning rate, chosen on "
             f"the first set's seeds by best mean validation accuracy on a {cfg.validation_fraction:.0%} split "
             "of the training set (`training.tune_learning_rate`: rates x seeds in one vmapped program)"
             + ("; the other sets' seeds are trained at the chosen rate afterwards and never influence it"
                if cfg.seed_sets > 1 else " (one seed set: the verdicts are not replicated)")
             + ". The search starts "
             "from " + "; ".join(f"{o} {list(rates(cfg, o))}" for o in cfg.optimizers)
             + f" and adds a rate 3x beyond the edge while the choice sits at the lowest or highest rate tried "
             f"(at most {cfg.widen} times); a rate marked *highest/lowest tried* is still at an edge. "
             f"Still at an edge: {len(at_edge)} of {len(rows)} runs"
             + (" (" + ", ".join(f"{r['model']} {r['optimizer']} {r['variant']}" for r in at_edge) + ")."
                if at_edge else "."),
             "",
             f"Flattened: {training.endpoint_rule()}. Steps to target: first step where the "
             f"{cfg.smoothing_steps}-step moving average of the training loss is below {cfg.loss_target} "
             "(mean over the seeds that reached it, and how many did).", "",
             "| model | optimizer | variant | rate | test accuracy (%) | final train loss | flattened "
             "| steps to target | weight-mean drift |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hits = [s for s in r["steps_to_target"] if s is not None]
        steps = f"{np.mean(hits):.0f} ({len(hits)}/{total})" if hits else f"not reached (0/{total})"
        loss = r["final_train_loss"]
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['variant']} | {_rate(r)} | "
                     f"{training.pct(r['test_accuracy'])} | {loss['mean']:.3f} ± {loss['std']:.3f} | "
                     f"{training.Flatness(**r['flattened']).describe()} | {steps} | "
                     f"{r['max_weight_mean_drift']:.1e} |")
    lines += ["", "**Generalization** (GC improves test accuracy): GC (ours) minus plain, each at its best "
              "rate, paired by seed (a seed's runs share initial weights and batches). A verdict needs two "
              "standard errors on each seed set; sets that disagree make it *unstable*.", "",
              *_accuracy_table(by, accuracy), "", _count_line(accuracy, "GC better", "GC worse", ctx.quick), "",
              "**Speed** (GC makes training faster), judged with both arms at **plain's rate**: at each arm's "
              "own rate a speed difference may be a difference of rates (a larger rate reaches a target "
              "sooner), while plain's tuned rate is the one GC is added to as a drop-in (the paper keeps the "
              "baseline's schedule) and the only one whose bias favours plain. At the arms' own rates the "
              "differences are numbers beside it, not verdicts. Two measures, paired by seed as above: steps "
              f"until the moving-average training loss falls below {cfg.loss_target} (a seed that never did "
              f"counts as the budget, {cfg.steps}: a lower bound), and test accuracy after {cfg.speed_steps} "
              "steps.", *_speed_tables(cfg, speed), "",
              "- Steps to target, at plain's rate: " + _count_line(
                  [s["common_rate_steps"] for s in speed], "GC faster", "GC slower", ctx.quick),
              f"- Accuracy after {cfg.speed_steps} steps, at plain's rate: " + _count_line(
                  [s["common_rate_accuracy"] for s in speed], "GC ahead", "GC behind", ctx.quick),
              "- " + _rate_reading(speed),
              "", *_stability_lines(stability, ctx.quick),
              "",
              f"![loss curves]({figures[0]})", "", f"![weight-mean drift]({figures[1]})", "",
              _constraint_reading(rows), "",
              "The paper's headline (ImageNet top-1 error, ResNet-50, SGD+momentum, without -> with GC, quoted "
              "from its Table 3): " + "; ".join(f"{k} {a} -> {b}" for k, (a, b) in PAPER_IMAGENET.items())
              + ": gains of about half a point on a 1.28M-image task with deep BN/GN ResNets trained for 100 "
              "epochs. " + _gain_reading(accuracy)]
    return "\n".join(lines)


def _accuracy_table(by: Mapping[tuple[str, str, str], dict], accuracy: list[dict]) -> list[str]:
    lines = ["| model | optimizer | plain (%) | GC (%) | GC minus plain (pts, all seeds) | seed sets "
             "| verdict |", "|---|---|---|---|---|---|---|"]
    for v in accuracy:
        plain, gc = (by[v["model"], v["optimizer"], variant]["test_accuracy"] for variant in (PLAIN, GC))
        lines.append(f"| {v['model']} | {v['optimizer']} | {training.pct(plain)} | {training.pct(gc)} | "
                     f"{100 * v['difference']:+.1f} ± {100 * v['standard_error']:.1f} | {_sets(v)} | "
                     f"{v['shown_verdict']} |")
    return lines


def _speed_tables(cfg: Config, speed: list[dict]) -> list[str]:
    """Steps to the target, then accuracy after ``speed_steps``: at the arms' own rates (numbers) and at
    plain's rate (the verdict)."""
    mean = lambda values, scale, digits: f"{scale * np.mean(values):.{digits}f}"
    diff = lambda d, se, scale, digits: f"{scale * d:+.{digits}f} ± {scale * se:.{digits}f}"
    lines = []
    for measure, scale, digits, title in (
            ("steps", 1, 1, f"Steps until the training loss falls below {cfg.loss_target}, plain minus GC"),
            ("accuracy", 100, 1, f"Test accuracy (%) after {cfg.speed_steps} steps, GC minus plain")):
        values = "steps" if measure == "steps" else "accuracy_after_speed_steps"
        lines += ["", f"{title}:", "",
                  "| model | optimizer | rate plain / GC | own rates: plain / GC | difference "
                  "| at plain's rate: plain / GC | difference (all seeds) | seed sets | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in speed:
            own, common, arm = s["own_rates"], s[f"common_rate_{measure}"], s[values]
            lines.append(
                f"| {s['model']} | {s['optimizer']} | {s['plain_rate']:.3g} / {s['gc_rate']:.3g} | "
                f"{mean(arm[PLAIN], scale, digits)} / {mean(arm[GC], scale, digits)} | "
                f"{diff(own[f'{measure}_difference'], own[f'{measure}_standard_error'], scale, digits)} | "
                f"{mean(arm[PLAIN], scale, digits)} / {mean(arm[GC_AT_PLAIN_RATE], scale, digits)} | "
                f"{diff(common['difference'], common['standard_error'], scale, digits)} | {_sets(common)} | "
                f"{common['shown_verdict']} |")
    return lines


def _count_line(judged: list[dict], better: str, worse: str, quick: bool) -> str:
    """How many pairs each replicated verdict got, in the claim's words."""
    count = lambda label: sum(v["verdict"] == label for v in judged)
    return (f"{better} (supported) in {count(SUPPORTED)} of {len(judged)} model x optimizer pairs, {worse} "
            f"(not supported) in {count(NOT_SUPPORTED)}, within noise in {count(UNCLEAR)}, unstable (the seed "
            f"sets disagree) in {count(UNSTABLE)}"
            + (f", {NO_VERDICT} in {count(NO_VERDICT)}" if count(NO_VERDICT) else "")
            + (" (quick run: not conclusive)." if quick else "."))


def _rate_reading(speed: list[dict]) -> str:
    """Whether the rate explains a speed difference: GC faster at its own rate, and at plain's?"""
    differ = [s for s in speed if s["gc_rate"] != s["plain_rate"]]
    faster_own = [s for s in differ if verdict(s["own_rates"]["steps_difference"],
                                               s["own_rates"]["steps_standard_error"]) == SUPPORTED]
    kept = sum(s["common_rate_steps"]["verdict"] == SUPPORTED for s in faster_own)
    outcome = ("same" if not differ else "none" if not faster_own else
               "kept" if kept == len(faster_own) else "lost" if not kept else "partly")
    chose = f"GC chose another rate than plain in {len(differ)} of {len(speed)} pairs"
    return reading(outcome, {
        "same": "GC chose plain's rate in every pair: the own-rate and the common-rate comparisons are the "
                "same runs.",
        "none": f"{chose}; at its own rate it was not faster (two standard errors, steps to target) in any of "
                "them.",
        "kept": f"{chose}; in all {len(faster_own)} where it was faster at its own rate (two standard errors, "
                "steps to target), it is faster at plain's rate too: the speed is GC's, not its rate's.",
        "lost": f"{chose}; in the {len(faster_own)} where it was faster at its own rate (two standard errors, "
                "steps to target), it is not shown faster at plain's rate (there: "
                f"{', '.join(s['common_rate_steps']['verdict'] for s in faster_own)}): the speed is not shown "
                "without its rate.",
        "partly": f"{chose}; of the {len(faster_own)} where it was faster at its own rate (two standard "
                  f"errors, steps to target), {kept} stay faster at plain's rate."})


# Below this, a weight mean that moved is float32 rounding: the constraint holds.
ROUNDING_DRIFT = 1e-5


def _constraint_reading(rows: list[dict]) -> str:
    """The weight-space constraint as measured: does each output's mean weight stay put under GC?"""
    drift = lambda optimizers: max(r["max_weight_mean_drift"] for r in rows
                                   if r["variant"] == GC and r["optimizer"] in optimizers)
    sgd = [o for o in ("SGD", "SGD+momentum") if any(r["optimizer"] == o for r in rows)]
    adam = [o for o in ("Adam", "AdamW") if any(r["optimizer"] == o for r in rows)]
    text = "Weight-space constraint (the largest drift of any output's mean weight from its initial value):"
    if sgd:
        held = drift(sgd) < ROUNDING_DRIFT
        text += f" with GC on {' and '.join(sgd)}, {drift(sgd):.1e}" + reading(str(held), {
            "True": ": every update of a kernel sums to zero over its inputs, so the means stay at float32 "
                    "rounding, as the paper's constraint says.",
            "False": f": above float32 rounding ({ROUNDING_DRIFT:.0e}), so the constraint did NOT hold here."})
    if adam:
        moved = drift(adam) >= ROUNDING_DRIFT
        text += f" With GC on {' and '.join(adam)}, {drift(adam):.1e}" + reading(str(moved), {
            "True": ": the gradient is centralized before the per-coordinate scaling, so the update is not "
                    "zero-mean and the means drift (the official repository's Adam_GCC2/AdamW_GCC2, our "
                    "`adam_gc`, keep them fixed instead).",
            "False": ": the means stayed at rounding here too."})
    return text + (" `optax.centralize` centres the first axis (PyTorch's outputs), i.e. Flax's *inputs*: "
                   "it does not hold the per-output means.")


def _gain_reading(verdicts: list[dict]) -> str:
    """What the measured verdicts say about such a gain here, chosen by the replicated 2-standard-error rule."""
    counts = {label: sum(v["verdict"] == label for v in verdicts)
              for label in (SUPPORTED, NOT_SUPPORTED, UNCLEAR, UNSTABLE)}
    spread = sorted(100 * v["standard_error"] for v in verdicts)[len(verdicts) // 2]
    paper_gain = min(a - b for a, b in PAPER_IMAGENET.values())
    outcome = ("better" if counts[SUPPORTED] and not counts[NOT_SUPPORTED] else
               "worse" if counts[NOT_SUPPORTED] and not counts[SUPPORTED] else
               "mixed" if counts[SUPPORTED] else
               "unstable" if counts[UNSTABLE] else "noise" if spread >= paper_gain / 2 else "resolved")
    unstable = f" ({counts[UNSTABLE]} unstable across the seed sets)" if counts[UNSTABLE] else ""
    return reading(outcome, {
        "better": f"Here GC was better in {counts[SUPPORTED]} of {len(verdicts)} pairs and worse in "
                  f"none{unstable}.",
        "worse": f"Here GC was worse in {counts[NOT_SUPPORTED]} of {len(verdicts)} pairs and better in none"
                 f"{unstable}.",
        "mixed": f"Here GC was better in {counts[SUPPORTED]} pairs and worse in "
                 f"{counts[NOT_SUPPORTED]}{unstable}.",
        "unstable": f"Here no pair was better or worse on both seed sets: {counts[UNSTABLE]} of "
                    f"{len(verdicts)} were beyond two standard errors on one set only or opposite on the two "
                    "(unstable), the rest within noise on both.",
        "noise": f"Here every pair is within noise on both seed sets: the median standard error, {spread:.2f} "
                 f"points, is at least half the paper's smallest gain ({paper_gain:.2f}), so an effect of that "
                 "size could not be resolved.",
        "resolved": f"Here every pair is within noise on both seed sets although the median standard error, "
                    f"{spread:.2f} points, is below half the paper's smallest gain ({paper_gain:.2f}): a gain "
                    "of that size would have shown, and none did."})


EXPERIMENT = Experiment(NAME, "SGD/momentum/Adam/AdamW with and without GC (ours and optax.centralize) on a "
                        "CNN and an MLP: accuracy, speed at a common rate, per-output weight means, replicated "
                        "on two seed sets", run, check_configs, config=Config, check_config=check_config,
                        plot=plot)

if __name__ == "__main__":
    raise SystemExit(main_for(EXPERIMENT))
