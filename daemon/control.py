"""The control socket: a ZeroMQ ROUTER in the running daemon that answers JSON requests.

`ControlServer` binds when the pipeline starts (before the run folder exists, so an
address that cannot be bound leaves nothing behind) and serves on its own thread, a
`zmq.Poller` loop. Requests are validated by the models of `control_protocol.py`;
anything malformed, oversized, unknown or mistyped gets an error reply and changes
nothing. `status` and `get` are answered on the socket's thread at once; commands that
change something are applied one at a time, in order, by one worker thread, so a slow
change (a model being loaded) never stops `status` from answering:

- camera and device settings are applied by the acquisition thread between two frames
  (`Acquisition.change_between_frames`): frames already taken are handed on first, a
  camera setting stops and restarts the camera's sequence around the change;
- `engine.set` builds, prepares and tries the new engine on this worker, then the engine
  stage swaps it in between two frames (`EngineStage.swap_engine`); a new engine that
  fails leaves the old one running;
- `acquisition.stop/start`, `snap` and `mda.run` run on the acquisition thread too.

Every change — applied or refused — is a line of `<run_dir>/events.jsonl` (time, command,
arguments, outcome, the frame id from which it holds, the client), and is logged. The
bound endpoint is written to `<run_dir>/control.json`. Security: `check_exposure`
refuses a bind beyond loopback without CURVE (unless `insecure`); with `curve`, only the
clients in the allow-list get through the handshake (`security.CurveServer`).

The socket has its own ZeroMQ context, so its ZAP authenticator never collides with one
on the data streams' context.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import zmq

from dimscope.engines import EngineError, available_engines, make_engine
from dimscope.engines.options import validate_options

from .acquisition import (
    Acquisition,
    AcquisitionBusyError,
    AcquisitionError,
    AcquisitionMode,
    ChangePoint,
)
from .control_protocol import (
    CHANGING_COMMANDS,
    SCHEMA,
    AcquisitionStartRequest,
    AcquisitionStopRequest,
    EngineSetRequest,
    GetRequest,
    MDARunRequest,
    ProtocolError,
    Request,
    SetRequest,
    SnapRequest,
    StatusRequest,
    error_reply,
    json_safe,
    ok_reply,
    parse_request,
    request_id,
)
from .engine_stage import EngineStage
from .mda import MDAError, load_sequence
from .security import CurveServer, check_exposure, load_public_key

if TYPE_CHECKING:
    from .config import Config
    from .pipeline import Pipeline

__all__ = ["DEFAULT_ADDRESS", "ENDPOINT_FILE", "EVENTS_FILE", "SCHEMA", "ControlServer"]

log = logging.getLogger(__name__)

#: where the control socket binds when `control.address` is not set
DEFAULT_ADDRESS = "tcp://127.0.0.1:5556"
#: ...and where it binds instead when that port is taken (another daemon on this PC)
FALLBACK_ADDRESS = "tcp://127.0.0.1:*"
ENDPOINT_FILE = "control.json"
EVENTS_FILE = "events.jsonl"
EVENTS_SCHEMA = "dimscope.events/1"
#: ZeroMQ drops a connection whose message is larger than this many times
#: `max_message_bytes` before reading it (memory stays bounded); smaller oversized
#: requests are read and get a `too_large` error reply
HARD_LIMIT_FACTOR = 16
#: changes waiting for the worker beyond this are refused (`busy`)
MAX_PENDING_CHANGES = 16
#: how long a change may wait for the acquisition thread to take it (then: not applied)
ACQUISITION_TAKE_S = 10.0
#: how long a change the acquisition thread has taken may run (the archive's
#: backpressure wait can hold a drain for `archive.backpressure_s`)
ACQUISITION_RUN_S = 60.0
#: how long `acquisition.stop` waits for a cancelled MDA sequence to end
MDA_CANCEL_WAIT_S = 30.0
#: refused requests logged one by one before only every 100th is (a flood stays quiet)
_LOGGED_REFUSALS = 20

#: friendly names of device properties, per source kind
SOURCE_ALIASES: dict[str, dict[str, tuple[str, str]]] = {
    "sim": {"laser_power": ("SimLaser", "Power")},
}

#: Micro-Manager property types (MM::PropertyType)
_PROP_STRING, _PROP_FLOAT, _PROP_INTEGER = 1, 2, 3

T = TypeVar("T")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who sent a request, as far as the socket can tell."""

    #: the peer's IP address (tcp)
    peer: str | None = None
    #: the client's CURVE public key (z85), when CURVE is on
    key: str | None = None
    #: the name of its key file in the allow-list folder (`alice` for alice.key)
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in (("peer", self.peer), ("key", self.key),
                                  ("name", self.name)) if v is not None}


