"""``jaxopt-lab bench``: the suite end to end in --quick mode, its files, its groups and its usage errors.

The end-to-end run checks the files and the consistency of every row, never how fast anything was.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.lab import bench as benchmarks
from jaxopt_lab.lab import cli
from jaxopt_lab.lab.bench import groups, norms, suite
from jaxopt_lab.lab.bench import timing as bm
from jaxopt_lab.lab.bench.timing import Target
from jaxopt_lab.lab.registry import available_experiments
from jaxopt_lab.normalization import _pallas as pallas_norm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(["bench", "--quick", "--out", str(out)]) == 0
    return out / "bench"


def test_bench_writes_metrics_figure_and_summary(bench_out):
    assert sorted(p.name for p in bench_out.iterdir()) == ["metrics.json", "ratios.png", "summary.md"]
    meta = json.loads((bench_out / "metrics.json").read_text())
    assert meta["quick"] is True and meta["config"]["quick"] is True
    env = meta["environment"]
    assert env["jax"] and env["device_kind"] and env["backend"] and env["device_count"] >= 1
    groups_run = {row["group"] for row in meta["rows"]}
    # Every group ran; end-to-end runs only in full mode (0 rows in quick).
    assert meta["groups"] == list(benchmarks.GROUP_NAMES) and meta["not_selected"] == []
    assert groups_run | {"end-to-end"} == set(benchmarks.GROUP_NAMES)


def test_every_row_is_consistent(bench_out):
    meta = json.loads((bench_out / "metrics.json").read_text())
    summary = (bench_out / "summary.md").read_text()
    for row in meta["rows"]:
        assert row["ours"] and row["shape"] and row["ours_s"] > 0
        if row["anchor"] is not None:
            assert row["anchor_s"] > 0 and row["ratio"] > 0
            assert row["speedup"] == pytest.approx(1 / row["ratio"])
        if row["ratio_q1"] is not None:  # a timed comparison: its ratios, their quartiles, its median
            ratios = np.asarray(row["ratios"])
            assert row["ratio"] == pytest.approx(np.median(ratios))
            assert (row["ratio_q1"], row["ratio_q3"]) == pytest.approx(tuple(np.percentile(ratios, [25, 75])))
            assert row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"]
        if row["target"] is not None:
            kind = "max_ratio" if row["target"].startswith("ours/anchor") else "min_speedup"
            value = float(row["target"].split()[-1].rstrip("x"))
            # Met only when the pessimistic (upper) quartile of the ratios meets it.
            judged = row["ratio"] if row["ratio_q3"] is None else row["ratio_q3"]
            assert row["met"] == Target(kind, value).met(judged)
        else:
            assert row["met"] is None
        load = row["load_average"]
        assert set(load) == {"before", "after"}
        if row["group"] == "norms" and row["context"] == norms.VJP_CONTEXT:
            assert row["copy_gbps"] > 0 and set(row["gbps"]) == {"ours", "flax", "flax_two_pass"}
            assert set(row["max_abs_error_at_large_offset"]) == set(row["gbps"])
        if row["group"] == "norms":
            assert row["context"] in (norms.VJP_CONTEXT, norms.LOSS_CONTEXT)
            assert row["pass_floor"] == norms.PASS_FLOOR and row["pass_floor_reason"]
            # vjp: reads x, dy and writes y, dx, 2 full-size outputs; loss: reads x 3 times and writes dx.
            min_arrays = 2 if row["context"] == norms.VJP_CONTEXT else 1
            for side in ("ours", "flax"):
                traffic = row["memory_traffic"][side]
                assert traffic["passes"] >= norms.PASS_FLOOR - 1e-6
                assert traffic["full_size_buffers"] >= min_arrays
                assert row["passes_over_floor"][side] == pytest.approx(traffic["passes"] / norms.PASS_FLOOR)
            if row["anchor"].startswith("flax.linen default"):
                assert (row["cause"] is None) == bool(row["met"])  # every miss states its cause
                if row["cause"]:
                    assert row["cause"] in summary
        assert f"| {row['group']} | {row['ours']} | {row['anchor'] or '-'} | {row['shape']} |" in summary
    assert "`jaxopt-lab bench --quick`" in summary and "![ratios and bandwidth](ratios.png)" in summary
    assert "Not measured" not in summary


def test_bench_covers_the_documented_rows(bench_out):
    meta = json.loads((bench_out / "metrics.json").read_text())
    rows = meta["rows"]
    norms = {(r["ours"].split()[0], r["shape"]) for r in rows if r["group"] == "norms"}
    cfg = benchmarks.BenchConfig.for_mode(True)
    for shape in cfg.nhwc_shapes:
        label = "x".join(map(str, shape))
        assert {(n, label) for n in ("layer_norm", "instance_norm", "group_norm", "batch_norm")} <= norms
    assert any(shape.endswith("bfloat16") for _, shape in norms)
    assert ("layer_norm", "64x1024") in norms
    # Accumulation against its physical floor, and its temporary memory against the full batch's.
    floor = [r for r in rows if r["group"] == "accumulation" and (r["anchor"] or "").startswith("floor:")]
    assert floor and all(r["target"] == "ours/anchor <= 1.05" for r in floor)
    memory = [r for r in rows if r["unit"] == "bytes"]
    assert memory and all(r["temp_bytes"]["full"]["temp_bytes"] > 0 for r in memory)
    for r in memory:
        assert r["anchor_s"] == pytest.approx(r["bound_bytes"])
        assert r["ratio"] == pytest.approx(r["ours_s"] / r["bound_bytes"])
    start, end = meta["load_average"]["start"], meta["load_average"]["end"]
    assert (start is None) == (end is None) and (start is None or len(start) == 3)


def test_quick_norms_have_loss_context_rows_for_every_norm_with_and_without_params(bench_out):
    meta = json.loads((bench_out / "metrics.json").read_text())
    summary = (bench_out / "summary.md").read_text()
    loss = [r for r in meta["rows"] if r["group"] == "norms" and r["context"] == norms.LOSS_CONTEXT]
    every_norm = ("layer_norm", "instance_norm", "group_norm", "batch_norm")
    # Quick mode: one small shape, float32 only.
    assert sorted((r["ours"].split()[0], r["params"]) for r in loss) == sorted(
        (name, params) for name in every_norm for params in ("with params", "x only"))
    assert {r["shape"] for r in loss} == {"8x16x16x32"}
    for r in loss:
        assert r["ours"] == f"{r['ours'].split()[0]} {norms.LOSS_CONTEXT}, {r['params']}"
        assert r["anchor"] == "flax.linen default (fast variance)" and r["target"] == "ours/anchor <= 1"
        assert np.all(np.isfinite(r["ratios"])) and np.isfinite([r["ratio_q1"], r["ratio_q3"]]).all()
        assert all(np.isfinite(v) and v >= 1 for v in r["passes_over_floor"].values())
        assert set(r["gbps"]) == {"ours", "flax"} and all(v > 0 for v in r["gbps"].values())
        assert f"| {r['ours'].split()[0]} | {r['params']} | {r['shape']} | {r['ratio']:.3g} |" in summary
    vjp = [r for r in meta["rows"] if r["group"] == "norms" and r["context"] == norms.VJP_CONTEXT]
    assert vjp and all(r["ours"].endswith("fwd+bwd (vjp)") for r in vjp)


def _plain_norm(x, name, groups, scale, bias):
    """The textbook formula in jnp (two-pass variance, float32), autodiff's reference."""
    x = x.astype(jnp.float32)
    eps = 1e-5 if name == "batch_norm" else 1e-6
    spatial = tuple(range(1, x.ndim - 1))
    if name == "group_norm":
        grouped = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
        axes = (*spatial, grouped.ndim - 1)
        mean, var = grouped.mean(axes, keepdims=True), grouped.var(axes, keepdims=True)
        y = ((grouped - mean) / jnp.sqrt(var + eps)).reshape(x.shape)
    else:
        axes = {"layer_norm": (-1,), "instance_norm": spatial, "batch_norm": tuple(range(x.ndim - 1))}[name]
        y = (x - x.mean(axes, keepdims=True)) / jnp.sqrt(x.var(axes, keepdims=True) + eps)
    return y if scale is None else y * scale + bias


