"""The ``jaxopt-lab`` command: ``list``, ``run NAME... | all``, ``report``, ``bench``.

A thin layer over :mod:`jaxopt_lab.experiment`, :mod:`jaxopt_lab.report` and the benchmark suite
(``experiments/benchmarks.py``). Usage errors (an unknown experiment, a bad flag or value) print one
line naming the valid choices and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from jaxopt_lab.experiment import DATA_PARALLEL_MODES

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _npz_file(text: str) -> Path:
    path = Path(text)
    if path.suffix != ".npz" or not path.is_file():
        raise argparse.ArgumentTypeError(f"expected an existing .npz file, got {text!r}")
    return path


def _build_parser() -> _Parser:
    parser = _Parser(prog="jaxopt-lab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                     metavar="{list,run,report,bench}")
    commands.add_parser("list", help="list every experiment with a one-line description")
    run = commands.add_parser("run", help="run experiments (names or 'all') and write the report")
    run.add_argument("names", nargs="+", metavar="NAME", help="experiment names, or 'all'")
    run.add_argument("--quick", action="store_true", help="small configs (~1-2 min each on 2 CPU cores)")
    run.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results)")
    run.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    run.add_argument("--data", type=_npz_file, default=None, metavar="PATH.npz",
                     help="arrays x_train, y_train, x_test, y_test for the real-data experiments "
                          "(default: scikit-learn's bundled digits)")
    run.add_argument("--data-parallel", choices=tuple(DATA_PARALLEL_MODES), default="auto",
                     help="split each training batch over all visible devices: auto (when more than one "
                          "device is visible and the batch divides), on (always; a batch that does not "
                          "divide is an error), off (default: auto)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    report = commands.add_parser("report", help="gather every summary and figure into OUT/REPORT.md")
    report.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results)")
    bench = commands.add_parser("bench", help="time our paths against their anchors into OUT/bench/")
    bench.add_argument("--quick", action="store_true",
                       help="small shapes, few repetitions (<= ~1 min on 2 CPU cores)")
    bench.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results)")
    return parser


def _cmd_list() -> int:
    from jaxopt_lab.experiment import available_experiments

    experiments = available_experiments()
    width = max(map(len, experiments), default=0)
    for name, exp in experiments.items():
        print(f"{name:<{width}}  {exp.description}")
    return 0


def _cmd_run(parser: _Parser, args: argparse.Namespace) -> int:
    from jaxopt_lab.experiment import available_experiments, run_experiment
    from jaxopt_lab.report import write_report

    experiments = available_experiments()
    unknown = [n for n in args.names if n != "all" and n not in experiments]
    if unknown:
        parser.error(f"unknown experiment {unknown[0]!r}; choose from: all, {', '.join(experiments)}")
    names = list(experiments) if "all" in args.names else list(dict.fromkeys(args.names))
    for name in names:
        print(f"[jaxopt-lab] running {name}{' (quick)' if args.quick else ''} ...", flush=True)
        elapsed = run_experiment(experiments[name], args.out, quick=args.quick, seed=args.seed,
                                 show_progress=not args.no_progress, data_path=args.data,
                                 data_parallel=DATA_PARALLEL_MODES[args.data_parallel])
        print(f"[jaxopt-lab] {name}: done in {elapsed:.1f} s -> {args.out / name}/", flush=True)
    report = write_report(args.out)
    print(f"[jaxopt-lab] report: {report}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI on ``argv`` (default ``sys.argv[1:]``) and returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command == "list":
        return _cmd_list()
    if args.command == "run":
        return _cmd_run(parser, args)
    if args.command == "bench":
        from jaxopt_lab.experiments.benchmarks import run_benchmarks

        print(f"[jaxopt-lab] bench: {run_benchmarks(args.out, quick=args.quick)}/summary.md", flush=True)
        return 0
    from jaxopt_lab.report import write_report

    try:
        print(write_report(args.out))
    except FileNotFoundError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
