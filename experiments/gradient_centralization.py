"""gradient-centralization: SGD, SGD+momentum, Adam, AdamW with and without GC on real digits.

mission.md part C (Yong et al., ECCV 2020). Every optimizer runs plain, with our GC
(:func:`jaxopt_lab.centralization.with_gradient_centralization`, the paper's placement: centralize the
gradient, then the optimizer) and with ``optax.centralize`` chained first (the anchor; it centres over
every axis but the FIRST, PyTorch's output axis, so on Flax kernels it is a different projection), on a
CNN with batch norm and on an MLP. Reports final test accuracy, steps to a training-loss target, and the
weight-space constraint: each layer's per-output mean weight over training.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import optax

from jaxopt_lab import data, models, training
from jaxopt_lab.centralization import with_gradient_centralization
from jaxopt_lab.experiment import Experiment, RunContext, main_for
from jaxopt_lab.plotting import new_figure, plot_loss_curves

NAME = "gradient-centralization"
VARIANTS = ("plain", "GC (ours)", "optax.centralize")
OPTIMIZERS = {
    "SGD": lambda: optax.sgd(0.1),
    "SGD+momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "Adam": lambda: optax.adam(1e-3),
    "AdamW": lambda: optax.adamw(1e-3, weight_decay=1e-2),
}
# Yong et al. (2020), ImageNet top-1 error (%) of ResNet-50, 100 epochs, SGD+momentum, without -> with GC
# (their Table 3), quoted from the paper; not re-measured here.
PAPER_IMAGENET = {"ResNet-50 (BN)": (23.71, 23.21), "ResNet-50 (GN)": (24.00, 23.48)}


@dataclasses.dataclass(frozen=True)
class Config:
    optimizers: tuple[str, ...]
    epochs: int
    seeds: int
    cnn_widths: tuple[int, ...]
    mlp_widths: tuple[int, ...] = (128, 128)
    batch_size: int = 32
    loss_target: float = 0.5
    smoothing_steps: int = 20


QUICK = Config(optimizers=("SGD+momentum", "Adam"), epochs=3, seeds=3, cnn_widths=(16, 32))
FULL = Config(optimizers=tuple(OPTIMIZERS), epochs=15, seeds=5, cnn_widths=(16, 32, 32))


def optimizer(name: str, variant: str) -> optax.GradientTransformation:
    """``name`` from :data:`OPTIMIZERS`, ``variant`` from :data:`VARIANTS`."""
    base = OPTIMIZERS[name]()
    if variant == "plain":
        return base
    if variant == "GC (ours)":
        return with_gradient_centralization(base)
    return optax.chain(optax.centralize(), base)


def per_output_means(params) -> dict[str, object]:
    """Each kernel's mean over every axis but the last (Flax's output features): one value per output."""
    return {layer: leaves["kernel"].reshape(-1, leaves["kernel"].shape[-1]).mean(axis=0)
            for layer, leaves in params.items() if "kernel" in leaves}


def steps_to_target(step_loss: np.ndarray, target: float, window: int) -> list[int | None]:
    """Per run, the first step at which the moving average of the training loss is below ``target``."""
    out = []
    for row in np.atleast_2d(step_loss):
        smooth = np.convolve(np.nan_to_num(row, nan=np.inf), np.ones(window) / window, mode="valid")
        hit = np.flatnonzero(smooth < target)
        out.append(int(hit[0]) + window if hit.size else None)
    return out


def run(ctx: RunContext) -> None:
    cfg = QUICK if ctx.quick else FULL
    ds = data.load_dataset(ctx.data_path)
    seeds = [ctx.seed + i for i in range(cfg.seeds)]
    model_for = {
        "CNN (batch norm)": models.CNN(norm="batch", num_classes=ds.num_classes, widths=cfg.cnn_widths),
        "MLP": models.MLP(num_classes=ds.num_classes, widths=cfg.mlp_widths)}
    jobs = [(m, o, v) for m in model_for for o in cfg.optimizers for v in VARIANTS]
    rows, curves, drift = [], {}, {}
    for model_name, opt_name, variant in ctx.progress(jobs, desc="training"):
        result = training.train_seeds(model_for[model_name], optimizer(opt_name, variant), ds, seeds,
                                      epochs=cfg.epochs, batch_size=cfg.batch_size, probe=per_output_means,
                                      data_parallel=ctx.data_parallel)
        step_loss = np.asarray(result.history.step_loss)
        # |per-output mean now - at initialization|, averaged over outputs and seeds: (epochs + 1,) per layer.
        layer_drift = {layer: np.abs(means - means[:, :1]).mean(axis=(0, 2))
                       for layer, means in ((k, np.asarray(v)) for k, v in result.history.probes.items())}
        reached = steps_to_target(step_loss, cfg.loss_target, cfg.smoothing_steps)
        hits = [r for r in reached if r is not None]
        rows.append({"model": model_name, "optimizer": opt_name, "variant": variant,
                     "test_accuracy": training.mean_std(result.final_test_accuracy),
                     "final_train_loss": training.mean_std(result.history.epoch_loss[:, -1]),
                     "steps_to_target": reached,
                     "steps_to_target_mean": float(np.mean(hits)) if hits else None,
                     "diverged": training.diverged_at(step_loss),
                     "max_weight_mean_drift": float(max(d[-1] for d in layer_drift.values()))})
        curves[model_name, opt_name, variant] = step_loss
        drift[model_name, opt_name, variant] = layer_drift

    figures = [_loss_figure(ctx, cfg, curves, list(model_for)), _drift_figure(ctx, cfg, drift, list(model_for))]
    ctx.set_metrics({**dataclasses.asdict(cfg), "seeds_used": seeds, "data": ds.describe(),
                     "paper_imagenet_top1_error": PAPER_IMAGENET},
                    {"runs": rows, "weight_mean_drift": [
                        {"model": m, "optimizer": o, "variant": v, "per_layer": d}
                        for (m, o, v), d in drift.items()]})
    ctx.set_summary(_summary(cfg, ds, rows, figures))


def _loss_figure(ctx, cfg, curves, model_names) -> str:
    fig, axes = new_figure(len(model_names), len(cfg.optimizers), width=4.6, height=3.4)
    for i, m in enumerate(model_names):
        for j, o in enumerate(cfg.optimizers):
            losses = np.stack([curves[m, o, v] for v in VARIANTS])  # (variants, seeds, steps)
            window = np.ones(cfg.smoothing_steps) / cfg.smoothing_steps
            smooth = np.stack([np.convolve(np.nanmean(v, axis=0), window, mode="valid") for v in losses])
            first_bad = [next((d for d in training.diverged_at(v) if d is not None), None) for v in losses]
            plot_loss_curves(axes[i, j], smooth, list(VARIANTS), diverged_at=first_bad, logy=True)
            axes[i, j].axhline(cfg.loss_target, color="grey", linewidth=0.8, linestyle=":")
            axes[i, j].set_title(f"{m}, {o}", fontsize="medium")
            axes[i, j].set_xlabel("step")
    axes[0, 0].set_ylabel("training loss (moving average, mean of seeds)")
    return ctx.save_figure(fig, "loss_curves.png")


def _drift_figure(ctx, cfg, drift, model_names) -> str:
    fig, axes = new_figure(len(model_names), len(cfg.optimizers), width=4.6, height=3.4)
    for i, m in enumerate(model_names):
        for j, o in enumerate(cfg.optimizers):
            ax = axes[i, j]
            for k, layer in enumerate(drift[m, o, "plain"]):
                color = f"C{k}"
                for variant, style in zip(VARIANTS, ("-", "--", ":"), strict=True):
                    ax.plot(drift[m, o, variant][layer], linestyle=style, color=color,
                            label=f"{layer}, {variant}" if k == 0 or variant == "plain" else None)
            ax.set_yscale("symlog", linthresh=1e-6)
            ax.set_title(f"{m}, {o}", fontsize="medium")
            ax.set_xlabel("epoch")
            ax.legend(fontsize="x-small")
    axes[0, 0].set_ylabel("|per-output mean weight - initial|")
    return ctx.save_figure(fig, "weight_mean_drift.png")


def _fmt(r: dict) -> str:
    return f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"


def _summary(cfg, ds, rows, figures) -> str:
    by = {(r["model"], r["optimizer"], r["variant"]): r for r in rows}
    lines = ["# gradient-centralization — GC on four optimizers, two models, and the weight-space constraint",
             "",
             f"Data: {ds.describe()}. Batch {cfg.batch_size}, {cfg.epochs} epochs, mean ± std over {cfg.seeds} "
             f"seeds. Steps to target: first step where the {cfg.smoothing_steps}-step moving average of the "
             f"training loss is below {cfg.loss_target} (mean over the seeds that reached it).", "",
             "| model | optimizer | variant | test accuracy (%) | Δ vs plain (pts) | final train loss "
             "| steps to target | weight-mean drift |", "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for r in rows:
        plain = by[r["model"], r["optimizer"], "plain"]["test_accuracy"]
        delta = 100 * (r["test_accuracy"]["mean"] - plain["mean"])
        reached = sum(s is not None for s in r["steps_to_target"])
        steps = (f"not reached (0/{cfg.seeds})" if r["steps_to_target_mean"] is None
                 else f"{r['steps_to_target_mean']:.0f} ({reached}/{cfg.seeds})")
        loss = r["final_train_loss"]
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['variant']} | {_fmt(r['test_accuracy'])} | "
                     f"{delta:+.1f} | {loss['mean']:.3f} ± {loss['std']:.3f} | {steps} | "
                     f"{r['max_weight_mean_drift']:.1e} |")
        if r["variant"] == "GC (ours)":
            se = 100 * np.hypot(r["test_accuracy"]["std"], plain["std"]) / np.sqrt(cfg.seeds)
            verdicts.append((r["model"], r["optimizer"], delta, se))
    better = sum(d > 2 * se for *_, d, se in verdicts)
    worse = sum(d < -2 * se for *_, d, se in verdicts)
    lines += ["", f"GC (ours) vs plain: better by more than 2 standard errors in {better} of {len(verdicts)} "
              f"model x optimizer pairs, worse in {worse}, within noise in {len(verdicts) - better - worse}.",
              "",
              f"![loss curves]({figures[0]})", "", f"![weight-mean drift]({figures[1]})", "",
              "Weight-space constraint: with GC on SGD and SGD+momentum every update of a kernel sums to zero "
              "over its inputs, so each output's mean weight stays at its initial value (drift at float32 "
              "rounding). With Adam/AdamW the *gradient* is centralized before the per-coordinate scaling, "
              "so the update is not zero-mean and the means drift (the paper's constraint holds exactly only "
              "for SGD-type updates; the official repository's Adam_GCC2/AdamW_GCC2 keep the weight means "
              "fixed instead). `optax.centralize` centres the first axis (PyTorch's outputs), i.e. Flax's "
              "*inputs*: it does not hold the per-output means.", "",
              "The paper's headline (ImageNet top-1 error, ResNet-50, SGD+momentum, without -> with GC, quoted "
              "from its Table 3): " + "; ".join(f"{k} {a} -> {b}" for k, (a, b) in PAPER_IMAGENET.items())
              + ". Reading: gains of about half a point on a 1.28M-image task with deep BN/GN ResNets trained "
              "for 100 epochs. On 1,347 8x8 digits with a 2-3 layer network, the seed-to-seed spread is of the "
              "same size or larger than such a gain, so a half-point effect could not be resolved here; what "
              "does carry over exactly is the mechanism (zero-mean updates, fixed per-output weight means "
              "for SGD-type optimizers), checked above."]
    return "\n".join(lines)


EXPERIMENT = Experiment(NAME, "SGD/momentum/Adam/AdamW with and without GC (ours and optax.centralize) on a "
                        "CNN and an MLP: accuracy, steps to target, per-output weight means", run)

if __name__ == "__main__":
    raise SystemExit(main_for(NAME))
