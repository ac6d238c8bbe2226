"""`dimscope relay`: re-publish one daemon's streams to many viewers from another machine.

A ZeroMQ XSUB/XPUB proxy (`zmq.proxy_steerable`, ZeroMQ's own forwarder, in C): the
XSUB side connects to the daemon like one subscriber, the XPUB side binds for the
viewers and forwards their subscriptions upstream. The acquisition PC sends each
message once, to the relay, however many viewers there are; a facility server carries
the fan-out. CURVE on both sides: upstream as a client of the daemon (its public key,
the relay's own key pair, which the daemon must allow), downstream as a server with
its own key pair and allow-list. A slow viewer only loses its own messages (the XPUB's
high-water mark, per viewer), as with the daemon's own socket.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from .security import CurveKeys, check_exposure, curve_client, curve_server_on

log = logging.getLogger(__name__)

#: the counters libzmq's steerable proxy reports for STATISTICS, in order
_STAT_NAMES = ("upstream_msgs_in", "upstream_bytes_in", "upstream_msgs_out",
               "upstream_bytes_out", "viewers_msgs_in", "viewers_bytes_in",
               "viewers_msgs_out", "viewers_bytes_out")


@dataclass(frozen=True)
class UpstreamKeys:
    """CURVE towards the daemon: its public key and the relay's own secret key."""

    server_public_key: Path
    client_secret_key: Path


class Relay:
    def __init__(self, upstream: str, bind: str, *, send_hwm: int = 32,
                 upstream_keys: UpstreamKeys | None = None,
                 curve: CurveKeys | None = None) -> None:
        self.upstream, self.bind = upstream, bind
        # A context of its own: its ZAP handler (CURVE towards viewers) answers for it only.
        self._ctx: zmq.Context[Any] = zmq.Context()
        self.curve = curve_server_on(self._ctx, curve)
        self._xsub = self._ctx.socket(zmq.XSUB)
        self._xpub = self._ctx.socket(zmq.XPUB)
        self._control = self._ctx.socket(zmq.PAIR)
        self._control_peer = self._ctx.socket(zmq.PAIR)
        endpoint = f"inproc://dimscope-relay-{id(self)}"
        self._control.bind(endpoint)
        self._control_peer.connect(endpoint)
        self._lock = threading.Lock()
        try:
            if upstream_keys is not None:
                curve_client(self._xsub, upstream_keys.server_public_key,
                             upstream_keys.client_secret_key)
            self._xsub.setsockopt(zmq.RCVHWM, send_hwm)
            self._xsub.connect(upstream)
            if self.curve is not None:
                self.curve.apply(self._xpub)
            self._xpub.setsockopt(zmq.SNDHWM, send_hwm)
            self._xpub.setsockopt(zmq.MAXMSGSIZE, 1024)  # subscriptions only, as the daemon
            self._xpub.bind(bind)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise OSError(f"relay {upstream} -> {bind}: {exc}") from None
        except BaseException:  # unreadable upstream keys: release everything, say why
            self._close_sockets()
            raise
        self.endpoint = self._xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        check_exposure(bind, what=f"relay on {self.endpoint}", curve=self.curve is not None)
        self._thread = threading.Thread(target=self._run, name="dimscope-relay", daemon=True)

    def start(self) -> Relay:
        self._thread.start()
        log.info("relay: %s -> %s%s", self.upstream, self.endpoint,
                 " (CURVE)" if self.curve else "")
        return self

    def _run(self) -> None:
        with contextlib.suppress(zmq.ContextTerminated):
            zmq.proxy_steerable(self._xsub, self._xpub, None, self._control)

    def stats(self, timeout_ms: int = 1000) -> dict[str, int]:
        """Messages and bytes in and out on each side, from the proxy itself."""
        with self._lock:
            self._control_peer.send(b"STATISTICS")
            if not self._control_peer.poll(timeout_ms):
                raise TimeoutError("the relay's proxy did not answer STATISTICS")
            parts = self._control_peer.recv_multipart()
        return {name: struct.unpack("=Q", part)[0] for name, part in zip(_STAT_NAMES, parts,
                                                                         strict=True)}

    def stop(self) -> None:
        with self._lock:
            self._control_peer.send(b"TERMINATE")
        self._thread.join(timeout=5)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._xsub, self._xpub, self._control, self._control_peer):
            sock.close(0)
        if self.curve is not None:
            self.curve.close()
        self._ctx.destroy(linger=0)
