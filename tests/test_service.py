"""Service operation: the systemd notify protocol on a real datagram socket, the watchdog
(pings while frames flow, none while the pipeline stalls), SIGHUP reload, /metrics scraped
over HTTP and parsed with prometheus_client's parser, JSON logs, and the unit file."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dimscope.daemon.service import (
    Notifier,
    ServiceMonitor,
    config_changes,
    watchdog_timeout_s,
)

from .conftest import REPO, make_config
from .procs import CLI, free_tcp_address, write_config

#: the test daemon's watchdog: pings every 1 s, systemd would kill after 2 s without one
WATCHDOG_S = 2.0


def _free_port() -> int:
    return int(free_tcp_address().rsplit(":", 1)[1])


def _messages(sock: socket.socket, until: float) -> list[tuple[float, dict[str, str]]]:
    """Datagrams received until `until` (monotonic), each parsed into its assignments."""
    out = []
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        out.append((time.monotonic(), dict(line.split("=", 1)
                                           for line in data.decode().splitlines())))
    return out


def _scrape(port: int) -> dict[str, Any]:
    """GET /metrics; {sample name + labels: value} and the family names."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples: dict[str, Any] = {"families": set()}
    for family in text_string_to_metric_families(text):
        samples["families"].add(family.name)
        for s in family.samples:
            key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()))
            samples[key] = s.value
    return samples


@dataclass
class Recording:
    """What one `dimscope run` under a fake systemd did."""

    messages: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    index_lines_at_ready: int = -1
    hup_at: float = 0.0
    term_at: float = 0.0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""
    returncode: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    #: (start, end) of the time live streaming was stopped from the control socket
    paused: tuple[float, float] = (0.0, 0.0)

    def times(self, key: str, value: str | None = None) -> list[float]:
        return [t for t, m in self.messages if key in m and (value is None or m[key] == value)]

    def first(self, key: str) -> dict[str, str]:
        return next(m for _, m in self.messages if key in m)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    """One run, recorded: notify socket bound here (a path), WATCHDOG_USEC 2 s, metrics on a
    free port, --log-json; SIGHUP after a config edit, then SIGTERM."""
    tmp = tmp_path_factory.mktemp("service")
    metrics_port = _free_port()
    control = free_tcp_address()
    body = ('[source]\nkind = "sim"\nwidth = 64\nheight = 64\nexposure_ms = 5.0\n'
            '[engine]\nname = "identity"\n'
            f'[archive]\nout_dir = "{tmp / "runs"}"\nfsync_every_s = 0\n'
            f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
            f'[publish]\naddress = "{free_tcp_address()}"\n'
            f'[control]\naddress = "{control}"\n')
    config = write_config(tmp / "dimscope.toml", body)
    rec = Recording()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp / "notify.sock"))
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp / "notify.sock"),
               "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))}
        env.pop("WATCHDOG_PID", None)
        stderr_path = tmp / "stderr.jsonl"
        with stderr_path.open("w") as err:
            proc = subprocess.Popen([*CLI, "run", "-c", str(config), "--log-json",
                                     "--summary-json", str(tmp / "summary.json")],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, env=env)
            try:
                deadline = time.monotonic() + 60
                while not rec.times("READY") and time.monotonic() < deadline:
                    rec.messages += _messages(sock, time.monotonic() + 0.05)
                    if rec.times("READY"):  # count the index the moment READY arrives
                        rec.run_dir = next((tmp / "runs").iterdir())
                        index = rec.run_dir / "index.jsonl"
                        rec.index_lines_at_ready = len(index.read_text().splitlines())
                    assert proc.poll() is None, stderr_path.read_text()
                assert rec.times("READY"), "no READY=1 within 60 s"
                rec.messages += _messages(sock, time.monotonic() + 2.5)
                rec.metrics.append(_scrape(metrics_port))
                # A change that needs a restart: the reload must say so and change nothing.
                write_config(config, body.replace("fsync_every_s = 0", "fsync_every_s = 1"))
                rec.hup_at = time.monotonic()
                proc.send_signal(signal.SIGHUP)
                rec.messages += _messages(sock, time.monotonic() + 2.5)
                rec.metrics.append(_scrape(metrics_port))
                # Live streaming stopped on purpose from the control socket: no frames for
                # longer than the watchdog timeout, and still no stall.
                from dimscope.daemon.client import ControlClient

                with ControlClient(control, timeout_s=20) as ctl:
                    ctl.stop()
                    rec.paused = (time.monotonic(), time.monotonic() + 2.5 * WATCHDOG_S)
                    rec.messages += _messages(sock, rec.paused[1])
                    ctl.start()
                rec.messages += _messages(sock, time.monotonic() + 1.0)
                rec.term_at = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                rec.messages += _messages(sock, time.monotonic() + 1.0)
                rec.returncode = proc.wait(timeout=60)
                rec.messages += _messages(sock, time.monotonic() + 0.1)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    rec.stderr = stderr_path.read_text()
    rec.summary = json.loads((tmp / "summary.json").read_text())
    return rec


