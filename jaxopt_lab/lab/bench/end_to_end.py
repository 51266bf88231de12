"""The ``end-to-end`` group (full mode only): wall time of ``jaxopt-lab run all --quick`` in a subprocess.

The experiments are counted from what the run wrote (one folder with a ``summary.md`` each), so this
module imports no experiment and the CLI it starts is a separate process.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxopt_lab.lab.bench.rows import BenchConfig, Row

__all__ = ["end_to_end_rows"]

COMMAND = "jaxopt-lab run all --quick"


def end_to_end_rows(cfg: BenchConfig) -> list[Row]:
    """The ``end-to-end`` group: one row in full mode, none in quick mode."""
    if not cfg.end_to_end:
        return []
    with tempfile.TemporaryDirectory(prefix="jaxopt-lab-e2e-") as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "jaxopt_lab.lab.cli", "run", "all", "--quick",
                               "--out", out, "--no-progress"], capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        names = sorted(folder.name for folder in Path(out).iterdir() if (folder / "summary.md").is_file())
    # A failing experiment is reported in its row, not allowed to discard every other measurement.
    ours = COMMAND + ("" if proc.returncode == 0 else f" (FAILED, exit {proc.returncode})")
    return [Row("end-to-end", ours, None, f"{len(names)} experiments", elapsed,
                extra={"experiments": names, "returncode": proc.returncode,
                       "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""})]
