"""Suite-wide setup: what makes the suite fit its time on two cores without changing what any test runs.

* **One compilation cache for the session.** The end-to-end tests run the same experiment programs more
  than once (a run interrupted, resumed and run again clean; the CLI in a subprocess and in process), so
  every worker and every subprocess the tests start share JAX's persistent compilation cache in a
  temporary folder, removed at the end. Only what JAX caches by default is cached (programs that took
  over a second to compile); a cached executable is the one XLA compiled, so no result changes. A
  ``JAX_COMPILATION_CACHE_DIR`` set by the caller is used as it is and kept.
* **The longest tests first.** With ``pytest -n auto`` each worker takes the next test when it is free;
  starting the end-to-end runs (``slow_e2e``, tens of seconds each) first leaves the short ones to fill
  the end instead of one long run finishing alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWNED_CACHE = "_jaxopt_lab_owned_compilation_cache"


def pytest_configure(config: pytest.Config) -> None:
    # Runs in the controller before pytest-xdist starts its workers, which inherit the environment.
    if hasattr(config, "workerinput") or os.environ.get(_CACHE_ENV):
        return
    folder = tempfile.mkdtemp(prefix="jaxopt-lab-test-xla-cache-")
    os.environ[_CACHE_ENV] = folder
    setattr(config, _OWNED_CACHE, folder)


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = getattr(config, _OWNED_CACHE, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(_CACHE_ENV, None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("slow_e2e") is None)  # stable: order kept otherwise
