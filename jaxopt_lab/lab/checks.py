"""Argument checks shared by the lab's engines: one message shape, ``OWNER: NAME must be ...``."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["positive_int"]


def positive_int(value: Any, owner: str, name: str) -> int:
    """``value`` as an ``int`` if it is a positive integer (``bool`` is not), else a ``ValueError``.

    >>> positive_int(3, "fit", "steps")
    3
    >>> positive_int(0, "fit", "steps")
    Traceback (most recent call last):
    ...
    ValueError: fit: steps must be a positive int, got 0
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)