def test_ready_is_sent_once_the_first_frame_is_archived(daemon: Recording) -> None:
    assert daemon.returncode == 0, daemon.stderr
    assert daemon.index_lines_at_ready >= 1
    ready = daemon.first("READY")
    assert ready["READY"] == "1" and "frames archived" in ready["STATUS"]
    # Nothing but STATUS (and no watchdog ping) before READY.
    before = [m for t, m in daemon.messages if t < daemon.times("READY")[0]]
    assert all(set(m) == {"STATUS"} for m in before), before


def test_status_lines_arrive_while_running(daemon: Recording) -> None:
    running = [m["STATUS"] for _, m in daemon.messages
               if m.get("STATUS", "").startswith("running:")]
    assert len(running) >= 3, daemon.messages
    assert "engine identity" in running[-1] and "lost 0" in running[-1]


def test_watchdog_pings_while_frames_flow(daemon: Recording) -> None:
    pings = daemon.times("WATCHDOG", "1")
    stop = daemon.times("STOPPING")[0]
    assert len(pings) >= 4, daemon.messages
    # Every interval is under the timeout systemd would enforce (half of it, plus slack).
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_S, gaps
    assert pings[-1] < stop and stop - pings[-1] < WATCHDOG_S


def test_watchdog_keeps_pinging_while_streaming_is_stopped_on_purpose(
        daemon: Recording) -> None:
    start, end = daemon.paused
    pings = [t for t in daemon.times("WATCHDOG") if start <= t <= end]
    assert len(pings) >= 3 and max(b - a for a, b in itertools.pairwise(pings)) \
        <= WATCHDOG_S
    assert not any("STALLED" in m.get("STATUS", "") for t, m in daemon.messages
                   if start + 0.5 <= t <= end)


def test_sigterm_sends_stopping_and_ends_the_pings(daemon: Recording) -> None:
    stopping = daemon.times("STOPPING", "1")
    assert len(stopping) == 1 and stopping[0] >= daemon.term_at
    assert not [t for t in daemon.times("WATCHDOG") if t > stopping[0]]


def test_sighup_reloads_and_answers_without_losing_a_frame(daemon: Recording) -> None:
    reloading = daemon.times("RELOADING", "1")
    assert len(reloading) == 1 and reloading[0] >= daemon.hup_at
    msg = daemon.first("RELOADING")
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 < now_usec - int(msg["MONOTONIC_USEC"]) < 60e6  # the same clock, recently
    readies = daemon.times("READY")
    assert len(readies) == 2 and readies[1] > reloading[0]
    answer = next(m for t, m in daemon.messages if t == readies[1])
    assert "archive.fsync_every_s" not in answer["STATUS"]  # named in the log instead
    assert "1 key(s) need a restart" in answer["STATUS"], answer
    logged = [json.loads(line) for line in daemon.stderr.splitlines()]
    restart = [r for r in logged if "needs_restart" in r]
    assert restart and restart[0]["needs_restart"] == ["archive.fsync_every_s"]
    assert restart[0]["level"] == "WARNING"
    # The run went on: every acquired frame archived, ids without a gap.
    s = daemon.summary
    assert s["acquired"] == s["archived"] > 0 and s["not_archived"] == []
    assert daemon.run_dir is not None
    ids = [json.loads(line)["frame_id"]
           for line in (daemon.run_dir / "index.jsonl").read_text().splitlines()]
    assert ids == list(range(s["acquired"]))


