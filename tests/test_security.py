"""CURVE on the data streams, key files, and the fan-out relay (issue 13), over real sockets."""

from __future__ import annotations

import logging
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from dimscope.daemon.frame import Frame, freeze
from dimscope.daemon.publisher import PublishSocket, TopicSink
from dimscope.daemon.relay import Relay, UpstreamKeys
from dimscope.daemon.security import (
    CurveKeys,
    SecurityError,
    check_exposure,
    create_keys,
    curve_client,
)
from dimscope.daemon.wire import decode


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Key pairs: the daemon, an allowed viewer, a stranger; the allow-list folder."""
    folder, allowed = tmp_path / "keys", tmp_path / "allowed"
    out: dict[str, Path] = {"allowed": allowed}
    for name in ("daemon", "viewer", "stranger", "relay", "relay_server"):
        public, secret = create_keys(folder, name)
        out[name], out[f"{name}_secret"] = public, secret
    allowed.mkdir()
    for name in ("viewer", "relay"):
        (allowed / f"{name}.key").write_bytes(out[name].read_bytes())
    return out


def _frame(i: int) -> Frame:
    pixels = freeze(np.full((16, 16), i, np.uint16))
    return Frame(frame_id=i, pixels=pixels, acquired_unix_ns=time.time_ns(), exposure_ms=1.0,
                 pixel_size_um=0.1, source="test").marked("acquired")


def _subscriber(address: str, keys: tuple[Path, Path] | None = None) -> zmq.Socket[Any]:
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        curve_client(sock, *keys)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(address)
    return sock


def _publish_until_received(sink: TopicSink, subs: list[zmq.Socket[Any]], frames: int,
                            settle_s: float = 1.0) -> list[list[int]]:
    """Let subscriptions arrive, publish `frames` frames, collect what each socket got."""
    time.sleep(settle_s)
    for i in range(frames):
        sink.append(_frame(i))
    got: list[list[int]] = [[] for _ in subs]
    deadline = time.monotonic() + 3.0
    poller = zmq.Poller()
    for s in subs:
        poller.register(s, zmq.POLLIN)
    while time.monotonic() < deadline and any(len(g) < frames for g in got):
        for sock, _ in poller.poll(100):
            header, _ = decode(sock.recv_multipart())
            got[subs.index(sock)].append(header["frame_id"])
    return got


def test_key_pairs_are_written_once_with_a_private_secret(tmp_path: Path) -> None:
    public, secret = create_keys(tmp_path, "scope1")
    assert public.read_text().count("public-key") == 1 and "secret-key" in secret.read_text()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with pytest.raises(SecurityError, match="not overwritten"):
        create_keys(tmp_path, "scope1")
    cli = subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", "keys", str(tmp_path),
                          "--name", "viewer2"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and (tmp_path / "viewer2.key_secret").exists()


def test_curve_stream_reaches_only_allowed_keys_and_logs_strangers(
        keys: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dimscope.daemon.security")
    sock = PublishSocket("tcp://127.0.0.1:*", send_hwm=100, linger_ms=0,
                         curve=CurveKeys(keys["daemon_secret"], keys["allowed"]))
    curve = sock.curve
    assert curve is not None
    try:
        allowed = _subscriber(sock.endpoint, (keys["daemon"], keys["viewer_secret"]))
        stranger = _subscriber(sock.endpoint, (keys["daemon"], keys["stranger_secret"]))
        plain = _subscriber(sock.endpoint)  # no CURVE at all
        got = _publish_until_received(TopicSink("raw", sock), [allowed, stranger, plain], 20)
        assert got[0] == list(range(20))
        assert got[1] == [] and got[2] == []
        refusals = [r for r in caplog.records if "refused a client" in r.getMessage()]
        stranger_key = zmq.auth.load_certificate(str(keys["stranger"]))[0].decode()
        assert any(stranger_key in r.getMessage() for r in refusals)
        assert curve.allow.refused >= 1 and curve.allow.accepted >= 1
        for s in (allowed, stranger, plain):
            s.close(0)
    finally:
        sock.close()


def test_missing_keys_and_exposed_control_are_refused(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SecurityError, match="server_secret_key"):
        PublishSocket("tcp://127.0.0.1:*", 10, curve=CurveKeys(None, tmp_path))
    with pytest.raises(SecurityError, match="cannot read key file"):
        PublishSocket("tcp://127.0.0.1:*", 10,
                      curve=CurveKeys(tmp_path / "absent.key_secret", tmp_path))
    with pytest.raises(SecurityError, match="beyond loopback without CURVE"):
        check_exposure("tcp://0.0.0.0:5556", what="control", curve=False)
    check_exposure("tcp://127.0.0.1:5556", what="control", curve=False)
    caplog.set_level(logging.WARNING, logger="dimscope.daemon.security")
    check_exposure("tcp://0.0.0.0:5556", what="control", curve=False, insecure=True)
    check_exposure("tcp://*:5555", what="data", curve=False)
    assert "WITHOUT authentication" in caplog.text and "open to every host" in caplog.text


def _peer_connections(monitor: zmq.Socket[Any], wait_s: float) -> int:
    """Connections the monitored socket accepted (ZMQ_EVENT_ACCEPTED) within `wait_s`."""
    from zmq.utils.monitor import recv_monitor_message

    accepted, deadline = 0, time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if monitor.poll(50):
            event = recv_monitor_message(monitor)
            accepted += int(event["event"] == zmq.EVENT_ACCEPTED)
    return accepted


def test_relay_fans_out_to_50_viewers_while_the_daemon_sends_once(
        keys: dict[str, Path]) -> None:
    daemon = PublishSocket("tcp://127.0.0.1:*", send_hwm=1000, linger_ms=0,
                           curve=CurveKeys(keys["daemon_secret"], keys["allowed"]))
    monitor = daemon.monitor()
    relay_allowed = keys["allowed"].parent / "relay_allowed"
    relay_allowed.mkdir()
    (relay_allowed / "viewer.key").write_bytes(keys["viewer"].read_bytes())
    relay = Relay(daemon.endpoint, "tcp://127.0.0.1:*", send_hwm=1000,
                  upstream_keys=UpstreamKeys(keys["daemon"], keys["relay_secret"]),
                  curve=CurveKeys(keys["relay_server_secret"], relay_allowed)).start()
    viewers = [_subscriber(relay.endpoint, (keys["relay_server"], keys["viewer_secret"]))
               for _ in range(50)]
    try:
        got = _publish_until_received(TopicSink("enhanced", daemon), viewers, 30, settle_s=2.0)
        assert all(g == list(range(30)) for g in got), [len(g) for g in got]
        # The acquisition side served exactly one peer (the relay) and sent each message once.
        assert _peer_connections(monitor, 0.3) == 1
        stats = relay.stats()
        assert stats["upstream_msgs_in"] == 30 * 3  # 3 parts per message
        stranger = _subscriber(relay.endpoint, (keys["relay_server"], keys["stranger_secret"]))
        assert _publish_until_received(TopicSink("raw", daemon), [stranger], 5,
                                       settle_s=0.5) == [[]]
        stranger.close(0)
    finally:
        for v in viewers:
            v.close(0)
        relay.stop()
        monitor.close(0)
        daemon.close()


def test_a_daemon_with_curve_streams_serves_only_allowed_viewers(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    from dimscope.daemon.pipeline import Pipeline

    from .conftest import make_config

    cfg = make_config(tmp_path, engine={"name": "identity"}, publish={"curve": True},
                      security={"server_secret_key": str(keys["daemon_secret"]),
                                "allowed_clients": str(keys["allowed"])})
    pipeline = Pipeline(cfg)
    pipeline.start()
    try:
        endpoint = pipeline.publish_endpoint or ""
        from dimscope.daemon.client import Subscriber

        got = {}
        with Subscriber(endpoint, topics=["raw"], server_key=keys["daemon"],
                        client_key=keys["viewer_secret"]) as allowed, \
                Subscriber(endpoint, topics=["raw"]) as plain:
            got["allowed"] = sum(1 for _ in allowed.frames(count=20, timeout_s=3.0))
            got["plain"] = sum(1 for _ in plain.frames(count=1, timeout_s=1.0))
    finally:
        summary = pipeline.stop()
    assert got["allowed"] == 20 and got["plain"] == 0
    assert summary.acquired == summary.archived
    with pytest.raises(ValueError, match="both"):
        Subscriber(endpoint, server_key=keys["daemon"])