@pytest.mark.parametrize("name", ["layer_norm", "instance_norm", "group_norm", "batch_norm"])
def test_loss_context_is_the_same_computation_for_ours_and_flax(name):
    # Both sides of a loss row compute value_and_grad of sum(norm(x)^2): the autodiff of the plain formula.
    small = dataclasses.replace(benchmarks.BenchConfig.for_mode(True), nhwc_shapes=((2, 4, 4, 32),),
                                tokens_shapes=(), bf16_shapes=())
    (case,) = [c for c in norms.norm_cases(small) if c.name == name]
    kx, ks, kb = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, case.shape) * 2.0 + 5.0
    paths = norms.loss_context_paths(case, x)
    assert paths["ours_loss_x"][1] == {} == paths["flax_loss_x"][1]
    channels = case.shape[-1]
    params = {"scale": 1 + 0.3 * jax.random.normal(ks, (channels,)), "bias": jax.random.normal(kb, (channels,))}

    def plain_loss(p, x):
        return jnp.sum(_plain_norm(x, name, case.groups, p.get("scale"), p.get("bias")) ** 2)

    for suffix, p, argnums in (("_loss", params, (0, 1)), ("_loss_x", {}, 1)):
        expected_value, expected_grads = jax.value_and_grad(plain_loss, argnums=argnums)(p, x)
        for side in ("ours", "flax"):
            fn, _ = paths[side + suffix]
            (value, _aux), grads = fn(p, x)
            np.testing.assert_allclose(value, expected_value, rtol=1e-5, err_msg=f"{side}{suffix}")
            for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3, err_msg=f"{side}{suffix}")