def test_metrics_scraped_over_http_during_the_run(daemon: Recording) -> None:
    first, second = daemon.metrics
    for family in ("dimscope_info", "dimscope_run_state", "dimscope_uptime_seconds",
                   "dimscope_frames_acquired", "dimscope_frames_archived",
                   "dimscope_frames_lost", "dimscope_stage_frames_received",
                   "dimscope_stage_frames_dropped", "dimscope_stage_queue_depth",
                   "dimscope_stage_queue_capacity", "dimscope_latency_window_seconds",
                   "dimscope_trust_alerts", "dimscope_engine_info", "process_cpu_seconds"):
        assert family in first["families"], (family, sorted(first["families"]))
    assert "dimscope_adaptation_info" not in first["families"]  # no adaptation: no family
    assert first["dimscope_run_state|dimscope_run_state=running"] == 1
    assert first["dimscope_engine_info|model_sha256=|name=identity|precision=exact|"
                 "runtime=numpy|scale=1|verified=true|version=1"] == 1
    assert 0 < first["dimscope_frames_acquired_total"] < second["dimscope_frames_acquired_total"]
    assert second["dimscope_frames_lost_total"] == 0
    assert second["dimscope_latency_window_seconds|quantile=0.99|topic=raw"] > 0
    for snap in daemon.metrics:  # each stage's counters add up (one frame may be in hand)
        for stage in ("archive", "engine", "publish_raw", "publish_enhanced"):
            def get(what: str, snap: dict[str, Any] = snap, stage: str = stage) -> float:
                return float(snap[f"dimscope_stage_{what}|stage={stage}"])

            unaccounted = (get("frames_received_total") - get("frames_passed_total")
                           - get("frames_dropped_total") - get("queue_depth"))
            assert 0 <= unaccounted <= 1, (stage, unaccounted)


def test_log_json_writes_one_json_object_per_line(daemon: Recording) -> None:
    lines = daemon.stderr.splitlines()
    assert len(lines) >= 4
    for line in lines:
        record = json.loads(line)
        assert {"ts", "level", "logger", "message"} <= set(record), record
        assert record["ts"].endswith("Z")
        assert datetime.fromisoformat(record["ts"]).utcoffset() is not None
    messages = [json.loads(line)["message"] for line in lines]
    assert any(m.startswith("dimscope 0.1.0: sim -> engine identity") for m in messages)
    assert any("SIGTERM received" in m for m in messages)
    finished = next(json.loads(line) for line in lines if "run finished" in line)
    assert finished["acquired"] == finished["archived"] == daemon.summary["acquired"]


# -- a stalled pipeline, in-process: the archive's disk hangs ------------------------------