class EventLog:
    """`events.jsonl`: one JSON line per change, appended and flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._lock = threading.Lock()
        self._fh = path.open("a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(json_safe({"schema": EVENTS_SCHEMA, **record}),
                          separators=(",", ":"), default=str)
        with self._lock:
            if self._fh.closed:
                return
            try:
                self._fh.write(line + "\n")
                self._fh.flush()
            except OSError as exc:  # a full disk must not take the control socket down
                log.error("control: could not append to %s: %s", self.path, exc)
                return
            self.count += 1

    def close(self) -> None:
        with self._lock:
            self._fh.close()


@dataclass
class _Change:
    """A changing request waiting for the worker."""

    request: Request
    rid: str | int | None
    envelope: list[bytes]
    client: ClientIdentity


class ControlServer:
    """The daemon's control socket (see the module docstring). Binds on construction;
    `start` writes control.json and starts serving; `close` stops."""

    def __init__(self, pipeline: Pipeline, config: Config) -> None:
        self.pipeline = pipeline
        cfg = config.control
        self.max_message_bytes = cfg.max_message_bytes
        self.requested = cfg.address
        address = cfg.address or DEFAULT_ADDRESS
        # Refused before anything is bound: a control socket open to the network without
        # CURVE is a startup error (SecurityError), unless `insecure`.
        check_exposure(address, what="control", curve=cfg.curve, insecure=cfg.insecure)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._curve: CurveServer | None = None
        self._key_names: dict[str, str] = {}
        self._sock = self._ctx.socket(zmq.ROUTER)
        try:
            if cfg.curve:
                self._curve = CurveServer(config.security.server_secret_key,
                                          config.security.allowed_clients, context=self._ctx)
                self._curve.apply(self._sock)
                self._key_names = _key_names(config.security.allowed_clients)
            self._sock.setsockopt(zmq.MAXMSGSIZE, HARD_LIMIT_FACTOR * cfg.max_message_bytes)
            self._sock.setsockopt(zmq.LINGER, 500)  # the last replies still go out at close
            self.fallback_from: str | None = None
            self.endpoint = self._bind(address, default=cfg.address is None)
        except BaseException:
            self._close_socket()
            raise
        self.run_dir: Path | None = None
        self.events: EventLog | None = None
        self.refused = 0
        self.answered = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._changes: queue.Queue[_Change | None] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._outbox: deque[list[bytes]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def _bind(self, address: str, *, default: bool) -> str:
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            if not (default and exc.errno == zmq.EADDRINUSE):
                raise OSError(f"cannot bind the control socket to {address}: {exc} (set "
                              "[control] address to a free port, or enabled = false)") from None
            # Another daemon on this PC has the default port: take any free loopback port;
            # control.json in the run folder names it (`dimscope ctl --run DIR`).
            self.fallback_from = address
            try:
                self._sock.bind(FALLBACK_ADDRESS)
            except zmq.ZMQError as exc2:
                raise OSError(f"cannot bind the control socket: {address} is taken and "
                              f"{FALLBACK_ADDRESS} failed too: {exc2}") from None
        return str(self._sock.getsockopt_string(zmq.LAST_ENDPOINT))

    @property
    def curve(self) -> bool:
        return self._curve is not None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, run_dir: Path) -> None:
        """Write control.json and events.jsonl's first line, then serve."""
        self.run_dir = run_dir
        info: dict[str, Any] = {
            "schema": "dimscope.control-endpoint/1", "address": self.endpoint,
            "requested": self.requested or DEFAULT_ADDRESS,
            "fallback": self.fallback_from is not None, "curve": self.curve,
            "pid": os.getpid(), "started": _now_iso(), "events": EVENTS_FILE,
        }
        if self._curve is not None:
            info["server_public_key"] = self._curve.public_key.decode()
        (run_dir / ENDPOINT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if self.fallback_from is not None:
            log.warning("control socket: %s is taken (another daemon on this PC?); bound %s "
                        "instead (written to %s; `dimscope ctl --address %s` or `--run %s`)",
                        self.fallback_from, self.endpoint, run_dir / ENDPOINT_FILE,
                        self.endpoint, run_dir)
        else:
            log.info("control socket on %s%s", self.endpoint, " (CURVE)" if self.curve else "")
        self.events = EventLog(run_dir / EVENTS_FILE)
        self.events.append(self._start_event())
        self._worker = threading.Thread(target=self._work, name="dimscope-control-changes",
                                        daemon=True)
        self._worker.start()
        self._thread = threading.Thread(target=self._serve, name="dimscope-control",
                                        daemon=True)
        self._thread.start()

    def _start_event(self) -> dict[str, Any]:
        """The settings the run starts with, from frame 0 (later lines change them)."""
        p = self.pipeline
        settings: dict[str, Any] = {"engine": p.engine_name, "engine_options": p.engine_options}
        with contextlib.suppress(Exception):
            settings["exposure_ms"] = float(p.source.core.getExposure())
        with contextlib.suppress(Exception):
            settings["laser_power"] = self._read_friendly("laser_power")
        stage = p.stage("engine")
        if isinstance(stage, EngineStage):
            settings["budget_ms"] = stage.budget_ms
        return {"time": _now_iso(), "unix_ns": time.time_ns(), "command": "run.start",
                "args": settings, "ok": True, "from_frame_id": 0,
                "control_address": self.endpoint}

    def close(self) -> None:
        """Stop serving: queued changes are refused (`busy`), the one in progress finishes
        and is answered, then the socket closes."""
        self._stop.set()
        self._changes.put(None)
        if self._worker is not None:
            self._worker.join(ACQUISITION_TAKE_S + ACQUISITION_RUN_S)
        self._wake()
        if self._thread is not None:
            self._thread.join(5.0)
        self._close_socket()
        if self.events is not None:
            self.events.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _close_socket(self) -> None:
        if not self._sock.closed:
            self._sock.close()
        if self._curve is not None:
            self._curve.close()
            self._curve = None
        self._ctx.term()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe already wakes the loop
            os.write(self._wake_w, b"x")

    # -- the socket's thread --------------------------------------------------------------
    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            events = dict(poller.poll(500))
            if self._wake_r in events:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
            self._send_outbox()
            if self._stop.is_set() and (self._worker is None or not self._worker.is_alive()):
                self._send_outbox()
                return
            if events.get(self._sock):
                while True:
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)

    def _send_outbox(self) -> None:
        while self._outbox:
            # A peer gone or over its high-water mark: there is nobody to tell.
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart(self._outbox.popleft(), zmq.NOBLOCK)

    def _reply(self, envelope: list[bytes], payload: bytes) -> None:
        """Queue a reply (any thread) and wake the socket's thread to send it."""
        self._outbox.append([*envelope, payload])
        self._wake()

    def _handle(self, frames: list[zmq.Frame]) -> None:
        # ROUTER: [routing id, (empty delimiter from REQ/compatible DEALER), request]
        envelope = [frames[0].bytes]
        rest = frames[1:]
        if len(rest) >= 2 and not rest[0].bytes:
            envelope.append(b"")
            rest = rest[1:]
        client = self._identify(frames[-1])
        if len(rest) != 1:
            self._refuse(envelope, None, "malformed", f"a request is one message part with "
                         f"one JSON object, got {len(rest)} parts", client)
            return
        payload = rest[0].bytes
        if len(payload) > self.max_message_bytes:
            self._refuse(envelope, None, "too_large", f"request of {len(payload)} bytes is "
                         f"over control.max_message_bytes = {self.max_message_bytes}", client)
            return
        try:
            request, rid = parse_request(payload)
        except ProtocolError as exc:
            rid = _id_of(payload)
            self._refuse(envelope, rid, exc.code, exc.message, client)
            return
        if request.command in CHANGING_COMMANDS:
            with self._pending_lock:
                full = self._pending >= MAX_PENDING_CHANGES
                if not full:
                    self._pending += 1
            if full or self._stop.is_set():
                why = ("the daemon is stopping" if self._stop.is_set() else
                       f"{MAX_PENDING_CHANGES} changes are already waiting")
                self._refuse(envelope, rid, "busy", why, client)
                return
            self._changes.put(_Change(request, rid, envelope, client))
            return
        try:
            if isinstance(request, StatusRequest):
                result = self.status(full=request.full)
            else:
                assert isinstance(request, GetRequest)
                result = self._get(request)
        except ProtocolError as exc:
            self._refuse(envelope, rid, exc.code, exc.message, client)
            return
        except Exception as exc:  # a bug or a device error: say so, keep serving
            log.exception("control: %s failed", request.command)
            self._refuse(envelope, rid, "failed", f"{request.command} failed: {exc}", client)
            return
        self._count(ok=True)
        self._send(envelope, ok_reply(rid, result))

    def _send(self, envelope: list[bytes], payload: bytes) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.send_multipart([*envelope, payload], zmq.NOBLOCK)

    def _refuse(self, envelope: list[bytes], rid: str | int | None, code: Any, message: str,
                client: ClientIdentity) -> None:
        refused = self._count(ok=False)
        if refused <= _LOGGED_REFUSALS or refused % 100 == 0:
            log.warning("control: refused a request from %s (%s): %s (%d refused so far)",
                        client.name or client.peer or "a client", code, message, refused)
        self._send(envelope, error_reply(rid, code, message))

    def _count(self, *, ok: bool) -> int:
        """Count an answered or a refused request (both threads answer); the new count."""
        with self._pending_lock:
            if ok:
                self.answered += 1
                return self.answered
            self.refused += 1
            return self.refused

    def _identify(self, frame: zmq.Frame) -> ClientIdentity:
        peer = key = None
        with contextlib.suppress(zmq.ZMQError, UnicodeDecodeError):
            peer = str(frame.get("Peer-Address"))
        if self._curve is not None:  # the ZAP handler set User-Id to the client's z85 key
            with contextlib.suppress(zmq.ZMQError, UnicodeDecodeError):
                key = str(frame.get("User-Id")) or None
        return ClientIdentity(peer=peer, key=key,
                              name=self._key_names.get(key) if key else None)

    # -- the worker: changes, one at a time ------------------------------------------------
    def _work(self) -> None:
        while True:
            change = self._changes.get()
            if change is None:
                break
            try:
                if self._stop.is_set():
                    payload = error_reply(change.rid, "busy", "the daemon is stopping")
                else:
                    payload = self._apply(change)
            finally:
                with self._pending_lock:
                    self._pending -= 1
            self._reply(change.envelope, payload)
        while True:  # refuse what is still queued, so no client waits for its timeout
            try:
                left = self._changes.get_nowait()
            except queue.Empty:
                return
            if left is not None:
                self._reply(left.envelope, error_reply(left.rid, "busy",
                                                       "the daemon is stopping"))

    def _apply(self, change: _Change) -> bytes:
        req = change.request
        args = req.model_dump(exclude={"schema_version", "id", "command"}, exclude_none=True)
        record: dict[str, Any] = {"time": _now_iso(), "unix_ns": time.time_ns(),
                                  "command": req.command, "args": args,
                                  "request_id": change.rid, "client": change.client.as_dict()}
        try:
            result = self._run_change(req)
        except ProtocolError as exc:
            self._count(ok=False)
            self._record(record, ok=False, error={"code": exc.code, "message": exc.message})
            return error_reply(change.rid, exc.code, exc.message)
        except Exception as exc:  # a bug or a device error: say so, keep serving
            log.exception("control: %s failed", req.command)
            message = f"{req.command} failed: {exc}"
            self._count(ok=False)
            self._record(record, ok=False, error={"code": "failed", "message": message})
            return error_reply(change.rid, "failed", message)
        self._count(ok=True)
        self._record(record, ok=True, result=result)
        return ok_reply(change.rid, result)

    def _record(self, record: dict[str, Any], *, ok: bool, result: dict[str, Any] | None = None,
                error: dict[str, str] | None = None) -> None:
        record["ok"] = ok
        if result is not None:
            record["result"] = result
            for key in ("from_frame_id", "next_frame_id"):
                if key in result:
                    record[key] = result[key]
        if error is not None:
            record["error"] = error
        who = record["client"].get("name") or record["client"].get("peer") or "a client"
        if ok:
            log.info("control: %s %s from %s: ok, from frame %s", record["command"],
                     record["args"], who, record.get("from_frame_id", "-"))
        else:
            log.warning("control: %s %s from %s refused: %s", record["command"],
                        record["args"], who, error["message"] if error else "")
        if self.events is not None:
            self.events.append(record)

    def _run_change(self, req: Request) -> dict[str, Any]:
        if isinstance(req, SetRequest):
            return self._set(req)
        if isinstance(req, EngineSetRequest):
            return self._engine_set(req)
        if isinstance(req, AcquisitionStopRequest):
            return self._acquisition_stop()
        if isinstance(req, AcquisitionStartRequest):
            return self._on_acquisition(lambda acq: {"from_frame_id": acq.resume(),
                                                     "acquisition": str(acq.mode)})
        if isinstance(req, SnapRequest):
            return self._snap()
        if isinstance(req, MDARunRequest):
            return self._mda_run(req)
        raise ProtocolError("unknown_command", f"{req.command} changes nothing here")

    # -- status ---------------------------------------------------------------------------
    def status(self, *, full: bool = False) -> dict[str, Any]:
        """The `status` reply: state, counters, latency, engine, settings, events."""
        p = self.pipeline
        s = p.summary()
        acq = p.acquisition
        latency = {name: {"p50": _round(v.p50), "p99": _round(v.p99)}
                   for name, v in s.latency_ms.items() if v.n}
        result: dict[str, Any] = {
            "state": str(s.state),
            "acquisition": str(acq.mode) if acq is not None else None,
            "uptime_s": _round(time.monotonic() - p.started_mono if p.started_mono else 0.0),
            "elapsed_s": _round(s.elapsed_s),
            "fps": _round(s.fps),
            "frames": {"acquired": s.acquired, "archived": s.archived,
                       "enhanced": s.enhanced, "published": s.published,
                       "dropped": sum(s.dropped.values()),
                       "not_archived": len(s.not_archived),
                       "next_frame_id": acq.next_frame_id if acq is not None else 0},
            "dropped": dict(s.dropped),
            "latency_ms": latency,
            "engine": self._engine_status(),
            "settings": self._settings(),
            "events": self.events.count if self.events is not None else 0,
            "mda": acq.last_sequence if acq is not None else None,
            "run_dir": s.run_dir,
            "source": s.source,
            "control_address": self.endpoint,
            "publish_address": p.publish_endpoint,
            "curve": self.curve,
            "requests": {"answered": self.answered, "refused": self.refused},
            "error": s.error,
            "engine_error": s.engine_error,
        }
        if full:
            result["summary"] = s.to_dict()
        return result

    def _engine_status(self) -> dict[str, Any] | None:
        stage = self.pipeline.stage("engine")
        if not isinstance(stage, EngineStage):
            return None
        info = stage.engine.info
        adapting = stage.adapter is not None and stage.adapt_error is None
        return {
            "name": info.name, "engine": self.pipeline.engine_name,
            "options": self.pipeline.engine_options, "version": info.version,
            "model_version": info.version, "model_sha256": info.model_sha256 or None,
            "verified": info.verified, "runtime": info.runtime, "precision": info.precision,
            "scale": info.scale, "tier": stage.tier, "tier_name": stage.tier_name,
            "tier_changes": stage.tier_changes, "budget_ms": stage.budget_ms,
            "skipped": stage.skipped, "late": stage.counters.late,
            "trust_alerts": stage.trust_alerts if stage.trust is not None else None,
            "adaptation": {"on": adapting, "version": stage.adapt_version,
                           "swaps": stage.adapt_swaps, "error": stage.adapt_error},
            "adaptation_version": stage.adapt_version,
            "changes": stage.engine_changes,
            "last_frame_id": stage.last_frame_id,
            "error": str(stage.error) if stage.error is not None else None,
        }

    def _settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"exposure_ms": None, "laser_power": None}
        with contextlib.suppress(Exception):  # the source may be closed (run stopping)
            out["exposure_ms"] = float(self.pipeline.source.core.getExposure())
        with contextlib.suppress(Exception):
            out["laser_power"] = self._read_friendly("laser_power")
        return out

    # -- get / set ------------------------------------------------------------------------
    def _core(self) -> Any:
        return self.pipeline.source.core

    def _alias(self, name: str) -> tuple[str, str]:
        """The device and property a friendly name stands for; `unsupported` if none."""
        cfg = self.pipeline.config
        configured = getattr(cfg.control, "aliases", None) or {}
        if name in configured:
            device, prop = configured[name]
            return str(device), str(prop)
        kind = cfg.source.kind
        found = SOURCE_ALIASES.get(kind, {}).get(name)
        if found is None:
            raise ProtocolError("unsupported", f"{name!r} has no device/property mapping for "
                                f"source {self.pipeline.source.name!r}; address it by device "
                                "and property (`dimscope ctl set DEVICE PROPERTY VALUE`)")
        return found

    def _read_friendly(self, name: str) -> Any:
        device, prop = self._alias(name)
        return _typed(self._core(), device, prop, self._core().getProperty(device, prop))

    def _get(self, req: GetRequest) -> dict[str, Any]:
        core = self._core()
        if req.name == "exposure":
            return {"name": "exposure", "value": float(core.getExposure()), "unit": "ms",
                    "device": core.getCameraDevice()}
        device, prop = self._alias(req.name) if req.name else (req.device, req.property)
        assert device is not None and prop is not None
        described = _describe(core, device, prop)
        if req.name:
            described["name"] = req.name
        return described

    def _set(self, req: SetRequest) -> dict[str, Any]:
        core = self._core()
        camera_device = core.getCameraDevice()
        if req.name == "exposure":
            value = float(req.value)  # a number: the request model checked it
            if camera_device and core.hasPropertyLimits(camera_device, "Exposure"):
                lo = core.getPropertyLowerLimit(camera_device, "Exposure")
                hi = core.getPropertyUpperLimit(camera_device, "Exposure")
                if not lo <= value <= hi:
                    raise ProtocolError("invalid", f"exposure {value:g} ms is outside the "
                                        f"camera's limits [{lo:g}, {hi:g}] ms")
            previous = float(core.getExposure())

            def apply_exposure() -> Any:
                core.setExposure(value)
                return float(core.getExposure())

            now, point = self._between_frames(apply_exposure, camera=True)
            return {"name": "exposure", "value": now, "previous": previous, "unit": "ms",
                    **_point(point)}
        device, prop = self._alias(req.name) if req.name else (req.device, req.property)
        assert device is not None and prop is not None
        value = _checked_value(core, device, prop, req.value)
        previous = _typed(core, device, prop, core.getProperty(device, prop))

        def apply_property() -> Any:
            try:
                core.setProperty(device, prop, value)
            except Exception as exc:  # the device refused: name it, nothing else changed
                raise ProtocolError("failed", f"{device}/{prop} = {value!r}: the device "
                                    f"refused it: {exc}") from None
            return _typed(core, device, prop, core.getProperty(device, prop))

        now, point = self._between_frames(apply_property, camera=device == camera_device)
        out = {"device": device, "property": prop, "value": now, "previous": previous,
               **_point(point)}
        if req.name:
            out["name"] = req.name
        return out

    def _between_frames(self, apply: Callable[[], T], *, camera: bool
                        ) -> tuple[T, ChangePoint]:
        def change(acq: Acquisition) -> tuple[T, ChangePoint]:
            return acq.change_between_frames(apply, camera=camera)

        return self._on_acquisition(change)

    # -- acquisition ----------------------------------------------------------------------
    def _on_acquisition(self, change: Callable[[Acquisition], T]) -> T:
        """Run `change(acquisition)` on the acquisition thread, between two frames."""
        acq = self.pipeline.acquisition
        if acq is None:
            raise ProtocolError("busy", "acquisition has not started")
        if acq.mode is AcquisitionMode.MDA:
            raise ProtocolError("busy", "an MDA sequence is running and owns the microscope"
                                + (" (acquisition.stop cancels it)" if acq.accepts_changes
                                   else " (this run is an MDA run, started with --mda)"))
        future: Future[T] = acq.submit(lambda _core: change(acq))
        try:
            return _wait(future)
        except AcquisitionBusyError as exc:
            raise ProtocolError("busy", str(exc)) from None
        except AcquisitionError as exc:
            raise ProtocolError("failed", f"acquisition stopped: {exc}") from None

    def _acquisition_stop(self) -> dict[str, Any]:
        acq = self.pipeline.acquisition
        if acq is not None and acq.mode is AcquisitionMode.MDA and acq.accepts_changes:
            acq.cancel_sequence()
            deadline = time.monotonic() + MDA_CANCEL_WAIT_S
            while acq.mode is AcquisitionMode.MDA and time.monotonic() < deadline:
                time.sleep(0.02)
            return {"cancelled_mda": True, "acquisition": str(acq.mode),
                    "next_frame_id": acq.next_frame_id, "from_frame_id": acq.next_frame_id}

        def pause(a: Acquisition) -> dict[str, Any]:
            next_id = a.pause()  # no streamed frame from this id on
            return {"next_frame_id": next_id, "from_frame_id": next_id,
                    "acquisition": str(a.mode)}

        return self._on_acquisition(pause)

    def _snap(self) -> dict[str, Any]:
        frame = self._on_acquisition(lambda acq: acq.snap())
        return {"frame_id": frame.frame_id, "from_frame_id": frame.frame_id,
                "exposure_ms": frame.exposure_ms, "shape": list(frame.shape),
                "dtype": frame.dtype.str}

    def _mda_run(self, req: MDARunRequest) -> dict[str, Any]:
        try:
            sequence = load_sequence(req.sequence if req.sequence is not None
                                     else str(req.path))
        except MDAError as exc:
            raise ProtocolError("invalid", str(exc)) from None
        planned, first = self._on_acquisition(lambda acq: acq.queue_sequence(sequence))
        return {"planned": planned, "from_frame_id": first, "next_frame_id": first,
                "acquisition": "mda"}

    # -- engine ---------------------------------------------------------------------------
    def _engine_set(self, req: EngineSetRequest) -> dict[str, Any]:
        from .graph import tier_factories

        p = self.pipeline
        stage = p.stage("engine")
        if not isinstance(stage, EngineStage):
            raise ProtocolError("unsupported", "this run has no engine stage (it runs raw only"
                                + (f": {p.engine_error})" if p.engine_error else ")"))
        if stage.error is not None:
            raise ProtocolError("unsupported", f"the engine stage is out of service: "
                                f"{stage.error}")
        ctx = p.build_context
        assert ctx is not None
        tiers = None
        if req.tiers is not None:
            from .config import TierConfig

            try:
                parsed = [TierConfig.model_validate(t.model_dump()) for t in req.tiers]
            except ValueError as exc:
                raise ProtocolError("invalid", f"tiers: {exc}") from None
            tiers = tier_factories(tuple(parsed), ctx.calibration)
        budget = stage.budget_ms if req.budget_ms is None else (float(req.budget_ms) or None)
        result: dict[str, Any] = {}
        if req.rebuilds_engine:
            name, options = self._new_engine_spec(req)
            engine, shape_key = self._build_engine(name, options, stage)
            if req.adapt:
                self._check_adaptable(engine)
            # Tiers left out keep their value: the fallbacks not used yet.
            swap = stage.swap_engine(engine, shape_key,
                                     tiers if tiers is not None else stage.remaining_tiers,
                                     budget)
            for closing in (swap.old, swap.stopped_adapter):
                if closing is not None:
                    with contextlib.suppress(Exception):
                        closing.close()
            p.engine_name, p.engine_options, p.engine_info = name, options, engine.info
            last = swap.last_frame_id
            result.update({"engine": name, "options": options, "replaced": swap.old.info.name,
                           "version": engine.info.version, "runtime": engine.info.runtime})
        else:
            last = stage.set_budget(budget, tiers)
        if req.adapt is True:
            assert p.run_dir is not None
            try:
                last = stage.start_adapting(p.run_dir / "adapted")
            except EngineError as exc:
                if req.rebuilds_engine:  # the swap happened: say what did and did not
                    result["adapt_error"] = str(exc)
                else:
                    raise ProtocolError("failed", f"adaptation cannot start: {exc}") from None
        elif req.adapt is False:
            last = stage.stop_adapting()
        result.update({"budget_ms": stage.budget_ms, "adapting": stage.adapt_error is None
                       and stage.adapter is not None,
                       "last_frame_id_before": last,
                       "from_frame_id": 0 if last is None else last + 1})
        return result

    def _new_engine_spec(self, req: EngineSetRequest) -> tuple[str, dict[str, Any]]:
        p = self.pipeline
        name = req.name or p.engine_name
        if name not in available_engines():
            raise ProtocolError("invalid", f"unknown engine {name!r}; available: "
                                f"{', '.join(sorted(available_engines()))}")
        if req.options is not None:
            options: dict[str, Any] = dict(req.options)
        elif name == p.engine_name:
            options = dict(p.engine_options)
        else:
            options = {}
        if req.model is not None:
            options["model"] = req.model
        if req.runtime is not None:
            options["runtime"] = req.runtime
        try:
            options = validate_options(name, options)
        except ValueError as exc:
            raise ProtocolError("invalid", str(exc)) from None
        if name == "model" and "model" not in options:
            raise ProtocolError("invalid", "engine 'model' needs a model (`model`: a shipped "
                                "model name or an .onnx path on the daemon's machine)")
        return name, options

    def _build_engine(self, name: str, options: dict[str, Any], stage: EngineStage
                      ) -> tuple[Any, tuple[tuple[int, ...], str]]:
        """The new engine, made, prepared for the camera's frames and tried on the newest
        one — here, off the stage thread (a first call often compiles or warms up)."""
        p = self.pipeline
        ctx = p.build_context
        assert ctx is not None
        acq = p.acquisition
        sample = acq.last_frame if acq is not None else None
        shape = sample.shape if sample is not None else tuple(ctx.frame_shape)
        dtype = sample.dtype if sample is not None else ctx.frame_dtype
        in_service = stage.engine.info.name
        try:
            engine = make_engine(name, **options)
        except (EngineError, TypeError, ValueError) as exc:
            raise ProtocolError("failed", f"engine {name!r} could not be made: {exc}; "
                                f"{in_service} stays in service") from None
        try:
            engine.prepare(shape, dtype, ctx.calibration)
            if sample is not None:
                engine.process(sample.pixels)
        except Exception as exc:
            with contextlib.suppress(Exception):
                engine.close()
            raise ProtocolError("failed", f"engine {name!r} could not run on {shape} frames: "
                                f"{exc}; {in_service} stays in service") from None
        return engine, (tuple(shape), dtype.str)

    @staticmethod
    def _check_adaptable(engine: Any) -> None:
        from dimscope.engines.adaptation import check_adaptable
        from dimscope.engines.model_engine import ModelEngine

        try:
            if not isinstance(engine, ModelEngine):
                raise EngineError(f"engine {engine.info.name!r} is not a model engine "
                                  "(adaptation trains a model's weights)")
            check_adaptable(engine.card, engine.path)
        except EngineError as exc:
            with contextlib.suppress(Exception):
                engine.close()
            raise ProtocolError("invalid", f"adapt: {exc}; nothing changed") from None


