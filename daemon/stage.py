"""A pipeline stage: one worker thread fed by one bounded queue, with counters.

Modelled on EPICS areaDetector plugins: every stage owns a queue of known
capacity and an explicit policy for what happens when it is full, so that no
frame is ever lost without a counter saying so.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

from .frame import Frame
from .metrics import LatencyWindow, StageCounters

log = logging.getLogger(__name__)

#: after a drain times out, how long the frame in progress may take to finish
_FINISH_CURRENT_S = 30.0


class OverflowPolicy(enum.StrEnum):
    #: Never discard: a full queue is an error the producer must act on (raw archive).
    FAIL = "fail"
    #: Discard the oldest queued frame, keep the newest (viewers, engines).
    DROP_OLDEST = "drop_oldest"


class QueueFullError(RuntimeError):
    """A FAIL-policy stage could not accept a frame."""


class StageFailedError(RuntimeError):
    """A stage's worker thread stopped on an error."""


class Stage:
    """Base class: subclasses implement `process(frame)`; call `emit()` to pass frames on."""

    #: how long the pipeline lets it drain at stop; None: the pipeline's default
    drain_timeout_s: float | None = None
    #: the worker thread's niceness increment (Linux): > 0 for heavy analysis that must
    #: yield the cores to acquisition, archiving and localization when they compete
    nice: int = 0
    #: how often `waiting` runs while the queue stays empty
    wait_poll_s: float = 0.5

    def __init__(self, name: str, capacity: int, policy: OverflowPolicy) -> None:
        if capacity < 1:
            raise ValueError(f"stage {name!r}: queue capacity must be >= 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.policy = policy
        self.counters = StageCounters()
        self.latency = LatencyWindow()
        self.error: BaseException | None = None
        self._queue: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._abandoned = False
        #: ids of frames dropped by the policy, until the worker hands them on (bounded)
        self._skipped: deque[int] = deque(maxlen=4096)
        #: frame ids still queued when a drain ran out of time (never processed)
        self.abandoned_ids: list[int] = []
        self._thread: threading.Thread | None = None
        self._downstream: list[Callable[[Frame], None]] = []
        self._on_error: list[Callable[[Stage, BaseException], None]] = []

    # -- wiring ---------------------------------------------------------------
    def connect(self, sink: Callable[[Frame], None]) -> None:
        self._downstream.append(sink)

    def on_error(self, callback: Callable[[Stage, BaseException], None]) -> None:
        self._on_error.append(callback)

    # -- producer side (called from upstream threads) -------------------------
    def offer(self, frame: Frame, wait_s: float = 0.0) -> None:
        """Enqueue a frame by this stage's policy.

        DROP_OLDEST never blocks. FAIL waits up to `wait_s` for room (backpressure:
        the producer, not this queue, holds the frame meanwhile), then raises
        `QueueFullError`.
        """
        with self._cond:
            if self.error is not None:
                # Counted, so a frame refused by a dead stage is never a silent loss.
                self.counters.received += 1
                self.counters.dropped += 1
                raise StageFailedError(f"stage {self.name!r} has failed: {self.error}")
            if self.policy is OverflowPolicy.FAIL and len(self._queue) >= self.capacity:
                deadline = time.monotonic() + wait_s
                while (len(self._queue) >= self.capacity and self.error is None
                       and (left := deadline - time.monotonic()) > 0):
                    self._cond.wait(left)
                if self.error is not None:
                    raise StageFailedError(f"stage {self.name!r} has failed: {self.error}")
            self.counters.received += 1
            if len(self._queue) >= self.capacity:
                if self.policy is OverflowPolicy.FAIL:
                    self.counters.received -= 1  # not accepted
                    raise QueueFullError(
                        f"stage {self.name!r} queue is full ({self.capacity} frames) and "
                        f"stayed full for {wait_s:g} s: it cannot keep up with acquisition"
                    )
                self._skipped.append(self._queue.popleft().frame_id)
                self.counters.dropped += 1
            self._queue.append(frame)
            depth = len(self._queue)
            if depth > self.counters.max_depth:
                self.counters.max_depth = depth
            self._cond.notify()

    def count_dropped(self, n: int = 1) -> None:
        """Count frames the worker discards; `offer` counts drops too, so share its lock."""
        with self._cond:
            self.counters.dropped += n

    def take_skipped(self) -> list[int]:
        """Ids of frames the policy dropped since the last call (the most recent 4096)."""
        with self._cond:
            if not self._skipped:
                return []
            ids = list(self._skipped)
            self._skipped.clear()
            return ids

    @property
    def depth(self) -> int:
        return len(self._queue)

    def take_queued(self, limit: int) -> list[Frame]:
        """Worker side: up to `limit` more frames already queued, without waiting (a stage
        that works faster on several frames at once takes them with the one in hand)."""
        with self._cond:
            n = min(limit, len(self._queue))
            frames = [self._queue.popleft() for _ in range(n)]
            if n and self.policy is OverflowPolicy.FAIL:
                self._cond.notify_all()
            return frames

    def snapshot(self) -> dict[str, object]:
        with self._cond:  # a consistent set: no offer is half-counted
            snap: dict[str, object] = dict(self.counters.snapshot(self.depth, self.capacity))
        snap["latency_ms"] = self.latency.summary()
        if self.error is not None:
            snap["error"] = str(self.error)
        return snap

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        self.setup()
        self._thread = threading.Thread(target=self._run, name=f"dimscope-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain what is queued within `timeout` s, then stop the worker and release resources.

        Frames still queued when the time is up are not processed: their ids
        are kept in `abandoned_ids` (and counted as dropped) so the caller can
        name them. The frame being processed at that moment is finished first,
        so files are never closed under a write in progress.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._cond:
                    self._abandoned = True
                    self.abandoned_ids = [f.frame_id for f in self._queue]
                    self.counters.dropped += len(self._queue)
                    self._queue.clear()
                log.error("stage %s did not drain within %.0f s: %d queued frame(s) abandoned",
                          self.name, timeout, len(self.abandoned_ids))
                self._thread.join(_FINISH_CURRENT_S)
                if self._thread.is_alive():
                    log.error("stage %s is stuck in one frame; its resources are left open",
                              self.name)
                    return
        self.teardown()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- worker side ------------------------------------------------------------
    def _next(self) -> Frame | None:
        with self._cond:
            if self._queue and not self._abandoned:  # the busy case: one lock per frame
                return self._pop()
            caught_up = not self._closing and not self._abandoned
        if caught_up:
            self.idle()
        while True:
            with self._cond:
                if not self._queue or self._abandoned:
                    if self._closing or self._abandoned:
                        return None
                    self._cond.wait(self.wait_poll_s)
                if self._queue and not self._abandoned:
                    return self._pop()
                if self._closing or self._abandoned:
                    return None
            self.waiting()

    def _pop(self) -> Frame:
        frame = self._queue.popleft()
        if self.policy is OverflowPolicy.FAIL:
            self._cond.notify_all()  # a producer may be waiting for room
        return frame

    def _run(self) -> None:
        if self.nice:
            try:  # per thread on Linux: a thread is a task with its own nice value
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               os.getpriority(os.PRIO_PROCESS, 0) + self.nice)
            except (AttributeError, OSError) as exc:
                log.warning("stage %s: cannot lower its priority: %s", self.name, exc)
        while True:
            try:  # `_next` runs the idle/waiting hooks: their failure is the stage's too
                frame = self._next()
                if frame is None:
                    return
                t0 = time.monotonic_ns()
                self.process(frame)
            except BaseException as exc:
                self.counters.errors += 1
                self._fail(exc)
                return
            self.latency.add((time.monotonic_ns() - t0) / 1e6)

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            self.error = exc
            # Frames still queued are counted as dropped: nothing vanishes silently.
            self.counters.dropped += len(self._queue)
            self._queue.clear()
            self._cond.notify_all()  # a producer waiting for room must hear of it
        log.error("stage %s failed: %s", self.name, exc)
        for callback in self._on_error:
            callback(self, exc)

    def emit(self, frame: Frame) -> None:
        self.counters.passed += 1
        for sink in self._downstream:
            sink(frame)

    # -- subclass hooks -------------------------------------------------------------
    def setup(self) -> None:
        """Open resources; runs in the caller's thread before the worker starts."""

    def idle(self) -> None:
        """The queue ran empty (worker thread): finish buffered work, e.g. index lines."""

    def waiting(self) -> None:
        """The queue stayed empty for another `wait_poll_s` (worker thread): work that is
        due by the clock, not by a frame (e.g. frames held for a stack)."""

    def teardown(self) -> None:
        """Release resources after the worker has drained."""

    def process(self, frame: Frame) -> None:
        raise NotImplementedError
