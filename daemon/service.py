"""Running under systemd: the notify protocol and a watchdog that pings only while frames flow.

`Notifier` speaks systemd's `sd_notify` datagram protocol in plain Python (no libsystemd):
newline-separated `KEY=VALUE` assignments sent as one datagram to the AF_UNIX socket named
by `$NOTIFY_SOCKET` (a leading `@` names the Linux abstract namespace). Without
`$NOTIFY_SOCKET` every call is a no-op, so `dimscope run` behaves the same outside systemd.

`ServiceMonitor` is a small thread beside the pipeline:

- `READY=1` once the readiness test passes (`dimscope run`: the first frame is archived
  and indexed), not at process start: `systemctl start` returns when data is being kept.
- `STATUS=...` every few seconds (what `systemctl status` shows), also while stopping.
- `WATCHDOG=1` every half `$WATCHDOG_USEC` (as `sd_watchdog_enabled(3)` advises), but only
  when the progress counter (frames archived) advanced since the previous ping, or within
  `grace_s` of its last advance (a long exposure, or the planned wait of a time-lapse). A
  stalled pipeline — a hung disk, a camera that stopped delivering — stops pinging, and
  systemd kills and restarts the service (`WatchdogSec=`, `Restart=on-failure`).
- a reload request (SIGHUP; the unit's `ExecReload`) is answered with `RELOADING=1` and
  `MONOTONIC_USEC=` (the `Type=notify-reload` protocol, which systemd >= 253 waits on), the
  reload itself, then `READY=1` again.
- `STOPPING=1` at stop, which also ends the watchdog (systemd then applies
  `TimeoutStopSec=` to the archive's drain instead).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping

__all__ = ["Notifier", "ServiceMonitor", "monotonic_usec", "watchdog_timeout_s"]

log = logging.getLogger(__name__)

#: the environment variables systemd hands a Type=notify service
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: what `MONOTONIC_USEC=` carries with `RELOADING=1`
    (systemd compares it with its own clock to match the reload to its request)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_timeout_s(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """The watchdog timeout systemd asks this process to honour, or None: the semantics of
    `sd_watchdog_enabled(3)` — `$WATCHDOG_USEC` a positive integer, and `$WATCHDOG_PID`,
    when set, this process's pid (otherwise the watchdog belongs to another process, e.g.
    a wrapper shell)."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 1e6


