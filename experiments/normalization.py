"""normalization: no norm / batch / layer / instance / group norm on real data, tested claim by claim.

Tests claims of the course notes (docs/claims.md). A small CNN with each norm at batch sizes 2..64, every
configuration trained for the
SAME number of optimizer steps (not epochs) with Adam at a learning rate chosen for that (norm, batch size)
by a vmapped sweep on a validation split (:func:`jaxopt_lab.lab.training.tune_learning_rate`), set beside the
trend of Figure 1 of the Group Norm paper (Wu & He, ECCV 2018); an MLP beside it (so the CNN is seen to be
at least as good); a row-RNN with batch vs layer norm; every trained CNN on test inputs whose contrast and
brightness were changed per example; group norm's group count; batch norm evaluated with its running
statistics and with the statistics of test batches of its training batch size (why BN does or does not
degrade at small batches); and a verdict per claim of the course notes. ``--data mnist1d`` runs it on MNIST-1D.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from jaxopt_lab.lab import data, models, training
from jaxopt_lab.lab.diagnostics import NOT_LEARNED, bn_statistics_gap, learned
from jaxopt_lab.lab.experiment import Experiment, RunContext, check_modes, check_training_config
from jaxopt_lab.lab.plotting import new_figure
from jaxopt_lab.lab.runner import main_for
from jaxopt_lab.lab.verdicts import SUPPORTED, difference, reading, verdict

NAME = "normalization"
CNN_NORMS = ("none", "batch", "layer", "instance", "group")
RNN_NORMS = ("none", "batch", "layer")
# The built-in datasets this experiment supports (`--data NAME`; a `.npz` path works too).
SUPPORTED_DATA = data.BUILTIN_DATASETS
# Wu & He, "Group Normalization", ECCV 2018, Figure 1 / Table 2-3: ResNet-50 ImageNet validation error (%)
# against images per GPU (BN's statistics are per GPU); LN and IN at 32 images per GPU.
PAPER_ERROR = {"batch": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
               "group": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
               "layer": {32: 25.3}, "instance": {32: 28.4}}
# Per-example changes at test time: a contrast (gain) factor, log-uniform, and a brightness (offset) in
# units of the raw training data's range (digits: pixels 0..16, so +-4 pixel levels).
CONTRAST_RANGE = (1 / 3, 3.0)
BRIGHTNESS_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class Config:
    batch_sizes: tuple[int, ...]
    # The step budget of a configuration at batch size b: max(steps, min_epochs passes over the training
    # split), rounded up to a multiple of 20 (training evaluates every budget/20 steps; a remainder would
    # compile the step loop a second time). A budget of steps, not epochs: the large batches get `steps`
    # (many epochs), the small ones as many steps as they need to converge (`min_epochs`).
    steps: int
    min_epochs: int
    seeds: int
    learning_rates: tuple[float, ...]  # Adam rates swept per (norm, batch size)
    num_groups: int
    group_counts: tuple[int, ...]
    rnn_batch_sizes: tuple[int, ...]
    rnn_hidden: int
    reference_batch: int = 32
    validation_fraction: float = 0.2
    # The CNN's architecture: None = models.CNN's defaults.
    widths: tuple[int, ...] | None = None
    pool_after: tuple[int, ...] | None = None

    @classmethod
    def for_mode(cls, quick: bool, data: str | None = None) -> Config:
        """The config of a run: :data:`QUICK`, or :data:`FULL` with ``data``'s overrides
        (:data:`FULL_BY_DATA`; ``None`` or a ``.npz`` file: none)."""
        return QUICK if quick else FULL_BY_DATA.get(data or "", FULL)


# Quick: a two-conv-layer CNN (half the compile time of the default four; quick runs are compile-bound, so
# 400 steps cost little more than 160 and let every CNN learn the digits at batch 32).
QUICK = Config(batch_sizes=(4, 32), steps=400, min_epochs=0, seeds=2, learning_rates=(3e-3, 1e-2),
               num_groups=4, group_counts=(1, 4), rnn_batch_sizes=(32,), rnn_hidden=32, widths=(16, 32),
               pool_after=(0,))
# Every configuration trains until its loss has flattened: 30 epochs (batch 2: 16,160 steps; the no-norm
# CNN needs ~30 epochs at batch 32 to pass the MLP on digits), at least 500 steps (batch 64: 30 epochs).
# Rates: Adam's useful range on these models spans 3e-4 (small batches) to 1e-2 (large ones).
FULL = Config(batch_sizes=(2, 4, 8, 16, 32, 64), steps=500, min_epochs=30, seeds=3,
              learning_rates=(3e-4, 1e-3, 3e-3, 1e-2), num_groups=8, group_counts=(1, 4, 8, 16),
              rnn_batch_sizes=(4, 32), rnn_hidden=64)
# MNIST-1D has 3x the training examples of digits and is harder (the paper's CNN: ~94%): at least 1000
# steps, and 10 epochs at the small batches (batch 2: 16,000 steps, as many as digits' 30 epochs).
FULL_BY_DATA = {"mnist1d": dataclasses.replace(FULL, steps=1000, min_epochs=10)}


def steps_for(cfg: Config, batch_size: int, train_size: int) -> int:
    """The step budget of every configuration trained at ``batch_size`` on ``train_size`` examples."""
    passes = math.ceil(cfg.min_epochs * train_size / batch_size)
    return max(cfg.steps, 20 * math.ceil(passes / 20))


def cnn(cfg: Config, norm: str, num_classes: int, num_groups: int | None = None) -> models.CNN:
    """The experiment's CNN: ``models.CNN``'s defaults unless the config sets widths / pooling."""
    arch: dict[str, Any] = {}
    if cfg.widths is not None:
        arch["widths"] = cfg.widths
    if cfg.pool_after is not None:
        arch["pool_after"] = cfg.pool_after
    return models.CNN(norm=norm, num_classes=num_classes,
                      num_groups=cfg.num_groups if num_groups is None else num_groups, **arch)


def _jobs(cfg: Config) -> list[tuple[str, Any, int]]:
    return ([("cnn", n, b) for n in CNN_NORMS for b in cfg.batch_sizes]
            + [("mlp", "none", cfg.reference_batch)]
            + [("rnn", n, b) for n in RNN_NORMS for b in cfg.rnn_batch_sizes]
            + [("groups", g, cfg.reference_batch) for g in cfg.group_counts if g != cfg.num_groups])


def _model(cfg: Config, kind: str, what: Any, num_classes: int) -> Any:
    if kind == "cnn":
        return cnn(cfg, what, num_classes)
    if kind == "groups":
        return cnn(cfg, "group", num_classes, num_groups=what)
    if kind == "mlp":
        return models.MLP(num_classes=num_classes)
    return models.RowRNN(norm=what, num_classes=num_classes, hidden=cfg.rnn_hidden)


def check_config(cfg: Config, label: str, data_name: str | None = None) -> None:
    """Builds every model and optimizer of ``cfg`` abstractly on ``data_name`` (``None``: every supported
    dataset); ``ValueError`` naming ``label`` if one cannot run."""
    if cfg.reference_batch not in cfg.batch_sizes:
        raise ValueError(f"{label}: reference_batch={cfg.reference_batch} must be one of batch_sizes "
                         f"{cfg.batch_sizes}")
    if cfg.num_groups not in cfg.group_counts:
        raise ValueError(f"{label}: num_groups={cfg.num_groups} must be one of group_counts {cfg.group_counts}")
    if cfg.seeds < 1 or len(cfg.learning_rates) < 1 or cfg.steps < 20 or cfg.steps % 20 or cfg.min_epochs < 0:
        raise ValueError(f"{label}: needs >= 1 seed (2 for a verdict), >= 1 learning rate, steps a positive "
                         f"multiple of 20 and min_epochs >= 0")
    for name in SUPPORTED_DATA if data_name is None else (data_name,):
        ds = data.load_dataset(name)
        train_size = training.examples_after_validation(len(ds.y_train), cfg.validation_fraction)
        models_at: dict[tuple[str, Any], list[int]] = {}
        for kind, what, batch_size in _jobs(cfg):  # each model once, with every batch size it trains at
            models_at.setdefault((kind, what), []).append(batch_size)
        for (kind, what), batch_sizes in models_at.items():
            check_training_config(_model(cfg, kind, what, ds.num_classes), optax.adam(cfg.learning_rates[0]),
                                  ds.image_shape, batch_sizes=batch_sizes, train_size=train_size,
                                  where=f"{label}: {kind} {what!r} on {name}")


def check_configs() -> None:
    """The quick and the full config of every supported dataset, without training (a few seconds)."""
    check_modes(Config.for_mode, check_config, SUPPORTED_DATA)


def _record(search: training.RateSearch) -> dict:
    history = search.result.history
    return {**training.mean_std(search.result.final_test_accuracy),
            "steps": int(np.asarray(history.steps)[0, -1]),
            "learning_rate": search.learning_rate,
            "rate_table": search.table,
            "first_eval": training.mean_std(history.test_accuracy[:, 0]),
            "first_eval_step": int(np.asarray(history.steps)[0, 0]),
            "final_train_loss": training.mean_std(np.asarray(history.train_loss)[:, -1]),
            "flattened": dataclasses.asdict(training.loss_flattened(history.step_loss)),
            "diverged": int(search.result.diverged.sum())}


def changed_inputs(ds: data.Dataset, kind: str, key: jax.Array) -> np.ndarray:
    """The test inputs with a per-example ``contrast``, ``brightness`` or ``both`` change in raw units,
    re-standardized with the training statistics (what the model would be fed). Works for images
    ``(N, H, W, C)`` and signals ``(N, L, C)``: contrast is a gain, brightness an offset."""
    n = len(ds.y_test)
    k1, k2 = jax.random.split(key)
    shape = (n,) + (1,) * (ds.x_test.ndim - 1)
    lo, hi = np.log(CONTRAST_RANGE)
    scale = np.exp(np.asarray(jax.random.uniform(k1, shape, minval=lo, maxval=hi)))
    raw_train = ds.x_train * ds.pixel_std + ds.pixel_mean
    span = BRIGHTNESS_FRACTION * float(raw_train.max() - raw_train.min())
    shift = np.asarray(jax.random.uniform(k2, shape, minval=-span, maxval=span))
    raw = ds.x_test * ds.pixel_std + ds.pixel_mean
    if kind in ("contrast", "both"):
        raw = raw * scale
    if kind in ("brightness", "both"):
        raw = raw + shift
    return ((raw - ds.pixel_mean) / ds.pixel_std).astype(np.float32)


def _pct(x: dict) -> str:
    return f"{100 * x['mean']:.1f} ± {100 * x['std']:.1f}"


def _claims(cfg: Config, cnn_runs: dict, rnn: dict, robust: dict, groups: dict,
            num_classes: int) -> list[dict]:
    small, ref = min(cfg.batch_sizes), cfg.reference_batch
    at = lambda norm, b: cnn_runs[norm][b]
    rows = []

    def add(claim: str, test: str, a: dict, b: dict, numbers: str, runs: tuple[dict, ...] = ()) -> None:
        """``runs``: the trained runs behind ``a`` and ``b`` when these are derived numbers."""
        diff, se = difference(a, b)
        untrained = [r for r in (runs or (a, b)) if not learned(r, num_classes)]
        if untrained:
            losses = ", ".join(f"{r['final_train_loss']['mean']:.2f}" for r in untrained)
            numbers += f"; final train loss {losses} >= ½ ln {num_classes} = {0.5 * math.log(num_classes):.2f}"
        rows.append({"claim": claim, "test": test, "difference": diff, "standard_error": se,
                     "numbers": numbers, "verdict": NOT_LEARNED if untrained else verdict(diff, se)})

    add("BN degrades with small batches", f"BN accuracy at batch {ref} minus at batch {small}",
        at("batch", ref), at("batch", small), f"{_pct(at('batch', ref))} vs {_pct(at('batch', small))}")
    first = at("none", ref)["first_eval_step"]
    add("BN speeds up training", f"test accuracy after {first} steps at batch {ref}: BN minus no norm",
        at("batch", ref)["first_eval"], at("none", ref)["first_eval"],
        f"{_pct(at('batch', ref)['first_eval'])} vs {_pct(at('none', ref)['first_eval'])}",
        (at("batch", ref), at("none", ref)))
    add("BN is the best default", f"BN minus the best other norm at batch {ref}", at("batch", ref),
        max((at(n, ref) for n in CNN_NORMS if n != "batch"), key=lambda r: r["mean"]),
        ", ".join(f"{n} {_pct(at(n, ref))}" for n in CNN_NORMS))
    add("LN works with tiny batches", f"LN minus BN at batch {small}", at("layer", small), at("batch", small),
        f"{_pct(at('layer', small))} vs {_pct(at('batch', small))}")
    add("LN is less effective for CNNs", f"BN minus LN at batch {ref}", at("batch", ref), at("layer", ref),
        f"{_pct(at('batch', ref))} vs {_pct(at('layer', ref))}")
    add("IN is less effective for classification", f"BN minus IN at batch {ref}", at("batch", ref),
        at("instance", ref), f"{_pct(at('batch', ref))} vs {_pct(at('instance', ref))}")
    drops = {n: training.mean_std(np.subtract(robust[n]["clean"]["values"], robust[n]["contrast"]["values"]))
             for n in CNN_NORMS}
    add("IN's per-sample normalization removes contrast changes",
        "accuracy lost to per-example contrast: BN's loss minus IN's", drops["batch"], drops["instance"],
        ", ".join(f"{n} lost {_pct(drops[n])}" for n in CNN_NORMS), (at("batch", ref), at("instance", ref)))
    add("GN is robust to small batches", f"GN minus BN at batch {small}", at("group", small),
        at("batch", small), f"{_pct(at('group', small))} vs {_pct(at('batch', small))}")
    for rb in sorted(rnn["batch"]):
        add("BN suits RNNs poorly, LN suits them", f"row-RNN at batch {rb}: LN minus BN", rnn["layer"][rb],
            rnn["batch"][rb], ", ".join(f"{n} {_pct(rnn[n][rb])}" for n in RNN_NORMS))
    best = max(groups.values(), key=lambda r: r["mean"])
    worst = min(groups.values(), key=lambda r: r["mean"])
    add("GN's group count needs tuning", "best minus worst group count", best, worst,
        ", ".join(f"G={g} {_pct(r)}" for g, r in groups.items()))
    return rows


def _dataset(ctx: RunContext) -> data.Dataset:
    return data.load_dataset(None if ctx.data_path is None else str(ctx.data_path))


def _test_sets(ds: data.Dataset, seed: int) -> dict[str, np.ndarray]:
    """The clean test inputs and their per-example contrast / brightness / both changes (fixed by ``seed``)."""
    key = jax.random.key(seed)
    return {"clean": ds.x_test, **{k: changed_inputs(ds, k, jax.random.fold_in(key, i))
                                   for i, k in enumerate(("contrast", "brightness", "both"))}}


def _train_job(cfg: Config, ds: data.Dataset, seeds: list[int], job: tuple[str, Any, int],
               test_sets: dict[str, np.ndarray], data_parallel: bool | None, progress: Any = None) -> dict:
    """One configuration, trained and evaluated: its record, its histories and what later stages need
    from its trained state (robustness at the reference batch, BN's running vs batch statistics)."""
    kind, what, batch_size = job
    train_size = training.examples_after_validation(len(ds.y_train), cfg.validation_fraction)
    search = training.tune_learning_rate(
        _model(cfg, kind, what, ds.num_classes), optax.adam, ds, seeds, learning_rates=cfg.learning_rates,
        batch_size=batch_size, steps=steps_for(cfg, batch_size, train_size),
        validation_fraction=cfg.validation_fraction, data_parallel=data_parallel, progress=progress)
    history, state = search.result.history, search.result.state
    unit: dict[str, Any] = {"record": _record(search), "histories": {
        "step_loss": np.asarray(history.step_loss), "eval_steps": np.asarray(history.steps)[0],
        "train_loss": np.asarray(history.train_loss), "test_accuracy": np.asarray(history.test_accuracy)}}
    if kind == "cnn" and batch_size == cfg.reference_batch:
        unit["robustness"] = {k: training.mean_std(training.evaluate_seeds(state, x, ds.y_test)[1])
                              for k, x in test_sets.items()}
    if kind == "cnn" and what == "batch":
        unit["bn_gap"] = bn_statistics_gap(state, ds, batch_size)
    return unit


def run(ctx: RunContext) -> None:
    ds = _dataset(ctx)
    cfg = ctx.resolve_config(Config, ds.name)
    seeds = [ctx.seed + i for i in range(cfg.seeds)]
    cnn_runs: dict[str, dict] = {n: {} for n in CNN_NORMS}
    rnn: dict[str, dict] = {n: {} for n in RNN_NORMS}
    groups: dict[int, dict] = {}
    robust: dict[str, dict] = {}
    bn_gap: dict[int, dict] = {}
    histories: dict[str, np.ndarray] = {}
    mlp: dict = {}
    test_sets = _test_sets(ds, ctx.seed)
    train_size = training.examples_after_validation(len(ds.y_train), cfg.validation_fraction)
    for job in ctx.progress(_jobs(cfg), desc="configurations"):
        kind, what, batch_size = job
        label = f"{kind} {what} batch {batch_size}"
        with ctx.progress(total=steps_for(cfg, batch_size, train_size), desc=f"{label}, steps") as bar:
            unit = ctx.cached(label, {"config": cfg, "data": ds.describe(), "job": list(job)},
                              functools.partial(_train_job, cfg, ds, seeds, job, test_sets, ctx.data_parallel,
                                                bar.update))
        record = unit["record"]
        histories.update({f"{kind}/{what}/b{batch_size}/{name}": value
                          for name, value in unit["histories"].items()})
        if kind == "cnn":
            cnn_runs[what][batch_size] = record
            if "robustness" in unit:
                robust[what] = unit["robustness"]
            if "bn_gap" in unit:
                bn_gap[batch_size] = unit["bn_gap"]
        elif kind == "mlp":
            mlp = record
        elif kind == "rnn":
            rnn[what][batch_size] = record
        else:
            groups[what] = record
    groups[cfg.num_groups] = cnn_runs["group"][cfg.reference_batch]
    groups = dict(sorted(groups.items()))
    bn_gap = dict(sorted(bn_gap.items()))
    claims = _claims(cfg, cnn_runs, rnn, robust, groups, ds.num_classes)
    for c in claims:
        c["shown_verdict"] = ctx.verdict(c["verdict"])
    # The endpoint evidence: at each batch size, did the best norm's training loss flatten?
    best_at = {b: max(CNN_NORMS, key=lambda n: float(cnn_runs[n][b]["mean"])) for b in cfg.batch_sizes}
    flat_best = {b: cnn_runs[best_at[b]][b]["flattened"]["flattened"] for b in cfg.batch_sizes}
    ctx.set_endpoint(
        f"{_budget_text(cfg)}, Adam at the rate "
        f"chosen per (norm, batch size) from {list(cfg.learning_rates)} on a {cfg.validation_fraction:.0%} "
        f"validation split; the best norm's training loss flattened at {sum(flat_best.values())} of "
        f"{len(flat_best)} batch sizes")
    config = {**dataclasses.asdict(cfg), "seeds_used": seeds, "data": ds.describe(), "data_name": ds.name,
              "num_classes": ds.num_classes,
              "cnn": repr(cnn(cfg, "none", ds.num_classes)),
              "mlp": repr(models.MLP(num_classes=ds.num_classes)),
              "optimizer": "adam, learning rate chosen per (norm, batch size) by training.tune_learning_rate"}
    ctx.set_metrics(config, {"cnn": cnn_runs, "mlp": mlp, "rnn": rnn, "robustness": robust,
                             "group_counts": groups, "bn_running_vs_batch_statistics": bn_gap,
                             "best_norm_flattened": flat_best, "claims": claims,
                             "paper_error_percent": PAPER_ERROR})
    ctx.save_histories(histories)
    ctx.plot(EXPERIMENT)
    ctx.set_summary(_summary(ctx, cfg, ds, cnn_runs, mlp, rnn, robust, groups, bn_gap, claims, FIGURES))


FIGURES = ("error_vs_batch_size.png", "rnn_robustness_groups.png", "training_loss.png")


def _int_keys(by_batch: dict) -> dict:
    """``{"32": x}`` (as JSON gives it back) -> ``{32: x}``, sorted."""
    return dict(sorted((int(k), v) for k, v in by_batch.items()))


def plot(ctx: RunContext, histories: Mapping[str, np.ndarray], recorded: Mapping[str, Any]) -> None:
    """Every figure of the experiment, from ``histories.npz`` and ``metrics.json`` alone."""
    config, metrics = recorded["config"], recorded["metrics"]
    cnn_runs = {n: _int_keys(r) for n, r in metrics["cnn"].items()}
    rnn = {n: _int_keys(r) for n, r in metrics["rnn"].items()}
    groups = _int_keys(metrics["group_counts"])
    bn_gap = _int_keys(metrics["bn_running_vs_batch_statistics"])
    curves = {(n, b): histories[f"cnn/{n}/b{b}/step_loss"] for n in CNN_NORMS for b in config["batch_sizes"]}
    _figure_batch_size(ctx, config, cnn_runs, metrics["mlp"], bn_gap)
    _figure_rnn_robust_groups(ctx, config, rnn, metrics["robustness"], groups)
    _figure_curves(ctx, config, curves)


def _figure_batch_size(ctx: RunContext, config: Mapping[str, Any], cnn_runs: dict, mlp: dict,
                       bn_gap: dict) -> str:
    fig, axes = new_figure(1, 3, width=5.4, height=4.2)
    ours, paper, stats = axes[0]
    for norm in CNN_NORMS:
        sizes = sorted(cnn_runs[norm])
        err = [100 * (1 - cnn_runs[norm][b]["mean"]) for b in sizes]
        ours.errorbar(sizes, err, yerr=[100 * cnn_runs[norm][b]["std"] for b in sizes], marker="o", capsize=3,
                      label=norm)
    # The CNNs' errors set the scale: an MLP far above them is named at the top instead of flattening them.
    top = max(100 * (1 - r["mean"] + r["std"]) for runs in cnn_runs.values() for r in runs.values())
    top = 1.15 * top + 0.5
    mlp_error, mlp_label = 100 * (1 - mlp["mean"]), f"MLP (batch {config['reference_batch']})"
    if mlp_error <= top:
        ours.axhline(mlp_error, color="grey", linestyle=":", label=mlp_label)
    else:
        ours.annotate(f"{mlp_label}: {mlp_error:.1f} % (off scale)", (0.02, 0.97), xycoords="axes fraction",
                      va="top", fontsize="small", color="grey")
    ours.set_ylim(0, top)
    for norm, points in PAPER_ERROR.items():
        sizes = sorted(points)
        paper.plot(sizes, [points[b] for b in sizes], marker="o", label=norm, linestyle="-" if len(sizes) > 1
                   else "none")
    sizes = sorted(bn_gap)
    for which, style in (("running", "-"), ("batch", "--")):
        stats.errorbar(sizes, [100 * (1 - bn_gap[b][which]["mean"]) for b in sizes],
                       yerr=[100 * bn_gap[b][which]["std"] for b in sizes], marker="o", capsize=3,
                       linestyle=style, label=f"BN, {which} statistics at test")
    for ax, title in ((ours, f"ours: CNN on {config['data_name']}, {config['seeds']} seeds"),
                      (paper, "Wu & He 2018, Fig. 1: ResNet-50 on ImageNet"),
                      (stats, "BN test error: running vs batch statistics")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (paper: images per GPU)")
        ax.set_ylabel("test error (%)")
        ax.set_title(title, fontsize="medium")
        ax.legend(fontsize="small")
    return ctx.save_figure(fig, "error_vs_batch_size.png")


def _figure_rnn_robust_groups(ctx: RunContext, config: Mapping[str, Any], rnn: dict, robust: dict,
                              groups: dict) -> str:
    fig, axes = new_figure(1, 3, width=4.6, height=3.8)
    ax = axes[0, 0]
    rbs = sorted(rnn["batch"])
    for i, norm in enumerate(RNN_NORMS):
        x = np.arange(len(rbs)) + (i - 1) * 0.27
        ax.bar(x, [100 * rnn[norm][b]["mean"] for b in rbs], 0.27,
               yerr=[100 * rnn[norm][b]["std"] for b in rbs], capsize=3, label=norm)
    ax.set_xticks(np.arange(len(rbs)), [f"batch {b}" for b in rbs])
    if "num_classes" in config:  # results written before it was recorded have no chance line
        ax.axhline(100 / config["num_classes"], color="grey", linestyle=":", label="chance")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("row-RNN", fontsize="medium")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, fontsize="small")  # below the bars
    ax = axes[0, 1]
    kinds = ("clean", "contrast", "brightness", "both")
    for i, norm in enumerate(CNN_NORMS):
        x = np.arange(len(kinds)) + (i - 2) * 0.16
        ax.bar(x, [100 * robust[norm][k]["mean"] for k in kinds], 0.16,
               yerr=[100 * robust[norm][k]["std"] for k in kinds], capsize=2, label=norm)
    ax.set_xticks(np.arange(len(kinds)), kinds)
    ax.set_title(f"CNN (batch {config['reference_batch']}), per-example test changes", fontsize="medium")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=3, fontsize="small")
    ax = axes[0, 2]
    g = list(groups)
    ax.errorbar(g, [100 * groups[k]["mean"] for k in g], yerr=[100 * groups[k]["std"] for k in g], marker="o",
                capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("groups G (1 = LN-like, channels = IN-like)")
    ax.set_title(f"group norm, batch {config['reference_batch']}", fontsize="medium")
    return ctx.save_figure(fig, "rnn_robustness_groups.png")


def _figure_curves(ctx: RunContext, config: Mapping[str, Any], curves: dict) -> str:
    """Training loss against steps per batch size (the endpoint: has it flattened?)."""
    fig, axes = new_figure(1, len(config["batch_sizes"]), width=3.6, height=3.2)
    for ax, b in zip(axes[0], config["batch_sizes"], strict=True):
        for norm in CNN_NORMS:
            loss = np.nanmean(curves[norm, b], axis=0)
            window = max(1, min(50, loss.size // 10))
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(window, loss.size + 1), smooth, label=norm)
        ax.set_yscale("log")
        ax.set_title(f"batch {b}", fontsize="medium")
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("training loss (moving average, mean of seeds)")
    axes[0, 0].legend(fontsize="small")
    return ctx.save_figure(fig, "training_loss.png")


def _summary(ctx, cfg, ds, cnn_runs, mlp, rnn, robust, groups, bn_gap, claims, figures) -> str:
    sizes = sorted(cfg.batch_sizes)
    ref = cfg.reference_batch
    train_size = training.examples_after_validation(len(ds.y_train), cfg.validation_fraction)
    budget = {b: steps_for(cfg, b, train_size) for b in sizes}
    lines = [f"# {NAME} — which norm wins at which batch size, in RNNs and under contrast changes", "",
             f"Data: {ds.describe()}; {cfg.validation_fraction:.0%} of the training set held out to choose "
             f"the learning rate, the rest ({train_size}) trains. "
             f"Model: `{cnn(cfg, 'none', ds.num_classes)!r}`. Step budget: {_budget_text(cfg)}, here "
             + ", ".join(f"batch {b}: **{budget[b]} steps** ({b * budget[b] / train_size:.1f} epochs)"
                         for b in sizes)
             + f". Adam at the rate chosen per (norm, batch "
             f"size) among {list(cfg.learning_rates)} by best mean validation accuracy "
             f"(`training.tune_learning_rate`, all rates x seeds in one vmapped program). Test accuracy (%), "
             f"mean ± std over {cfg.seeds} seeds, chosen rate in brackets:", "",
             "| model | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for norm in CNN_NORMS:
        lines.append(f"| CNN, {norm} | " + " | ".join(
            f"{_pct(cnn_runs[norm][b])} ({cnn_runs[norm][b]['learning_rate']:g})" for b in sizes) + " |")
    lines.append("| MLP, no norm | " + " | ".join(
        f"{_pct(mlp)} ({mlp['learning_rate']:g})" if b == ref else "—" for b in sizes) + " |")
    none, diff_mlp = cnn_runs["none"][ref], difference(cnn_runs["none"][ref], mlp)
    lines += ["", f"No-norm CNN minus MLP at batch {ref}: {100 * diff_mlp[0]:+.1f} ± {100 * diff_mlp[1]:.1f} "
              f"points ({_pct(none)} vs {_pct(mlp)}).", "",
              "Endpoint evidence: did the training loss flatten (least-squares change of the seed-mean step "
              "loss over the last 20% of steps, relative to its level; flattened when within 5%), and the "
              "final training loss (mean of the last evaluation interval):", "",
              "| norm | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for norm in CNN_NORMS:
        lines.append(f"| {norm} | " + " | ".join(_flat(cnn_runs[norm][b]) for b in sizes) + " |")
    lines += ["", "Wu & He (2018), ResNet-50 on ImageNet, validation error (%) at 32/16/8/4/2 images per GPU: "
              "BN 23.6/23.7/24.8/27.3/34.7, GN 24.1/24.2/24.0/24.2/24.1; at 32: LN 25.3, IN 28.4. "
              "Their trend: BN's error grows as the batch shrinks below 16; GN's is flat.", "",
              f"![error vs batch size]({figures[0]})", "", f"![training loss]({figures[2]})", "",
              "Why BN does or does not degrade here: each BN model evaluated on the same test examples with "
              "its running statistics (what inference uses) and with the statistics of each test batch of "
              "its training batch size (what it was trained with), accuracy (%):", "",
              "| batch | running statistics | batch statistics | running minus batch (pts) |",
              "|---|---|---|---|"]
    for b, g in bn_gap.items():
        lines.append(f"| {b} | {_pct(g['running'])} | {_pct(g['batch'])} | {100 * g['gap']['mean']:+.1f} ± "
                     f"{100 * g['gap']['std']:.1f} |")
    lines += ["", _bn_reading(cfg, cnn_runs, bn_gap, claims, ds.num_classes), "",
              "Row-RNN (rows/positions as time steps), test accuracy (%), chosen rate in brackets:", "",
              "| norm | " + " | ".join(f"batch {b}" for b in sorted(rnn["batch"])) + " |",
              "|---|" + "---|" * len(rnn["batch"])]
    for norm in RNN_NORMS:
        lines.append(f"| {norm} | " + " | ".join(f"{_pct(rnn[norm][b])} ({rnn[norm][b]['learning_rate']:g})"
                                                for b in sorted(rnn[norm])) + " |")
    kinds = ("clean", "contrast", "brightness", "both")
    lines += ["", f"Per-example test changes (contrast x[{CONTRAST_RANGE[0]:.2f}, {CONTRAST_RANGE[1]:g}] "
              f"log-uniform on the raw input, brightness an offset of up to ±{BRIGHTNESS_FRACTION:.0%} of the "
              f"raw training range), CNN trained at batch {ref}, accuracy (%):", "",
              "| norm | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for norm in CNN_NORMS:
        lines.append(f"| {norm} | " + " | ".join(_pct(robust[norm][k]) for k in kinds) + " |")
    lines += ["", f"Group norm's group count at batch {ref}: "
              + ", ".join(f"G={g}: {_pct(r)} ({r['learning_rate']:g})" for g, r in groups.items()) + ".", "",
              f"![RNN, robustness, groups]({figures[1]})", "",
              "Verdicts (supported / not supported when the difference exceeds 2 standard errors over seeds, "
              "else unclear; no verdict when a compared model did not learn, its final training loss at or "
              "above half that of a uniform guess"
              + ("; a quick run's verdicts are not conclusive" if ctx.quick else "") + "):", "",
              "| claim (course notes) | test | difference (pts) | verdict | numbers |", "|---|---|---|---|---|"]
    for c in claims:
        gap = f"{100 * c['difference']:+.1f} ± {100 * c['standard_error']:.1f}"
        lines.append(f"| {c['claim']} | {c['test']} | {gap} | {c['shown_verdict']} | {c['numbers']} |")
    lines += ["", "Notes: a contrast change in raw units is, in standardized units, a scale *and* a shift "
              "(the blank background is not 0 after standardization), and the first conv's zero padding does "
              "not move with a shift; so instance norm is close to, not exactly, invariant to these changes "
              "(it is exactly invariant to a pure scale of its input: tests/test_models.py). Batch norm's "
              "running statistics are fixed at test time, so a changed input reaches the network "
              "un-normalized."]
    return "\n".join(lines)


def _budget_text(cfg: Config) -> str:
    if cfg.min_epochs == 0:
        return f"{cfg.steps} optimizer steps for every configuration, whatever its batch size"
    return (f"per configuration the larger of {cfg.steps} optimizer steps and {cfg.min_epochs} epochs (so the "
            "small batches train until their loss flattens), in steps, a multiple of 20")


def _flat(record: dict) -> str:
    """``yes (+0.4%), loss 0.012``: flattened?, the relative change over the last 20% of steps, the final
    training loss (a loss flat at ln(10) = 2.3 is a model that has not learned, not a converged one)."""
    f, loss = record["flattened"], record["final_train_loss"]["mean"]
    if not math.isfinite(f["relative_change"]):
        return "diverged"
    return (f"{'yes' if f['flattened'] else 'no'} ({100 * f['relative_change']:+.0f}%, "
            f"{f['absolute_change']:+.3f} nats), loss {loss:.3f}")


def _bn_reading(cfg: Config, cnn_runs: dict, bn_gap: dict, claims: list[dict], num_classes: int) -> str:
    """One paragraph on the Group Norm paper's small-batch claim, every clause chosen by the numbers: the
    verdict of the claim's row in the table, and the 2-standard-error rule on the statistics gap."""
    small, ref = min(cfg.batch_sizes), cfg.reference_batch
    drop, se = difference(cnn_runs["batch"][ref], cnn_runs["batch"][small])
    row = next(c for c in claims if c["claim"] == "BN degrades with small batches")
    found = row["verdict"]
    paper = {b: PAPER_ERROR["batch"][b] for b in (small, ref) if b in PAPER_ERROR["batch"]}
    gap_small, gap_ref = bn_gap[small]["gap"], bn_gap[ref]["gap"]
    at_small = {n: cnn_runs[n][small]["mean"] for n in CNN_NORMS}
    text = (f"Reading: BN's test accuracy at batch {ref} minus at batch {small}: {100 * drop:+.1f} ± "
            f"{100 * se:.1f} points (verdict: {row.get('shown_verdict', found)})")
    size = None
    if len(paper) == 2:
        paper_drop = paper[small] - paper[ref]
        text += (f", against {paper_drop:.1f} points of ImageNet error in the paper ({paper[ref]} % at {ref} "
                 f"images per GPU, {paper[small]} % at {small})")
        size = "full" if found == SUPPORTED and 100 * drop >= 0.25 * paper_drop else "direction"
        text += reading(found if found != SUPPORTED else size, {
            "full": ": the degradation is **reproduced**",
            "direction": ": its **direction is reproduced, its size is not**",
            "not supported": ": the opposite of the degradation was measured",
            "unclear": ": the degradation is **not reproduced** (within the seed-to-seed noise)",
            NOT_LEARNED: ": **no verdict**, a compared model did not learn"})
    text += (f". At batch {small} the five CNNs reach {100 * min(at_small.values()):.1f}-"
             f"{100 * max(at_small.values()):.1f} % test accuracy. "
             f"Normalizing each test batch of {small} with its own statistics instead of the running averages "
             f"costs {100 * gap_small['mean']:+.1f} ± {100 * gap_small['std']:.1f} points (at batch {ref}: "
             f"{100 * gap_ref['mean']:+.1f} ± {100 * gap_ref['std']:.1f}).")
    n = len(gap_small["values"])
    noisy = verdict(gap_small["mean"], gap_small["std"] / math.sqrt(n) if n > 1 else math.inf)
    text += reading(noisy, {
        SUPPORTED: f" So statistics of {small} examples are a noisier normalization than the running averages "
                   "that inference uses; the network trained with that noise.",
        "not supported": f" The statistics of {small} examples normalize better than the running averages "
                         "here.",
        "unclear": f" The statistics of {small} examples normalize about as well as the running averages here, "
                   "so the small-batch noise that drives the paper's effect is small on this data."})
    if found != SUPPORTED or size == "direction":
        text += (" Why the paper's effect is larger here is not tested by this run; one hypothesis is depth "
                 "(the paper's ResNet-50 stacks about 50 normalized layers on 1000 classes, this CNN has "
                 f"{len(cfg.widths or models.CNN().widths)} normalized conv layers on {num_classes} classes).")
    return text


EXPERIMENT = Experiment(NAME, "no/batch/layer/instance/group norm vs batch size at a fixed step budget "
                        "and tuned rates (GN paper Fig. 1), MLP baseline, row-RNN, contrast robustness, GN "
                        "groups, BN running vs batch statistics, verdicts on the course notes' claims", run,
                        check_configs, config=Config, check_config=check_config, plot=plot)

if __name__ == "__main__":
    raise SystemExit(main_for(EXPERIMENT))