def _wait(future: Future[T]) -> T:
    """The change's result; a change the acquisition thread has not taken in time is
    withdrawn (nothing changed), one it is running is waited for."""
    try:
        return future.result(ACQUISITION_TAKE_S)
    except FutureTimeout:
        if future.cancel():
            raise ProtocolError("timeout", f"the acquisition thread did not take the change "
                                f"within {ACQUISITION_TAKE_S:g} s; nothing changed") from None
    try:
        return future.result(ACQUISITION_RUN_S)
    except FutureTimeout:
        raise ProtocolError("timeout", f"the change is still running after "
                            f"{ACQUISITION_TAKE_S + ACQUISITION_RUN_S:g} s; see status and "
                            "events.jsonl for its outcome") from None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _point(point: ChangePoint) -> dict[str, Any]:
    return {"from_frame_id": point.from_frame_id, "next_frame_id": point.next_frame_id,
            "sequence_restarted": point.sequence_restarted,
            "stopped_ms": _round(point.stopped_ms)}


def _id_of(payload: bytes) -> str | int | None:
    """The id of a request that did not validate, when it has a usable one."""
    try:
        return request_id(json.loads(payload))
    except ValueError:
        return None


def _key_names(folder: Path | None) -> dict[str, str]:
    """z85 public key -> key file name (`alice` for alice.key), for the event log."""
    names: dict[str, str] = {}
    if folder is None:
        return names
    for path in sorted(folder.glob("*.key")):
        with contextlib.suppress(Exception):
            names[load_public_key(path).decode()] = path.stem
    return names


