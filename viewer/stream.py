"""What a live viewer receives, kept small: the newest frame per display slot, in time order.

`LiveStream` subscribes to a daemon on a worker thread and never queues a backlog: each
display slot holds one frame (conflation). The GUI calls `take()` at its display rate and
gets the newest frame of each slot that arrived since; every frame replaced before the
GUI took it is counted as dropped by the viewer. A slow GUI therefore shows the newest
frame late by at most one paint, and never seconds of backlog; the daemon is never slowed
(it is a subscriber like any other; ZeroMQ drops for this subscriber only).

Slots:
- `raw`: the newest raw frame;
- `enhanced`: enhanced *and* interpolated frames merged on their acquisition timestamps
  (`acquired_unix_ns`; synthesised frames carry their own time between their sources).
  An interpolated frame can only be made once its later source exists, so it arrives
  after that source; to show them in their place, the slot plays out with a delay
  measured from the stream (how old interpolated frames are on arrival, p90 over the last
  2 s, plus 5 ms), and 0 when no interpolated frames come;
- `trust`: the trust map of the enhanced frame on display (by `frame_id`), else the newest.

No Qt here: the napari widget (`widget.py`) paints what this hands it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dimscope.daemon.client import Subscriber

#: the topics a viewer subscribes to, by default
VIEW_TOPICS = ("raw", "enhanced", "interpolated", "trust")
SLOTS = ("raw", "enhanced", "trust")
#: trust maps kept to match the enhanced frame on display
_TRUST_KEEP = 32
#: enhanced + interpolated frames waiting for their playout time, at most
_TIMELINE_KEEP = 64


@dataclass(frozen=True, slots=True)
class ViewFrame:
    topic: str
    header: dict[str, Any]
    pixels: np.ndarray
    #: local wall-clock time it was received (ns)
    received_unix_ns: int

    @property
    def acquired_unix_ns(self) -> int:
        return int(self.header["acquired_unix_ns"])

    @property
    def kind(self) -> str:
        return str(self.header.get("kind", self.topic))


@dataclass
class SlotCounters:
    received: int = 0
    shown: int = 0
    #: replaced (or played past) before the display took them
    dropped: int = 0
    #: missed before they reached this viewer (gaps in the topic's `seq`)
    missed: int = 0


@dataclass
class History:
    """(local time s, value) over the last `seconds`, for the live plot."""

    seconds: float = 60.0
    points: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, t: float, value: float) -> None:
        self.points.append((t, value))
        while self.points and self.points[0][0] < t - self.seconds:
            self.points.popleft()

    def values(self) -> list[tuple[float, float]]:
        return list(self.points)


class LiveStream:
    def __init__(self, address: str, topics: Sequence[str] = VIEW_TOPICS,
                 rcv_hwm: int = 8, server_key: Path | None = None,
                 client_key: Path | None = None) -> None:
        """`server_key`/`client_key`: CURVE key files for a daemon that encrypts its
        streams (`publish.curve`)."""
        self.address = address
        self._keys = (server_key, client_key)
        self.topics = tuple(topics)
        self.counters = {slot: SlotCounters() for slot in SLOTS}
        #: publish -> receive latency (ms) of enhanced frames, and frames/s received
        self.latency = History()
        self.fps = History()
        self.error: str | None = None
        self._rcv_hwm = rcv_hwm
        self._lock = threading.Lock()
        self._newest: dict[str, ViewFrame] = {}  # raw, trust: one each
        self._timeline: list[ViewFrame] = []  # enhanced + interpolated, by acquisition time
        self._trust_by_id: dict[int, ViewFrame] = {}
        self._interp_ages: deque[tuple[float, float]] = deque()  # (local s, age ms)
        self._offsets: deque[int] = deque(maxlen=64)  # daemon wall clock - ours (ns)
        self._last_shown_enhanced: ViewFrame | None = None
        self._arrivals: deque[float] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dimscope-view-recv", daemon=True)

    # -- worker thread ---------------------------------------------------------------------
    def start(self) -> LiveStream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        try:
            sub = Subscriber(self.address, topics=self.topics, rcv_hwm=self._rcv_hwm,
                             server_key=self._keys[0], client_key=self._keys[1])
        except Exception as exc:  # a bad address: said in the widget, not raised into Qt
            self.error = f"cannot subscribe to {self.address}: {exc}"
            return
        try:
            while not self._stop.is_set():
                msg = sub.recv(timeout_s=0.05)
                if msg is not None:
                    # Copy out of ZeroMQ's buffer: the GUI may hold it after the next recv.
                    self._put(ViewFrame(msg.topic, msg.header, np.array(msg.pixels),
                                        time.time_ns()), msg.gap)
        finally:
            sub.close()

    def _put(self, frame: ViewFrame, gap: int) -> None:
        now = time.monotonic()
        slot = "enhanced" if frame.topic == "interpolated" else frame.topic
        if slot not in self.counters:
            return
        published = int(frame.header.get("published_unix_ns", frame.received_unix_ns))
        with self._lock:
            c = self.counters[slot]
            c.received += 1
            c.missed += gap
            self._offsets.append(published - frame.received_unix_ns)
            if slot == "enhanced":
                self._timeline.append(frame)
                self._timeline.sort(key=lambda f: f.acquired_unix_ns)
                # Bounded even when the GUI takes nothing for a while: the oldest go, counted.
                excess = len(self._timeline) - _TIMELINE_KEEP
                if excess > 0:
                    c.dropped += excess
                    del self._timeline[:excess]
                if frame.topic == "interpolated":
                    age_ms = (frame.received_unix_ns + self._offset_ns()
                              - frame.acquired_unix_ns) / 1e6
                    self._interp_ages.append((now, age_ms))
                    while self._interp_ages and self._interp_ages[0][0] < now - 2.0:
                        self._interp_ages.popleft()
                if frame.topic == "enhanced":
                    self.latency.add(now, (frame.received_unix_ns - published) / 1e6
                                     + float(frame.header["latency_ms"].get("total", 0.0)))
                    self._arrivals.append(now)
                    while self._arrivals and self._arrivals[0] < now - 1.0:
                        self._arrivals.popleft()
                    self.fps.add(now, float(len(self._arrivals)))
            elif slot == "trust":
                self._trust_by_id[int(frame.header["frame_id"])] = frame
                for old in sorted(self._trust_by_id)[:-_TRUST_KEEP]:
                    del self._trust_by_id[old]
                if "trust" in self._newest:
                    self.counters["trust"].dropped += 1
                self._newest["trust"] = frame
            else:
                if slot in self._newest:
                    c.dropped += 1
                self._newest[slot] = frame

    def _offset_ns(self) -> int:
        return int(np.median(self._offsets)) if self._offsets else 0

    # -- GUI side --------------------------------------------------------------------------
    def playout_delay_ms(self) -> float:
        """How far behind the newest acquisition the enhanced slot plays (0 without
        interpolated frames in the last 2 s)."""
        now = time.monotonic()
        with self._lock:
            while self._interp_ages and self._interp_ages[0][0] < now - 2.0:
                self._interp_ages.popleft()
            ages = [a for _, a in self._interp_ages]
        return float(np.percentile(ages, 90)) + 5.0 if ages else 0.0

    def take(self) -> dict[str, ViewFrame]:
        """The newest frame of each slot that arrived since the last call."""
        delay_ns = int(self.playout_delay_ms() * 1e6)
        out: dict[str, ViewFrame] = {}
        with self._lock:
            if "raw" in self._newest:
                out["raw"] = self._newest.pop("raw")
            if self._timeline:
                due_by = time.time_ns() + self._offset_ns() - delay_ns
                due = [f for f in self._timeline if f.acquired_unix_ns <= due_by] \
                    if delay_ns else list(self._timeline)
                self._timeline = self._timeline[len(due):]
                # Never back in time: a frame older than the one on display (an interpolated
                # frame that came after its later neighbour was shown) is dropped, counted.
                last = self._last_shown_enhanced
                if last is not None:
                    late = [f for f in due if f.acquired_unix_ns <= last.acquired_unix_ns]
                    self.counters["enhanced"].dropped += len(late)
                    due = due[len(late):]
                if due:
                    shown = due[-1]
                    self.counters["enhanced"].dropped += len(due) - 1
                    out["enhanced"] = shown
                    self._last_shown_enhanced = shown
            trust = self._newest.pop("trust", None)
            showing = self._last_shown_enhanced
            if showing is not None and showing.topic == "enhanced":
                matched = self._trust_by_id.get(int(showing.header["frame_id"]))
                if matched is not None and "enhanced" in out:
                    trust = matched
            if trust is not None:
                out["trust"] = trust
            for slot in out:
                self.counters[slot].shown += 1
        return out

    def dropped(self) -> int:
        """Frames this viewer received but never showed, all slots."""
        with self._lock:
            return sum(c.dropped for c in self.counters.values())
