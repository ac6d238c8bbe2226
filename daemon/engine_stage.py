"""Engine stage: runs an `Engine` on the newest raw frame, emits enhanced frames.

Its queue holds `queue_frames` (default 1) frames with the DROP_OLDEST
policy: when the engine is slower than the camera it always works on the
newest frame and counts every frame it skipped as `dropped`. The raw archive
is unaffected — it has its own queue.

Latency budget (optional, ms from acquisition to publication), enforced in
this order:
1. **faster tier** — when the engine's own median processing time over its
   last frames (at least `MIN_SAMPLES`) exceeds `TIER_HEADROOM` of the budget, the next
   configured tier (another engine or other options) replaces it; counted in
   `tier_changes`, reported as `tier`.
2. **skip** — a frame whose age plus the expected processing time already
   exceeds the budget is not enhanced: it is published on the enhanced topic
   as the raw frame, kind "raw", header `budget: "skipped"`; counted in `skipped`.
   Every `PROBE_EVERY`-th frame while skipping is enhanced anyway to re-measure,
   so enhancement resumes by itself when the machine has room again.
3. frames enhanced but published past the budget are counted in `late`
   (header `budget: "missed"`; those within it say `budget: "met"`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from dimscope.engines import CameraCalibration, Engine, EngineError

from .frame import BudgetOutcome, Frame, freeze
from .stage import OverflowPolicy, Stage

log = logging.getLogger(__name__)

#: consecutive failing frames after which the engine is taken out of service
MAX_CONSECUTIVE_ERRORS = 10
#: recent processing times kept per tier (their median is the expected time)
TIER_WINDOW = 8
#: frames measured on a tier before judging it (too slow -> next tier; else skip if late)
MIN_SAMPLES = 3
#: while skipping, every PROBE_EVERY-th frame is enhanced anyway to re-measure the engine,
#: so skipping stops when the machine has room again
PROBE_EVERY = 25
#: a tier whose median processing time exceeds this share of the budget is too slow
#: (the rest is queueing and publishing)
TIER_HEADROOM = 0.8


class EngineStage(Stage):
    def __init__(self, engine: Engine, calibration: CameraCalibration, queue_frames: int,
                 budget_ms: float | None = None,
                 tiers: Sequence[tuple[str, Callable[[], Engine]]] = (),
                 name: str = "engine") -> None:
        super().__init__(name, queue_frames, OverflowPolicy.DROP_OLDEST)
        self.engine = engine
        self.calibration = calibration
        self.budget_ms = budget_ms
        self._tiers = list(tiers)  # faster fallbacks, in order
        self.tier = 0
        self.tier_name = engine.info.name
        self.tier_changes = 0
        self.skipped = 0
        self._skips_in_a_row = 0
        self._recent: deque[float] = deque(maxlen=TIER_WINDOW)
        self._prepared_for: tuple[tuple[int, ...], str] | None = None
        self._consecutive_errors = 0

    def _ensure_prepared(self, frame: Frame) -> None:
        key = (frame.shape, frame.dtype.str)
        if key != self._prepared_for:
            self.engine.prepare(frame.shape, frame.dtype, self.calibration)
            self._prepared_for = key

    def _expected_ms(self) -> float:
        return float(np.median(self._recent)) if self._recent else 0.0

    def _maybe_next_tier(self) -> None:
        if (self.budget_ms is None or not self._tiers or len(self._recent) < MIN_SAMPLES
                or self._expected_ms() <= TIER_HEADROOM * self.budget_ms):
            return
        name, factory = self._tiers.pop(0)
        slow_ms = self._expected_ms()
        try:
            engine = factory()
        except EngineError as exc:
            log.error("budget: tier %d (%s) cannot load, staying on %s: %s", self.tier + 1,
                      name, self.tier_name, exc)
            return
        self.engine.close()
        self.engine, self._prepared_for = engine, None
        self.tier += 1
        self.tier_name = name
        self.tier_changes += 1
        self._recent.clear()
        log.warning("budget %.1f ms: engine median %.1f ms too slow, switched to tier %d (%s)",
                    self.budget_ms, slow_ms, self.tier, name)

    def process(self, frame: Frame) -> None:
        self._ensure_prepared(frame)
        started = frame.marked("engine_start")
        if self.budget_ms is not None:
            age_ms = (started.marks[-1][1] - frame.marks[0][1]) / 1e6
            # While a faster tier remains, measure this one first (tiers come before skips).
            judged = not self._tiers or len(self._recent) >= MIN_SAMPLES
            probe = self._skips_in_a_row >= PROBE_EVERY
            if judged and not probe and age_ms + self._expected_ms() > self.budget_ms:
                self.skipped += 1
                self._skips_in_a_row += 1
                self.emit(started.replace(budget="skipped", tier=self.tier))
                return
        t0 = time.monotonic_ns()
        try:
            out = self.engine.process(frame.pixels)
        except Exception as exc:  # one bad frame must not end enhancement for good
            self._consecutive_errors += 1
            log.warning("engine %s failed on frame %d: %s", self.engine.info.name,
                        frame.frame_id, exc)
            if self._consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                # Stage._run counts this last frame's error when it takes the stage down.
                raise EngineError(f"engine {self.engine.info.name!r} failed on "
                                  f"{MAX_CONSECUTIVE_ERRORS} consecutive frames; last: {exc}"
                                  ) from exc
            self.counters.errors += 1
            return
        done_ns = time.monotonic_ns()
        self._recent.append((done_ns - t0) / 1e6)
        self._skips_in_a_row = 0
        self._consecutive_errors = 0
        scale = self.engine.scale
        budget: BudgetOutcome | None = None
        if self.budget_ms is not None:
            missed = (done_ns - frame.marks[0][1]) / 1e6 > self.budget_ms
            self.counters.late += int(missed)
            budget = "missed" if missed else "met"
        enhanced = started.replace(
            pixels=freeze(out), kind="enhanced", engine=self.engine.info,
            source_ids=(frame.frame_id,), pixel_size_um=frame.pixel_size_um / scale,
            budget=budget, tier=self.tier if self.budget_ms is not None else None,
        ).marked("engine_done", done_ns)
        self.emit(enhanced)
        self._maybe_next_tier()

    def snapshot(self) -> dict[str, object]:
        snap = super().snapshot()
        snap.update({"budget_ms": self.budget_ms, "tier": self.tier, "tier_name": self.tier_name,
                     "tier_changes": self.tier_changes, "skipped": self.skipped})
        return snap

    def teardown(self) -> None:
        self.engine.close()
