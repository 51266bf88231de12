"""Every experiment's quick and full configs can be built, checked in seconds without training.

``Experiment.check_configs`` is part of the contract: it builds every model, optimizer and data shape of
both modes on every dataset abstractly (``jax.eval_shape``) and raises ``ValueError`` on a config that
cannot run. A full config that would crash after 20 minutes of training fails here instead.
"""

import dataclasses
import importlib
import json

import optax
import pytest

from jaxopt_lab.lab import experiment, models, runner
from jaxopt_lab.lab.registry import available_experiments

EXPERIMENTS = available_experiments()


def _module(name):
    return importlib.import_module(EXPERIMENTS[name].run.__module__)


def test_every_experiment_is_checked():
    assert len(EXPERIMENTS) >= 8, list(EXPERIMENTS)  # the discovery found the experiments


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_quick_and_full_configs_can_run(name):
    EXPERIMENTS[name].check_configs()  # raises ValueError on a config that cannot run


def test_an_experiment_without_check_configs_is_refused():
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'check_configs'"):
        experiment.Experiment("toy", "a toy", _toy)
    with pytest.raises(TypeError, match="check_configs must be callable"):
        experiment.Experiment("toy", "a toy", _toy, None)


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if hasattr(_module(n), "Config")])
def test_every_config_comes_from_for_mode(name):
    config = _module(name).Config
    for quick in (True, False):
        assert isinstance(config.for_mode(quick), config) and isinstance(config.for_mode(quick, None), config)
    assert config.for_mode(True) != config.for_mode(False)  # quick is smaller than full


def test_check_modes_labels_every_mode_and_dataset():
    seen = []
    experiment.check_modes(lambda quick, data=None: (quick, data), lambda *args: seen.append(args),
                           ("digits", "mnist1d"))
    assert [label for _, label, _ in seen] == ["QUICK (digits)", "QUICK (mnist1d)", "FULL (digits)",
                                               "FULL (mnist1d)"]
    assert [cfg for cfg, _, _ in seen] == [(True, "digits"), (True, "mnist1d"), (False, "digits"),
                                           (False, "mnist1d")]


def test_a_group_count_that_does_not_divide_a_width_is_caught():
    # A full config once crashed this way: group counts up to 32 while the first CNN width was 16.
    model = models.CNN(norm="group", widths=(16, 32, 32), num_groups=32)
    with pytest.raises(ValueError, match=r"FULL: GN G=32.*divisible by num_groups=32"):
        experiment.check_training_config(model, optax.adam(1e-3), (8, 8, 1), batch_sizes=[32],
                                         train_size=1000, where="FULL: GN G=32")


def test_the_normalization_check_rejects_a_group_count_that_no_width_admits():
    normalization = _module("normalization")
    full = normalization.Config.for_mode(False)
    too_many = 2 * max(full.widths or models.CNN().widths)  # divides no width
    broken = dataclasses.replace(full, group_counts=(*full.group_counts, too_many))
    with pytest.raises(ValueError, match=rf"FULL: groups {too_many} on digits.*num_groups={too_many}"):
        normalization.check_config(broken, "FULL", "digits")


def test_the_normalization_step_budget_covers_min_epochs_at_every_batch_size():
    normalization = _module("normalization")
    # 1077: digits' training split after the validation hold-out
    cfg, train_size = normalization.Config.for_mode(False, "digits"), 1077
    for batch_size in (1, 2, 3, 4, 8, 16, 32, 64, 128, 1077):
        steps = normalization.steps_for(cfg, batch_size, train_size)
        assert steps % 20 == 0 and steps >= cfg.steps  # evaluation intervals of equal length, never cut short
        assert steps * batch_size >= cfg.min_epochs * train_size  # the small batches see min_epochs epochs
        assert (steps - 20) < max(cfg.steps, cfg.min_epochs * train_size / batch_size)  # and not more
    quick = normalization.Config.for_mode(True)
    assert {normalization.steps_for(quick, b, train_size) for b in quick.batch_sizes} == {quick.steps}
    with pytest.raises(ValueError, match="multiple of 20"):
        normalization.check_config(dataclasses.replace(cfg, steps=510), "FULL", "digits")


@pytest.mark.parametrize(("change", "message"), [
    ({"batch_size": 200}, "batch_size=200 must be at most examples=128"),
    ({"examples": 0}, "examples must be a positive int"),
    ({"noise_batches": 2.5}, "noise_batches must be a positive int"),
    ({"residual_std": -1.0}, "residual_std must be >= 0"),
])
def test_the_saddle_check_rejects_a_bad_data_set_or_batch(change, message):
    saddle_points = _module("saddle-points")
    with pytest.raises(ValueError, match=rf"FULL: {message}"):
        saddle_points.check_config(dataclasses.replace(saddle_points.Config.for_mode(False), **change), "FULL")


def test_the_normalization_configs_replicate_widen_and_decay_where_they_should():
    normalization = _module("normalization")
    quick, digits, mnist1d = (normalization.Config.for_mode(q, d) for q, d in
                              ((True, None), (False, "digits"), (False, "mnist1d")))
    assert (quick.seeds, digits.seeds, mnist1d.seeds) == (2, 5, 5) and min(quick.widen, digits.widen) >= 1
    # Quick: one rate in the grid, so the search, every added rate and the replicate seeds are programs of
    # the same number of lanes (one compilation per configuration).
    assert len(quick.learning_rates) == 1
    assert (digits.schedule, mnist1d.schedule) == ("constant", "cosine")
    assert normalization.seed_sets(digits, 10) == ([10, 11, 12, 13, 14], [15, 16, 17, 18, 19])
    for bad, message in (({"schedule": "linear"}, "schedule one of"), ({"widen": -1}, "widen must be >= 0"),
                         ({"smoothing_steps": 0}, "smoothing_steps in")):
        with pytest.raises(ValueError, match=message):
            normalization.check_config(dataclasses.replace(quick, **bad), "QUICK", "digits")


def _toy(ctx):
    from jaxopt_lab.lab.plotting import new_figure

    fig, _ = new_figure()
    ctx.save_figure(fig, "toy.png")
    ctx.set_endpoint("100 optimizer steps")
    ctx.set_metrics({}, {"verdict": ctx.verdict("supported")})
    ctx.set_summary("# toy — a title\n\nBody. ![toy](toy.png)\n")


@pytest.mark.parametrize("quick", [True, False])
def test_quick_and_full_summaries_are_marked_under_their_heading(tmp_path, quick):
    from jaxopt_lab.lab import report

    toy = experiment.Experiment("toy", "a toy", _toy, lambda: None)
    runner.run_experiment(toy, tmp_path, quick=quick, seed=0, show_progress=False)
    lines = (tmp_path / "toy" / "summary.md").read_text().split("\n")
    assert lines[0] == "# toy — a title"
    if quick:
        assert lines[1].startswith("**Quick mode: a smoke-size run") and "not conclusive" in lines[1]
    else:
        assert lines[1].startswith("**Full mode.**")
    assert lines[1].endswith("Training endpoint: 100 optimizer steps.") and lines[2] == ""
    meta = json.loads((tmp_path / "toy" / "metrics.json").read_text())
    assert meta["mode"] == ("quick" if quick else "full") and meta["endpoint"] == "100 optimizer steps"
    assert meta["metrics"]["verdict"] == ("supported (quick: not conclusive)" if quick else "supported")
    text = report.write_report(tmp_path).read_text()  # the report still finds the section by its heading
    assert f"## toy — a title\n{lines[1]}\n" in text and "![toy](toy/toy.png)" in text