class Notifier:
    """Sends `sd_notify` messages to `$NOTIFY_SOCKET`; a no-op when there is none.

    A send that fails (systemd restarting, the socket gone) is logged once and not raised:
    notifying the service manager must never stop acquisition.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._sock: socket.socket | None = None
        self._target: str | bytes = ""
        self._lock = threading.Lock()
        self._warned = False
        if self.address is None:
            return
        if self.address.startswith("@"):  # abstract namespace: a leading NUL byte
            self._target = b"\0" + self.address[1:].encode()
        elif self.address.startswith("/"):
            self._target = self.address
        else:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket (@name); "
                        "not notifying systemd", self.address)
            self.address = None
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None
                     ) -> tuple[Notifier, float | None]:
        """A notifier and the watchdog timeout (s) from the environment, which it then
        clears (as `sd_notify(unset_environment=1)`): child processes — the adaptation
        trainer — must not talk to systemd for the daemon, nor inherit its watchdog."""
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET"))
        timeout = watchdog_timeout_s(env) if notifier.enabled else None
        for key in NOTIFY_ENV:
            env.pop(key, None)
        return notifier, timeout

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send `KEY=value` lines as one datagram (`notify(READY=1, STATUS="...")`); True if
        it was sent. Newlines inside a value would start a new assignment: they become
        spaces."""
        if self._sock is None:
            return False
        text = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items())
        with self._lock:
            try:
                self._sock.sendto(text.encode(), self._target)
            except OSError as exc:
                if not self._warned:
                    log.warning("cannot notify systemd at %s: %s", self.address,
                                exc.strerror or exc)
                    self._warned = True
                return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class ServiceMonitor:
    """Tells systemd how the run is doing (see the module docstring); one daemon thread.

    `ready()` says whether the first frame is safely stored; `progress()` counts frames
    stored (monotonic); `status()` is the one-line `STATUS=`; `reload()` re-reads the
    configuration and returns what it did (run on this thread, never on the pipeline's);
    `idle_ok()` says frames are not expected at all (acquisition paused on purpose), so
    their absence is no stall.
    """

    def __init__(self, notifier: Notifier, *, ready: Callable[[], bool],
                 progress: Callable[[], int], status: Callable[[], str],
                 watchdog_s: float | None = None, grace_s: float = 0.0,
                 status_every_s: float = 5.0,
                 reload: Callable[[], str] | None = None,
                 idle_ok: Callable[[], bool] | None = None) -> None:
        self.notifier = notifier
        self._ready_test = ready
        self._progress = progress
        self._status = status
        self._reload = reload
        #: True while no frames are expected at all (acquisition deliberately paused)
        self._idle_ok = idle_ok or (lambda: False)
        #: half the timeout: a ping that is late by a scheduling hiccup still arrives in time
        self.ping_every_s = watchdog_s / 2 if watchdog_s else None
        self.grace_s = grace_s
        self.status_every_s = (min(status_every_s, self.ping_every_s) if self.ping_every_s
                               else status_every_s)
        self.is_ready = False
        self.pings = 0
        self._stopping = threading.Event()
        self._reload_requested = threading.Event()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # -- called from the main thread ------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dimscope-service",
                                        daemon=True)
        self._thread.start()

    def request_reload(self) -> None:
        """Safe to call from a signal handler: sets a flag the monitor thread acts on."""
        self._reload_requested.set()
        self._wake.set()

    def stopping(self) -> None:
        """`STOPPING=1` now (before the drain): pings end, `STATUS=` goes on."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._send(STOPPING=1, STATUS=self._safe_status())
            self._wake.set()

    def close(self) -> None:
        self.stopping()
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)

    # -- the monitor thread ------------------------------------------------------------
    def _send(self, **fields: str | int) -> None:
        self.notifier.notify(**fields)

    def _safe_status(self) -> str:
        try:
            return self._status()
        except Exception as exc:  # a status line must never take the monitor down
            return f"status unavailable: {exc}"

    def _run(self) -> None:
        tick = min(0.1, (self.ping_every_s or 1.0) / 4)
        last_status = time.monotonic()
        last_ping = 0.0
        last_count = count_at_ping = self._progress()
        last_advance = time.monotonic()
        while not self._closed.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._closed.is_set():
                break
            now = time.monotonic()
            count = self._progress()
            if count != last_count:
                last_count, last_advance = count, now
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self._do_reload()
            running = not self._stopping.is_set()
            if running and not self.is_ready and self._ready_test():
                self.is_ready = True
                fields: dict[str, str | int] = {"READY": 1, "STATUS": self._safe_status()}
                if self.ping_every_s:
                    fields["WATCHDOG"] = 1
                    self.pings += 1
                self._send(**fields)
                last_status = last_ping = now
                count_at_ping = count
                continue
            due = bool(running and self.is_ready and self.ping_every_s
                       and now - last_ping >= self.ping_every_s)
            # Frames stored since the last ping, or an expected gap: otherwise no ping, and
            # systemd kills the service WatchdogSec after the last one.
            if due and (count != count_at_ping or now - last_advance <= self.grace_s
                        or self._idle_ok()):
                self._send(WATCHDOG=1)
                self.pings += 1
                last_ping, count_at_ping = now, count
            if now - last_status >= self.status_every_s:
                status = self._safe_status()
                idle_s = now - last_advance
                if (running and self.is_ready and not self._idle_ok()
                        and idle_s > max(self.grace_s, self.ping_every_s or 0.0)):
                    status = f"STALLED: no frame stored for {idle_s:.0f} s; {status}"
                self._send(STATUS=status)
                last_status = now

    def _do_reload(self) -> None:
        if self._reload is None:
            return
        if self._stopping.is_set():
            log.warning("reload requested while stopping: ignored")
            return
        # Before READY, a reload must not announce readiness: it just re-reads the config.
        announce = self.is_ready
        if announce:
            self._send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(),
                       STATUS="reloading the configuration")
        try:
            outcome = self._reload()
        except Exception as exc:  # a failed reload leaves the run as it was
            log.exception("reload failed; running on with the configuration loaded before")
            outcome = f"reload failed: {exc}"
        if announce:
            self._send(READY=1, STATUS=f"{outcome}; {self._safe_status()}")


def config_changes(old: Mapping[str, object], new: Mapping[str, object],
                   prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings (configs in JSON form);
    a list (e.g. `stages`) is compared whole."""
    changed: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed
