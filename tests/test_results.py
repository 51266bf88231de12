"""Atomic results: strict JSON, temp file then rename, and staging folders that keep old results."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaxopt_lab.lab import results


def test_atomic_write_json_is_strict_and_converts_arrays(tmp_path):
    path = results.atomic_write_json(tmp_path / "a" / "m.json",
                                     {"x": np.arange(3), "nan": float("nan"), "f": np.float32(1.5),
                                      "t": (1, 2), "p": Path("p")})
    assert json.loads(path.read_text()) == {"x": [0, 1, 2], "nan": None, "f": 1.5, "t": [1, 2], "p": "p"}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temp file left behind


def test_to_jsonable_rejects_unknown_types():
    with pytest.raises(TypeError, match="object"):
        results.to_jsonable({"bad": object()})


def test_staging_dir_keeps_old_results_when_interrupted(tmp_path):
    final = tmp_path / "exp"
    with results.staging_dir(final) as staged:
        (staged / "metrics.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), results.staging_dir(final) as staged:
        (staged / "metrics.json").write_text("half-written")
        raise KeyboardInterrupt
    assert (final / "metrics.json").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["exp"]  # the failed staging folder was removed
    with results.staging_dir(final) as staged:
        (staged / "summary.md").write_text("new")
    assert sorted(os.listdir(final)) == ["summary.md"]  # re-running replaces cleanly
