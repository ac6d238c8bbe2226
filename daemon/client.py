"""Client library: `Subscriber` receives dimscope frames as (header, numpy array), with gap
detection; `ControlClient` drives a running daemon through its control socket
(docs/control.md)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
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
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 server_key: Path | None = None, client_key: Path | None = None) -> None:
        """`server_key` (the daemon's public `.key` file) and `client_key` (this client's
        `.key_secret`, allowed by the daemon): for streams published with CURVE."""
        self.address = address
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        if (server_key is None) != (client_key is None):
            self._sock.close(0)
            raise ValueError("CURVE needs both the daemon's public key and this client's "
                             "secret key")
        if server_key is not None and client_key is not None:
            from .security import curve_client

            try:
                curve_client(self._sock, server_key, client_key)
            except Exception:
                self._sock.close(0)
                raise
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


# -- the control socket -------------------------------------------------------------------

#: where a daemon's control socket is unless its config says otherwise
DEFAULT_CONTROL_ADDRESS = "tcp://127.0.0.1:5556"
#: largest reply a control client accepts (a full status is a few tens of KB)
MAX_REPLY_BYTES = 16 * 2**20
_CONTROL_SCHEMA = "dimscope.control/1"


class ControlError(RuntimeError):
    """The daemon answered a request with an error reply (`code`, `message`)."""

    def __init__(self, code: str, message: str, reply: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reply = reply


class ControlUnreachable(ControlError):
    """No reply: no daemon answering at the address within the timeout, or the
    connection could not be made (handshake failed)."""


class ControlRefused(ControlUnreachable):
    """The daemon's CURVE authenticator refused this client's key (not in its allow-list)."""


_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class ControlClient:
    """Requests to a daemon's control socket (a DEALER socket, one request at a time).

    Every method returns the reply's `result` and raises `ControlError` on an error reply
    (`ControlUnreachable` when nothing answers within `timeout_s`; never hangs).

    >>> with ControlClient("tcp://127.0.0.1:5556") as ctl:
    ...     ctl.set("exposure", 20)["from_frame_id"]
    ...     ctl.status()["frames"]["archived"]

    With CURVE give the daemon's public key file and this client's secret key file
    (`dimscope keys`); the client's public key must be in the daemon's allow-list.
    """

    def __init__(self, address: str = DEFAULT_CONTROL_ADDRESS, *, timeout_s: float = 5.0,
                 server_key: Path | str | None = None, client_key: Path | str | None = None
                 ) -> None:
        if (server_key is None) != (client_key is None):
            raise ValueError("CURVE needs both server_key (the daemon's .key file) and "
                             "client_key (this client's .key_secret file)")
        self.address = address
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Queue a request only on a finished connection (handshake done): "no daemon" is
        # then told apart from "no reply", and nothing is sent into a refused handshake.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        if server_key is not None and client_key is not None:
            from .security import curve_client

            curve_client(self._sock, Path(server_key), Path(client_key))
        self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self._handshake_failure: str | None = None
        self._sock.connect(address)

    @classmethod
    def for_run(cls, run_dir: Path | str, **kwargs: Any) -> ControlClient:
        """A client of the daemon writing `run_dir` (its control.json names the address)."""
        path = Path(run_dir) / "control.json"
        try:
            address = json.loads(path.read_text())["address"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: no control address there ({exc})") from None
        return cls(str(address), **kwargs)

    # -- requests ---------------------------------------------------------------------------
    def request(self, command: str, /, timeout_s: float | None = None, **args: Any
                ) -> dict[str, Any]:
        """Send one request (arguments that are None are left out) and return its result."""
        rid = f"{os.getpid()}-{next(self._ids)}"
        message = {"schema": _CONTROL_SCHEMA, "id": rid, "command": command,
                   **{k: v for k, v in args.items() if v is not None}}
        payload = json.dumps(message).encode()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        if not self._wait(zmq.POLLOUT, deadline):
            raise ControlUnreachable("unreachable", self._no_daemon(timeout))
        self._sock.send_multipart([b"", payload])
        while self._wait(zmq.POLLIN, deadline):
            parts = self._sock.recv_multipart()
            try:
                reply = json.loads(parts[-1])
            except ValueError:
                continue  # not a reply of a dimscope daemon
            if not isinstance(reply, dict) or reply.get("id") != rid:
                continue  # the late reply of an earlier request that timed out
            if reply.get("ok") is True and isinstance(reply.get("result"), dict):
                result: dict[str, Any] = reply["result"]
                return result
            error = reply.get("error")
            if not isinstance(error, dict):
                error = {}
            raise ControlError(str(error.get("code", "error")),
                               str(error.get("message", "the daemon refused the request")),
                               reply)
        raise ControlUnreachable("unreachable", f"no reply from {self.address} within "
                                 f"{timeout:g} s (the request may still be applied: see "
                                 "`status` and the run's events.jsonl)")

    def _wait(self, event: int, deadline: float) -> bool:
        """Wait for `event` on the socket; raise at once if the handshake was refused."""
        poller = zmq.Poller()
        poller.register(self._sock, event)
        poller.register(self._monitor, zmq.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(max(1, int(left * 1000))))
            if self._monitor in ready:
                self._read_monitor()
                continue
            if ready.get(self._sock, 0) & event:
                return True
        return False

    def _read_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise ControlRefused(
                    "refused", f"the daemon at {self.address} refused this client's key "
                    f"(CURVE authentication failed, status {event['value']}): its public key "
                    "is not in the daemon's allow-list")
            self._handshake_failure = (
                "the connection's security handshake failed: the daemon requires CURVE "
                "(give --server-key and --client-key), or the server key given is not the "
                "daemon's")

    def _no_daemon(self, timeout: float) -> str:
        if self._handshake_failure is not None:
            return f"no connection to {self.address} within {timeout:g} s: " \
                   f"{self._handshake_failure}"
        return (f"no daemon answered at {self.address} within {timeout:g} s (is `dimscope "
                "run` running? when the default port is taken, the run folder's control.json "
                "names the address it took)")

    # -- commands -------------------------------------------------------------------------
    def status(self, full: bool = False) -> dict[str, Any]:
        return self.request("status", full=full or None)

    def get(self, name: str | None = None, *, device: str | None = None,
            property: str | None = None) -> dict[str, Any]:
        """A setting: `get("exposure")`, `get("laser_power")`, or
        `get(device="Camera", property="Binning")` (with its type, limits, allowed values)."""
        return self.request("get", name=name, device=device, property=property)

    def set(self, name: str | None = None, value: Any = None, *, device: str | None = None,
            property: str | None = None) -> dict[str, Any]:
        """Change a setting between two frames: `set("exposure", 20)`,
        `set(device="SimLaser", property="Power", value=0.5)`. The result says from which
        frame id it holds (`from_frame_id`)."""
        if value is None:
            raise ValueError("set needs a value")
        return self.request("set", name=name, device=device, property=property, value=value)

    def engine(self, name: str | None = None, *, model: str | None = None,
               runtime: str | None = None, options: dict[str, Any] | None = None,
               budget_ms: float | None = None, tiers: list[dict[str, Any]] | None = None,
               adapt: bool | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """Change the engine between two frames (None = keep); `budget_ms=0` removes the
        budget. Loading a model can take a while: the timeout is at least 60 s."""
        return self.request("engine.set", timeout_s=max(timeout_s or self.timeout_s, 60.0),
                            name=name, model=model, runtime=runtime, options=options,
                            budget_ms=budget_ms, tiers=tiers, adapt=adapt)

    def start(self) -> dict[str, Any]:
        """Resume live streaming (`acquisition.start`)."""
        return self.request("acquisition.start")

    def stop(self) -> dict[str, Any]:
        """Stop live streaming, or cancel a running MDA sequence; the run goes on."""
        return self.request("acquisition.stop", timeout_s=max(self.timeout_s, 30.0))

    def snap(self) -> dict[str, Any]:
        """One frame (live streaming stopped), archived and published like the others."""
        return self.request("snap")

    def mda(self, sequence: dict[str, Any] | Path | str | Any, *,
            on_daemon: bool = False) -> dict[str, Any]:
        """Run a useq MDA sequence (live streaming stopped): a dict, an `MDASequence`, or
        a YAML/JSON file read here (`on_daemon=True`: a path on the daemon's machine)."""
        if on_daemon:
            return self.request("mda.run", path=str(sequence))
        if isinstance(sequence, str | Path):
            sequence = _read_sequence_file(Path(sequence))
        elif hasattr(sequence, "model_dump"):
            sequence = sequence.model_dump(mode="json", exclude_unset=True)
        return self.request("mda.run", sequence=sequence)

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_sequence_file(path: Path) -> dict[str, Any]:
    """A sequence file as a dict (YAML or JSON); ValueError naming the file otherwise."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read MDA sequence {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"MDA sequence {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"MDA sequence {path} is not a mapping of useq MDASequence fields")
    return data