def _known_property(core: Any, device: str, prop: str) -> None:
    devices = list(core.getLoadedDevices())
    if device not in devices:
        raise ProtocolError("invalid", f"no device {device!r}; loaded: {', '.join(devices)}")
    if not core.hasProperty(device, prop):
        names = list(core.getDevicePropertyNames(device))
        raise ProtocolError("invalid", f"device {device!r} has no property {prop!r}; it has: "
                            f"{', '.join(names)}")


def _ptype(core: Any, device: str, prop: str) -> int:
    with contextlib.suppress(Exception):
        return int(core.getPropertyType(device, prop))
    return _PROP_STRING


def _typed(core: Any, device: str, prop: str, value: Any) -> Any:
    """A property value as its type says (Micro-Manager hands everything out as text)."""
    kind = _ptype(core, device, prop)
    try:
        if kind == _PROP_FLOAT:
            return float(value)
        if kind == _PROP_INTEGER:
            return int(float(value))
    except (TypeError, ValueError):
        pass
    return value if isinstance(value, str | int | float) else str(value)


def _describe(core: Any, device: str, prop: str) -> dict[str, Any]:
    _known_property(core, device, prop)
    kind = _ptype(core, device, prop)
    out: dict[str, Any] = {
        "device": device, "property": prop,
        "value": _typed(core, device, prop, core.getProperty(device, prop)),
        "type": {_PROP_FLOAT: "float", _PROP_INTEGER: "integer"}.get(kind, "string"),
        "read_only": bool(core.isPropertyReadOnly(device, prop)),
        "allowed": list(core.getAllowedPropertyValues(device, prop)) or None,
        "limits": None,
    }
    if core.hasPropertyLimits(device, prop):
        out["limits"] = [core.getPropertyLowerLimit(device, prop),
                         core.getPropertyUpperLimit(device, prop)]
    return out


