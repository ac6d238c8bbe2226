"""Subscriber library: receive dimscope frames as (header, numpy array), with gap detection."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from .wire import decode

log = logging.getLogger(__name__)

#: largest message part a subscriber accepts: a 8192² float32 frame is 256 MiB
DEFAULT_MAX_MESSAGE_BYTES = 512 * 2**20


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    header: dict[str, Any]
    pixels: np.ndarray
    #: frames of this topic missed since the previous one (from the `seq` numbers)
    gap: int


class Subscriber:
    """SUB socket on a dimscope publisher.

    >>> with Subscriber("tcp://127.0.0.1:5555", topics=["enhanced"]) as sub:
    ...     for msg in sub.frames(count=10, timeout_s=5):
    ...         print(msg.header["frame_id"], msg.pixels.mean())
    """

    def __init__(self, address: str = "tcp://127.0.0.1:5555",
                 topics: Sequence[str] = ("raw", "enhanced"), rcv_hwm: int = 64,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.address = address
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, rcv_hwm)
        # A peer that sends a larger message part is disconnected instead of buffered.
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.setsockopt(zmq.LINGER, 0)
        for topic in topics:
            # Exact topic match: subscribe to "raw" must not also match "raw2"... so we
            # also check the topic on receipt below.
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._topics = set(topics)
        self._sock.connect(address)
        self._last_seq: dict[str, int] = {}
        self.gaps: dict[str, int] = {}
        self.received: dict[str, int] = {}
        #: messages skipped because they were not valid dimscope frames
        self.malformed = 0

    def recv(self, timeout_s: float | None = None) -> Received | None:
        """The next frame, or None if none arrived within `timeout_s`."""
        timeout_ms = None if timeout_s is None else int(timeout_s * 1000)
        while True:
            if not self._sock.poll(timeout_ms):
                return None
            parts = self._sock.recv_multipart(copy=False)
            topic = bytes(parts[0].buffer).decode()
            if topic not in self._topics:
                continue
            try:
                header, pixels = decode(parts)
                seq = int(header["seq"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # A peer that does not speak dimscope's wire format: skip, count, say so.
                self.malformed += 1
                log.warning("skipped a malformed %r message from %s: %s", topic,
                            self.address, exc)
                continue
            last = self._last_seq.get(topic)
            gap = 0 if last is None else max(seq - last - 1, 0)
            self._last_seq[topic] = seq
            self.gaps[topic] = self.gaps.get(topic, 0) + gap
            self.received[topic] = self.received.get(topic, 0) + 1
            return Received(topic, header, pixels, gap)

    def frames(self, count: int | None = None, timeout_s: float | None = 10.0
               ) -> Iterator[Received]:
        """Yield frames until `count` arrived or none came for `timeout_s` seconds."""
        n = 0
        while count is None or n < count:
            msg = self.recv(timeout_s)
            if msg is None:
                return
            n += 1
            yield msg

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Recorder:
    """Receives on a background thread into `messages` (topic, header, pixel copy) until closed.

    For scripts and tests that run a pipeline in-process and look at what viewers got.
    """

    def __init__(self, address: str, topics: Sequence[str]) -> None:
        import threading

        self.messages: list[tuple[str, dict[str, Any], np.ndarray]] = []
        self._sub = Subscriber(address, topics=topics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dimscope-recorder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._sub.recv(timeout_s=0.1)
            if msg is not None:
                self.messages.append((msg.topic, msg.header, np.array(msg.pixels)))

    def close(self, linger_s: float = 0.3) -> list[tuple[str, dict[str, Any], np.ndarray]]:
        """Wait `linger_s` for messages in flight, stop, and return everything received."""
        import time

        time.sleep(linger_s)
        self._stop.set()
        self._thread.join()
        self._sub.close()
        return self.messages
