"""gradient-accumulation: an effective batch of 128 reached four ways, on real digits.

Tests claims of the course notes (docs/claims.md). (a) one batch of 128; (b) ``optax.MultiSteps`` over 4
batches of 32; (c)
:func:`jaxopt_lab.accumulation.microbatched_value_and_grad` with 4 micro-batches of 32 inside one step;
(d) plain batches of 32 (no accumulation, 4x the updates). All runs of a seed see the same examples in
the same order (a batch of 128 is four consecutive batches of 32), so (b) and (c) must equal (a) up to
float rounding, unless the model has batch norm, whose statistics are then those of 32 examples.
The endpoint is a budget of optimizer updates; (a)'s SGD+momentum rate is chosen by a vmapped sweep on a
validation split (:func:`jaxopt_lab.lab.training.tune_learning_rate`) and used for (a), (b) and (c) alike (an
equivalence test needs the same rate); (d) gets its own tuned rate. Reported: parameter max-abs difference
to (a), loss curves, test accuracy, the chosen rates, and the step time and compiled memory of each variant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_lab.lab import data, models, training
from jaxopt_lab.lab.experiment import Experiment, RunContext, check_modes, check_training_config
from jaxopt_lab.lab.plotting import new_figure, plot_loss_curves
from jaxopt_lab.lab.runner import main_for
from jaxopt_lab.lab.verdicts import reading

NAME = "gradient-accumulation"
EFFECTIVE_BATCH, STEPS = 128, 4
MICRO_BATCH = EFFECTIVE_BATCH // STEPS
# name -> (batch size fed per call, micro-batches inside the step, MultiSteps?)
VARIANTS = {
    "(a) 1 x 128": (EFFECTIVE_BATCH, 1, False),
    "(b) MultiSteps 4 x 32": (MICRO_BATCH, 1, True),
    "(c) micro-batched 4 x 32": (EFFECTIVE_BATCH, STEPS, False),
    "(d) plain 32": (MICRO_BATCH, 1, False),
}


SUPPORTED_DATA = data.BUILTIN_DATASETS


@dataclasses.dataclass(frozen=True)
class Config:
    models: tuple[str, ...]
    updates: int  # optimizer updates of an effective batch of 128 ((b) takes 4x as many micro-steps)
    seeds: int
    learning_rates: tuple[float, ...]  # SGD+momentum rates swept for (a) (used by (a)-(c)) and for (d)
    momentum: float = 0.9
    timing_repeats: int = 20
    validation_fraction: float = 0.2

    @classmethod
    def for_mode(cls, quick: bool, data: str | None = None) -> Config:
        """:data:`QUICK` or :data:`FULL` (the same on every dataset)."""
        return QUICK if quick else FULL


QUICK = Config(models=("MLP, no norm", "MLP, group norm", "MLP, batch norm"), updates=60, seeds=3,
               learning_rates=(0.03, 0.1))
FULL = Config(models=("MLP, no norm", "MLP, group norm", "MLP, batch norm", "CNN, group norm",
                      "CNN, batch norm"), updates=240, seeds=3, learning_rates=(0.01, 0.03, 0.1))


def build_model(name: str, num_classes: int):
    kind, norm = name.split(", ")
    norm = {"no norm": "none", "group norm": "group", "batch norm": "batch"}[norm]
    if kind == "MLP":
        return models.MLP(norm=norm, num_classes=num_classes)
    return models.CNN(norm=norm, num_classes=num_classes)


def _optimizer(cfg: Config, multi_steps: bool, learning_rate) -> optax.GradientTransformation:
    tx = optax.sgd(learning_rate, momentum=cfg.momentum)
    return optax.MultiSteps(tx, every_k_schedule=STEPS) if multi_steps else tx


def check_config(cfg: Config, label: str, data_name: str | None = None) -> None:
    """Builds every model x variant of ``cfg`` abstractly (one step each) on ``data_name`` (``None``: every
    supported dataset); ``ValueError`` naming ``label`` if one cannot run."""
    if cfg.seeds < 1 or cfg.updates < 20 or not cfg.learning_rates:
        raise ValueError(f"{label}: needs >= 1 seed, >= 20 updates and >= 1 learning rate")
    for name in SUPPORTED_DATA if data_name is None else (data_name,):
        ds = data.load_dataset(name)
        swept = training.examples_after_validation(len(ds.y_train), cfg.validation_fraction)
        train_size = (len(ds.y_train) // EFFECTIVE_BATCH) * EFFECTIVE_BATCH
        for model_name in cfg.models:
            model = build_model(model_name, ds.num_classes)
            for variant, (batch_size, k, multi) in VARIANTS.items():
                check_training_config(model, _optimizer(cfg, multi, cfg.learning_rates[0]), ds.image_shape,
                                      batch_sizes=[batch_size], train_size=min(train_size, swept),
                                      num_microbatches=k, where=f"{label}: {model_name}, {variant} on {name}")


def check_configs() -> None:
    """The quick and the full config of every supported dataset, without training (a few seconds)."""
    check_modes(Config.for_mode, check_config, SUPPORTED_DATA)


def per_update_losses(step_loss: np.ndarray, multi_steps: bool) -> np.ndarray:
    """MultiSteps records a loss per micro-step: average each group of ``STEPS`` into one per update."""
    return step_loss.reshape(*step_loss.shape[:-1], -1, STEPS).mean(-1) if multi_steps else step_loss


def max_abs_difference(a, b) -> np.ndarray:
    """Per seed (leading axis), the largest absolute difference over every parameter."""
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: np.abs(np.asarray(x) - np.asarray(y)).reshape(len(x), -1)
                                         .max(axis=1), a, b))
    return np.max(np.stack(diffs), axis=0)


def relative_l2_difference(a, b) -> np.ndarray:
    """Per seed, ``||a - b|| / ||b||`` over all parameters (small when only a few weights moved apart)."""
    sq = lambda tree: sum(np.square(np.asarray(x, np.float64)).reshape(len(x), -1).sum(1)
                          for x in jax.tree.leaves(tree))
    return np.sqrt(sq(jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), a, b)) / sq(b))


def time_and_memory(model, cfg: Config, ds: data.Dataset, variant: str, learning_rate: float) -> dict:
    """Median wall time of one optimizer update (4 calls for MultiSteps) and XLA's compiled temp memory."""
    batch_size, k, multi = VARIANTS[variant]
    state = training.create_train_state(model, _optimizer(cfg, multi, learning_rate), jax.random.key(0),
                                        ds.x_train[:1])
    batch = training.Batch(jnp.asarray(ds.x_train[:batch_size]), jnp.asarray(ds.y_train[:batch_size]))
    step = jax.jit(training.make_train_step(num_microbatches=k))
    compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    calls = STEPS if multi else 1
    jax.block_until_ready(step(state, batch))
    times = []
    for _ in range(cfg.timing_repeats):
        start = time.perf_counter()
        s = state
        for _ in range(calls):
            s, metrics = step(s, batch)
        jax.block_until_ready((s, metrics))
        times.append(time.perf_counter() - start)
    return {"update_ms": 1e3 * float(np.median(times)),
            "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
            "argument_bytes": None if memory is None else int(memory.argument_size_in_bytes)}