def test_pallas_rows_only_where_the_kernels_compile(monkeypatch):
    cases = {(c.name, c.shape): c for c in norms.norm_cases(benchmarks.BenchConfig.for_mode(True))}
    layer, group = cases["layer_norm", (64, 1024)], cases["group_norm", (8, 16, 16, 32)]
    monkeypatch.setattr(pallas_norm, "available", lambda backend=None: False)
    assert norms.pallas_path(layer) is None and norms.pallas_path(group) is None
    monkeypatch.setattr(pallas_norm, "available", lambda backend=None: True)  # as on a GPU
    assert callable(norms.pallas_path(layer)) and callable(norms.pallas_path(group))
    assert norms.pallas_path(cases["batch_norm", (8, 16, 16, 32)]) is None  # no kernel for it
    odd = dataclasses.replace(group, shape=(8, 7, 7, 32))  # H*W = 49: not a Triton block size
    assert norms.pallas_path(odd) is None


def test_kernel_rows_of_every_context_where_the_kernels_run(monkeypatch):
    # As on a GPU, with the kernels interpreted: the group norm case gets the kernel against flax and against
    # the XLA path in the vjp and both loss contexts, and the decision table lists all three.
    monkeypatch.setattr(pallas_norm, "available", lambda backend=None: True)
    monkeypatch.setattr(pallas_norm, "DISPATCH_INTERPRETED", True)
    tiny = benchmarks.BenchConfig(quick=True, repeats=2, warmup=0, min_sample_s=0.0,
                                  nhwc_shapes=((2, 4, 4, 8),), tokens_shapes=(), bf16_shapes=(), sweep_steps=1)
    (case,) = [c for c in norms.norm_cases(tiny) if c.name == "group_norm"]
    rows = [r.as_dict() for r in norms._case_rows(tiny, case)]
    kernel = [r for r in rows if r["ours"].startswith(norms.KERNEL)]
    assert {(r["context"], r.get("params"), r["anchor"]) for r in kernel} == {
        (context, params, anchor) for context, params in ((norms.VJP_CONTEXT, None),
                                                          (norms.LOSS_CONTEXT, "with params"),
                                                          (norms.LOSS_CONTEXT, "x only"))
        for anchor in (norms.ANCHOR, norms.XLA_ANCHOR)}
    assert all(r["kernel"] == "group_norm" and r["ratio"] > 0 for r in kernel)
    assert kernel[0]["pallas_max_abs_error_at_large_offset"] < 1e-3  # the kernel's forward is accurate
    assert norms.pallas_decision(rows, "gpu").count("| group_norm | float32 | 2x4x4x8 |") == 3


def test_pallas_decision_names_the_norms_and_dtypes_whose_kernel_met_every_row():
    # Kernel rows as a GPU bench writes them (timings made up): layer norm's kernel beats the XLA path in both
    # contexts, group norm's loses its loss row, so only layer norm is justified.
    cases = {c.name: c for c in norms.norm_cases(benchmarks.BenchConfig.for_mode(True)) if c.dtype == "float32"}

    def timings(pallas, loss_pallas):
        return {key: bm.Timing(np.array(value, float), 1) for key, value in (
            ("pallas", pallas), ("xla", [2.0] * 4), ("flax", [3.0] * 4), ("pallas_loss", loss_pallas),
            ("xla_loss", [2.0] * 4), ("flax_loss", [3.0] * 4))}

    rows = []
    for name, loss_pallas in (("layer_norm", [1.5] * 4), ("group_norm", [2.2] * 4)):
        t = timings([1.0] * 4, loss_pallas)
        vjp = norms._kernel_rows(t, "", f"{name} fwd+bwd (vjp)", cases[name], context=norms.VJP_CONTEXT,
                                 dtype="float32")
        loss = norms._kernel_rows(t, "_loss", f"{name} {norms.LOSS_CONTEXT}, with params", cases[name],
                                  context=norms.LOSS_CONTEXT, dtype="float32", params="with params")
        rows += [r.as_dict() for r in vjp + loss]
    assert {r["anchor"] for r in rows} == {norms.ANCHOR, norms.XLA_ANCHOR}
    text = norms.pallas_decision(rows, "gpu")
    assert text.endswith("Justified VERIFIED keys (met in every row of that norm and dtype): "
                         "Verified('layer_norm', 'gpu', 'float32')\n")
    assert ("| group_norm | float32 | 8x16x16x32 | loss: value_and_grad of sum(y^2), with params "
            "| 1.10 (1.10-1.10) | 0.73 (0.73-0.73) | **missed** |") in text
    assert norms.pallas_decision([], "gpu").startswith("No kernel rows")


