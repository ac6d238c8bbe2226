"""The one frame type that flows through every stage of the pipeline.

A `Frame` is immutable: stages derive new frames with `replace()` / `marked()`
instead of mutating, because one raw frame is shared by the archive, the
engine stage and the raw publisher at the same time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import xxhash

from dimscope.engines.base import EngineInfo
from dimscope.engines.trust import TrustReport

#: what the pixels are: `passthrough` = the raw pixels on the enhanced stream because the
#: latency budget skipped the engine (never counted as enhanced); `trust` = a trust map;
#: `localizations` = a block of single-molecule localizations as Arrow IPC stream bytes
#: (uint8; `daemon/localize_stage.py`); `render` = a super-resolution render of them;
#: `mean` = the running mean of the raw frames; `dense` = a sparse-to-dense prediction,
#: `error_map` = its disagreement with the widefield image, `ready` = the ready event (JSON
#: as uint8; `daemon/dense_stage.py`)
FrameKind = Literal["raw", "enhanced", "interpolated", "passthrough", "trust",
                    "localizations", "render", "mean", "dense", "error_map", "ready"]
#: what the latency budget made of a frame: enhanced in time, enhanced late, or passed on raw
BudgetOutcome = Literal["met", "missed", "skipped"]


@dataclass(frozen=True, slots=True)
class Frame:
    """Pixels plus everything needed to say what they are.

    Timestamps: `acquired_unix_ns` is wall-clock (comparable across machines
    with synchronised clocks); `marks` are `time.monotonic_ns()` stamps taken
    in this process, used for per-stage latency.
    """

    frame_id: int
    pixels: np.ndarray
    acquired_unix_ns: int
    exposure_ms: float
    pixel_size_um: float
    source: str
    kind: FrameKind = "raw"
    metadata: Mapping[str, str] = field(default_factory=dict)
    engine: EngineInfo | None = None
    source_ids: tuple[int, ...] = ()
    # (stage name, monotonic ns) in the order the frame passed the stages.
    marks: tuple[tuple[str, int], ...] = ()
    # MDA indices such as {"t": 3, "c": 0, "z": 1} when acquired by a sequence.
    mda_index: Mapping[str, int] = field(default_factory=dict)
    #: interpolated frames: where between `source_ids[0]` (0) and `source_ids[1]` (1)
    t: float | None = None
    #: set by an engine stage with a latency budget
    budget: BudgetOutcome | None = None
    #: the engine tier that made (or skipped) this frame, when a budget has tiers
    tier: int | None = None
    #: xxh3-64 of the raw pixels, taken at acquisition while they are hot in cache (the
    #: archive index records it; `recover` and subscribers can verify it)
    checksum: str | None = None
    #: enhanced frames: how far they agree with their raw frame (`engines/trust.py`)
    trust: TrustReport | None = None
    #: enhanced frames: the raw pixels they were made from (shared, never published), so a
    #: later stage can check its own output against the measurement (interpolation trust)
    raw: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)

    @property
    def dtype(self) -> np.dtype[np.generic]:
        return self.pixels.dtype

    def marked(self, stage: str, at_ns: int | None = None) -> Frame:
        """A copy with a latency mark appended (pixels are shared, not copied)."""
        stamp = time.monotonic_ns() if at_ns is None else at_ns
        return dataclasses.replace(self, marks=(*self.marks, (stage, stamp)))

    def replace(self, **changes: object) -> Frame:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def latency_ms(self, until_ns: int | None = None) -> dict[str, float]:
        """Per-stage latency: time from each mark to the next, plus `total`.

        Key names are the later mark of each interval, e.g. the time between
        `acquired` and `engine_start` is reported as `engine_start`.
        """
        out: dict[str, float] = {}
        if not self.marks:
            return out
        for (_, t0), (name, t1) in zip(self.marks, self.marks[1:], strict=False):
            out[name] = (t1 - t0) / 1e6
        end = self.marks[-1][1] if until_ns is None else until_ns
        out["total"] = (end - self.marks[0][1]) / 1e6
        return out


def freeze(pixels: np.ndarray) -> np.ndarray:
    """Make pixels C-contiguous and read-only so no stage can alter raw data."""
    arr = np.ascontiguousarray(pixels)
    arr.flags.writeable = False
    return arr


def pixel_checksum(pixels: np.ndarray | bytes) -> str:
    """xxh3-64 of a frame's bytes as stored (hex): ~0.01 ms per 512² frame in cache."""
    data = pixels.data if isinstance(pixels, np.ndarray) else pixels
    return xxhash.xxh3_64_hexdigest(data)
