"""What the suite measures with (:class:`BenchConfig`) and what it reports (:class:`Row`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxopt_lab.lab.bench.timing import Comparison, Target

__all__ = ["BenchConfig", "Row", "compared_row"]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Sizes and repetition counts; :meth:`for_mode` gives the quick (CI) and full settings.

    ``nhwc_shapes`` are the (N, H, W, C) activations every norm runs on; ``tokens_shapes`` the (tokens,
    features) of a transformer's layer norm; ``bf16_shapes`` repeat the NHWC norms in bfloat16.
    """

    quick: bool
    repeats: int
    warmup: int
    min_sample_s: float
    nhwc_shapes: tuple[tuple[int, int, int, int], ...]
    tokens_shapes: tuple[tuple[int, int], ...]
    bf16_shapes: tuple[tuple[int, int, int, int], ...]
    sweep_steps: int
    effective_batch: int = 128
    num_microbatches: int = 4
    end_to_end: bool = False

    @classmethod
    def for_mode(cls, quick: bool) -> BenchConfig:
        if quick:
            return cls(quick=True, repeats=9, warmup=1, min_sample_s=0.005, nhwc_shapes=((8, 16, 16, 32),),
                       tokens_shapes=((64, 1024),), bf16_shapes=((8, 16, 16, 32),), sweep_steps=200)
        # (16, 56, 56, 64) is ResNet-50's first stage, (128, 56, 56, 64), with the batch cut 8x to fit.
        return cls(quick=False, repeats=31, warmup=2, min_sample_s=0.03,
                   nhwc_shapes=((8, 16, 16, 32), (32, 32, 32, 64), (16, 56, 56, 64)),
                   tokens_shapes=((64, 1024),), bf16_shapes=((32, 32, 32, 64),), sweep_steps=1000,
                   end_to_end=True)

    def loss_context_at(self, shape: tuple[int, ...], dtype: str) -> bool:
        """Whether the norms get loss-context rows on this case: every case in full mode; in quick mode
        only the first NHWC shape in float32 (each loss row adds four compiled programs)."""
        return not self.quick or (shape == self.nhwc_shapes[0] and dtype == "float32")

    def timing(self) -> dict[str, Any]:
        """The keyword arguments of :func:`jaxopt_lab.lab.bench.timing.time_interleaved`."""
        return {"repeats": self.repeats, "warmup": self.warmup, "min_sample_s": self.min_sample_s}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: our path against an anchor (or a plain measurement when anchor is None).

    ``ratio`` is the median of the per-repetition ratios time(ours) / time(anchor) and ``ratio_iqr``
    their (lower, upper) quartiles; the target is met when the upper quartile meets it (three
    repetitions in four), not the median alone. A row without per-repetition ratios (a ratio of
    bytes, say) judges its one ratio.
    """

    group: str
    ours: str
    anchor: str | None
    shape: str
    ours_s: float
    anchor_s: float | None = None
    ratio: float | None = None  # time(ours) / time(anchor), median of paired repetitions
    target: Target | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    ratio_iqr: tuple[float, float] | None = None
    cause: str | None = None  # why a missed target was missed (set for the norms, from the HLO)
    unit: str = "s"  # of ours_s and anchor_s: "s" (seconds) or "bytes" (a memory row)

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.target.met(self.ratio if self.ratio_iqr is None else self.ratio_iqr[1])

    def as_dict(self) -> dict[str, Any]:
        return {"group": self.group, "ours": self.ours, "anchor": self.anchor, "shape": self.shape,
                "ours_s": self.ours_s, "anchor_s": self.anchor_s, "ratio": self.ratio,
                "ratio_q1": None if self.ratio_iqr is None else self.ratio_iqr[0],
                "ratio_q3": None if self.ratio_iqr is None else self.ratio_iqr[1],
                "speedup": None if self.ratio is None else 1.0 / self.ratio,
                "target": None if self.target is None else self.target.describe(), "met": self.met,
                "cause": self.cause, "unit": self.unit, **self.extra}


def compared_row(group: str, ours: str, anchor: str, shape: str, comparison: Comparison,
                 target: Target | None = None, cause: str | None = None, **extra: Any) -> Row:
    """The row of a timed comparison: medians, the paired ratios and their quartiles, and ``extra``."""
    return Row(group, ours, anchor, shape, comparison.ours.median, comparison.anchor.median, comparison.ratio,
               target, {"ratios": comparison.ratios.tolist(), "ours_relative_iqr": comparison.ours.spread,
                        "anchor_relative_iqr": comparison.anchor.spread, **extra},
               ratio_iqr=comparison.ratio_quartiles, cause=cause)
