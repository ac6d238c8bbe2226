"""`trust.jsonl`: every frame the engine emitted, with its trust score, beside the raw index.

A finished experiment can then be audited frame by frame: which raw frame each
enhanced frame came from, what made it (engine, model version, whether its weights
were verified), the latency budget's decision, and how far it agreed with the
camera's measurement. One JSON object per line, appended and flushed as frames
come (a crash loses at most the last unflushed lines, never the raw archive):

    {"frame_id": 12, "kind": "enhanced", "source_ids": [12], "acquired_unix_ns": ...,
     "engine": "denoise", "version": "3+ab12…", "verified": true, "budget": "met",
     "tier": 0, "trust": {"mean_abs_z": 0.79, ..., "alert": false}}

Passthrough frames (skipped by the budget) are listed with `"trust": null`. Interpolated
frames have their own file, `trust_interpolated.jsonl` (source ids: both neighbours).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from .frame import Frame
from .sinks import SinkStage
from .stage import OverflowPolicy

#: the files' names in the run folder: the engine's frames, and interpolated frames
TRUST_LOG = "trust.jsonl"
TRUST_LOG_INTERPOLATED = "trust_interpolated.jsonl"


class TrustLogSink:
    def __init__(self, path: Path, flush_every_s: float = 0.5) -> None:
        self.path = path
        self.flush_every_s = flush_every_s
        self._file: IO[str] | None = None
        self._last_flush = 0.0
        self.skipped: list[int] = []

    def setup(self) -> None:
        self._file = self.path.open("a", encoding="utf-8")

    def append(self, frame: Frame) -> bool:
        assert self._file is not None
        e = frame.engine
        entry: dict[str, Any] = {
            "frame_id": frame.frame_id, "kind": frame.kind,
            "source_ids": list(frame.source_ids) or [frame.frame_id],
            "acquired_unix_ns": frame.acquired_unix_ns,
            "engine": e.name if e else None, "version": e.version if e else None,
            "verified": e.verified if e else None, "budget": frame.budget, "tier": frame.tier,
            "trust": frame.trust.score.as_dict() if frame.trust is not None else None}
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
        if time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()
        return True

    def skip(self, frame_ids: Sequence[int]) -> None:
        self.skipped.extend(frame_ids)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TrustLogStage(SinkStage):
    """Writes `trust.jsonl`; drop-oldest (counted) if the disk lags, never blocking."""

    def __init__(self, run_dir: Path, queue_frames: int = 256, name: str = "trust_log",
                 filename: str = TRUST_LOG) -> None:
        super().__init__(name, TrustLogSink(run_dir / filename), queue_frames,
                         OverflowPolicy.DROP_OLDEST)


def read_trust_log(run_dir: Path, filename: str = TRUST_LOG) -> list[dict[str, Any]]:
    """The entries of a run's `trust.jsonl` (or `trust_interpolated.jsonl`); a torn last
    line, from a crash, is left out."""
    path = Path(run_dir) / filename
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries
