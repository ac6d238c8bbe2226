"""ZeroMQ PUB publishing: one socket, one stage per topic.

A PUB socket never blocks its sender: past the per-subscriber high-water mark
ZeroMQ drops messages for that subscriber only. So a slow or dead viewer can
never slow acquisition or archiving; subscribers see the loss as a gap in the
per-topic `seq` numbers.

A PUB socket also receives: subscription messages from every peer. Those are
capped (`MAX_SUBSCRIPTION_BYTES`) so an unauthenticated peer cannot grow the
daemon's memory with huge ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Literal

import zmq

from .config import PublishConfig, SecurityConfig
from .frame import Frame
from .metrics import LatencyWindow
from .security import CurveKeys, check_exposure, curve_server_on
from .sinks import SinkStage
from .stage import OverflowPolicy
from .wire import encode_header, trust_frame

log = logging.getLogger(__name__)

#: subscriptions are topic names; anything longer is not a dimscope subscriber
MAX_SUBSCRIPTION_BYTES = 1024


class PublishSocket:
    """The one PUB socket, shared by the topic stages (sends are serialised by a lock).

    With `curve` keys the streams are encrypted and only clients whose public keys are
    allowed receive anything; the socket then has a ZeroMQ context of its own (see
    `security.CurveServer`)."""

    def __init__(self, address: str, send_hwm: int, linger_ms: int = 1000,
                 curve: CurveKeys | None = None) -> None:
        self.address = address
        self.linger_ms = linger_ms
        self._own_ctx = curve is not None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = (zmq.Context() if curve is not None
                                                     else zmq.Context.instance())
        self.curve = curve_server_on(self._ctx, curve)
        self._sock = self._ctx.socket(zmq.PUB)
        if self.curve is not None:
            self.curve.apply(self._sock)
        self._sock.setsockopt(zmq.SNDHWM, send_hwm)  # must precede bind to take effect
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            self._release()
            raise OSError(f"cannot bind ZeroMQ publisher to {address}: {exc}") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        check_exposure(address, what=f"publishing on {self.endpoint}: the data streams",
                       curve=self.curve is not None)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, publish: PublishConfig, security: SecurityConfig) -> PublishSocket:
        """The socket `[publish]` describes; CURVE with `[security]` keys when
        `publish.curve` (SecurityError names a missing key)."""
        curve = (CurveKeys(security.server_secret_key, security.allowed_clients)
                 if publish.curve else None)
        return cls(publish.address, publish.send_hwm, publish.linger_ms, curve=curve)

    def _release(self) -> None:
        if self.curve is not None:
            self.curve.close()
        if self._own_ctx:  # also closes a monitor socket the caller forgot (term would wait)
            self._ctx.destroy(linger=0)

    def monitor(self) -> zmq.Socket[bytes]:
        """A socket receiving this socket's connection events (`zmq.utils.monitor`), e.g.
        to see how many peers it serves; the caller closes it."""
        with self._lock:
            return self._sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)

    def send(self, topic: bytes, header: bytes, pixels: memoryview) -> bool:
        with self._lock:
            try:
                # Zero-copy: ZeroMQ keeps a reference to the read-only pixel buffer.
                self._sock.send_multipart([topic, header, pixels], flags=zmq.NOBLOCK,
                                          copy=False)
            except zmq.Again:
                return False
        return True

    def close(self) -> None:
        """Close after giving queued messages `linger_ms` to reach subscribers.

        With no linger the tail of every stream (the last frames of a run) would
        be discarded at close; a subscriber too slow to take them within the
        linger still loses them, and sees that as missing `seq` numbers.
        """
        with self._lock:
            self._sock.close(self.linger_ms)
        self._release()


#: what a topic sends of each frame: the frame itself, or its trust map (`wire.trust_frame`)
Payload = Literal["frame", "trust"]


class TopicSink:
    """Sends frames on one topic of the shared PUB socket, numbering them (`seq`).

    With payload `trust` it sends each frame's trust map instead, and passes over frames
    that have none (raw and passthrough frames; counted in `without_trust`)."""

    def __init__(self, topic: str, socket: PublishSocket, payload: Payload = "frame") -> None:
        self.topic = topic
        self.payload = payload
        self.without_trust = 0
        self._topic_bytes = topic.encode()
        self._socket = socket
        self.seq = 0
        # Acquisition-to-send latency of published frames.
        self.end_to_end = LatencyWindow()

    def setup(self) -> None:
        pass

    def append(self, frame: Frame) -> bool:
        if self.payload == "trust":
            trust = trust_frame(frame)
            if trust is None:
                self.without_trust += 1
                return True  # nothing to send for it: not a loss
            frame = trust
        mono = time.monotonic_ns()
        frame = frame.marked("published", mono)
        header = encode_header(frame, topic=self.topic, seq=self.seq,
                               published_unix_ns=time.time_ns(), published_mono_ns=mono)
        if not self._socket.send(self._topic_bytes, header, memoryview(frame.pixels.data)):
            return False  # past the high-water mark of every subscriber
        self.seq += 1
        self.end_to_end.add(frame.latency_ms()["total"])
        return True

    def skip(self, frame_ids: Sequence[int]) -> None:
        pass  # subscribers see skipped frames as gaps in `seq`

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # the socket is shared; the pipeline closes it after every topic


class PublishStage(SinkStage):
    """A topic publisher: drop-oldest queue in front of a `TopicSink`."""

    def __init__(self, topic: str, socket: PublishSocket, queue_frames: int,
                 name: str | None = None, payload: Payload = "frame",
                 kinds: tuple[str, ...] = ()) -> None:
        self.topic_sink = TopicSink(topic, socket, payload)
        super().__init__(name or f"publish_{topic}", self.topic_sink, queue_frames,
                         OverflowPolicy.DROP_OLDEST)
        self.topic = topic
        #: only frames of these kinds are queued and sent (empty: all); the others are
        #: counted here and never enter the queue, so they cannot push out this topic's
        self.kinds = kinds
        self.other_kinds = 0
        #: acquisition-to-send latency (the stage's `latency` is its own processing time)
        self.end_to_end = self.topic_sink.end_to_end

    def offer(self, frame: Frame, wait_s: float = 0.0) -> None:
        if self.kinds and frame.kind not in self.kinds:
            self.other_kinds += 1  # one upstream worker offers: no lock needed
            return
        super().offer(frame, wait_s)

    def snapshot(self) -> dict[str, object]:
        snap = super().snapshot()
        if self.kinds:
            snap["other_kinds"] = self.other_kinds
        return snap
