"""normalization-depth: does batch norm's small-batch degradation grow with depth?

The ``normalization`` experiment finds batch norm's loss between batch 32 and batch 2 far smaller than the
Group Norm paper's (Wu & He, ECCV 2018, Figure 1: 11.1 points of ImageNet error on ResNet-50) and offers
depth as a hypothesis: the noise of small-batch statistics compounds over ResNet-50's ~50 normalized
layers, and a four-layer CNN absorbs it. This experiment tests that hypothesis. A residual CNN
(:class:`jaxopt_lab.lab.models.ResidualCNN`: post-activation blocks, each block's last norm scale starting
at zero) at several depths, with batch norm and with group norm (whose statistics never cross examples: the
control for everything the batch size changes besides BN's statistics), is trained at a small and at the
reference batch size, with Adam at a rate tuned per configuration on a validation split
(:func:`jaxopt_lab.lab.training.tune_learning_rate`, the grid widened by up to ``widen`` rates while the choice
sits at its edge), chosen by a search seed set and replicated at that rate by a disjoint seed set.

Per depth: BN(reference) - BN(small) test accuracy, the same for GN beside it, and BN's running- minus
batch-statistics gap at test time (:func:`jaxopt_lab.lab.diagnostics.bn_statistics_gap`). The verdict on
"the small-batch degradation grows with depth": the BN gap at the deepest minus at the shallowest depth, and
the per-seed slope of the gap per doubling of depth, each judged on both seed sets
(:func:`jaxopt_lab.lab.verdicts.judge`). ``--data mnist1d`` runs it on MNIST-1D.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optax

from jaxopt_lab.lab import data, models, norm_claims, training
from jaxopt_lab.lab.diagnostics import NOT_LEARNED, bn_statistics_gap, learned
from jaxopt_lab.lab.experiment import Experiment, RunContext, check_modes, check_training_config
from jaxopt_lab.lab.norm_claims import PAPER_ERROR
from jaxopt_lab.lab.plotting import new_figure
from jaxopt_lab.lab.runner import main_for
from jaxopt_lab.lab.training import pct
from jaxopt_lab.lab.verdicts import NOT_SUPPORTED, SUPPORTED, UNCLEAR, UNSTABLE, judge, reading

NAME = "normalization-depth"
NORMS = ("batch", "group")
SUPPORTED_DATA = data.BUILTIN_DATASETS
# Normalized layers of the Group Norm paper's ResNet-50: the stem, 16 bottleneck blocks x 3, 4 projections.
RESNET50_NORM_LAYERS = 53


@dataclasses.dataclass(frozen=True)
class Config:
    depths: tuple[int, ...]  # residual blocks; a ResidualCNN has 1 + 2 * blocks normalized layers
    small_batch: int
    # The step budget at a batch size: the larger of `epochs` passes over the training split and `min_steps`
    # optimizer steps (steps_for): the small batch trains for `epochs` epochs, the reference batch (16x fewer
    # steps per epoch) for at least `min_steps` updates.
    epochs: int
    min_steps: int
    seeds: int  # per seed set: `seeds` choose the rate, `seeds` more (disjoint) replicate at the choice
    learning_rates: tuple[float, ...]  # Adam rates, the grid each search starts from
    widen: int  # rates the search may add beyond the grid's edges (tune_learning_rate(widen=...))
    width: int = 16
    num_groups: int = 4
    reference_batch: int = 32
    validation_fraction: float = 0.2

    @classmethod
    def for_mode(cls, quick: bool, data: str | None = None) -> Config:
        """The config of a run: :data:`QUICK`, or :data:`FULL` with ``data``'s overrides
        (:data:`FULL_BY_DATA`; ``None`` or a ``.npz`` file: none)."""
        return QUICK if quick else FULL_BY_DATA.get(data or "", FULL)


# Quick: two shallow depths, one rate (so the search and the replicate set share one compiled program),
# one seed per set; compile-bound (eight configurations).
QUICK = Config(depths=(1, 2), small_batch=4, epochs=1, min_steps=200, seeds=1, learning_rates=(1e-2,),
               widen=0, width=8)
# Full: 2 blocks (5 normalized layers, about the normalization experiment's four-layer CNN) to 26 (53, as
# many as ResNet-50), about evenly spaced in log(depth); batch 2 against 32 (the paper's extremes). Budget
# (MNIST-1D): batch 2 for 4 epochs (6400 steps), batch 32 for 1000 steps (10 epochs; at 5 epochs its chosen
# rate sat at the top of the grid, under-trained); the 26-block runs take two thirds of the time. Adam's best
# rate here lies between 1e-3 (batch 2) and 3e-2 (batch 32).
FULL = Config(depths=(2, 7, 26), small_batch=2, epochs=4, min_steps=1000, seeds=3,
              learning_rates=(1e-3, 3e-3, 1e-2), widen=1)
FULL_BY_DATA: dict[str, Config] = {}


def batch_sizes(cfg: Config) -> tuple[int, int]:
    """``(small, reference)``."""
    return cfg.small_batch, cfg.reference_batch


def steps_for(cfg: Config, batch_size: int, train_size: int) -> int:
    """The step budget at ``batch_size`` on ``train_size`` examples: ``cfg.epochs`` passes over them, at least
    ``cfg.min_steps``, rounded up to a multiple of 20 (training evaluates every budget/20 steps; a remainder
    would compile the step loop a second time)."""
    return max(cfg.min_steps, 20 * math.ceil(cfg.epochs * train_size / batch_size / 20))


def model(cfg: Config, norm: str, blocks: int, num_classes: int) -> models.ResidualCNN:
    return models.ResidualCNN(norm=norm, blocks=blocks, width=cfg.width, num_classes=num_classes,
                              num_groups=cfg.num_groups)


def _jobs(cfg: Config) -> list[tuple[str, int, int]]:
    return [(norm, blocks, b) for blocks in cfg.depths for norm in NORMS for b in batch_sizes(cfg)]


def check_config(cfg: Config, label: str, data_name: str | None = None) -> None:
    """Builds every model and optimizer of ``cfg`` abstractly on ``data_name`` (``None``: every supported
    dataset); ``ValueError`` naming ``label`` if one cannot run."""
    depths = tuple(cfg.depths)
    if len(depths) < 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths) \
            or list(depths) != sorted(set(depths)):
        raise ValueError(f"{label}: depths must be two or more increasing ints >= 1 (residual blocks), "
                         f"got {depths!r}")
    if not 1 <= cfg.small_batch < cfg.reference_batch:
        raise ValueError(f"{label}: small_batch must lie in [1, reference_batch={cfg.reference_batch}), "
                         f"got {cfg.small_batch!r}")
    if cfg.epochs < 1 or cfg.min_steps < 20 or cfg.min_steps % 20:
        raise ValueError(f"{label}: needs epochs >= 1 and min_steps a positive multiple of 20, got "
                         f"epochs={cfg.epochs!r}, min_steps={cfg.min_steps!r}")
    if cfg.seeds < 1 or len(cfg.learning_rates) < 1 or cfg.widen < 0:
        raise ValueError(f"{label}: needs seeds >= 1 per set, >= 1 learning rate and widen >= 0, got "
                         f"seeds={cfg.seeds!r}, learning_rates={cfg.learning_rates!r}, widen={cfg.widen!r}")
    for name in SUPPORTED_DATA if data_name is None else (data_name,):
        ds = data.load_dataset(name)
        train_size = training.examples_after_validation(len(ds.y_train), cfg.validation_fraction)
        for norm in NORMS:
            for blocks in depths:
                check_training_config(model(cfg, norm, blocks, ds.num_classes),
                                      optax.adam(cfg.learning_rates[0]), ds.image_shape,
                                      batch_sizes=batch_sizes(cfg), train_size=train_size,
                                      where=f"{label}: {norm} norm, {blocks} blocks on {name}")


def check_configs() -> None:
    """The quick and the full config of every supported dataset, without training (a few seconds)."""
    check_modes(Config.for_mode, check_config, SUPPORTED_DATA)


def _train_job(cfg: Config, ds: data.Dataset, seeds: list[int], replicate_seeds: list[int],
               job: tuple[str, int, int], data_parallel: bool | None, progress: Any = None) -> dict:
    """One (norm, depth, batch size): the rate search, its replication, and for batch norm the running vs
    batch statistics gap of every run."""
    norm, blocks, batch_size = job
    search = training.tune_learning_rate(
        model(cfg, norm, blocks, ds.num_classes), optax.adam, ds, seeds, learning_rates=cfg.learning_rates,
        batch_size=batch_size, steps=steps_for(cfg, batch_size, _train_size(cfg, ds)),
        validation_fraction=cfg.validation_fraction,
        widen=cfg.widen, replicate_seeds=replicate_seeds, data_parallel=data_parallel, progress=progress)
    history = search.result.history
    unit: dict[str, Any] = {"record": norm_claims.record(search), "histories": {
        "step_loss": np.asarray(history.step_loss), "eval_steps": np.asarray(history.steps)[0],
        "test_accuracy": np.asarray(history.test_accuracy)}}
    if norm == "batch":
        unit["bn_gap"] = bn_statistics_gap(search.result.state, ds, batch_size)
    return unit


def _gap(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict:
    """Per seed ``a - b`` (seed ``s`` of both: the same initial weights where the shapes agree)."""
    return training.mean_std(np.subtract(a["values"], b["values"]))


def _slopes(gaps: Mapping[int, Mapping[str, Any]]) -> dict:
    """Per seed, the least-squares slope of the gap against log2(blocks): the change per doubling of depth."""
    depths = sorted(gaps)
    x = np.log2(np.asarray(depths, dtype=np.float64))[:, None]
    y = np.asarray([gaps[d]["values"] for d in depths], dtype=np.float64)  # (depths, seeds)
    # The closed form, not np.polyfit: a diverged seed's NaN gives that seed a NaN slope instead of raising.
    x = x - x.mean()
    return training.mean_std((x * (y - y.mean(axis=0))).sum(axis=0) / (x**2).sum())


def analyse(cfg: Config, runs: Mapping[str, Mapping[int, Mapping[int, dict]]],
            bn_gap: Mapping[int, Mapping[int, dict]], num_classes: int) -> dict:
    """Every measure and verdict of the experiment from the trained records, no training.

    Args:
      runs: ``runs[norm][blocks][batch_size]``, records with per-seed test accuracies (``values``: the
        search's seeds, then the replicate set's) and ``final_train_loss``.
      bn_gap: ``bn_gap[blocks][batch_size]``, :func:`bn_statistics_gap` of the batch-norm runs.
      num_classes: for the did-it-learn rule (:func:`jaxopt_lab.lab.diagnostics.learned`).

    Returns:
      ``{"per_depth": [...], "claims": [...]}``: per depth, each norm's reference-minus-small accuracy gap
      (``{"mean", "std", "values"}`` per seed, and its :func:`judge` row) and BN's statistics gap; per
      claim, the test, the difference and standard error over all seeds, each seed set's verdict and the
      replicated verdict (:data:`NOT_LEARNED` when a compared model did not learn).
    """
    small, ref = batch_sizes(cfg)
    depths = sorted(cfg.depths)
    shallow, deep = depths[0], depths[-1]
    gaps = {norm: {d: _gap(runs[norm][d][ref], runs[norm][d][small]) for d in depths} for norm in NORMS}
    stats = {d: bn_gap[d][small]["gap"] for d in depths}
    per_depth = []
    for d in depths:
        row: dict[str, Any] = {"blocks": d, "normalized_layers": 1 + 2 * d,
                               "statistics_gap": stats[d], "statistics_gap_reference": bn_gap[d][ref]["gap"]}
        for norm in NORMS:
            row[norm] = {"gap": gaps[norm][d], **_judged([(runs[norm][d][ref], runs[norm][d][small])],
                                                         (runs[norm][d][ref], runs[norm][d][small]),
                                                         num_classes)}
        per_depth.append(row)
    both = [runs[n][d][b] for n in NORMS for d in (shallow, deep) for b in (small, ref)]
    bn_only = [runs["batch"][d][b] for d in (shallow, deep) for b in (small, ref)]
    specific = {d: _gap(gaps["batch"][d], gaps["group"][d]) for d in (shallow, deep)}
    zero = training.mean_std(np.zeros(len(gaps["batch"][shallow]["values"])))
    claims = [
        {"id": "bn_gap_grows", "claim": "BN's small-batch degradation grows with depth",
         "test": f"BN gap (batch {ref} minus {small}, points) at {deep} blocks minus at {shallow}",
         **_judged([(gaps["batch"][deep], gaps["batch"][shallow])], bn_only, num_classes)},
        {"id": "bn_gap_trend", "claim": "BN's small-batch degradation grows with depth (trend)",
         "test": "slope of the BN gap per doubling of depth (per seed, least squares over log2 blocks) vs 0",
         **_judged([(_slopes(gaps["batch"]), zero)], [runs["batch"][d][b] for d in depths
                                                       for b in (small, ref)], num_classes, paired=True)},
        {"id": "gn_gap_grows", "claim": "GN's small-batch gap grows with depth (the control)",
         "test": f"GN gap (batch {ref} minus {small}, points) at {deep} blocks minus at {shallow}",
         **_judged([(gaps["group"][deep], gaps["group"][shallow])],
                   [runs["group"][d][b] for d in (shallow, deep) for b in (small, ref)], num_classes)},
        {"id": "bn_specific", "claim": "the growth is BN's own (beyond GN's)",
         "test": f"(BN gap minus GN gap) at {deep} blocks minus at {shallow}",
         **_judged([(specific[deep], specific[shallow])], both, num_classes)},
        {"id": "statistics_gap_grows",
         "claim": f"{small}-example statistics cost BN more at test time the deeper it is",
         "test": f"BN at batch {small}, running minus batch statistics (points) at {deep} blocks minus at "
                 f"{shallow}",
         **_judged([(stats[deep], stats[shallow])], [runs["batch"][d][small] for d in (shallow, deep)],
                   num_classes)},
    ]
    return {"per_depth": per_depth, "claims": claims}


def _judged(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], compared: Sequence[dict],
            num_classes: int, *, paired: bool = False) -> dict:
    """:func:`judge` on two seed sets, as a table row; :data:`NOT_LEARNED` when a compared run did not learn."""
    j = judge(pairs, paired=paired, sets=2)
    untrained = [r["final_train_loss"]["mean"] for r in compared if not learned(r, num_classes)]
    return {"difference": j.difference, "standard_error": j.standard_error,
            "set_verdicts": list(j.set_verdicts), "verdict": NOT_LEARNED if untrained else j.verdict,
            "untrained_losses": untrained}


def _dataset(ctx: RunContext) -> data.Dataset:
    return data.load_dataset(None if ctx.data_path is None else str(ctx.data_path))


def run(ctx: RunContext) -> None:
    ds = _dataset(ctx)
    cfg = ctx.resolve_config(Config, ds.name)
    seeds = [ctx.seed + i for i in range(cfg.seeds)]
    replicate_seeds = [ctx.seed + cfg.seeds + i for i in range(cfg.seeds)]
    runs: dict[str, dict[int, dict[int, dict]]] = {n: {d: {} for d in cfg.depths} for n in NORMS}
    bn_gap: dict[int, dict[int, dict]] = {d: {} for d in cfg.depths}
    histories: dict[str, np.ndarray] = {}
    for job in ctx.progress(_jobs(cfg), desc="configurations"):
        norm, blocks, batch_size = job
        label = f"{norm} norm, {blocks} blocks, batch {batch_size}"
        steps = steps_for(cfg, batch_size, _train_size(cfg, ds))
        with ctx.progress(total=steps, desc=f"{label}, steps") as bar:
            unit = ctx.cached(label, {"config": cfg, "data": ds.describe(), "job": list(job)},
                              functools.partial(_train_job, cfg, ds, seeds, replicate_seeds, job,
                                                ctx.data_parallel, bar.update))
        runs[norm][blocks][batch_size] = unit["record"]
        if "bn_gap" in unit:
            bn_gap[blocks][batch_size] = unit["bn_gap"]
        histories.update({f"{norm}/d{blocks}/b{batch_size}/{name}": value
                          for name, value in unit["histories"].items()})
    analysis = analyse(cfg, runs, bn_gap, ds.num_classes)
    for claim in analysis["claims"]:
        claim["shown_verdict"] = ctx.verdict(claim["verdict"])
    flat = [r["flattened"]["flattened"] for by_depth in runs.values() for by_batch in by_depth.values()
            for r in by_batch.values()]
    ctx.set_endpoint(f"{_budget_text(cfg, ds)}, Adam at the rate chosen per (norm, depth, batch size); the "
                     f"training loss flattened in {sum(flat)} of {len(flat)} configurations")
    config = {**dataclasses.asdict(cfg), "seeds_used": seeds, "replicate_seeds": replicate_seeds,
              "data": ds.describe(), "data_name": ds.name, "num_classes": ds.num_classes,
              "train_size": _train_size(cfg, ds),
              "model": _describe_model(cfg),
              "optimizer": "adam, learning rate chosen per (norm, depth, batch size) by training."
                           "tune_learning_rate(widen=...), replicated at that rate by a disjoint seed set",
              "endpoint_rule": training.endpoint_rule()}
    ctx.set_metrics(config, {"runs": runs, "bn_running_vs_batch_statistics": bn_gap, **analysis,
                             "paper_error_percent": PAPER_ERROR["batch"]})
    ctx.save_histories(histories)
    ctx.plot(EXPERIMENT)
    ctx.set_summary(_summary(ctx, cfg, ds, runs, analysis))


def _train_size(cfg: Config, ds: data.Dataset) -> int:
    return training.examples_after_validation(len(ds.y_train), cfg.validation_fraction)


def _budget_text(cfg: Config, ds: data.Dataset) -> str:
    n = _train_size(cfg, ds)
    steps = {b: steps_for(cfg, b, n) for b in batch_sizes(cfg)}
    return " and ".join(f"{s} optimizer steps at batch {b} ({b * s / n:.1f} epochs)" for b, s in steps.items())


FIGURES = ("gap_vs_depth.png", "training_loss.png")


def _int_keys(tree: Mapping[str, Any], levels: int = 1) -> dict:
    """``{"32": x}`` (as JSON gives it back) -> ``{32: x}``, sorted, for the first ``levels`` levels."""
    return dict(sorted((int(k), _int_keys(v, levels - 1) if levels > 1 else v) for k, v in tree.items()))


def plot(ctx: RunContext, histories: Mapping[str, np.ndarray], recorded: Mapping[str, Any]) -> None:
    """Every figure of the experiment, from ``histories.npz`` and ``metrics.json`` alone."""
    config, metrics = recorded["config"], recorded["metrics"]
    runs = {n: _int_keys(r, 2) for n, r in metrics["runs"].items()}
    _figure_depth(ctx, config, runs, metrics["per_depth"])
    _figure_curves(ctx, config, histories)


def _figure_depth(ctx: RunContext, config: Mapping[str, Any], runs: dict, per_depth: list[dict]) -> str:
    fig, axes = new_figure(1, 3, width=4.8, height=3.9)
    accuracy, gap, stats = axes[0]
    small, ref = config["small_batch"], config["reference_batch"]
    layers = [row["normalized_layers"] for row in per_depth]
    depths = [row["blocks"] for row in per_depth]
    for norm, color in zip(NORMS, ("C0", "C1"), strict=True):
        for b, style in ((ref, "-"), (small, "--")):
            accuracy.errorbar(layers, [100 * runs[norm][d][b]["mean"] for d in depths],
                              yerr=[100 * runs[norm][d][b]["std"] for d in depths], color=color,
                              linestyle=style, marker="o", capsize=3, label=f"{_short(norm)}, batch {b}")
        gap.errorbar(layers, [100 * row[norm]["difference"] for row in per_depth],
                     yerr=[200 * row[norm]["standard_error"] for row in per_depth], color=color, marker="o",
                     capsize=3, label=_short(norm))
    for key, b, style in (("statistics_gap", small, "--"), ("statistics_gap_reference", ref, "-")):
        stats.errorbar(layers, [100 * row[key]["mean"] for row in per_depth],
                       yerr=[200 * row[key]["std"] / math.sqrt(len(row[key]["values"])) for row in per_depth],
                       color="C0", linestyle=style, marker="o", capsize=3, label=f"BN trained at batch {b}")
    gap.axhline(0, color="grey", linewidth=0.8)
    stats.axhline(0, color="grey", linewidth=0.8)
    titles = (f"test accuracy ({config['data_name']}, mean ± std, {len(config['seeds_used']) * 2} seeds)",
              f"batch {ref} minus batch {small} (points, ± 2 SE)",
              "BN: running minus batch statistics at test (± 2 SE)")
    for ax, title, ylabel in zip((accuracy, gap, stats), titles, ("test accuracy (%)", "accuracy gap (points)",
                                                                   "accuracy gap (points)"), strict=True):
        ax.axvline(RESNET50_NORM_LAYERS, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(layers, [str(n) for n in layers])
        ax.set_xlabel("normalized layers (1 + 2 x blocks; dotted: ResNet-50)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize="medium")
        ax.legend(fontsize="small")
    return ctx.save_figure(fig, FIGURES[0])


def _short(norm: str) -> str:
    return {"batch": "BN", "group": "GN"}[norm]


def _figure_curves(ctx: RunContext, config: Mapping[str, Any], histories: Mapping[str, np.ndarray]) -> str:
    """Training loss against epochs per depth (the endpoint: has it flattened?)."""
    depths = config["depths"]
    fig, axes = new_figure(1, len(depths), width=3.8, height=3.3)
    for ax, d in zip(axes[0], depths, strict=True):
        for norm, color in zip(NORMS, ("C0", "C1"), strict=True):
            for b, style in ((config["reference_batch"], "-"), (config["small_batch"], "--")):
                loss = np.nanmean(histories[f"{norm}/d{d}/b{b}/step_loss"], axis=0)
                window = max(1, min(100, loss.size // 20))
                smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
                epochs = np.arange(window, loss.size + 1) * b / config["train_size"]
                ax.plot(epochs, smooth, color=color, linestyle=style, label=f"{_short(norm)}, batch {b}")
        ax.set_yscale("log")
        ax.set_title(f"{d} blocks ({1 + 2 * d} normalized layers)", fontsize="medium")
        ax.set_xlabel("epoch")
    axes[0, 0].set_ylabel("training loss (moving average, mean of seeds)")
    axes[0, 0].legend(fontsize="small")
    return ctx.save_figure(fig, FIGURES[1])


def _pts(row: Mapping[str, Any]) -> str:
    return f"{100 * row['difference']:+.1f} ± {100 * row['standard_error']:.1f}"


def _summary(ctx: RunContext, cfg: Config, ds: data.Dataset, runs: dict, analysis: dict) -> str:
    small, ref = batch_sizes(cfg)
    n = 2 * cfg.seeds
    columns = [(norm, b) for norm in NORMS for b in (ref, small)]
    header = ["| blocks | " + " | ".join(f"{_short(norm)} batch {b}" for norm, b in columns) + " |",
              "|---|" + "---|" * len(columns)]
    widened = (f", widened up to {cfg.widen} times by 3x while the choice sat at an edge of the rates tried"
               if cfg.widen else "")
    lines = [f"# {NAME} — does batch norm's small-batch degradation grow with depth?", "",
             f"Data: {ds.describe()}; {cfg.validation_fraction:.0%} of the training set held out to choose "
             f"the rate, the rest ({_train_size(cfg, ds)}) trains. Model: `{_describe_model(cfg)}`, "
             "post-activation residual blocks (`relu(x + norm(conv(relu(norm(conv(x))))))`, each block's "
             "last norm scale initialized to zero, Goyal et al. 2017), at "
             f"{', '.join(map(str, cfg.depths))} blocks: {', '.join(str(1 + 2 * d) for d in cfg.depths)} "
             "normalized layers (ResNet-50 has "
             f"{RESNET50_NORM_LAYERS}). Budget: {_budget_text(cfg, ds)} (the larger of {cfg.epochs} epochs and "
             f"{cfg.min_steps} optimizer steps). Adam at the rate chosen per (norm, depth, batch size) from "
             f"{list(cfg.learning_rates)}{widened}, by the best mean validation accuracy of the search seed "
             f"set ({cfg.seeds} seeds); a disjoint replicate set ({cfg.seeds} seeds) then trained at the "
             f"chosen rate. Test accuracy (%), mean ± std over all {n} seeds, chosen rate in brackets (`*`: "
             "still at the edge of the rates tried):", "", *header]
    for d in cfg.depths:
        lines.append(f"| {d} | " + " | ".join(_cell(runs[norm][d][b]) for norm, b in columns) + " |")
    lines += ["", f"Endpoint: {training.endpoint_rule()}. Per configuration:", "", *header]
    for d in cfg.depths:
        lines.append(f"| {d} | " + " | ".join(_flat(runs[norm][d][b]) for norm, b in columns) + " |")
    lines += ["", f"![gap vs depth]({FIGURES[0]})", "", f"![training loss]({FIGURES[1]})", "",
              f"Per depth: test accuracy at batch {ref} minus at batch {small} (points; the difference over "
              f"all {n} seeds ± its standard error, unpaired, then each seed set's verdict and the replicated "
              f"one), and BN evaluated on test batches of {small} with their own statistics instead of the "
              "running averages (running minus batch statistics, points, mean ± std over seeds):", "",
              "| blocks | normalized layers | BN gap | BN: sets → verdict | GN gap | GN: sets → verdict | BN "
              f"statistics gap, batch {small} | at batch {ref} |", "|---|---|---|---|---|---|---|---|"]
    for row in analysis["per_depth"]:
        lines.append(f"| {row['blocks']} | {row['normalized_layers']} | {_pts(row['batch'])} | "
                     f"{_sets(ctx, row['batch'])} | {_pts(row['group'])} | {_sets(ctx, row['group'])} | "
                     f"{_signed(row['statistics_gap'])} | {_signed(row['statistics_gap_reference'])} |")
    lines += ["", "Verdicts (the difference over all seeds ± its standard error; supported / not supported "
              "when it exceeds two standard errors in the claimed / the opposite direction, else unclear; each "
              f"seed set of {cfg.seeds} judged alone, and the verdict is the sets' common one, unstable where "
              "they disagree; no verdict where a compared model did not learn, its final training loss at or "
              "above half that of a uniform guess"
              + ("; a quick run's verdicts are not conclusive" if ctx.quick else "") + "):", "",
              "| claim | test | difference (pts) | seed sets | verdict |", "|---|---|---|---|---|"]
    for c in analysis["claims"]:
        lines.append(f"| {c['claim']} | {c['test']} | {_pts(c)} | {', '.join(c['set_verdicts'])} | "
                     f"{c['shown_verdict']} |")
    lines += ["", _reading(cfg, analysis)]
    return "\n".join(lines)


def _describe_model(cfg: Config) -> str:
    return (f"ResidualCNN(norm, blocks, width={cfg.width}, num_groups={cfg.num_groups} for group norm, "
            "kernel_size=3)")


def _cell(record: Mapping[str, Any]) -> str:
    edge = "*" if record["at_edge"] else ""
    return f"{pct(record)} ({record['learning_rate']:g}{edge})"


def _flat(record: Mapping[str, Any]) -> str:
    return (f"{training.Flatness(**record['flattened']).describe()}, loss "
            f"{record['final_train_loss']['mean']:.3f}")


def _signed(x: Mapping[str, Any]) -> str:
    return f"{100 * x['mean']:+.1f} ± {100 * x['std']:.1f}"


def _sets(ctx: RunContext, row: Mapping[str, Any]) -> str:
    return f"{', '.join(row['set_verdicts'])} → {ctx.verdict(row['verdict'])}"


def _reading(cfg: Config, analysis: dict) -> str:
    """The reading of the depth hypothesis, every clause chosen by a verdict of the table above."""
    small, ref = batch_sizes(cfg)
    claims = {c["id"]: c for c in analysis["claims"]}
    shallow, deep = analysis["per_depth"][0], analysis["per_depth"][-1]
    grows = claims["bn_gap_grows"]
    paper = PAPER_ERROR["batch"]
    text = (f"Reading: BN's accuracy gap between batch {ref} and batch {small} is {_pts(shallow['batch'])} "
            f"points at {shallow['blocks']} blocks ({shallow['normalized_layers']} normalized layers) and "
            f"{_pts(deep['batch'])} at {deep['blocks']} ({deep['normalized_layers']}); deepest minus "
            f"shallowest {_pts(grows)} (trend {_pts(claims['bn_gap_trend'])} per doubling of depth); the Group "
            f"Norm paper measured {paper[2] - paper[32]:.1f} points of ImageNet error between 32 and 2 images "
            f"per GPU on ResNet-50 ({RESNET50_NORM_LAYERS} normalized layers). ")
    text += reading(grows["verdict"], {
        SUPPORTED: "The degradation **grows with depth**: depth is a candidate for why the Group Norm paper's "
                   "effect is larger than the shallow CNN's.",
        NOT_SUPPORTED: "The degradation **shrinks with depth**: depth does not explain why the paper's effect "
                       "is larger, and that explanation is dropped.",
        UNCLEAR: "The degradation **does not grow measurably with depth** (within two standard errors): depth "
                 "does not explain why the paper's effect is larger here, and that explanation is dropped.",
        UNSTABLE: "The two seed sets **disagree** on whether it grows: no conclusion on depth from this run.",
        NOT_LEARNED: "**No verdict**: a compared model did not learn."})
    if grows["verdict"] == SUPPORTED:
        text += " " + reading(claims["bn_specific"]["verdict"], {
            SUPPORTED: "It grows more than group norm's gap, so the growth is batch norm's own.",
            NOT_SUPPORTED: "Group norm's gap grows more, so the growth is not batch norm's own.",
            UNCLEAR: "Whether it grows more than group norm's gap (the batch size's effect without BN's "
                     "statistics) is within the noise, so the growth is not shown to be batch norm's own.",
            UNSTABLE: "Whether it grows more than group norm's gap the two seed sets disagree.",
            NOT_LEARNED: "Against group norm: no verdict (a model did not learn)."})
    stats_small = deep["statistics_gap"]
    text += (f" At test time, normalizing batches of {small} with their own statistics instead of the running "
             f"averages costs {_signed(stats_small)} points at {deep['blocks']} blocks "
             f"({_signed(shallow['statistics_gap'])} at {shallow['blocks']}); ")
    text += reading(claims["statistics_gap_grows"]["verdict"], {
        SUPPORTED: "that cost grows with depth, so the noise of small-batch statistics does compound over "
                   "layers, while the running averages used at inference remove it.",
        NOT_SUPPORTED: "that cost shrinks with depth.",
        UNCLEAR: "that cost does not grow measurably with depth.",
        UNSTABLE: "whether that cost grows with depth the two seed sets disagree.",
        NOT_LEARNED: "no verdict on its growth (a model did not learn)."})
    return text


EXPERIMENT = Experiment(NAME, "BN vs GN at a small and the reference batch on a residual CNN of increasing "
                        "depth, tuned rates, a replicate seed set: does BN's small-batch loss grow with depth "
                        "(the Group Norm paper's ResNet-50 vs our shallow CNN)", run, check_configs,
                        config=Config, check_config=check_config, plot=plot)

if __name__ == "__main__":
    raise SystemExit(main_for(EXPERIMENT))
