"""Outputs behind one small protocol (as ome-writers' SinkProtocol): setup, append, skip,
flush, close.

A sink only stores or sends frames. The `SinkStage` around it owns the queue, the
overflow policy, the counters and the thread, so a new output — a trust-map writer, a
relay, a second archive — is one class implementing `Sink`. The raw archive
(`archive.OmeTiffSink`) and each topic publisher (`publisher.TopicSink`) are sinks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .frame import Frame
from .stage import OverflowPolicy, Stage

log = logging.getLogger(__name__)


@runtime_checkable
class Sink(Protocol):
    def setup(self) -> None:
        """Open files or sockets; called before the first frame."""

    def append(self, frame: Frame) -> bool:
        """Store or send one frame: True when it was, False when the sink refused it
        (counted as dropped). Raise to take the sink out of service."""

    def skip(self, frame_ids: Sequence[int]) -> None:
        """Frames the stage dropped by its policy before they reached this sink."""

    def flush(self) -> None:
        """The stage caught up: write anything buffered."""

    def close(self) -> None:
        """Write what is left and release everything."""


class SinkStage(Stage):
    """A stage whose work is to hand each frame to a `Sink`."""

    def __init__(self, name: str, sink: Sink, capacity: int, policy: OverflowPolicy) -> None:
        super().__init__(name, capacity, policy)
        self.sink = sink

    def setup(self) -> None:
        self.sink.setup()

    def _tell_skipped(self) -> None:
        skipped = self.take_skipped()
        if skipped:
            self.sink.skip(skipped)

    def process(self, frame: Frame) -> None:
        self._tell_skipped()
        if self.sink.append(frame):
            self.counters.passed += 1
        else:
            self.count_dropped()

    def idle(self) -> None:
        try:
            self._tell_skipped()
            self.sink.flush()
        except Exception as exc:  # a sink that cannot flush is out of service, loudly
            self._fail(exc)

    def teardown(self) -> None:
        try:
            self._tell_skipped()
            self.sink.close()
        except Exception as exc:
            log.error("%s: closing failed: %s", self.name, exc)
            if self.error is None:
                self.error = exc
