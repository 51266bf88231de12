"""The jaxopt-lab command: run the experiments, steer and re-plot them, report, benchmark.

Commands: ``list``, ``run NAME... | all``, ``config NAME``, ``plot NAME``, ``report``, ``bench``.

A thin layer over the runner (:mod:`jaxopt_lab.lab.runner`), the report (:mod:`jaxopt_lab.lab.report`) and
the benchmark suite (:mod:`jaxopt_lab.lab.bench`); how errors, warnings and Ctrl-C look is
:mod:`jaxopt_lab.lab.program`'s. A mistake in the user's input prints one line naming the flag, the problem
and what was expected, and exits with status 2: a bad flag or value, an unknown experiment, a ``--data``
file that is missing or malformed (checked before any experiment runs), an ``--out`` that is a file or a
folder one cannot write to. Ctrl-C prints one line saying which experiments finished (they are kept) and
which did not (nothing of them is written), and exits with status 130.

The parser needs only the standard library (:mod:`~jaxopt_lab.lab.flags`, ``bench.GROUP_NAMES``), so
``jaxopt-lab --help`` answers in a fraction of a second. The lab (JAX, the experiments) is imported inside
the commands below: that import takes seconds, and inside :func:`~jaxopt_lab.lab.program.run_program` a
Ctrl-C during it still ends in one line and status 130 instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from jaxopt_lab.lab import bench
from jaxopt_lab.lab.flags import add_run_arguments, add_set_argument
from jaxopt_lab.lab.program import DEBUG_ENV, Parser, UsageError, add_debug, run_program

__all__ = ["DEBUG_ENV", "UsageError", "main"]


def _build_parser() -> Parser:
    parser = Parser(prog="jaxopt-lab", description=__doc__.splitlines()[0])
    add_debug(parser, False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                     metavar="{list,run,config,plot,report,bench}")
    commands.add_parser("list", help="list every experiment with a one-line description")
    run = commands.add_parser("run", help="run experiments (names or 'all') and write the report")
    run.add_argument("names", nargs="+", metavar="NAME", help="experiment names, or 'all'")
    add_run_arguments(run)
    config = commands.add_parser("config", help="print an experiment's resolved config (JSON)")
    config.add_argument("name", metavar="NAME", help="an experiment name")
    config.add_argument("--quick", action="store_true", help="the quick config")
    config.add_argument("--data", default=None, metavar="NAME|PATH.npz", help="the dataset the config is for")
    add_set_argument(config)
    plot = commands.add_parser("plot", help="redraw an experiment's figures from its histories (no training)")
    plot.add_argument("name", metavar="NAME", help="an experiment name")
    plot.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results)")
    report = commands.add_parser("report", help="gather every summary and figure into OUT/REPORT.md")
    report.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results)")
    bench_parser = commands.add_parser("bench", help="time our paths against their anchors into OUT/bench/")
    bench_parser.add_argument("--quick", action="store_true",
                              help="small shapes, few repetitions (<= ~1 min on 2 CPU cores)")
    bench_parser.add_argument("--out", type=Path, default=Path("results"),
                              help="results folder (default: results)")
    bench_parser.add_argument("--group", action="append", choices=bench.GROUP_NAMES, metavar="GROUP",
                              help=f"measure only this group (repeatable): {', '.join(bench.GROUP_NAMES)}; "
                                   "default all")
    for sub in (commands.choices[name] for name in ("list", "run", "config", "plot", "report", "bench")):
        add_debug(sub, argparse.SUPPRESS)
    return parser


def _cmd_list() -> int:
    from jaxopt_lab.lab.registry import available_experiments

    experiments = available_experiments()
    width = max(map(len, experiments), default=0)
    for name, exp in experiments.items():
        print(f"{name:<{width}}  {exp.description}")
    return 0


def _cmd_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from jaxopt_lab.lab.registry import available_experiments
    from jaxopt_lab.lab.runner import run_experiments

    experiments = available_experiments()
    unknown = [n for n in args.names if n != "all" and n not in experiments]
    if unknown:
        parser.error(f"unknown experiment {unknown[0]!r}; choose from: all, {', '.join(experiments)}")
    names = list(experiments) if "all" in args.names else list(dict.fromkeys(args.names))
    return run_experiments([experiments[name] for name in names], args)


def _cmd_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from jaxopt_lab.lab.registry import available_experiments
    from jaxopt_lab.lab.results import to_jsonable
    from jaxopt_lab.lab.runner import check_overrides

    experiments = available_experiments()
    if args.name not in experiments:
        parser.error(f"unknown experiment {args.name!r}; choose from: {', '.join(experiments)}")
    config = check_overrides(experiments[args.name], args.quick, args.data, args.overrides)
    resolved = None if config is None else to_jsonable(dataclasses.asdict(config))
    print(json.dumps({"experiment": args.name, "mode": "quick" if args.quick else "full", "data": args.data,
                      "overrides": args.overrides, "config": resolved}, indent=2))
    return 0


def _cmd_plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from jaxopt_lab.lab.registry import available_experiments
    from jaxopt_lab.lab.runner import replot

    experiments = available_experiments()
    if args.name not in experiments:
        parser.error(f"unknown experiment {args.name!r}; choose from: {', '.join(experiments)}")
    for figure in replot(experiments[args.name], args.out):
        print(args.out / args.name / figure)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from jaxopt_lab.lab.report import write_report

    try:
        report = write_report(args.out)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise UsageError(f"--out {args.out}: {err}") from err
    print(report)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from jaxopt_lab.lab.bench import run_benchmarks
    from jaxopt_lab.lab.runner import writable_folder

    writable_folder(args.out)
    folder = run_benchmarks(args.out, quick=args.quick, groups=args.group)
    print(f"[jaxopt-lab] bench: {folder}/summary.md", flush=True)
    return 0


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "list":
        return _cmd_list()
    if args.command == "run":
        return _cmd_run(parser, args)
    if args.command == "config":
        return _cmd_config(parser, args)
    if args.command == "plot":
        return _cmd_plot(parser, args)
    if args.command == "report":
        return _cmd_report(args)
    return _cmd_bench(args)


def main(argv: Sequence[str] | None = None, *, exit_on_interrupt: bool | None = None) -> int:
    """Runs the CLI on ``argv`` (default ``sys.argv[1:]``) and returns the exit status.

    Returns 0 on success and 130 after Ctrl-C (one line on stderr). A usage error prints one line on
    stderr and raises ``SystemExit(2)``, as argparse does for a bad flag. ``exit_on_interrupt``: see
    :func:`~jaxopt_lab.lab.program.run_program` (default: when ``argv`` is None, i.e. run as the program).
    """
    return run_program(_build_parser, _dispatch, argv, exit_on_interrupt=exit_on_interrupt)


if __name__ == "__main__":  # `python -m jaxopt_lab.lab.cli`: run the imported module, not a second copy of it
    from jaxopt_lab.lab.cli import main as _main

    raise SystemExit(_main())
