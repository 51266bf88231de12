"""The contract every experiment follows: ``Experiment``, ``RunContext`` and how configs are checked.

An experiment is a module in the top-level ``experiments/`` folder (installed as the subpackage
``jaxopt_lab.lab.experiments``) that defines
``EXPERIMENT = Experiment(name, description, run, check_configs, config=Config, check_config=..., plot=...)``:

* ``run(ctx)`` gets its config from ``ctx.resolve_config(Config, dataset)`` (``Config.for_mode(quick,
  dataset)`` with the ``--set`` overrides), computes with the library's jitted engines, wraps each
  configuration's work in ``ctx.cached`` (a checkpoint ``--resume`` can reuse), hands its numbers, its
  histories and its summary to ``ctx.set_metrics`` / ``ctx.save_histories`` / ``ctx.set_summary``, and
  draws its figures with ``ctx.plot(EXPERIMENT)``: ``plot(ctx, histories, recorded)`` from the saved
  histories and metrics alone, so ``jaxopt-lab plot NAME`` redraws them without training;
* ``check_configs()`` builds every config of every mode and dataset without training (usually through
  :func:`check_modes` and ``check_config(config, label, dataset)``) and raises ``ValueError`` naming the
  one that cannot run.

The runner (:mod:`jaxopt_lab.lab.runner`) writes ``metrics.json`` and ``summary.md`` and swaps the finished
folder into ``OUT/NAME`` atomically. Quick and full runs are told apart in one place: the runner puts
:func:`mode_line` on the line right after the summary's ``# name — title`` heading, and ``ctx.verdict(...)``
marks a verdict as not conclusive in quick mode.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxopt_lab.lab import data, results, training
from jaxopt_lab.lab.checkpoints import Checkpoints
from jaxopt_lab.lab.overrides import OverrideError, apply_overrides

__all__ = [
    "CANONICAL_ORDER",
    "HISTORIES_FILE",
    "QUICK_VERDICT_MARK",
    "Experiment",
    "RunContext",
    "check_modes",
    "check_training_config",
    "code_version",
    "configured",
    "environment",
    "mark_verdict",
    "mode_line",
    "package_version",
    "with_mode_line",
]

# The order of the report and of `jaxopt-lab list`: from the worked 2-2-2 network up to real-data training.
CANONICAL_ORDER = (
    "hand-backprop",
    "optimizer-grid",
    "learning-rate",
    "saddle-points",
    "batch-vs-minibatch",
    "normalization",
    "normalization-depth",
    "gradient-centralization",
    "gradient-accumulation",
    "baselines",
)



# Appended to every verdict of a quick run (see `mark_verdict`).
QUICK_VERDICT_MARK = " (quick: not conclusive)"


def mark_verdict(verdict: str, *, quick: bool) -> str:
    """``verdict`` as a summary shows it: marked as not conclusive in quick mode.

    >>> mark_verdict("supported", quick=True), mark_verdict("supported", quick=False)
    ('supported (quick: not conclusive)', 'supported')
    """
    return verdict + QUICK_VERDICT_MARK if quick else verdict


def mode_line(*, quick: bool, endpoint: str | None = None) -> str:
    """The line under a summary's heading that says whether the run is quick or full, and its endpoint.

    >>> mode_line(quick=False, endpoint="3000 steps, lr chosen per norm")
    '**Full mode.** Training endpoint: 3000 steps, lr chosen per norm.'
    >>> mode_line(quick=True).startswith("**Quick mode: a smoke-size run")
    True
    """
    end = f" Training endpoint: {endpoint.rstrip('.')}." if endpoint else ""
    if quick:
        return ("**Quick mode: a smoke-size run; its numbers show that the experiment runs, its verdicts are "
                "not conclusive** (run without `--quick` for the full experiment)." + end)
    return "**Full mode.**" + end


def with_mode_line(summary: str, *, quick: bool, endpoint: str | None = None) -> str:
    r"""``summary`` with :func:`mode_line` on the line right after its first line when that is a ``#``
    heading (where ``jaxopt-lab report`` finds a section), else on its first line.

    >>> print(with_mode_line("# demo — a title\n\nBody.", quick=False))
    # demo — a title
    **Full mode.**
    <BLANKLINE>
    Body.
    """
    line = mode_line(quick=quick, endpoint=endpoint)
    head, _, rest = summary.partition("\n")
    if head.startswith("# "):
        return f"{head}\n{line}\n" + (rest if rest.startswith("\n") or not rest else "\n" + rest)
    return f"{line}\n\n{summary}"


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment: a name for the CLI, a one-line description, ``run(ctx)`` and ``check_configs()``.

    ``check_configs`` is part of the contract: the suite calls it for every experiment, so a config that
    cannot run (a batch larger than the data, a group count that does not divide the channels) fails in
    seconds instead of an hour into a full run.
    """

    name: str
    description: str
    run: Callable[[RunContext], None]
    check_configs: Callable[[], None]
    # The experiment's frozen-dataclass Config (with ``for_mode``) and the check of one config,
    # ``check_config(config, label, data)``: what ``--set`` overrides and validates. None: nothing to set.
    config: Any = None
    check_config: Callable[[Any, str, str | None], None] | None = None
    # Draws every figure from the run's histories.npz and its metrics.json (``{"config", "metrics"}``, as
    # JSON gives them back), so `jaxopt-lab plot NAME` redraws them without training. None: run draws them.
    plot: Callable[[RunContext, Mapping[str, np.ndarray], Mapping[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        for field in ("run", "check_configs"):
            if not callable(getattr(self, field)):
                raise TypeError(f"Experiment {self.name!r}: {field} must be callable, got "
                                f"{getattr(self, field)!r}")
        if self.config is not None and not (dataclasses.is_dataclass(self.config)
                                            and callable(getattr(self.config, "for_mode", None))
                                            and callable(self.check_config)):
            raise TypeError(f"Experiment {self.name!r}: config must be a dataclass with for_mode, given with "
                            f"a check_config; got {self.config!r} and {self.check_config!r}")

    def resolve_config(self, quick: bool, data: str | None = None, overrides: Sequence[str] = ()) -> Any:
        """``config.for_mode(quick, data)`` with ``overrides`` (``KEY=VALUE``) applied, checked with
        ``check_config`` without training; ``OverrideError``/``ValueError`` if it cannot run."""
        if self.config is None or self.check_config is None:
            if overrides:
                raise OverrideError(f"--set: {self.name} has no config to set")
            return None
        config = configured(self.config, quick, data, overrides)
        if overrides:
            self.check_config(config, f"{self.name} with --set {' '.join(overrides)}", data)
        return config


HISTORIES_FILE = "histories.npz"


def configured(config_type: Any, quick: bool, data: str | None, overrides: Sequence[str]) -> Any:
    """``config_type.for_mode(quick, data)`` with the ``--set`` overrides (``KEY=VALUE``) applied."""
    return apply_overrides(config_type.for_mode(quick, data), overrides)

ConfigT = TypeVar("ConfigT")
ConfigT_co = TypeVar("ConfigT_co", covariant=True)


class ForMode(Protocol[ConfigT_co]):
    """``Config.for_mode``: the config of a quick or full run on a dataset (``None``: the default one)."""

    def __call__(self, quick: bool, data: str | None = None, /) -> ConfigT_co: ...


def check_modes(for_mode: ForMode[ConfigT], check: Callable[[ConfigT, str, str | None], None],
                datasets: Sequence[str] = ()) -> None:
    """Runs ``check(config, label, dataset)`` on the quick and the full config of every dataset.

    The one loop behind every experiment's ``check_configs()``. ``datasets`` empty (a generated problem):
    each mode once, with ``dataset`` None. ``label`` names the config in errors, e.g. ``"FULL (mnist1d)"``.

    >>> seen = []
    >>> check_modes(lambda quick, data=None: ("small" if quick else "big", data),
    ...             lambda cfg, label, data: seen.append((label, cfg)), ("digits",))
    >>> seen
    [('QUICK (digits)', ('small', 'digits')), ('FULL (digits)', ('big', 'digits'))]
    """
    for quick in (True, False):
        for name in tuple(datasets) or (None,):
            label = ("QUICK" if quick else "FULL") + ("" if name is None else f" ({name})")
            check(for_mode(quick, name), label, name)


@dataclasses.dataclass
class RunContext:
    """What an experiment receives: its mode, seed and output folder, plus the ways to write into it."""

    name: str
    quick: bool
    seed: int
    out_dir: Path
    show_progress: bool = True
    data_path: Path | None = None  # `--data PATH.npz`: read by the real-data experiments only
    # `--data-parallel`: None splits batches over devices when more than one is visible, True always,
    # False never (see `training.train_seeds`); read by the real-data experiments only.
    data_parallel: bool | None = None
    overrides: tuple[str, ...] = ()  # `--set KEY=VALUE`, applied by `resolve_config`
    checkpoints: Checkpoints | None = None  # one per finished configuration (`--resume`), set by the runner
    config: Any = None
    metrics: Any = None
    summary: str | None = None
    endpoint: str | None = None
    figures: list[str] = dataclasses.field(default_factory=list)
    histories: list[str] = dataclasses.field(default_factory=list)

    def resolve_config(self, config_type: Any, data: str | None = None) -> Any:
        """The run's config: ``config_type.for_mode(quick, data)`` with the ``--set`` overrides applied."""
        return configured(config_type, self.quick, data, self.overrides)

    def progress(self, iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 desc: str | None = None) -> Any:
        """A tqdm progress bar (on stderr) labelled with the experiment's name."""
        label = f"{self.name}: {desc}" if desc else self.name
        return tqdm(iterable, total=total, desc=label, disable=not self.show_progress,
                    leave=False, dynamic_ncols=True)

    def cached(self, label: str, key: Mapping[str, Any], compute: Callable[[], Any]) -> Any:
        """One configuration's result, checkpointed the moment it is computed (reused by ``--resume``).

        ``key`` holds what determines the result besides the run's mode, seed, data, overrides and code
        (those are added); the result is a tree of dicts, lists, arrays, numbers and strings
        (:class:`~jaxopt_lab.lab.checkpoints.Checkpoints`).
        """
        return compute() if self.checkpoints is None else self.checkpoints.cached(label, key, compute)

    def save_histories(self, arrays: Mapping[str, Any]) -> str:
        """Writes the run's per-step and per-evaluation histories as ``OUT/NAME/histories.npz`` (names like
        ``cnn/batch/b32/step_loss``; leading axis the seed where there are seeds) and returns its name."""
        results.atomic_write_npz(self.out_dir / HISTORIES_FILE, arrays)
        self.histories = sorted(arrays)
        return HISTORIES_FILE

    def plot(self, experiment: Experiment) -> None:
        """Draws ``experiment``'s figures from what this run just wrote (the path ``jaxopt-lab plot`` takes)."""
        if experiment.plot is None:
            raise ValueError(f"plot: experiment {experiment.name!r} draws its figures in run()")
        with np.load(self.out_dir / HISTORIES_FILE) as stored:
            histories = {name: stored[name] for name in stored.files}
        recorded = json.loads(json.dumps(results.to_jsonable({"config": self.config, "metrics": self.metrics})))
        experiment.plot(self, histories, recorded)

    def save_figure(self, fig: Any, filename: str) -> str:
        """Saves ``fig`` as ``OUT/NAME/filename`` (PNG) and returns the file name for summaries."""
        if not filename.endswith(".png"):
            raise ValueError(f"save_figure: filename must end in .png, got {filename!r}")
        results.save_figure(fig, self.out_dir / filename)
        self.figures.append(filename)
        return filename

    def set_metrics(self, config: Any, metrics: Any) -> None:
        """Records the experiment's config and every number it measured (written as metrics.json)."""
        self.config, self.metrics = config, metrics

    def set_summary(self, markdown: str) -> None:
        """Records the summary (markdown; figures linked by their bare file names).

        Start it with ``# NAME — title``; the runner adds the quick/full line (:func:`mode_line`) under it.
        """
        self.summary = markdown

    def set_endpoint(self, text: str) -> None:
        """Records the training endpoint in a few words (e.g. "1500 optimizer steps per configuration,
        rate chosen per norm on a validation split"): shown under the summary's heading, and saved in
        ``metrics.json``."""
        self.endpoint = text

    def verdict(self, verdict: str) -> str:
        """``verdict`` marked as not conclusive in quick mode (:func:`mark_verdict`)."""
        return mark_verdict(verdict, quick=self.quick)


def package_version(package: str) -> str | None:
    """The installed version of ``package``, or None when it is not installed.

    >>> package_version("jaxopt-lab") is not None, package_version("no-such-package-here")
    (True, None)
    """
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def code_version(folder: str | os.PathLike[str] | None = None) -> str:
    """The git commit of the code in ``folder`` (default: this package's source), ``+dirty`` when its
    tracked files have changes, or ``"unknown"`` outside a git checkout (an installed wheel).

    >>> code_version("/")  # not a git checkout
    'unknown'
    """
    where = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if changes else "") if commit else "unknown"


def environment() -> dict[str, Any]:
    """The software, hardware and code a result was measured on (written into every ``metrics.json``)."""
    devices = jax.devices()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        **{name: package_version(name) for name in ("jaxlib", "flax", "optax", "numpy", "chex")},
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "commit": code_version(),
    }



def check_training_config(model: Any, tx: Any, input_shape: Sequence[int], *, batch_sizes: Sequence[int],
                          train_size: int, num_microbatches: int = 1, where: str) -> None:
    """Raises ``ValueError`` (naming ``where``) unless ``model`` and ``tx`` can train on this data.

    The check behind every experiment's ``check_configs()``: it initializes ``model`` and runs one
    training step (:func:`make_train_step`) under ``jax.eval_shape`` (cached per model,
    input shape and micro-batching), then ``tx``'s ``init`` and ``update`` on the parameters' shapes, so
    shapes, group counts and optimizer states are checked without computing anything (milliseconds to a
    second), and checks every batch size against ``train_size`` examples and ``num_microbatches``.

    Args:
      model: a Flax classifier called as ``model(images, train=...)``.
      tx: an optax ``GradientTransformation``.
      input_shape: one example's shape, e.g. ``(8, 8, 1)`` or ``(40, 1)``.
      batch_sizes: every batch size the config trains this model at.
      train_size: the training examples available (after any validation split).
      num_microbatches: micro-batches per step; every batch size must be divisible by it.
      where: names the config entry in the error, e.g. ``"FULL: CNN(norm='group') on digits"``.

    >>> import optax
    >>> from jaxopt_lab.lab import models
    >>> check_training_config(models.MLP(), optax.adam(1e-3), (8, 8, 1), batch_sizes=[32], train_size=1000,
    ...                       where="demo")
    >>> check_training_config(models.MLP(), optax.adam(1e-3), (8, 8, 1), batch_sizes=[2048], train_size=1000,
    ...                       where="demo")
    Traceback (most recent call last):
    ValueError: demo: num_batches: batch_size=2048 exceeds the 1000 examples
    """
    try:
        for batch_size in batch_sizes:
            data.num_batches(train_size, batch_size)
            if batch_size % num_microbatches:
                raise ValueError(f"batch_size={batch_size} is not divisible by num_microbatches="
                                 f"{num_microbatches}")
        # The shapes are the same at every batch size: trace the model once (cached across configs that
        # share it), then the optimizer on the parameters' shapes.
        params = _abstract_params(model, tuple(input_shape), min(batch_sizes), num_microbatches)
        jax.eval_shape(lambda p: tx.update(p, tx.init(p), p), params)
    except Exception as error:  # any failure to build or step: the config cannot run
        raise ValueError(f"{where}: {error}") from error


_ABSTRACT_PARAMS: dict[tuple[Any, ...], Any] = {}


def _abstract_params(model: Any, input_shape: tuple[int, ...], batch_size: int, num_microbatches: int) -> Any:
    """The parameter shapes of ``model`` after one abstract training step (``jax.eval_shape``), cached."""
    key = (repr(model), input_shape, batch_size, num_microbatches)
    if key not in _ABSTRACT_PARAMS:
        def one_step(images: jax.Array, labels: jax.Array) -> Any:
            state = training.create_train_state(model, optax.sgd(0.1), jax.random.key(0), images[:1])
            step = training.make_train_step(num_microbatches=num_microbatches)
            return step(state, training.Batch(images, labels))[0].params

        _ABSTRACT_PARAMS[key] = jax.eval_shape(one_step, jax.ShapeDtypeStruct((batch_size, *input_shape),
                                                                              jnp.float32),
                                               jax.ShapeDtypeStruct((batch_size,), jnp.int32))
    return _ABSTRACT_PARAMS[key]
