"""One checkpoint per finished configuration, so an interrupted experiment can resume where it stopped.

An experiment wraps each configuration's work in :meth:`Checkpoints.cached` with a label and a key. The
result (a tree of dicts, lists, arrays, numbers and strings: what the experiment needs later, not
trained states) is written atomically the moment it is computed, under ``OUT/.resume/NAME/``, named by a
hash of everything that determines it: the experiment, mode, seed, dataset, ``--set`` overrides, the
configuration's own key, and the hash of the code (every source file of the package and the experiments).
``jaxopt-lab run NAME --resume`` reuses the files whose hash matches and recomputes the rest; without
``--resume`` a run starts fresh. The files are written with flax's msgpack serialization (the format of
``flax.serialization``, already a dependency), and the folder is removed when the experiment finishes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from flax import serialization

from jaxopt_lab.lab import results

__all__ = ["RESUME_DIR", "Checkpoints", "source_hash"]

RESUME_DIR = ".resume"  # under the results folder; `jaxopt-lab report` skips folders starting with "."

T = TypeVar("T")


@functools.cache
def source_hash() -> str:
    """SHA-256 of every ``.py`` file of ``jaxopt_lab`` and of the experiments: the code version of a result,
    in or outside a git checkout, with or without uncommitted changes."""
    experiments = importlib.util.find_spec("jaxopt_lab.lab.experiments")
    assert experiments is not None and experiments.submodule_search_locations is not None
    digest = hashlib.sha256()
    roots = [Path(__file__).resolve().parents[1], *map(Path, experiments.submodule_search_locations)]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_")[:60] or "configuration"


class Checkpoints:
    """The checkpoints of one experiment run in ``folder``; ``resume`` reuses the matching ones.

    Args:
      folder: where the files go (``OUT/.resume/NAME``).
      resume: reuse a finished configuration whose key matches; False clears ``folder`` first.
      run_key: what determines every result of the run (experiment, mode, seed, data, overrides).

    >>> import tempfile
    >>> import numpy as np
    >>> folder = Path(tempfile.mkdtemp()) / "demo"
    >>> first = Checkpoints(folder, resume=False, run_key={"seed": 0})
    >>> first.cached("a", {"lr": 0.1}, lambda: {"loss": np.arange(3.0)})["loss"].tolist()
    [0.0, 1.0, 2.0]
    >>> again = Checkpoints(folder, resume=True, run_key={"seed": 0})
    >>> again.cached("a", {"lr": 0.1}, lambda: 1 / 0)["loss"].tolist(), again.reused, again.total
    ([0.0, 1.0, 2.0], 1, 1)
    >>> again.remove(); folder.exists()
    False
    >>> Checkpoints(folder, resume=False, run_key={}).remove()  # nothing was ever written: a no-op
    """

    def __init__(self, folder: str | Path, *, resume: bool, run_key: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.resume = resume
        self.run_key = {**results.to_jsonable(run_key), "code": source_hash()}
        self.reused = 0
        self.total = 0
        if not resume and self.folder.exists():
            shutil.rmtree(self.folder)

    def path(self, label: str, key: Mapping[str, Any]) -> Path:
        """The file of the configuration ``label`` with ``key`` (a hash of it and of the run's key)."""
        text = json.dumps({"run": self.run_key, "label": label, "key": results.to_jsonable(key)},
                          sort_keys=True, allow_nan=True)
        return self.folder / f"{_slug(label)}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.msgpack"

    def cached(self, label: str, key: Mapping[str, Any], compute: Callable[[], T]) -> T:
        """``compute()``, or its saved result when resuming and this configuration already finished.

        The result must be a tree of dicts (string keys), lists, numpy arrays, numbers, strings and None;
        tuples come back as lists.
        """
        self.total += 1
        path = self.path(label, key)
        if self.resume and path.is_file():
            self.reused += 1
            return serialization.msgpack_restore(path.read_bytes())
        stored = serialization.msgpack_serialize(compute())
        results.atomic_write_bytes(path, stored)
        # What a fresh run goes on with is what a resumed one reads back (lists for tuples, keys in the
        # stored order), so the two end with the same output, byte for byte.
        return serialization.msgpack_restore(stored)

    def remove(self) -> None:
        """Deletes the folder (the run finished: its results are written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        parent = self.folder.parent
        if parent.name == RESUME_DIR and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