def run(ctx: RunContext) -> None:
    ds = data.load_dataset(None if ctx.data_path is None else str(ctx.data_path))
    cfg = ctx.resolve_config(Config, ds.name)
    seeds = [ctx.seed + i for i in range(cfg.seeds)]
    train_size = (len(ds.y_train) // EFFECTIVE_BATCH) * EFFECTIVE_BATCH
    rows: list[dict[str, Any]] = []
    chosen: dict[str, dict[str, Any]] = {}
    b_vs_c: dict[str, dict[str, Any]] = {}
    histories: dict[str, np.ndarray] = {}
    # Steps per model: the two rate sweeps (at 128 and at 32) and the four variants.
    steps_per_model = (1 + STEPS) * cfg.updates + sum(
        cfg.updates if batch_size == EFFECTIVE_BATCH else STEPS * cfg.updates
        for batch_size, _, _ in VARIANTS.values())
    for model_name in ctx.progress(cfg.models, desc="models"):
        with ctx.progress(total=steps_per_model, desc=f"{model_name}, steps") as bar:
            unit = ctx.cached(model_name, {"config": cfg, "data": ds.describe(), "model": model_name},
                              functools.partial(_train_model, cfg, ds, seeds, model_name, train_size,
                                                ctx.data_parallel, bar.update))
        rows += unit["rows"]
        chosen[model_name], b_vs_c[model_name] = unit["chosen"], unit["b_vs_c"]
        histories.update({f"{model_name}/{variant}/{name}": value
                          for variant, arrays in unit["histories"].items() for name, value in arrays.items()})
    timing_model = cfg.models[0]
    timing = {v: time_and_memory(build_model(timing_model, ds.num_classes), cfg, ds, v,
                                 chosen[timing_model]["128"]["learning_rate"])
              for v in ctx.progress(VARIANTS, desc="timing")}
    flat = [r for r in rows if r["variant"].startswith("(a)")]
    ctx.set_endpoint(f"{cfg.updates} updates of an effective batch of {EFFECTIVE_BATCH} ((b): "
                     f"{STEPS * cfg.updates} micro-steps; (d): {STEPS * cfg.updates} steps of {MICRO_BATCH}), "
                     f"SGD+momentum at (a)'s swept rate for (a)-(c) and (d)'s own; (a)'s training loss "
                     f"flattened for {sum(bool(r['flattened']['flattened']) for r in flat)} of {len(flat)} "
                     "models")
    device = jax.devices()[0]
    ctx.set_metrics({**dataclasses.asdict(cfg), "seeds_used": seeds, "data": ds.describe(),
                     "train_size": train_size, "device": f"{device.platform} ({device.device_kind})"},
                    {"runs": rows, "chosen_learning_rates": chosen, "b_vs_c_max_abs_param_diff": b_vs_c,
                     "timing_model": timing_model, "timing": timing})
    ctx.save_histories(histories)
    ctx.plot(EXPERIMENT)
    ctx.set_summary(_summary(cfg, ds, rows, chosen, b_vs_c, timing, timing_model, device, FIGURE, train_size))


FIGURE = "loss_curves.png"


def _train_model(cfg: Config, ds: data.Dataset, seeds: list[int], model_name: str, train_size: int,
                 data_parallel: bool | None, progress: Any = None) -> dict:
    """One model: the rate sweeps, the four variants trained, their rows, (b) vs (c) and the histories."""
    model = build_model(model_name, ds.num_classes)
    # The values are the same either way; unrolling only sidesteps XLA:CPU's slow conv backward in loops
    # (jax-ml/jax#12868) for the training runs. The timing keeps the real loop.
    unroll = True if jax.default_backend() == "cpu" else 1
    # (a)'s rate, from a sweep at batch 128, serves (a), (b) and (c); (d) gets its own sweep at batch 32.
    sweeps = {which: training.tune_learning_rate(
        model, lambda lr: _optimizer(cfg, False, lr), ds, seeds, learning_rates=cfg.learning_rates,
        batch_size=batch_size, steps=steps, validation_fraction=cfg.validation_fraction,
        data_parallel=data_parallel, progress=progress)
        for which, batch_size, steps in (("128", EFFECTIVE_BATCH, cfg.updates),
                                         ("32", MICRO_BATCH, STEPS * cfg.updates))}
    chosen = {which: {"learning_rate": sw.learning_rate, "table": sw.table} for which, sw in sweeps.items()}
    results = {}
    for variant, (batch_size, k, multi) in VARIANTS.items():
        rate = sweeps["32" if variant.startswith("(d)") else "128"].learning_rate
        steps = cfg.updates if batch_size == EFFECTIVE_BATCH else STEPS * cfg.updates
        results[variant] = training.train_seeds(
            model, _optimizer(cfg, multi, rate), ds, seeds, steps=steps, batch_size=batch_size,
            num_microbatches=k, train_size=train_size, unroll=unroll, data_parallel=data_parallel,
            progress=progress)
    reference = results["(a) 1 x 128"].state.params
    rows = []
    for variant, (_, _, multi) in VARIANTS.items():
        result = results[variant]
        losses = per_update_losses(np.asarray(result.history.step_loss), multi)
        rows.append({"model": model_name, "variant": variant,
                     "learning_rate": chosen["32" if variant.startswith("(d)") else "128"]["learning_rate"],
                     "max_abs_param_diff_to_a": training.mean_std(max_abs_difference(result.state.params,
                                                                                     reference)),
                     "relative_l2_diff_to_a": training.mean_std(relative_l2_difference(result.state.params,
                                                                                       reference)),
                     "test_accuracy": training.mean_std(result.final_test_accuracy),
                     "final_train_loss": training.mean_std(losses[:, -10:].mean(1)),
                     "flattened": dataclasses.asdict(training.loss_flattened(losses)),
                     "diverged": training.diverged_at(result.history.step_loss)})
    b_vs_c = training.mean_std(max_abs_difference(results["(b) MultiSteps 4 x 32"].state.params,
                                                  results["(c) micro-batched 4 x 32"].state.params))
    histories = {variant: {"step_loss": np.asarray(r.history.step_loss),
                           "eval_steps": np.asarray(r.history.steps)[0],
                           "test_accuracy": np.asarray(r.history.test_accuracy)}
                 for variant, r in results.items()}
    return {"rows": rows, "chosen": chosen, "b_vs_c": b_vs_c, "histories": histories}


def plot(ctx: RunContext, histories: Mapping[str, np.ndarray], recorded: Mapping[str, Any]) -> None:
    """The loss curves of every model and variant, from ``histories.npz`` alone."""
    _figure(ctx, recorded["config"]["models"], histories)


def _figure(ctx, model_names, histories) -> str:
    fig, axes = new_figure(1, len(model_names), width=4.4, height=3.6)
    for ax, model_name in zip(axes[0], model_names, strict=True):
        for variant, (batch_size, _, multi) in VARIANTS.items():
            losses = per_update_losses(histories[f"{model_name}/{variant}/step_loss"], multi)
            per_update = EFFECTIVE_BATCH if multi else batch_size
            examples = per_update * np.arange(1, losses.shape[1] + 1)
            first_bad = next((d for d in training.diverged_at(losses) if d is not None), None)
            plot_loss_curves(ax, np.nanmean(losses, axis=0)[None], [variant], steps=examples,
                             diverged_at=[first_bad], logy=True,
                             linestyle="--" if variant.startswith(("(b)", "(c)")) else "-")
        ax.set_title(model_name, fontsize="medium")
        ax.set_xlabel("training examples seen")
    axes[0, 0].set_ylabel("training loss per update (mean of seeds)")
    return ctx.save_figure(fig, "loss_curves.png")


def _batch_norm_reading(rows: list[dict], b_vs_c: dict, exact: list[float]) -> str:
    """What batch norm does to (b) and (c), in clauses chosen by the measured distances."""
    bn = [r for r in rows if "batch norm" in r["model"] and r["variant"].startswith(("(b)", "(c)"))]
    if not bn:
        return "(d) takes 4x the updates on the same data, so it is not comparable step for step."
    to_a: dict[str, float] = {}
    for r in bn:  # the nearer of (b) and (c) to (a), per model
        median = float(np.median(r["max_abs_param_diff_to_a"]["values"]))
        to_a[r["model"]] = min(to_a.get(r["model"], median), median)
    away = min(r["relative_l2_diff_to_a"]["mean"] for r in bn) / max(max(exact), 1e-30)
    text = ("With batch norm each micro-batch is normalized with its own 32 examples' statistics and the "
            "running averages are updated 4 times per update, so (b) and (c) train a different function from "
            f"(a): their relative L2 distance to (a) is {away:.0f}x or more the largest one without batch "
            "norm. ")
    agree = {m: b_vs_c[m]["mean"] < 0.1 * to_a[m] for m in to_a if m in b_vs_c}
    text += reading(str(all(agree.values())), {
        "True": "(b) and (c) agree with each other far more closely than with (a) (same micro-batches, same "
                "statistics): their max abs difference is under a tenth of their distance to (a).",
        "False": "(b) and (c) do not stay together either: for "
                 + ", ".join(m for m, ok in agree.items() if not ok)
                 + " their max abs difference is at least a tenth of their distance to (a), so the rounding "
                   "between the two paths is amplified as much as the statistics' difference."})
    return text + (" (d) takes 4x the updates on the same data, so it is not comparable step for step; its "
                   "accuracy on the same examples is for scale.")


def _summary(cfg, ds, rows, chosen, b_vs_c, timing, timing_model, device, figure, train_size) -> str:
    lines = [f"# {NAME} — an effective batch of 128 four ways: where it is exact, what it costs",
             "", f"Data: {ds.describe()} (first {train_size} training examples, a multiple of 128). "
             f"SGD, momentum "
             f"{cfg.momentum}, **{cfg.updates} updates** of an effective batch of {EFFECTIVE_BATCH} ((b): "
             f"{STEPS * cfg.updates} micro-steps; (d): {STEPS * cfg.updates} steps of {MICRO_BATCH}, the same "
             f"examples), mean ± std over {cfg.seeds} seeds; the same examples in the same order for every "
             f"variant. Learning rate: ONE rate for (a), (b) and (c), chosen for (a) among "
             f"{list(cfg.learning_rates)} by best mean validation accuracy on a {cfg.validation_fraction:.0%} "
             "split of the training set (`training.tune_learning_rate`), because an equivalence test needs the "
             "same rate; (d) plain 32 gets its own rate from the same sweep at batch 32.", "",
             "| model | rate (a)-(c) | rate (d) |", "|---|---|---|"]
    lines += [f"| {m} | {c['128']['learning_rate']:g} | {c['32']['learning_rate']:g} |"
              for m, c in chosen.items()]
    lines += ["", "| model | variant | max abs param diff to (a): median (max) over seeds | relative L2 diff | "
              "test accuracy (%) | final train loss | loss flattened |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        d, a, loss, flat = (r["max_abs_param_diff_to_a"], r["test_accuracy"], r["final_train_loss"],
                            r["flattened"])
        flat_text = ("diverged" if not math.isfinite(flat["relative_change"]) else
                     f"{'yes' if flat['flattened'] else 'no'} ({100 * flat['relative_change']:+.0f}%)")
        lines.append(f"| {r['model']} | {r['variant']} | {np.median(d['values']):.1e} ({max(d['values']):.1e}) "
                     f"| {r['relative_l2_diff_to_a']['mean']:.1e} "
                     f"| {100 * a['mean']:.1f} ± {100 * a['std']:.1f} "
                     f"| {loss['mean']:.3f} ± {loss['std']:.3f} | {flat_text} |")
    # The measured spread of (b)/(c) around (a) without batch norm, beside (d)'s distance for scale.
    exact = [r["relative_l2_diff_to_a"]["mean"] for r in rows
             if "batch norm" not in r["model"] and r["variant"].startswith(("(b)", "(c)"))]
    plain = [r["relative_l2_diff_to_a"]["mean"] for r in rows
             if "batch norm" not in r["model"] and r["variant"].startswith("(d)")]
    lines += ["", "(b) vs (c), max abs param difference: "
              + "; ".join(f"{m}: {v['mean']:.1e}" for m, v in b_vs_c.items()) + ".", "",
              f"![loss curves]({figure})", "",
              "Reading: without batch norm (no norm, group norm) one update of (b) or (c) equals one update "
              "of (a) to float32 rounding (the unit tests check it step by step). Over "
              f"{cfg.updates} updates those rounding differences are amplified by training, most where one "
              "flips a ReLU at its kink (the gradient then changes discontinuously): here the relative L2 "
              f"distance of (b)/(c) to (a) is {min(exact):.1e} to {max(exact):.1e}, against "
              f"{min(plain):.1e} to {max(plain):.1e} for (d), a different schedule; compare the accuracies. "
              + _batch_norm_reading(rows, b_vs_c, exact),
              "",
              f"Step time and compiled memory, {timing_model}, on {device.platform} ({device.device_kind}); "
              f"time = median wall time of one optimizer update (4 calls for MultiSteps) over "
              f"{cfg.timing_repeats} repeats; memory = XLA's `memory_analysis()` of the compiled step "
              "(temporary buffers: activations and gradients; arguments: state and batch):", "",
              "| variant | update time (ms) | temp memory (KiB) | argument memory (KiB) |", "|---|---|---|---|"]
    kib = lambda b: "n/a" if b is None else f"{b / 1024:.0f}"
    for variant, t in timing.items():
        lines.append(f"| {variant} | {t['update_ms']:.2f} | {kib(t['temp_bytes'])} | "
                     f"{kib(t['argument_bytes'])} |")
    lines += ["", "On CPU the temporary memory is what the compiler plans, not a measured peak; GPU figures "
              "need a device (rerun there: the same command reports its numbers). Timing uses the MLP: on "
              "XLA:CPU a convolution's backward inside the micro-batch `lax.scan` is far slower than outside "
              "(jax-ml/jax#12868), which would measure the CPU compiler, not accumulation."]
    return "\n".join(lines)


EXPERIMENT = Experiment(NAME, "effective batch 128 as 1x128, MultiSteps 4x32, micro-batched 4x32 and plain 32: "
                        "exactness, BN vs GN, loss, accuracy, step time and memory", run,
                        check_configs, config=Config, check_config=check_config, plot=plot)

if __name__ == "__main__":
    raise SystemExit(main_for(EXPERIMENT))
