"""Counters and latency windows shared by every stage."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np


class LatencyWindow:
    """Sliding window of latencies (ms) for p50/p99/max over recent frames."""

    def __init__(self, size: int = 2000) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self._values.append(ms)

    def summary(self) -> dict[str, float]:
        with self._lock:
            values = np.fromiter(self._values, dtype=np.float64, count=len(self._values))
        if values.size == 0:
            return {"n": 0}
        p50, p99 = np.percentile(values, [50, 99])
        return {"n": int(values.size), "p50": float(p50), "p99": float(p99),
                "max": float(values.max())}


@dataclass
class StageCounters:
    """Per-stage counters, written under the stage's queue lock where more than one thread
    writes them (`received` and `dropped`: the producer in `offer`, the worker for sends
    that fail), and read under it (`Stage.snapshot`), so a snapshot always adds up.

    received: frames offered to the stage; passed: frames it handed on (or
    stored, for a sink); dropped: frames it discarded by its stated policy;
    late: frames that missed a latency budget; errors: frames it failed on.
    """

    received: int = 0
    passed: int = 0
    dropped: int = 0
    late: int = 0
    errors: int = 0
    max_depth: int = 0

    def snapshot(self, depth: int, capacity: int) -> dict[str, int]:
        return {"received": self.received, "passed": self.passed, "dropped": self.dropped,
                "late": self.late, "errors": self.errors, "depth": depth,
                "max_depth": self.max_depth, "capacity": capacity}
