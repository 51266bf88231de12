"""Atomic, crash-safe writing of experiment results.

Every file is written to a temporary name in its destination folder and then renamed over the final
name (``os.replace`` is atomic on POSIX and Windows), so a reader never sees half a file. A whole
experiment writes into a staging folder that replaces ``DIR/NAME`` only once the experiment finished:
an interrupted ``run all`` keeps every experiment that completed and leaves no partial one behind.

The temporary files and folders come from :mod:`tempfile`, which creates them private (``0600``/``0700``);
each is given the permissions a plain ``open``/``mkdir`` would have given it (``0o666``/``0o777`` less the
process's umask) before it takes its final name, so results on a shared machine are as readable as any
other file their owner writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "replace_dir_atomically",
    "save_figure",
    "staging_dir",
    "to_jsonable",
]


def _umask() -> int:
    """The process's umask, read without changing it where the OS shows it (Linux), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no read-only query elsewhere; 022 is the safe value for the brief swap
    os.umask(mask)
    return mask


def _as_if_created(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Gives a ``tempfile`` file (0600) or folder (0700) the mode a plain open/mkdir would have given it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary file and a rename (mode ``0o666 & ~umask``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _as_if_created(tmp)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Writes UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Converts arrays, dataclasses, tuples and numpy scalars into plain JSON values.

    Non-finite floats become ``None`` (JSON has no NaN); experiments record divergence explicitly in
    their own fields, so a ``null`` loss always comes with a ``diverged`` flag beside it.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
        arr = np.asarray(obj)
        return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"to_jsonable: cannot store a value of type {type(obj).__name__}: {obj!r}")


def atomic_write_npz(path: str | os.PathLike[str], arrays: Mapping[str, Any]) -> Path:
    """Writes named arrays as one compressed ``.npz`` (``numpy.load`` reads it back), atomically.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> path = atomic_write_npz(Path(folder) / "h.npz", {"cnn/batch/step_loss": np.zeros((2, 3))})
    >>> np.load(path)["cnn/batch/step_loss"].shape
    (2, 3)
    """
    buffer = io.BytesIO()
    named: dict[str, Any] = {name: np.asarray(value) for name, value in arrays.items()}
    np.savez_compressed(buffer, **named)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Writes ``obj`` (after :func:`to_jsonable`) as indented, strict JSON, atomically."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False, sort_keys=False)
    return atomic_write_text(path, text + "\n")


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Saves a matplotlib figure atomically and closes it."""
    import matplotlib.pyplot as plt  # seconds to import: results are also written without figures

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        _as_if_created(tmp)
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path


def replace_dir_atomically(staged: Path, final: Path) -> None:
    """Moves the finished folder ``staged`` to ``final``, replacing any earlier results."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields an empty folder beside ``final``; on success it replaces ``final``, on error it is removed.

    The folder gets the mode of a plain ``mkdir`` (``0o777 & ~umask``), not ``mkdtemp``'s ``0700``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        _as_if_created(staged, directory=True)
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    replace_dir_atomically(staged, final)