def test_a_stalled_pipeline_stops_pinging_and_resumes_when_frames_flow(
        tmp_path: Path) -> None:
    from dimscope.daemon.cli import _first_frame_stored, _frames_stored, _ServiceStatus
    from dimscope.daemon.pipeline import Pipeline

    cfg = make_config(tmp_path, source={"kind": "sim", "width": 64, "height": 64,
                                        "exposure_ms": 10.0},
                      engine={"name": "identity"})
    pipeline = Pipeline(cfg)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        name = f"dimscope-test-{os.getpid()}-stall"
        sock.bind(b"\0" + name.encode())  # the abstract namespace: NOTIFY_SOCKET=@name
        monitor = ServiceMonitor(Notifier("@" + name),
                                 ready=lambda: _first_frame_stored(pipeline),
                                 progress=lambda: _frames_stored(pipeline),
                                 status=_ServiceStatus(pipeline), watchdog_s=0.6)
        monitor.start()
        pipeline.start()
        try:
            got = _messages(sock, time.monotonic() + 1.5)
            assert any("READY" in m for _, m in got)
            assert sum("WATCHDOG" in m for _, m in got) >= 3
            archive = pipeline.stage("archive")
            assert archive is not None
            gate = threading.Event()
            write = archive.process

            def hung_disk(frame: Any) -> None:
                gate.wait()  # a write that does not return: an NFS server gone, a dead disk
                write(frame)

            hung_at = time.monotonic()
            archive.process = hung_disk  # type: ignore[method-assign]
            stalled = _messages(sock, time.monotonic() + 2.0)
            gate.set()
            resumed = _messages(sock, time.monotonic() + 1.5)
        finally:
            gate.set()
            monitor.stopping()
            summary = pipeline.stop()
            monitor.close()
    late = [t for t, m in stalled if "WATCHDOG" in m]
    # At most the one ping whose frames were archived just before the hang.
    assert len(late) <= 1 and all(t - hung_at < 0.5 for t in late), (hung_at, stalled)
    assert any(m.get("STATUS", "").startswith("STALLED: no frame stored") for _, m in stalled)
    assert sum("WATCHDOG" in m for _, m in resumed) >= 2
    assert summary.acquired == summary.archived > 0 and summary.error is None


