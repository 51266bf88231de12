"""normalization: no norm / batch / layer / instance / group norm on real data, tested claim by claim.

Tests claims of the course notes (docs/claims.md). A small CNN with each norm at batch sizes 2..64, every
configuration trained with Adam at a learning rate chosen for that (norm, batch size) by a vmapped sweep on
a validation split (:func:`jaxopt_lab.lab.training.tune_learning_rate`) whose grid widens until the choice
is bracketed, then replicated on a second, disjoint seed set; set beside the trend of Figure 1 of the Group
Norm paper (Wu & He, ECCV 2018); an MLP beside it (so the CNN is seen to be at least as good); a GRU whose
cell is layer- or batch-normalized (:class:`jaxopt_lab.lab.models.NormGRU`); BN and no norm at one shared
rate (is BN faster, or is its rate?); every trained CNN on test inputs whose contrast and brightness were
changed per example; group norm's group count; batch norm evaluated with its running statistics and with the
statistics of test batches of its training batch size (why BN does or does not degrade at small batches);
and a verdict per claim of the course notes, on each seed set and replicated
(:mod:`jaxopt_lab.lab.norm_claims`). ``--data mnist1d`` runs it on MNIST-1D.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from jaxopt_lab.lab import data, models, norm_claims, training
from jaxopt_lab.lab.diagnostics import bn_statistics_gap
from jaxopt_lab.lab.experiment import Experiment, RunContext, check_modes, check_training_config
from jaxopt_lab.lab.norm_claims import PAPER_ERROR
from jaxopt_lab.lab.plotting import new_figure
from jaxopt_lab.lab.runner import main_for
from jaxopt_lab.lab.training import pct
from jaxopt_lab.lab.verdicts import difference

NAME = "normalization"
CNN_NORMS = ("none", "batch", "layer", "instance", "group")
RNN_NORMS = models.RNN_NORMS
SCHEDULES = ("constant", "cosine")
# The built-in datasets this experiment supports (`--data NAME`; a `.npz` path works too).
SUPPORTED_DATA = data.BUILTIN_DATASETS
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
    # Per seed set: the rate search trains `seeds` seeds, and as many replicate seeds (disjoint) are trained
    # at the chosen rate afterwards; every verdict is judged on each set and replicated.
    seeds: int
    learning_rates: tuple[float, ...]  # Adam rates swept per (norm, batch size)
    num_groups: int
    group_counts: tuple[int, ...]
    rnn_batch_sizes: tuple[int, ...]  # the GRU's (empty: no GRU)
    rnn_hidden: int
    widen: int = 0  # rates the search may add beyond the grid's edges (`tune_learning_rate(widen=...)`)
    schedule: str = "constant"  # Adam's rate: constant, or cosine-decayed to 0 over each run's budget
    # "BN speeds up training": steps until the `smoothing_steps`-step mean training loss is below `loss_target`.
    loss_target: float = 0.5
    smoothing_steps: int = 20
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
# 400 steps cost little more than 160 and let every CNN learn the digits at batch 32). One rate in the grid
# and one added by widening: the search, the added rate and the replicate seeds are programs of the same
# number of lanes, so each configuration compiles once.
QUICK = Config(batch_sizes=(4, 32), steps=400, min_epochs=0, seeds=2, learning_rates=(1e-2,), widen=2,
               num_groups=4, group_counts=(1, 4), rnn_batch_sizes=(32,), rnn_hidden=32, widths=(16, 32),
               pool_after=(0,))
# Every configuration trains until its loss has flattened: 30 epochs (batch 2: 16,160 steps; the no-norm
# CNN needs ~30 epochs at batch 32 to pass the MLP on digits), at least 500 steps (batch 64: 30 epochs).
# Rates: Adam's useful range on these models spans 3e-4 (small batches) to 1e-2 (large ones); widening adds
# up to three more beyond an edge.
FULL = Config(batch_sizes=(2, 4, 8, 16, 32, 64), steps=500, min_epochs=30, seeds=5,
              learning_rates=(3e-4, 1e-3, 3e-3, 1e-2), widen=3, num_groups=8, group_counts=(1, 4, 8, 16),
              rnn_batch_sizes=(4, 32), rnn_hidden=64)
# MNIST-1D has 3x the training examples of digits and is harder (the paper's CNN: ~94%). At a constant rate
# its losses had not flattened at 10 epochs. With Adam's rate decayed to 0 (cosine), batch norm (the best
# norm at most batch sizes) flattened at 1 of 6 batch sizes after 20 epochs in a full run and at 5 of 6
# after 40 in runs at its chosen rates, so 40 epochs (batch 2: 64,000 steps; batch 64: 2,000). Measured in
# docs/mnist1d.md.
FULL_BY_DATA = {"mnist1d": dataclasses.replace(FULL, steps=1000, min_epochs=40, schedule="cosine")}


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


def optimizer(cfg: Config, steps: int) -> Callable[[Any], optax.GradientTransformation]:
    """``learning_rate -> Adam`` for a run of ``steps`` steps: a constant rate, or a cosine decay from it to 0
    over the run (``cfg.schedule``). The rate may be traced (one program serves every rate)."""
    if cfg.schedule == "cosine":
        return lambda learning_rate: optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    return optax.adam


# Jobs: (kind, norm or group count, batch size). "speed" is batch norm trained at the no-norm CNN's chosen
# rate at the reference batch: the speed claim's shared-rate arm (its rate is known only after "cnn none").
def _jobs(cfg: Config) -> list[tuple[str, Any, int]]:
    return ([("cnn", n, b) for n in CNN_NORMS for b in cfg.batch_sizes]
            + [("speed", "batch", cfg.reference_batch), ("mlp", "none", cfg.reference_batch)]
            + [("rnn", n, b) for n in RNN_NORMS for b in cfg.rnn_batch_sizes]
            + [("groups", g, cfg.reference_batch) for g in cfg.group_counts if g != cfg.num_groups])


def _model(cfg: Config, kind: str, what: Any, num_classes: int) -> Any:
    if kind in ("cnn", "speed"):
        return cnn(cfg, what, num_classes)
    if kind == "groups":
        return cnn(cfg, "group", num_classes, num_groups=what)
    if kind == "mlp":
        return models.MLP(num_classes=num_classes)
    return models.NormGRU(norm=what, num_classes=num_classes, hidden=cfg.rnn_hidden)


def check_config(cfg: Config, label: str, data_name: str | None = None) -> None:
    """Builds every model and optimizer of ``cfg`` abstractly on ``data_name`` (``None``: every supported
    dataset); ``ValueError`` naming ``label`` if one cannot run."""
    if cfg.reference_batch not in cfg.batch_sizes:
        raise ValueError(f"{label}: reference_batch={cfg.reference_batch} must be one of batch_sizes "
                         f"{cfg.batch_sizes}")
    if cfg.num_groups not in cfg.group_counts:
        raise ValueError(f"{label}: num_groups={cfg.num_groups} must be one of group_counts {cfg.group_counts}")
    if cfg.seeds < 1 or len(cfg.learning_rates) < 1 or cfg.steps < 20 or cfg.steps % 20 or cfg.min_epochs < 0:
        raise ValueError(f"{label}: needs >= 1 seed per set (2 for a verdict), >= 1 learning rate, steps a "
                         f"positive multiple of 20 and min_epochs >= 0")
    if cfg.widen < 0 or cfg.schedule not in SCHEDULES:
        raise ValueError(f"{label}: widen must be >= 0 and schedule one of {SCHEDULES}, got widen={cfg.widen}, "
                         f"schedule={cfg.schedule!r}")
    if not cfg.loss_target > 0 or not 1 <= cfg.smoothing_steps <= cfg.steps:
        raise ValueError(f"{label}: loss_target must be > 0 and smoothing_steps in [1, steps={cfg.steps}], got "
                         f"{cfg.loss_target}, {cfg.smoothing_steps}")
    for name in SUPPORTED_DATA if data_name is None else (data_name,):
        ds = data.load_dataset(name)
        train_size = training.examples_after_validation(len(ds.y_train), cfg.validation_fraction)
        models_at: dict[tuple[str, Any], list[int]] = {}
        for kind, what, batch_size in _jobs(cfg):  # each model once, with every batch size it trains at
            models_at.setdefault((kind, what), []).append(batch_size)
        for (kind, what), batch_sizes in models_at.items():
            tx = optimizer(cfg, steps_for(cfg, min(batch_sizes), train_size))(cfg.learning_rates[0])
            check_training_config(_model(cfg, kind, what, ds.num_classes), tx, ds.image_shape,
                                  batch_sizes=batch_sizes, train_size=train_size,
                                  where=f"{label}: {kind} {what!r} on {name}")


def check_configs() -> None:
    """The quick and the full config of every supported dataset, without training (a few seconds)."""
    check_modes(Config.for_mode, check_config, SUPPORTED_DATA)


def _record(cfg: Config, search: training.RateSearch, *, searched: bool = True) -> dict:
    """:func:`norm_claims.record` and the speed measures: test accuracy at the first evaluation and the
    steps to the loss target."""
    history = search.result.history
    return {**norm_claims.record(search, searched=searched),
            "first_eval": training.mean_std(history.test_accuracy[:, 0]),
            "first_eval_step": int(np.asarray(history.steps)[0, 0]),
            "steps_to_target": norm_claims.steps_record(history.step_loss, cfg.loss_target,
                                                        cfg.smoothing_steps)}


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


def _dataset(ctx: RunContext) -> data.Dataset:
    return data.load_dataset(None if ctx.data_path is None else str(ctx.data_path))


def _test_sets(ds: data.Dataset, seed: int) -> dict[str, np.ndarray]:
    """The clean test inputs and their per-example contrast / brightness / both changes (fixed by ``seed``)."""
    key = jax.random.key(seed)
    return {"clean": ds.x_test, **{k: changed_inputs(ds, k, jax.random.fold_in(key, i))
                                   for i, k in enumerate(("contrast", "brightness", "both"))}}


def _train_job(cfg: Config, ds: data.Dataset, seed_set: tuple[list[int], list[int]], job: tuple[str, Any, int],
               test_sets: dict[str, np.ndarray], data_parallel: bool | None, progress: Any = None,
               learning_rate: float | None = None) -> dict:
    """One configuration, trained and evaluated: its record, its histories and what later stages need
    from its trained state (robustness at the reference batch, BN's running vs batch statistics).
    ``learning_rate``: train at this rate only (the speed claim's shared rate) instead of searching."""
    kind, what, batch_size = job
    seeds, replicas = seed_set
    train_size = training.examples_after_validation(len(ds.y_train), cfg.validation_fraction)
    steps = steps_for(cfg, batch_size, train_size)
    search = training.tune_learning_rate(
        _model(cfg, kind, what, ds.num_classes), optimizer(cfg, steps), ds, seeds,
        learning_rates=cfg.learning_rates if learning_rate is None else [learning_rate],
        widen=cfg.widen if learning_rate is None else 0, replicate_seeds=replicas, batch_size=batch_size,
        steps=steps, validation_fraction=cfg.validation_fraction, data_parallel=data_parallel,
        progress=progress)
    history, state = search.result.history, search.result.state
    unit: dict[str, Any] = {"record": _record(cfg, search, searched=learning_rate is None), "histories": {
        "step_loss": np.asarray(history.step_loss), "eval_steps": np.asarray(history.steps)[0],
        "train_loss": np.asarray(history.train_loss), "test_accuracy": np.asarray(history.test_accuracy)}}
    if kind == "cnn" and batch_size == cfg.reference_batch:
        unit["robustness"] = {k: training.mean_std(training.evaluate_seeds(state, x, ds.y_test)[1])
                              for k, x in test_sets.items()}
    if kind == "cnn" and what == "batch":
        unit["bn_gap"] = bn_statistics_gap(state, ds, batch_size)
    return unit


def seed_sets(cfg: Config, seed: int) -> tuple[list[int], list[int]]:
    """The rate search's seeds and the disjoint replicate seeds: ``seed .. seed + seeds - 1`` and
    ``seed + seeds .. seed + 2 seeds - 1``."""
    return [seed + i for i in range(cfg.seeds)], [seed + cfg.seeds + i for i in range(cfg.seeds)]


def run(ctx: RunContext) -> None:
    ds = _dataset(ctx)
    cfg = ctx.resolve_config(Config, ds.name)
    seed_set = seed_sets(cfg, ctx.seed)
    cnn_runs: dict[str, dict] = {n: {} for n in CNN_NORMS}
    rnn: dict[str, dict] = {n: {} for n in RNN_NORMS}
    groups: dict[int, dict] = {}
    robust: dict[str, dict] = {}
    bn_gap: dict[int, dict] = {}
    histories: dict[str, np.ndarray] = {}
    mlp: dict = {}
    bn_shared: dict = {}
    test_sets = _test_sets(ds, ctx.seed)
    train_size = training.examples_after_validation(len(ds.y_train), cfg.validation_fraction)
    for job in ctx.progress(_jobs(cfg), desc="configurations"):
        kind, what, batch_size = job
        label = f"{kind} {what} batch {batch_size}"
        # The speed arm trains at the no-norm CNN's chosen rate (its job runs after every "cnn" job); where
        # that is BN's own chosen rate, BN's runs (same seeds, split and rate) are that arm already.
        shared = cnn_runs["none"][cfg.reference_batch]["learning_rate"] if kind == "speed" else None
        if shared is not None and shared == cnn_runs["batch"][batch_size]["learning_rate"]:
            bn_shared, own = {**cnn_runs["batch"][batch_size], "at_edge": None}, f"cnn/batch/b{batch_size}/"
            histories.update({f"speed/batch/b{batch_size}/{name[len(own):]}": value
                              for name, value in list(histories.items()) if name.startswith(own)})
            continue
        steps = steps_for(cfg, batch_size, train_size)
        with ctx.progress(total=steps * (2 + (0 if shared else cfg.widen)), desc=f"{label}, steps") as bar:
            unit = ctx.cached(label, {"config": cfg, "data": ds.describe(), "job": list(job), "rate": shared},
                              functools.partial(_train_job, cfg, ds, seed_set, job, test_sets,
                                                ctx.data_parallel, bar.update, shared))
        record = unit["record"]
        histories.update({f"{kind}/{what}/b{batch_size}/{name}": value
                          for name, value in unit["histories"].items()})
        if kind == "cnn":
            cnn_runs[what][batch_size] = record
            if "robustness" in unit:
                robust[what] = unit["robustness"]
            if "bn_gap" in unit:
                bn_gap[batch_size] = unit["bn_gap"]
        elif kind == "speed":
            bn_shared = record
        elif kind == "mlp":
            mlp = record
        elif kind == "rnn":
            rnn[what][batch_size] = record
        else:
            groups[what] = record
    groups[cfg.num_groups] = cnn_runs["group"][cfg.reference_batch]
    groups = dict(sorted(groups.items()))
    bn_gap = dict(sorted(bn_gap.items()))
    ref = cfg.reference_batch
    speed = {"shared_rate": bn_shared["learning_rate"], "bn_shared_rate": bn_shared,
             "own_rate_is_shared": bn_shared["learning_rate"] == cnn_runs["batch"][ref]["learning_rate"],
             "comparisons": norm_claims.speed_comparisons(
                 none=cnn_runs["none"][ref], bn_own=cnn_runs["batch"][ref], bn_shared=bn_shared,
                 reference_batch=ref, target=cfg.loss_target, window=cfg.smoothing_steps,
                 num_classes=ds.num_classes)}
    claims = norm_claims.claims(batch_sizes=cfg.batch_sizes, reference_batch=ref, cnn_runs=cnn_runs, rnn=rnn,
                                robust=robust, groups=groups, speed=speed, num_classes=ds.num_classes)
    per_batch = norm_claims.per_batch(cnn_runs, rnn, ds.num_classes)
    for c in claims:
        c["shown_verdict"] = ctx.verdict(c["verdict"])
    # The endpoint evidence: at each batch size, did the best norm's training loss flatten?
    best_at = {b: max(CNN_NORMS, key=lambda n: float(cnn_runs[n][b]["mean"])) for b in cfg.batch_sizes}
    flat_best = {b: cnn_runs[best_at[b]][b]["flattened"]["flattened"] for b in cfg.batch_sizes}
    ctx.set_endpoint(
        f"{_budget_text(cfg)}, Adam ({cfg.schedule} rate) at the rate "
        f"chosen per (norm, batch size) from {list(cfg.learning_rates)} (widened up to {cfg.widen} times) on a "
        f"{cfg.validation_fraction:.0%} validation split; the best norm's training loss flattened at "
        f"{sum(flat_best.values())} of {len(flat_best)} batch sizes")
    config = {**dataclasses.asdict(cfg), "seeds_used": seed_set[0], "replicate_seeds": seed_set[1],
              "data": ds.describe(), "data_name": ds.name, "num_classes": ds.num_classes,
              "cnn": repr(cnn(cfg, "none", ds.num_classes)),
              "mlp": repr(models.MLP(num_classes=ds.num_classes)),
              "rnn": repr(models.NormGRU(num_classes=ds.num_classes, hidden=cfg.rnn_hidden)),
              "optimizer": f"adam ({cfg.schedule} rate), learning rate chosen per (norm, batch size) by "
                           "training.tune_learning_rate"}
    ctx.set_metrics(config, {"cnn": cnn_runs, "mlp": mlp, "rnn": rnn, "robustness": robust,
                             "group_counts": groups, "bn_running_vs_batch_statistics": bn_gap, "speed": speed,
                             "best_norm_flattened": flat_best, "claims": claims, "claims_per_batch": per_batch,
                             "rates_at_edge": _edges(cnn_runs, rnn, mlp, groups),
                             "paper_error_percent": PAPER_ERROR})
    ctx.save_histories(histories)
    ctx.plot(EXPERIMENT)
    ctx.set_summary(_summary(ctx, cfg, ds, cnn_runs, mlp, rnn, robust, groups, bn_gap, speed, claims, per_batch,
                             FIGURES))


def _edges(cnn_runs: dict, rnn: dict, mlp: dict, groups: dict) -> list[str]:
    """The configurations whose chosen rate is still at an edge of the (widened) grid, e.g. ``cnn batch b2:
    highest``."""
    runs = {**{f"cnn {n} b{b}": r for n, by in cnn_runs.items() for b, r in by.items()},
            **{f"rnn {n} b{b}": r for n, by in rnn.items() for b, r in by.items()},
            "mlp": mlp, **{f"groups G={g}": r for g, r in groups.items()}}
    return [f"{label}: {r['at_edge']}" for label, r in runs.items() if r.get("at_edge")]


FIGURES = ("error_vs_batch_size.png", "rnn_robustness_groups.png", "training_loss.png", "speed.png")


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
    _figure_speed(ctx, config, histories, metrics["speed"]["shared_rate"],
                  cnn_runs["batch"][config["reference_batch"]]["learning_rate"])


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
    for ax, title in ((ours, f"ours: CNN on {config['data_name']}, {2 * config['seeds']} seeds"),
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
    rbs = sorted(rnn["batch"])  # empty when the run trained no GRU
    for i, norm in enumerate(RNN_NORMS):
        x = np.arange(len(rbs)) + (i - 1) * 0.27
        ax.bar(x, [100 * rnn[norm][b]["mean"] for b in rbs], 0.27,
               yerr=[100 * rnn[norm][b]["std"] for b in rbs], capsize=3, label=norm)
    ax.set_xticks(np.arange(len(rbs)), [f"batch {b}" for b in rbs])
    if "num_classes" in config:  # results written before it was recorded have no chance line
        ax.axhline(100 / config["num_classes"], color="grey", linestyle=":", label="chance")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("GRU, norm inside the cell", fontsize="medium")
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


def _figure_speed(ctx: RunContext, config: Mapping[str, Any], histories: Mapping[str, np.ndarray],
                  shared_rate: float, own_rate: float) -> str:
    """The speed claim's arms at the reference batch: training loss and test accuracy against steps (log
    scale: the claim is about the early steps)."""
    ref, window = config["reference_batch"], config["smoothing_steps"]
    arms = {f"no norm, its rate {shared_rate:.2g} (shared)": f"cnn/none/b{ref}",
            f"BN, the shared rate {shared_rate:.2g}": f"speed/batch/b{ref}"}
    if own_rate != shared_rate:  # else the same runs as the shared-rate arm
        arms[f"BN, its own rate {own_rate:.2g}"] = f"cnn/batch/b{ref}"
    fig, axes = new_figure(1, 2, width=5.0, height=3.8)
    loss_ax, acc_ax = axes[0]
    for label, key in arms.items():
        loss = np.nanmean(histories[f"{key}/step_loss"], axis=0)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        loss_ax.plot(np.arange(window, loss.size + 1), smooth, label=label, linewidth=1)
        accuracy = 100 * histories[f"{key}/test_accuracy"]
        acc_ax.errorbar(histories[f"{key}/eval_steps"], accuracy.mean(axis=0),
                        yerr=accuracy.std(axis=0, ddof=1), capsize=2, label=label)
    loss_ax.axhline(config["loss_target"], color="grey", linestyle=":",
                    label=f"target {config['loss_target']:g}")
    loss_ax.set(yscale="log", ylabel=f"training loss ({window}-step mean, mean of seeds)")
    acc_ax.set(ylabel="test accuracy (%), mean ± std of seeds")
    for ax in (loss_ax, acc_ax):
        ax.set(xscale="log", xlabel="step (log scale)")
        ax.tick_params(axis="x", which="minor", labelbottom=False)  # they crowd a short range
        ax.set_title(f"BN vs no norm, CNN at batch {ref}", fontsize="medium")
        ax.legend(fontsize="small")
    return ctx.save_figure(fig, "speed.png")


def _summary(ctx, cfg, ds, cnn_runs, mlp, rnn, robust, groups, bn_gap, speed, claims, per_batch,
             figures) -> str:
    sizes = sorted(cfg.batch_sizes)
    ref = cfg.reference_batch
    train_size = training.examples_after_validation(len(ds.y_train), cfg.validation_fraction)
    budget = {b: steps_for(cfg, b, train_size) for b in sizes}
    edges = _edges(cnn_runs, rnn, mlp, groups)
    lines = [f"# {NAME} — which norm wins at which batch size, in RNNs and under contrast changes", "",
             f"Data: {ds.describe()}; {cfg.validation_fraction:.0%} of the training set held out to choose "
             f"the learning rate, the rest ({train_size}) trains. "
             f"Model: `{cnn(cfg, 'none', ds.num_classes)!r}`. Step budget: {_budget_text(cfg)}, here "
             + ", ".join(f"batch {b}: **{budget[b]} steps** ({b * budget[b] / train_size:.1f} epochs)"
                         for b in sizes)
             + f". Adam ({cfg.schedule} rate) at the rate chosen per (norm, batch size) among "
             f"{list(cfg.learning_rates)} by best mean validation accuracy (`training.tune_learning_rate`, "
             "all rates x seeds in one vmapped program); while the choice is the lowest or highest rate tried, "
             f"the search adds one 3x beyond it (at most {cfg.widen}). Seeds: {cfg.seeds} choose the rate, "
             f"{cfg.seeds} other seeds are then trained at the chosen rate (the replicate set). Test accuracy "
             f"(%), mean ± std over all {2 * cfg.seeds} seeds, chosen rate in brackets (*edge*: still the "
             "lowest or highest rate tried):", "",
             "| model | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for norm in CNN_NORMS:
        lines.append(f"| CNN, {norm} | " + " | ".join(_accuracy(cnn_runs[norm][b]) for b in sizes) + " |")
    lines.append("| MLP, no norm | " + " | ".join(_accuracy(mlp) if b == ref else "—" for b in sizes) + " |")
    none, diff_mlp = cnn_runs["none"][ref], difference(cnn_runs["none"][ref], mlp)
    lines += ["", f"No-norm CNN minus MLP at batch {ref}: {100 * diff_mlp[0]:+.1f} ± {100 * diff_mlp[1]:.1f} "
              f"points ({pct(none)} vs {pct(mlp)}). Rates still at an edge of the widened grid: "
              + (f"{len(edges)} configurations ({'; '.join(edges)})." if edges else "none."), "",
              f"Endpoint evidence: the training loss {training.endpoint_rule()}; then the final training loss "
              "(mean of the last evaluation interval):", "",
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
        lines.append(f"| {b} | {pct(g['running'])} | {pct(g['batch'])} | {100 * g['gap']['mean']:+.1f} ± "
                     f"{100 * g['gap']['std']:.1f} |")
    conv_layers = len(cfg.widths or models.CNN().widths)
    lines += ["", norm_claims.small_batch_reading(
                  batch_sizes=cfg.batch_sizes, reference_batch=ref, cnn_runs=cnn_runs, bn_gap=bn_gap,
                  claims=claims, conv_layers=conv_layers, num_classes=ds.num_classes), "",
              f"Does BN speed up training, or does its rate? BN and no norm at batch {ref}, each at its own "
              f"chosen rate and both at one shared rate, the no-norm arm's ({speed['shared_rate']:g}: the "
              "baseline keeps its best rate and BN gets no rate of its own, so the shared-rate comparison "
              "measures the norm alone; it gives the verdict"
              + ("; BN's own chosen rate is the shared rate here, so both BN rows are the same runs"
                 if speed["own_rate_is_shared"] else "") + "):", "",
              *norm_claims.speed_table(none=none, bn_own=cnn_runs["batch"][ref],
                                       bn_shared=speed["bn_shared_rate"], comparisons=speed["comparisons"],
                                       target=cfg.loss_target, window=cfg.smoothing_steps), "",
              f"![speed]({figures[3]})", ""]
    if rnn["batch"]:
        rbs = sorted(rnn["batch"])
        lines += [f"GRU ({cfg.rnn_hidden} units, rows/positions as time steps, classifying from the last "
                  "state; `models.NormGRU`: the recurrent pre-activation and, where a step has more than one "
                  "feature, "
                  "the input pre-activation normalized separately inside the cell, layer norm per example and "
                  "step, batch norm with statistics per time step), test accuracy (%):", "",
                  "| norm | " + " | ".join(f"batch {b}" for b in rbs) + " |", "|---|" + "---|" * len(rbs)]
        lines += [f"| {norm} | " + " | ".join(_accuracy(rnn[norm][b]) for b in rbs) + " |"
                  for norm in RNN_NORMS]
        lines += [""]
    kinds = ("clean", "contrast", "brightness", "both")
    lines += [f"Per-example test changes (contrast x[{CONTRAST_RANGE[0]:.2f}, {CONTRAST_RANGE[1]:g}] "
              f"log-uniform on the raw input, brightness an offset of up to ±{BRIGHTNESS_FRACTION:.0%} of the "
              f"raw training range), CNN trained at batch {ref}, accuracy (%):", "",
              "| norm | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for norm in CNN_NORMS:
        lines.append(f"| {norm} | " + " | ".join(pct(robust[norm][k]) for k in kinds) + " |")
    lines += ["", f"Group norm's group count at batch {ref}: "
              + ", ".join(f"G={g}: {_accuracy(r)}" for g, r in groups.items()) + ".", "",
              f"![RNN, robustness, groups]({figures[1]})", "",
              "Verdicts: each claim's test on all seeds (difference ± standard error), then on each seed set "
              f"alone (set A: the {cfg.seeds} seeds that chose the rates, set B: the {cfg.seeds} replicate "
              "seeds); supported / not supported when the difference exceeds 2 standard errors, else unclear; "
              "the verdict is the sets' common verdict, *unstable* when they disagree; no verdict when a "
              "compared model did not learn (its final training loss at or above half that of a uniform guess)"
              + ("; a quick run's verdicts are not conclusive" if ctx.quick else "") + ":", "",
              *norm_claims.claims_table(claims), "",
              "The general claims at each batch size on its own (unpaired; the verdict replicated on both seed "
              "sets), beside their pooled test above:", "",
              *norm_claims.per_batch_table(per_batch, sorted({*cfg.batch_sizes, *cfg.rnn_batch_sizes})), "",
              "Notes: a contrast change in raw units is, in standardized units, a scale *and* a shift "
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


def _accuracy(record: dict) -> str:
    """``99.1 ± 0.3 (0.01)``, with ``edge`` after the rate when it is still at an edge of the widened grid."""
    return f"{pct(record)} ({record['learning_rate']:.2g}{' edge' if record.get('at_edge') else ''})"


def _flat(record: dict) -> str:
    """``yes (last 200 steps: -1.3%, -0.004 nats), loss 0.012``: the endpoint rule's verdict and evidence,
    then the final training loss (a loss flat at ln(10) = 2.3 is a model that has not learned, not a
    converged one)."""
    return (f"{training.Flatness(**record['flattened']).describe()}, loss "
            f"{record['final_train_loss']['mean']:.3f}")


EXPERIMENT = Experiment(NAME, "no/batch/layer/instance/group norm vs batch size at a fixed step budget "
                        "and tuned rates (GN paper Fig. 1), MLP baseline, normalized GRU, BN speed at a shared "
                        "rate, contrast robustness, GN groups, BN running vs batch statistics, replicated "
                        "verdicts on the course notes' claims", run,
                        check_configs, config=Config, check_config=check_config, plot=plot)

if __name__ == "__main__":
    raise SystemExit(main_for(EXPERIMENT))
