"""The names of the benchmark groups, in the order the suite runs them, and the check of a selection.

Standard library only: the CLI builds ``jaxopt-lab bench --group`` from :data:`GROUP_NAMES` without
importing JAX. :data:`jaxopt_lab.lab.bench.suite.GROUPS` pairs each name with the function producing its
rows (a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["GROUP_NAMES", "check_groups"]

GROUP_NAMES = ("norms", "accumulation", "gradient-centralization", "sweep", "end-to-end")


def check_groups(groups: Sequence[str] | None) -> tuple[str, ...]:
    """The selected group names (all of :data:`GROUP_NAMES` for None), or a ``TypeError``/``ValueError``.

    >>> check_groups(["sweep"])
    ('sweep',)
    >>> check_groups(None) == GROUP_NAMES
    True
    """
    if groups is None:
        return GROUP_NAMES
    if isinstance(groups, str) or not all(isinstance(g, str) for g in groups):
        raise TypeError(f"groups must be a sequence of group names, got {groups!r}")
    unknown = [g for g in groups if g not in GROUP_NAMES]
    if unknown or not groups:
        raise ValueError(f"groups must be one or more of {', '.join(GROUP_NAMES)}; got {list(groups)!r}")
    return tuple(groups)