def test_every_group_name_has_its_rows_function_and_a_cli_choice():
    # groups.py (stdlib only, read by the CLI's parser) and the suite's table name the same groups.
    assert tuple(suite.GROUPS) == groups.GROUP_NAMES == benchmarks.GROUP_NAMES
    assert all(callable(make_rows) for make_rows in suite.GROUPS.values())
    bench_parser = cli._build_parser()._subparsers._group_actions[0].choices["bench"]
    (group_flag,) = [a for a in bench_parser._actions if "--group" in a.option_strings]
    assert tuple(group_flag.choices) == groups.GROUP_NAMES


def test_the_package_is_light_to_import_and_its_names_load_on_use():
    # The CLI's parser imports jaxopt_lab.lab.bench for GROUP_NAMES: that must not import JAX.
    code = ("import sys, jaxopt_lab.lab.bench as b; assert 'jax' not in sys.modules, 'jax'; "
            "b.run_benchmarks; assert 'jax' in sys.modules; print(sorted(b.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted(benchmarks.__all__))
    with pytest.raises(AttributeError, match="no attribute 'GROUPS'"):
        _ = benchmarks.GROUPS


def test_group_selects_what_is_measured(tmp_path):
    # end-to-end has no rows in quick mode: the cheapest group to select; every other one is "not selected".
    assert cli.main(["bench", "--quick", "--group", "end-to-end", "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "bench" / "metrics.json").read_text())
    assert meta["groups"] == ["end-to-end"] and meta["rows"] == []
    others = [g for g in benchmarks.GROUP_NAMES if g != "end-to-end"]
    assert meta["not_selected"] == others
    summary = (tmp_path / "bench" / "summary.md").read_text()
    assert f"Not measured (not selected with --group): {', '.join(others)}." in summary
    assert "*Measured by `jaxopt-lab bench --quick --group end-to-end` in " in summary
    with pytest.raises(ValueError, match="groups must be one or more of norms, accumulation"):
        benchmarks.run_benchmarks(tmp_path, quick=True, groups=["norm"])
    with pytest.raises(TypeError, match="sequence of group names"):
        benchmarks.run_benchmarks(tmp_path, quick=True, groups="norms")


def test_a_missed_norm_row_states_its_hlo_level_cause_from_the_numbers():
    side = lambda passes, arrays, kernels, reductions: {"passes": passes, "full_size_buffers": arrays,
                                                        "kernels": kernels, "reductions": reductions}
    # Equal traffic, one more reduction: compute, and what the extra reduction is.
    cause = norms.norm_cause("instance_norm", (1.03, 1.6), {"ours": side(14.2, 4, 14, 7),
                                                                   "flax": side(15.0, 4, 13, 6)})
    assert cause.startswith("+60% by upper quartile; HLO: ours 14.2 passes")
    assert "(its IQR spans 1)" not in cause
    assert "no more memory than flax" in cause and "1 more reduction, the accuracy shift" in cause
    # More traffic than flax: the norm's known mechanism; an IQR reaching below 1 is said.
    cause = norms.norm_cause("layer_norm", (0.97, 1.13), {"ours": side(21.7, 7, 13, 7),
                                                                 "flax": side(20.8, 6, 16, 6)})
    assert "(its IQR spans 1)" in cause and cause.endswith(norms.NORM_MECHANISMS["layer_norm"])


def test_bench_is_not_an_experiment():
    assert not hasattr(benchmarks, "EXPERIMENT")
    modules = {exp.run.__module__ for exp in available_experiments().values()}
    assert not any(module.startswith(benchmarks.__name__) for module in modules)


@pytest.mark.parametrize("argv", [["bench", "--repeats", "3"], ["bench", "extra"], ["bench", "--out"],
                                  ["bench", "--group", "norm"]])
def test_usage_errors_are_one_line_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("jaxopt-lab") and ": error: " in err