def test_watchdog_keeps_pinging_through_an_expected_gap() -> None:
    """A slow camera or an MDA interval is not a stall (`grace_s` covers it), and neither is
    acquisition paused on purpose (`idle_ok`)."""
    got: dict[str, list[tuple[float, dict[str, str]]]] = {}
    socks, monitors = [], []
    for kind in ("grace", "paused"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"dimscope-test-{os.getpid()}-{kind}"
        sock.bind(b"\0" + name.encode())
        socks.append(sock)
        monitors.append(ServiceMonitor(
            Notifier("@" + name), ready=lambda: True, progress=lambda: 1,
            status=lambda: "ok", watchdog_s=0.4, grace_s=1.0 if kind == "grace" else 0.0,
            idle_ok=(lambda: True) if kind == "paused" else None))
    for monitor in monitors:
        monitor.start()
    until = time.monotonic() + 2.0
    reader = threading.Thread(target=lambda: got.update(paused=_messages(socks[1], until)))
    reader.start()
    got["grace"] = _messages(socks[0], until)
    reader.join()
    for monitor, sock in zip(monitors, socks, strict=True):
        monitor.close()
        sock.close()
    pings = [t for t, m in got["grace"] if "WATCHDOG" in m]
    assert pings and pings[-1] - pings[0] > 0.6  # on for ~1 s of grace ...
    assert got["grace"][-1][0] - pings[-1] > 0.5  # ... then off
    assert any(m.get("STATUS", "").startswith("STALLED") for _, m in got["grace"])
    paused = [t for t, m in got["paused"] if "WATCHDOG" in m]
    assert len(paused) >= 6 and paused[-1] > until - 0.5, paused
    assert not any("STALLED" in m.get("STATUS", "") for _, m in got["paused"])


# -- /metrics: counters at the end, a port already taken -----------------------------------

def test_metrics_counters_add_up_at_the_end_and_the_port_is_freed(tmp_path: Path) -> None:
    from dimscope.daemon.pipeline import Pipeline
    from dimscope.daemon.prometheus import MetricsServer, PipelineCollector

    cfg = make_config(tmp_path, source={"kind": "sim", "width": 64, "height": 64,
                                        "exposure_ms": 5.0},
                      engine={"name": "identity", "budget_ms": 500.0})
    pipeline = Pipeline(cfg)
    server = MetricsServer("127.0.0.1:0", PipelineCollector(pipeline))
    try:
        with pytest.raises(OSError, match="cannot serve /metrics"):
            MetricsServer(f"127.0.0.1:{server.port}", PipelineCollector(pipeline))
        pipeline.start()
        pipeline.wait(duration_s=1.0)
        summary = pipeline.stop()
        m = _scrape(server.port)
    finally:
        server.close()
    assert m["dimscope_run_state|dimscope_run_state=finished"] == 1
    acquired = m["dimscope_frames_acquired_total"]
    assert acquired == summary.acquired == m["dimscope_frames_archived_total"] > 0
    assert m["dimscope_stage_frames_received_total|stage=archive"] == acquired
    assert m["dimscope_stage_frames_passed_total|stage=archive"] == acquired
    assert m["dimscope_frames_lost_total"] == 0 and m["dimscope_frames_not_archived"] == 0
    for stage in ("archive", "engine", "publish_raw", "publish_enhanced"):
        assert (m[f"dimscope_stage_frames_received_total|stage={stage}"]
                == m[f"dimscope_stage_frames_passed_total|stage={stage}"]
                + m[f"dimscope_stage_frames_dropped_total|stage={stage}"])
        assert m[f"dimscope_stage_queue_depth|stage={stage}"] == 0
    assert m["dimscope_budget_seconds|stage=engine"] == 0.5
    assert m["dimscope_budget_tier|stage=engine"] == 0
    assert "dimscope_budget_skipped_frames_total|stage=engine" in m
    with socket.socket() as s:  # closed: the port can be listened on again (a restart)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the scrape's TIME_WAIT
        s.bind(("127.0.0.1", server.port))
        s.listen()


def test_run_with_the_metrics_port_taken_is_bad_input(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "c.toml",
                              f'[metrics]\naddress = "127.0.0.1:{port}"\n'
                              f'[archive]\nout_dir = "{tmp_path / "runs"}"\n')
        result = subprocess.run([*CLI, "run", "-c", str(config), "--frames", "3", "-q"],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"metrics.address 127.0.0.1:{port}: cannot serve /metrics there" in result.stderr
    assert not (tmp_path / "runs").exists()  # refused before any run folder


@pytest.mark.parametrize(("address", "problem"), [
    ("9464", "expected HOST:PORT"), ("http://127.0.0.1:9464", "no scheme"),
    ("127.0.0.1:70000", "port must be 0-65535")])
def test_metrics_address_is_checked(address: str, problem: str) -> None:
    from dimscope.daemon.prometheus import parse_listen_address

    with pytest.raises(ValueError, match=problem):
        parse_listen_address(address)
    assert parse_listen_address("[::1]:9464") == ("::1", 9464)


def test_reload_applies_logging_and_metrics_live_and_names_the_rest(tmp_path: Path) -> None:
    import argparse

    from dimscope.daemon.cli import _Reloader, _use_json_logs, build_parser
    from dimscope.daemon.config import load_config
    from dimscope.daemon.logs import json_logs_enabled
    from dimscope.daemon.pipeline import Pipeline
    from dimscope.daemon.prometheus import MetricsServer, PipelineCollector

    old_port, new_port = _free_port(), _free_port()
    base = f'[archive]\nout_dir = "{tmp_path / "runs"}"\n'
    config = write_config(tmp_path / "c.toml",
                          base + f'[metrics]\naddress = "127.0.0.1:{old_port}"\n')
    args: argparse.Namespace = build_parser().parse_args(["run", "-c", str(config)])
    cfg = load_config(config)
    collector = PipelineCollector(Pipeline(cfg))
    reloader = _Reloader(args, cfg, collector, MetricsServer(cfg.metrics.address or "",
                                                             collector))
    publish = cfg.publish.address
    try:
        config.write_text("[source]\nkind = 'sim'\nwidth = 32\n" + base
                          + f'[metrics]\naddress = "127.0.0.1:{new_port}"\n'
                          + '[logging]\njson_logs = true\n'
                          + f'[publish]\naddress = "{publish}"\n')
        outcome = reloader()
        assert json_logs_enabled()
        assert "applied logging.json_logs, metrics.address" in outcome
        assert "1 key(s) need a restart" in outcome  # source.width
        assert "dimscope_run_state" in _scrape(new_port)["families"]
        with socket.socket() as s:  # the old address is free again
            s.bind(("127.0.0.1", old_port))
        config.write_text("[source]\nkind = 'nonsense'\n")
        assert "failed: invalid config, nothing changed" in reloader()
        assert reloader.metrics is not None and reloader.metrics.port == new_port
    finally:
        reloader.close()
        _use_json_logs(False)


# -- the protocol pieces -------------------------------------------------------------------

def test_notifier_sends_one_datagram_to_a_path_or_abstract_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as path_sock, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract_sock:
        path_sock.bind(str(tmp_path / "n.sock"))
        abstract_sock.bind(f"\0dimscope-test-{os.getpid()}".encode())
        for address, sock in ((str(tmp_path / "n.sock"), path_sock),
                              (f"@dimscope-test-{os.getpid()}", abstract_sock)):
            notifier = Notifier(address)
            assert notifier.notify(READY=1, STATUS="two\nlines")
            sock.settimeout(2)
            assert sock.recv(1024) == b"READY=1\nSTATUS=two lines"
            notifier.close()
    gone = Notifier(str(tmp_path / "nobody.sock"))  # nobody listening: logged, not raised
    assert gone.notify(WATCHDOG=1) is False


def test_without_notify_socket_everything_is_a_no_op() -> None:
    env = {"WATCHDOG_USEC": "1000000", "PATH": "/bin"}
    notifier, watchdog = Notifier.from_environ(env)
    assert not notifier.enabled and watchdog is None and notifier.notify(READY=1) is False
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    notifier, watchdog = Notifier.from_environ(env)
    assert notifier.enabled and watchdog == 1.0
    assert env == {}  # cleared: child processes must not notify for the daemon
    notifier.close()


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None), ({"WATCHDOG_USEC": "0"}, None), ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None), ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # someone else's watchdog
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 30.0)])
def test_watchdog_timeout_follows_sd_watchdog_enabled(env: dict[str, str],
                                                      expected: float | None) -> None:
    env = {k: v.replace("<self>", str(os.getpid())) for k, v in env.items()}
    assert watchdog_timeout_s(env) == expected


