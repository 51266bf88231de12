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

The control, (a'): (a) again with its batch fed in a fixed shuffled order (:class:`PermutedBatch`), the
same function, parameters and data, so only the order of the sums over the batch differs: in the
gradient's sum over examples and in batch norm's statistics. Its distance to (a) after training is the
*chaos floor*: how far float rounding alone, amplified by training, moves the parameters. (b)'s and (c)'s
distances to (a) are judged against it by the 2-SE rule on log10 distances over seeds.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.ticker import FuncFormatter

from jaxopt_lab.lab import data, diagnostics, models, training
from jaxopt_lab.lab.bench import timing as bench_timing
from jaxopt_lab.lab.experiment import Experiment, RunContext, check_modes, check_training_config
from jaxopt_lab.lab.plotting import new_figure, plot_loss_curves
from jaxopt_lab.lab.runner import main_for
from jaxopt_lab.lab.verdicts import NOT_SUPPORTED, SUPPORTED, UNCLEAR, difference, judge, reading, verdict

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


# The control: (a) with its batch reordered. Its distance to (a) is the chaos floor of each model.
CONTROL = "(a') 1 x 128, batch reordered"
ABOVE, BELOW, AT = "above the floor", "below the floor", "at the floor"
# Distances are compared on a log scale; bitwise-equal parameters (distance 0) count as this.
SMALLEST_DISTANCE = 1e-12
# The stability claim compares accumulation with what one would do without it: plain batches of 32.
STABILITY_ARMS = ("(c) micro-batched 4 x 32", "(d) plain 32")


def judge_stability(by_model: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Claim GA4 (accumulation steadies training) on each model's test-loss reversals: (d) minus (c), paired
    by seed and pooled over the models where no run of either arm diverged, by the 2-SE rule. Supported
    when plain batches of 32 reverse more than accumulated batches of 128.

    >>> c, d = {"values": [0.1, 0.2, 0.1]}, {"values": [0.5, 0.6, 0.4]}
    >>> judge_stability({"MLP": {"(c) micro-batched 4 x 32": c, "(d) plain 32": d}})["verdict"]
    'supported'
    """
    compared = [m for m, arms in by_model.items()
                if all(np.isfinite(arms[a]["values"]).all() for a in STABILITY_ARMS)]
    if not compared:
        return {"models": [], "excluded": list(by_model), "difference": None, "standard_error": None,
                "verdict": UNCLEAR}
    c, d = STABILITY_ARMS
    judged = judge([(by_model[m][d], by_model[m][c]) for m in compared], paired=True, sets=1)
    return {"models": compared, "excluded": [m for m in by_model if m not in compared],
            "difference": judged.difference, "standard_error": judged.standard_error, "verdict": judged.verdict}

SUPPORTED_DATA = data.BUILTIN_DATASETS


class PermutedBatch(nn.Module):
    """``inner`` applied to its batch in a fixed shuffled order, the outputs put back in the input's order.

    The same function as ``inner``, with the same parameters and initialization (``nn.share_scope``: the
    variables live in ``inner``'s scope): every per-example output, and batch norm's statistics, are
    unchanged by reordering the batch. Only the order of the sums over the batch differs (in the
    gradient's sum over examples and in batch norm's statistics), so training both from the same start on
    the same batches isolates float rounding. A shuffled order, not a reversed one: pairwise (tree) sums
    of a reversed array add the same pairs, and float addition is commutative.

    >>> import jax
    >>> mlp = models.MLP(norm="batch")
    >>> x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
    >>> same = jax.tree.map(jnp.array_equal, mlp.init(jax.random.key(1), x),
    ...                     PermutedBatch(mlp).init(jax.random.key(1), x))
    >>> all(jax.tree.leaves(same))
    True
    """

    inner: nn.Module
    seed: int = 0

    def setup(self) -> None:
        nn.share_scope(self, self.inner)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        order = np.random.default_rng(self.seed).permutation(x.shape[0])  # static: shapes are static
        return self.inner(x[order], train=train)[np.argsort(order)]


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


def time_and_memory(model, cfg: Config, ds: data.Dataset, variant: str, learning_rate: float) -> dict[str, Any]:
    """Median wall time of one optimizer update (4 calls for MultiSteps) and XLA's compiled memory of one
    call (:func:`jaxopt_lab.lab.bench.timing.compiled_memory`)."""
    batch_size, k, multi = VARIANTS[variant]
    state = training.create_train_state(model, _optimizer(cfg, multi, learning_rate), jax.random.key(0),
                                        ds.x_train[:1])
    batch = training.Batch(jnp.asarray(ds.x_train[:batch_size]), jnp.asarray(ds.y_train[:batch_size]))
    step = jax.jit(training.make_train_step(num_microbatches=k))
    compiled = step.lower(state, batch).compile()
    try:
        memory: Mapping[str, int | None] = bench_timing.compiled_memory(compiled, (state, batch))
    except ValueError:  # a backend without memory analysis: the summary says n/a
        memory = dict.fromkeys(("temp_bytes", "argument_bytes", "output_bytes", "alias_bytes", "total_bytes"),
                               None)
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
    return {"update_ms": 1e3 * float(np.median(times)), **memory}


def run(ctx: RunContext) -> None:
    ds = data.load_dataset(None if ctx.data_path is None else str(ctx.data_path))
    cfg = ctx.resolve_config(Config, ds.name)
    seeds = [ctx.seed + i for i in range(cfg.seeds)]
    train_size = (len(ds.y_train) // EFFECTIVE_BATCH) * EFFECTIVE_BATCH
    rows: list[dict[str, Any]] = []
    chosen: dict[str, dict[str, Any]] = {}
    b_vs_c: dict[str, dict[str, Any]] = {}
    floors: dict[str, dict[str, Any]] = {}
    histories: dict[str, np.ndarray] = {}
    # Steps per model: the two rate sweeps (at 128 and at 32) and the four variants.
    steps_per_model = (1 + STEPS) * cfg.updates + cfg.updates + sum(  # sweeps, the control, the variants
        cfg.updates if batch_size == EFFECTIVE_BATCH else STEPS * cfg.updates
        for batch_size, _, _ in VARIANTS.values())
    for model_name in ctx.progress(cfg.models, desc="models"):
        with ctx.progress(total=steps_per_model, desc=f"{model_name}, steps") as bar:
            unit = ctx.cached(model_name, {"config": cfg, "data": ds.describe(), "model": model_name},
                              functools.partial(_train_model, cfg, ds, seeds, model_name, train_size,
                                                ctx.data_parallel, bar.update))
        rows += unit["rows"]
        chosen[model_name], b_vs_c[model_name] = unit["chosen"], unit["b_vs_c"]
        floors[model_name] = unit["floor"]
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
    floor_table = {model: judge_against_floor(rows, model, floor) for model, floor in floors.items()}
    reversals = {model: {variant: training.mean_std(diagnostics.loss_reversals(
        histories[f"{model}/{variant}/test_loss"])) for variant in VARIANTS} for model in cfg.models}
    stability = {"test_loss_reversals": reversals, **judge_stability(reversals)}
    stability["shown_verdict"] = ctx.verdict(stability["verdict"])
    ctx.set_metrics({**dataclasses.asdict(cfg), "seeds_used": seeds, "data": ds.describe(),
                     "train_size": train_size, "device": f"{device.platform} ({device.device_kind})"},
                    {"runs": rows, "chosen_learning_rates": chosen, "b_vs_c_max_abs_param_diff": b_vs_c,
                     "chaos_floor": floor_table, "stability": stability, "timing_model": timing_model,
                     "timing": timing})
    ctx.save_histories(histories)
    ctx.plot(EXPERIMENT)
    ctx.set_summary(_summary(cfg, ds, rows, chosen, floor_table, stability, timing, timing_model, device,
                             train_size))


def against_floor(distances: Mapping[str, Any], floor: Mapping[str, Any]) -> dict[str, Any]:
    """``distances`` (per-seed relative L2 distances) against the chaos floor's, by the 2-SE rule on log10.

    Log scale because distances grown by chaotic amplification spread over orders of magnitude across
    seeds; a bitwise-equal pair (distance 0) counts as :data:`SMALLEST_DISTANCE`.

    >>> floor = {"values": [1e-3, 2e-3, 1.5e-3]}
    >>> against_floor({"values": [1e-1, 2e-1, 1.5e-1]}, floor)["outcome"]
    'above the floor'
    >>> against_floor({"values": [1.2e-3, 0.9e-3, 2.1e-3]}, floor)["outcome"]
    'at the floor'
    """
    logs = lambda d: training.mean_std(np.log10(np.maximum(d["values"], SMALLEST_DISTANCE)))
    diff, se = difference(logs(distances), logs(floor))
    return {"values": list(distances["values"]), "geometric_mean": float(10 ** logs(distances)["mean"]),
            "log10_ratio_to_floor": diff, "log10_se": se, "outcome": verdict(diff, se, (ABOVE, BELOW, AT))}


def judge_against_floor(rows: list[dict], model: str, floor: Mapping[str, Any]) -> dict[str, Any]:
    """One model's chaos floor, and (b), (c), (d) and (b) against (c) judged against it."""
    to_a = {r["variant"][:3]: r["relative_l2_diff_to_a"] for r in rows if r["model"] == model}
    floor_values = floor["chaos_floor"]["values"]
    log_floor = np.log10(np.maximum(floor_values, SMALLEST_DISTANCE))
    return {"floor": {"values": floor_values, "geometric_mean": float(10 ** np.mean(log_floor))},
            "control_test_accuracy": floor["control_test_accuracy"],
            **{f"{v} to (a)": against_floor(to_a[v], floor["chaos_floor"]) for v in ("(b)", "(c)", "(d)")},
            "(b) to (c)": against_floor(floor["b_vs_c_relative_l2"], floor["chaos_floor"])}


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
    # The control: (a) again, its batch reordered; only the summation order differs from (a).
    control = training.train_seeds(
        PermutedBatch(model), _optimizer(cfg, False, sweeps["128"].learning_rate), ds, seeds, steps=cfg.updates,
        batch_size=EFFECTIVE_BATCH, train_size=train_size, unroll=unroll, data_parallel=data_parallel,
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
    b_params, c_params = (results[v].state.params
                          for v in ("(b) MultiSteps 4 x 32", "(c) micro-batched 4 x 32"))
    b_vs_c = training.mean_std(max_abs_difference(b_params, c_params))
    floor = {"chaos_floor": training.mean_std(relative_l2_difference(control.state.params, reference)),
             "b_vs_c_relative_l2": training.mean_std(relative_l2_difference(b_params, c_params)),
             "control_test_accuracy": training.mean_std(control.final_test_accuracy)}
    histories = {variant: {"step_loss": np.asarray(r.history.step_loss),
                           "eval_steps": np.asarray(r.history.steps)[0],
                           "test_accuracy": np.asarray(r.history.test_accuracy),
                           "test_loss": np.asarray(r.history.test_loss)}
                 for variant, r in results.items()}
    return {"rows": rows, "chosen": chosen, "b_vs_c": b_vs_c, "floor": floor, "histories": histories}


def plot(ctx: RunContext, histories: Mapping[str, np.ndarray], recorded: Mapping[str, Any]) -> None:
    """The loss curves of every model and variant (from ``histories.npz``) and the distances to (a) against
    the chaos floor (from ``metrics.json``)."""
    _figure(ctx, recorded["config"]["models"], histories)
    _distance_figure(ctx, recorded["metrics"]["chaos_floor"])


DISTANCE_FIGURE = "distance_to_a.png"


def _distance_figure(ctx: RunContext, floor_table: Mapping[str, Mapping[str, Any]]) -> str:
    """Per model, every seed's relative L2 distance: the floor (a') to (a), then (b), (c), (b) to (c), (d)."""
    series = {"(a') to (a): chaos floor": "floor", "(b) to (a)": "(b) to (a)", "(c) to (a)": "(c) to (a)",
              "(b) to (c)": "(b) to (c)", "(d) to (a)": "(d) to (a)"}
    models = list(floor_table)
    fig, axes = new_figure(1, 1, width=max(6.5, 1.8 * len(models)), height=4.6)
    ax = axes[0, 0]
    offsets = np.linspace(-0.3, 0.3, len(series))
    for i, (label, key) in enumerate(series.items()):
        for m, model in enumerate(models):
            values = np.maximum(floor_table[model][key]["values"], SMALLEST_DISTANCE)
            ax.plot(np.full(len(values), m + offsets[i]), values, "o" if i else "s", color=f"C{i}", alpha=0.8,
                    markersize=6 if i else 7, label=label if m == 0 else None)
    for m, model in enumerate(models):
        ax.hlines(floor_table[model]["floor"]["geometric_mean"], m - 0.4, m + 0.4, color="C0", linewidth=1,
                  linestyle=":", label="chaos floor, geometric mean over seeds" if m == 0 else None)
    ax.set_xticks(range(len(models)), models, fontsize="small")
    ax.set(yscale="log", ylabel="relative L2 distance (one point per seed)",
           title="Final parameters' distance against the chaos floor\n((a') = (a) with each batch summed in "
                 "another order)")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize="small")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    return ctx.save_figure(fig, DISTANCE_FIGURE)


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
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value / 1000:g}k" if value else "0"))
        if ax.get_legend() is not None:  # one legend for every panel, below them: none covers a curve
            ax.get_legend().remove()
    axes[0, 0].set_ylabel("training loss per update (mean of seeds)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=len(VARIANTS),
               fontsize="small")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return ctx.save_figure(fig, "loss_curves.png")


def _ratio(judged: Mapping[str, Any]) -> str:
    return f"{10 ** judged['log10_ratio_to_floor']:.2g}x"


def _ratio_span(judged: list[Mapping[str, Any]]) -> str:
    """``0.05x to 8.7x`` (geometric means over seeds, as ratios to the floor); one value alone if one."""
    ratios = sorted(10 ** j["log10_ratio_to_floor"] for j in judged)
    if not ratios:
        return "none"
    return f"{ratios[0]:.2g}x" + ("" if len(ratios) == 1 else f" to {ratios[-1]:.2g}x")


def _floor_reading(floor_table: Mapping[str, Mapping[str, Any]]) -> str:
    """What the distances to (a) mean, each sentence chosen by its outcome against the chaos floor."""
    groups = {"without": [m for m in floor_table if "batch norm" not in m],
              "with": [m for m in floor_table if "batch norm" in m]}
    text = []
    for group, names in groups.items():
        if not names:
            continue
        judged = {(m, v): floor_table[m][f"{v} to (a)"] for m in names for v in ("(b)", "(c)")}
        above = [f"{v} on {m} ({_ratio(j)} the floor)" for (m, v), j in judged.items() if j["outcome"] == ABOVE]
        at = [f"{v} on {m}" for (m, v), j in judged.items() if j["outcome"] != ABOVE]
        ratios = _ratio_span([j for j in judged.values() if j["outcome"] != ABOVE])
        floors = [floor_table[m]["floor"]["geometric_mean"] for m in names]
        span = f"{min(floors):.1e}" + ("" if len(floors) == 1 else f" to {max(floors):.1e}")
        stay = "" if not at else " " + ", ".join(at) + " stay at the floor."
        if group == "without":
            text.append(reading(str(not above), {
                "True": "Without batch norm (b) and (c) end within two standard errors of the chaos floor "
                        f"({span}; their distances are {ratios} it): by this rule no farther from (a) than "
                        "(a) itself ends when only the order of its batch's sums changes, so nothing here "
                        "separates their distance from float rounding amplified by training.",
                "False": "Without batch norm " + ", ".join(above) + " end farther from (a) than the chaos "
                         f"floor ({span}), beyond two standard errors: reordering (a)'s sums does not "
                         "reproduce the rounding of those paths (MultiSteps keeps a running mean of the "
                         "gradients, (c) adds four micro-batch means), although one update equals (a)'s to "
                         "float32 rounding (the unit tests)." + stay}))
        else:
            beyond = "" if not above else " and " + ", ".join(above) + " beyond it"
            text.append(reading(str(not at), {
                "True": "With batch norm (b) and (c) end beyond the chaos floor (" + ", ".join(above)
                        + "): each micro-batch is normalized with its own 32 examples' statistics and the "
                          "running averages are updated 4 times per update, so they train a different "
                          "function from (a).",
                "False": "With batch norm " + ", ".join(at) + " end within the chaos floor of (a)" + beyond
                         + ": there the micro-batch statistics moved them no farther than rounding does."}))
    b_vs_c = {m: floor_table[m]["(b) to (c)"] for m in floor_table}
    apart = [f"{m} ({_ratio(j)} the floor)" for m, j in b_vs_c.items() if j["outcome"] == ABOVE]
    text.append(reading(str(not apart), {
        "True": "(b) and (c) (the same micro-batches, the same statistics) end within two standard errors of "
                f"the chaos floor from each other for every model ({_ratio_span(list(b_vs_c.values()))} it).",
        "False": "(b) and (c) (the same micro-batches, the same statistics) end farther apart than the chaos "
                 "floor for " + ", ".join(apart) + ": the two paths differ by more than reordered sums do."}))
    plain = [floor_table[m]["(d) to (a)"] for m in floor_table]
    text.append(f"(d) takes 4x the updates on the same data, a different schedule: it ends "
                f"{min(10 ** j['log10_ratio_to_floor'] for j in plain):.2g}x to "
                f"{max(10 ** j['log10_ratio_to_floor'] for j in plain):.2g}x the floor from (a), for scale.")
    return " ".join(text)


def _memory_reading(timing: Mapping[str, Mapping[str, Any]]) -> str:
    """Why a step's temp memory alone misleads, said only where the measured figures show it."""
    b, d = timing["(b) MultiSteps 4 x 32"], timing["(d) plain 32"]
    if b["temp_bytes"] is None or d["temp_bytes"] is None:
        return "This backend reports no memory analysis."
    kib = lambda x: f"{x / 1024:.0f} KiB"
    return reading(str(b["temp_bytes"] < d["temp_bytes"]), {
        "True": f"(b)'s temp memory ({kib(b['temp_bytes'])}) is below (d)'s ({kib(d['temp_bytes'])}) though "
                "both run the same model on 32 examples: XLA's buffer assignment places a temporary inside an "
                "output buffer whose value is written only after the temporary is dead, and "
                "`temp_size_in_bytes` counts only what it could not place there. MultiSteps' step returns "
                "three parameter-sized arrays written at its very end (parameters, momentum, the gradient "
                "accumulator, each selected by a `jnp.where`), which hold the micro-batch's activations. Its "
                "footprint is in the total: "
                f"{kib(b['total_bytes'])} against (d)'s {kib(d['total_bytes'])}, the difference being the "
                "accumulator (and its counters) in the arguments and again in the outputs.",
        "False": f"(b)'s temp memory ({kib(b['temp_bytes'])}) is at least (d)'s ({kib(d['temp_bytes'])}); the "
                 f"totals are {kib(b['total_bytes'])} and {kib(d['total_bytes'])}, the difference being "
                 "MultiSteps' accumulator in the arguments and the outputs."})


def _stability_lines(cfg, stability: Mapping[str, Any]) -> list[str]:
    """Claim GA4's table, verdict and reading (chosen by the verdict)."""
    cell = lambda x: "diverged" if not np.isfinite(x["values"]).all() else f"{x['mean']:.3f} ± {x['std']:.3f}"
    lines = ["**Stability: does accumulation steady training?** Measured on the test loss at each evaluation "
             "point (the same examples seen in every variant): its *reversals*, the total variation of its "
             "log minus its net change, 0 for a curve that only falls (or only rises). Mean ± std over "
             f"{cfg.seeds} seeds; (c) at (a)'s rate, (d) at its own:", "",
             "| model | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    lines += [f"| {m} | " + " | ".join(cell(by[v]) for v in VARIANTS) + " |"
              for m, by in stability["test_loss_reversals"].items()]
    shown = stability["shown_verdict"]
    if stability["difference"] is None:
        return [*lines, "", f"Verdict: **{shown}**: a run of (c) or (d) diverged on every model."]
    excluded = stability["excluded"]
    lines += ["", f"Verdict ((d) minus (c), paired by seed, pooled over {len(stability['models'])} models"
              + (f"; left out, a run diverged: {', '.join(excluded)}" if excluded else "")
              + f"): {stability['difference']:+.3f} ± {stability['standard_error']:.3f}: **{shown}**. "
              + reading(stability["verdict"], {
                  SUPPORTED: "Plain batches of 32, at their own tuned rate, reverse their test loss more "
                             "than accumulated batches of 128 do.",
                  NOT_SUPPORTED: "Accumulated batches of 128 reverse their test loss more than plain batches "
                                 "of 32 at their own tuned rate.",
                  UNCLEAR: "The difference is within the seed-to-seed noise: at these tuned rates accumulation "
                           "does not measurably steady the test loss."})]
    return lines


def _summary(cfg, ds, rows, chosen, floor_table, stability, timing, timing_model, device, train_size) -> str:
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
    rule = f"Loss flattened: {training.endpoint_rule()}."
    for r in rows:
        d, a, loss, flat = (r["max_abs_param_diff_to_a"], r["test_accuracy"], r["final_train_loss"],
                            r["flattened"])
        flat_text = training.Flatness(**flat).describe()
        lines.append(f"| {r['model']} | {r['variant']} | {np.median(d['values']):.1e} ({max(d['values']):.1e}) "
                     f"| {r['relative_l2_diff_to_a']['mean']:.1e} "
                     f"| {training.pct(a)} "
                     f"| {loss['mean']:.3f} ± {loss['std']:.3f} | {flat_text} |")
    cell = lambda j: f"{j['geometric_mean']:.1e} ({_ratio(j)}, {j['outcome']})"
    lines += ["", rule, ""]
    lines += [f"**The chaos floor.** {CONTROL}: (a) trained again from the same start on the same batches, "
              "each batch fed to the model in a fixed shuffled order and the outputs put back "
              "(`PermutedBatch`): the same function, so only the order of the sums over the batch differs (the "
              "gradient's sum over examples, batch norm's statistics). Its relative L2 distance to (a) after "
              f"{cfg.updates} updates is how far float rounding alone, amplified by training, moves the "
              "parameters. Summation order isolates rounding at the precision the runs use, the kind of "
              "difference (b) and (c) have from (a) without batch norm; float64 against float32 would change "
              "every operation's rounding at once and measure float32's total error instead. Relative L2 "
              "distance, geometric mean over seeds; in parentheses the ratio to the floor and the 2-SE rule on "
              "log10 distances over seeds:", "",
              "| model | chaos floor: (a') to (a) | (b) to (a) | (c) to (a) | (b) to (c) | (d) to (a) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {f['floor']['geometric_mean']:.1e} | " + " | ".join(
        cell(f[key]) for key in ("(b) to (a)", "(c) to (a)", "(b) to (c)", "(d) to (a)")) + " |"
        for m, f in floor_table.items()]
    lines += ["", "Reading: " + _floor_reading(floor_table), "", *_stability_lines(cfg, stability), "",
              f"![loss curves]({FIGURE})", "",
              f"![distances to (a) against the chaos floor]({DISTANCE_FIGURE})", "",
              f"Step time and compiled memory, {timing_model}, on {device.platform} ({device.device_kind}); "
              f"time = median wall time of one optimizer update (4 calls for MultiSteps) over "
              f"{cfg.timing_repeats} repeats; memory = XLA's `memory_analysis()` of one compiled call of the "
              "step (arguments: state and batch; outputs: the new state and metrics; temp: scratch XLA could "
              "not place in either; total: their sum less any aliased bytes):", "",
              "| variant | update time (ms) | temp (KiB) | arguments (KiB) | outputs (KiB) | total (KiB) |",
              "|---|---|---|---|---|---|"]
    kib = lambda b: "n/a" if b is None else f"{b / 1024:.0f}"
    for variant, t in timing.items():
        lines.append(f"| {variant} | {t['update_ms']:.2f} | {kib(t['temp_bytes'])} | "
                     f"{kib(t['argument_bytes'])} | {kib(t['output_bytes'])} | {kib(t['total_bytes'])} |")
    lines += ["", _memory_reading(timing) + " On CPU these are what the compiler plans, not a measured peak; "
              "GPU figures need a device (rerun there: the same command reports its numbers). Timing uses the "
              "MLP: on XLA:CPU a convolution's backward inside the micro-batch `lax.scan` is far slower than "
              "outside (jax-ml/jax#12868), which would measure the CPU compiler, not accumulation."]
    return "\n".join(lines)


EXPERIMENT = Experiment(NAME, "effective batch 128 as 1x128, MultiSteps 4x32, micro-batched 4x32 and plain 32: "
                        "exactness, BN vs GN, loss, accuracy, step time and memory", run,
                        check_configs, config=Config, check_config=check_config, plot=plot)

if __name__ == "__main__":
    raise SystemExit(main_for(EXPERIMENT))