def _checked_value(core: Any, device: str, prop: str, value: Any) -> Any:
    """`value` converted to the property's type and checked against what the core allows
    (read-only, allowed values, limits); ProtocolError naming what is allowed otherwise."""
    _known_property(core, device, prop)
    where = f"{device}/{prop}"
    if core.isPropertyReadOnly(device, prop):
        raise ProtocolError("invalid", f"{where} is read-only")
    if isinstance(value, bool):
        value = int(value)
    allowed = [str(v) for v in core.getAllowedPropertyValues(device, prop)]
    if allowed:
        text = _as_text(value)
        if text not in allowed:
            raise ProtocolError("invalid", f"{where} = {value!r} is not allowed; allowed: "
                                f"{', '.join(allowed)}")
        return text
    kind = _ptype(core, device, prop)
    if kind in (_PROP_FLOAT, _PROP_INTEGER):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ProtocolError("invalid", f"{where} takes a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ProtocolError("invalid", f"{where} takes a finite number, got {value!r}")
        if kind == _PROP_INTEGER and not number.is_integer():
            raise ProtocolError("invalid", f"{where} takes an integer, got {value!r}")
        if core.hasPropertyLimits(device, prop):
            lo = core.getPropertyLowerLimit(device, prop)
            hi = core.getPropertyUpperLimit(device, prop)
            if not lo <= number <= hi:
                raise ProtocolError("invalid", f"{where} = {number:g} is outside its limits "
                                    f"[{lo:g}, {hi:g}]")
        return int(number) if kind == _PROP_INTEGER else number
    return _as_text(value)


def _as_text(value: Any) -> str:
    """How Micro-Manager writes a value: integral floats without a fraction ("2", not "2.0")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)