def test_config_changes_names_dotted_keys() -> None:
    old = {"archive": {"out_dir": "a", "rotate_gb": 4}, "stages": [], "logging": {"j": False}}
    new = {"archive": {"out_dir": "b", "rotate_gb": 4}, "stages": [{"x": 1}],
           "logging": {"j": False}}
    assert config_changes(old, new) == ["archive.out_dir", "stages"]


def test_json_formatter_carries_extras_and_tracebacks() -> None:
    from dimscope.daemon.logs import JsonFormatter

    try:
        raise RuntimeError("disk gone")
    except RuntimeError:
        record = logging.LogRecord("dimscope.x", logging.ERROR, __file__, 1, "lost %d", (3,),
                                   sys.exc_info())
    record.frames = [1, 2]
    out = json.loads(JsonFormatter().format(record))
    assert out["message"] == "lost 3" and out["level"] == "ERROR"
    assert out["logger"] == "dimscope.x" and out["frames"] == [1, 2]
    assert "RuntimeError: disk gone" in out["exc_info"]
    assert "\n" not in JsonFormatter().format(record)


# -- the unit file ---------------------------------------------------------------------------

def test_unit_file_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = (REPO / "systemd" / "dimscope.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure",
                 "ExecReload=/bin/kill -HUP $MAINPID", "TimeoutStopSec=120", "User=dimscope",
                 "ExecStart=/usr/local/bin/dimscope run -c /etc/dimscope/dimscope.toml "
                 "--log-json"):
        assert line in unit.splitlines(), line
    directives = {line.split("=", 1)[0] for line in unit.splitlines()
                  if "=" in line and not line.startswith("#")}
    # Each of these would hide the camera's, frame grabber's or GPU's device nodes.
    assert not directives & {"PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"}
    # verify insists that ExecStart's program exists: point it at this checkout's dimscope.
    here = shutil.which("dimscope", path=str(Path(sys.executable).parent))
    if here is None:
        pytest.skip("the dimscope script is not installed beside this Python")
    (tmp_path / "dimscope.service").write_text(unit.replace("/usr/local/bin/dimscope", here))
    result = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "dimscope.service")],
                            capture_output=True, text=True, timeout=60)
    # Unknown or misspelt keys are only warnings (exit 0): any output is a failure too.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
