"""The control socket and `dimscope ctl` (issue 13), over real sockets on a real run: each
command round trip; a setting holds from the frame id recorded for it (events.jsonl, and
index.jsonl's exposure); an engine swap mid-run loses no raw frame; bad requests change
nothing; the default port falls back; exposure rules; CURVE allow-list."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from dimscope.daemon.archive import read_index
from dimscope.daemon.client import (
    ControlClient,
    ControlError,
    ControlRefused,
    ControlUnreachable,
    Recorder,
)
from dimscope.daemon.control import DEFAULT_ADDRESS, EVENTS_FILE
from dimscope.daemon.pipeline import Pipeline
from dimscope.daemon.security import SecurityError, create_keys

from .conftest import REPO, make_config
from .procs import CLI, dimscope, free_tcp_address, write_config

ANY_PORT = "tcp://127.0.0.1:*"
SCHEMA = "dimscope.control/1"


def _running(tmp_path: Path, control: dict[str, Any] | None = None, **sections: Any
             ) -> Pipeline:
    cfg = make_config(tmp_path, engine={"name": "identity"},
                      control={"address": ANY_PORT, **(control or {})}, **sections)
    pipeline = Pipeline(cfg)
    pipeline.start()
    return pipeline


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    p = _running(tmp_path)
    yield p
    if p.control is not None or p.state != "finished":
        p.stop()


def _wait_for(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _frames_past(p: Pipeline, frame_id: int) -> None:
    _wait_for(lambda: p.summary().archived > frame_id + 5, what=f"frames past {frame_id}")


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / EVENTS_FILE).read_text().splitlines()]


def test_every_command_round_trips_and_each_change_holds_from_its_recorded_frame(
        pipeline: Pipeline) -> None:
    p = pipeline
    assert p.control_endpoint is not None
    with ControlClient(p.control_endpoint, timeout_s=10) as ctl:
        _frames_past(p, 10)
        status = ctl.status()
        assert status["state"] == "running" and status["acquisition"] == "streaming"
        assert status["frames"]["acquired"] >= 10 and status["engine"]["name"] == "identity"
        assert status["settings"] == {"exposure_ms": 5.0, "laser_power": 1.0}
        assert status["events"] == 1 and status["control_address"] == p.control_endpoint
        assert "stages" in ctl.status(full=True)["summary"]
        assert ctl.get("exposure")["value"] == 5.0
        laser = ctl.get("laser_power")
        assert (laser["device"], laser["property"], laser["limits"]) == ("SimLaser", "Power",
                                                                         [0.0, 1.0])
        assert ctl.get(device="SimCamera", property="ReadNoise-e")["read_only"] is True

        exposure = ctl.set("exposure", 8)
        assert exposure["value"] == 8.0 and exposure["sequence_restarted"] is True
        _frames_past(p, exposure["from_frame_id"])
        laser_set = ctl.set("laser_power", 0.5)
        assert laser_set["value"] == 0.5 and laser_set["sequence_restarted"] is False
        # The camera kept streaming: the frame it was exposing straddles the change.
        assert laser_set["from_frame_id"] == laser_set["next_frame_id"] + 1
        _frames_past(p, laser_set["from_frame_id"])
        by_device = ctl.set(device="SimLaser", property="Power", value="0.25")  # text: typed
        assert by_device["value"] == 0.25 and by_device["previous"] == 0.5
        _frames_past(p, by_device["from_frame_id"])
        with pytest.raises(ControlError, match=r"outside its limits \[0, 1\]") as err:
            ctl.set("laser_power", 2)
        assert err.value.code == "invalid"
        with pytest.raises(ControlError, match="is read-only"):
            ctl.set(device="SimCamera", property="ReadNoise-e", value=2)

        with pytest.raises(ControlError, match="runs only while live streaming is stopped"):
            ctl.mda({"time_plan": {"interval": 0.01, "loops": 3}})
        with pytest.raises(ControlError, match="snap takes a single frame"):
            ctl.snap()
        stopped = ctl.stop()
        assert ctl.status()["acquisition"] == "stopped"
        time.sleep(0.2)
        assert p.summary().acquired == stopped["next_frame_id"]  # nothing while stopped
        snap = ctl.snap()
        assert snap["frame_id"] == stopped["next_frame_id"] and snap["exposure_ms"] == 8.0
        mda = ctl.mda({"time_plan": {"interval": 0.01, "loops": 3}})
        assert mda["planned"] == 3 and mda["from_frame_id"] == snap["frame_id"] + 1
        _wait_for(lambda: ctl.status()["acquisition"] == "stopped", what="the MDA to end")
        assert ctl.status()["mda"]["frames"] == 3
        started = ctl.start()
        assert started["from_frame_id"] == mda["from_frame_id"] + 3
        _frames_past(p, started["from_frame_id"])
        assert ctl.status()["events"] == 12  # run.start + every change, refused ones too

    summary = p.stop()
    assert summary.error is None and summary.acquired == summary.archived
    assert summary.control_address == p.control_endpoint
    run_dir = Path(summary.run_dir or "")
    events = _events(run_dir)
    assert [e["command"] for e in events] == [
        "run.start", "set", "set", "set", "set", "set", "mda.run", "snap",
        "acquisition.stop", "snap", "mda.run", "acquisition.start"]
    assert all(e["schema"] == "dimscope.events/1" and "time" in e for e in events)
    assert [e["ok"] for e in events[1:6]] == [True, True, True, False, False]
    assert events[1]["from_frame_id"] == exposure["from_frame_id"]
    assert events[4]["error"]["code"] == "invalid" and events[1]["client"]["peer"]
    # index.jsonl says which frames were taken with which exposure: 5 ms until the
    # recorded frame, 8 ms from it on (the camera's own tag for each frame).
    index = {e["frame_id"]: e for e in read_index(run_dir)[0]}
    assert len(index) == summary.acquired
    cut = exposure["from_frame_id"]
    assert {e["exposure_ms"] for i, e in index.items() if i < cut} == {5.0}
    assert {e["exposure_ms"] for i, e in index.items() if i >= cut} == {8.0}
    # The laser change holds from its frame: the simulated signal per ms halves there.
    def per_ms(i: int) -> float:
        md = index[i]["metadata"]
        return float(md["SimPhotonsPeak"]) / float(index[i]["exposure_ms"])
    cut = laser_set["from_frame_id"]
    assert per_ms(cut) == pytest.approx(0.5 * per_ms(cut - 2), rel=0.01)
    assert per_ms(cut + 3) == pytest.approx(per_ms(cut), rel=0.01)
    assert index[snap["frame_id"]]["metadata"]["Snap"] == "1"
    assert [index[mda["from_frame_id"] + t]["mda_index"]["t"] for t in range(3)] == [0, 1, 2]


def test_engine_swap_mid_run_loses_no_raw_frame_and_a_failing_engine_changes_nothing(
        pipeline: Pipeline) -> None:
    p = pipeline
    recorder = Recorder(p.publish_endpoint or "", ["enhanced"])
    with ControlClient(p.control_endpoint or "", timeout_s=20) as ctl:
        _frames_past(p, 20)
        before = ctl.status(full=True)["summary"]["stages"]["engine"]
        swap = ctl.engine("vst_gaussian", budget_ms=200)
        assert swap["replaced"] == "identity" and swap["engine"] == "vst_gaussian"
        _frames_past(p, swap["from_frame_id"] + 10)
        after = ctl.status(full=True)
        engine = after["summary"]["stages"]["engine"]
        assert engine["received"] > before["received"]
        assert engine["errors"] == 0 and after["engine"]["name"] == "vst_gaussian"
        assert after["engine"]["budget_ms"] == 200 and after["engine"]["changes"] == 1
        # A new engine that cannot load: the reply says why, the one in service stays.
        with pytest.raises(ControlError, match="vst_gaussian stays in service") as err:
            ctl.engine("model", model="/nonexistent/model.onnx")
        assert err.value.code == "failed"
        with pytest.raises(ControlError, match=r"adapt: .* not a model engine"):
            ctl.engine("identity", adapt=True)
        budget = ctl.engine(budget_ms=0)  # budget only: no new engine
        assert "engine" not in budget and budget["budget_ms"] is None
        enhanced = ctl.status()["frames"]["enhanced"]
        _frames_past(p, p.summary().acquired + 5)
        still = ctl.status()
        assert still["engine"]["name"] == "vst_gaussian" and still["engine"]["changes"] == 1
        assert still["frames"]["enhanced"] > enhanced
    summary = p.stop()
    received = recorder.close()
    assert summary.error is None and summary.acquired == summary.archived > 0
    assert summary.stages["engine"].errors == 0
    engines = {h["frame_id"]: h["engine"]["name"] for _, h, _ in received}
    cut = swap["from_frame_id"]
    assert engines and {n for i, n in engines.items() if i >= cut} == {"vst_gaussian"}
    assert {n for i, n in engines.items() if i < cut} <= {"identity"}
    assert sum(i < cut for i in engines) > 0
    assert summary.engine == "vst_gaussian" and summary.engine_info is not None
    assert summary.engine_info.name == "vst_gaussian"


def test_engine_set_turns_live_adaptation_on_and_off(pipeline: Pipeline) -> None:
    pytest.importorskip("torch")
    p = pipeline
    with ControlClient(p.control_endpoint or "", timeout_s=20) as ctl:
        _frames_past(p, 5)
        on = ctl.engine("denoise", adapt=True)
        assert on["engine"] == "denoise" and on["adapting"] is True
        assert ctl.status()["engine"]["adaptation"]["on"] is True
        _frames_past(p, on["from_frame_id"] + 20)
        off = ctl.engine(adapt=False)
        assert off["adapting"] is False and "engine" not in off
        adaptation = ctl.status()["engine"]["adaptation"]
        assert adaptation["on"] is False and "turned off" in adaptation["error"]
        assert ctl.status()["engine"]["name"] == "denoise"  # the model in service stays
    summary = p.stop()
    assert summary.error is None and summary.acquired == summary.archived
    assert summary.stages["engine"].adapt_frames_used is not None


def test_micro_manager_properties_are_checked_against_the_real_core(tmp_path: Path) -> None:
    """The C++ DemoCamera: allowed values, limits, types; a binning change holds from its
    frame (the archive starts a new file at the new frame size)."""
    pytest.importorskip("mm_test_adapters")
    import tomllib

    from dimscope.daemon.config import parse_config

    data = tomllib.loads((REPO / "configs" / "democam.toml").read_text())
    data.update(archive={"out_dir": str(tmp_path / "runs"), "fsync_every_s": 0},
                publish={"address": ANY_PORT}, control={"address": ANY_PORT},
                engine={"name": "identity"})
    p = Pipeline(parse_config(data, base_dir=REPO / "configs"))
    p.start()
    try:
        with ControlClient(p.control_endpoint or "", timeout_s=10) as ctl:
            mode = ctl.get(device="Camera", property="Mode")
            assert mode["type"] == "string" and "Color Test Pattern" in mode["allowed"]
            gain = ctl.get(device="Camera", property="Gain")
            assert gain["type"] == "integer" and gain["limits"] == [-5.0, 8.0]
            with pytest.raises(ControlError, match=r"Camera/Binning = 3 is not allowed; "
                                                   r"allowed: 1, 2, 4, 8"):
                ctl.set(device="Camera", property="Binning", value=3)
            with pytest.raises(ControlError, match=r"outside its limits \[-5, 8\]"):
                ctl.set(device="Camera", property="Gain", value=99)
            with pytest.raises(ControlError, match="takes an integer"):
                ctl.set(device="Camera", property="Gain", value=1.5)
            with pytest.raises(ControlError, match="no device/property mapping") as err:
                ctl.set("laser_power", 0.5)
            assert err.value.code == "unsupported"
            assert ctl.set(device="Camera", property="Gain", value="2")["value"] == 2
            _frames_past(p, 5)
            binned = ctl.set(device="Camera", property="Binning", value=2.0)
            assert binned["value"] == 2 and binned["sequence_restarted"] is True
            _frames_past(p, binned["from_frame_id"] + 3)
    finally:
        summary = p.stop()
    assert summary.error is None and summary.acquired == summary.archived
    shapes = {e["frame_id"]: tuple(e["shape"]) for e in read_index(Path(summary.run_dir or ""))[0]}
    cut = binned["from_frame_id"]
    assert {s for i, s in shapes.items() if i < cut} == {(512, 512)}
    assert {s for i, s in shapes.items() if i >= cut} == {(256, 256)}


def _raw_request(sock: zmq.Socket[Any], payload: bytes | list[bytes], wait_s: float = 5.0
                 ) -> dict[str, Any] | None:
    sock.send_multipart([b"", *(payload if isinstance(payload, list) else [payload])])
    if not sock.poll(int(wait_s * 1000)):
        return None
    reply: dict[str, Any] = json.loads(sock.recv_multipart()[-1])
    return reply


@pytest.mark.parametrize("kind", ["dealer", "req"])
def test_bad_requests_get_an_error_reply_naming_the_problem_and_change_nothing(
        tmp_path: Path, kind: str) -> None:
    p = _running(tmp_path, control={"max_message_bytes": 2048})
    try:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(p.control_endpoint or "")
        if kind == "req":  # a plain REQ socket works too: the envelope is the same
            req = zmq.Context.instance().socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(p.control_endpoint or "")
            req.send(json.dumps({"schema": SCHEMA, "id": 7, "command": "status"}).encode())
            assert req.poll(5000)
            reply = json.loads(req.recv())
            assert reply["ok"] and reply["id"] == 7 and reply["schema"] == SCHEMA
            req.close(0)
        with ControlClient(p.control_endpoint or "") as ctl:
            before = ctl.status()
        cases: list[tuple[bytes | list[bytes], str, str]] = [
            (b"{not json", "malformed", "not UTF-8 JSON"),
            (b"\xff\xfe", "malformed", "not UTF-8 JSON"),
            (b"[1, 2]", "malformed", "a request is a JSON object"),
            (b'{"command": "status"}', "schema", "schema must be 'dimscope.control/1'"),
            (json.dumps({"schema": "dimscope.control/9", "command": "status"}).encode(),
             "schema", "got 'dimscope.control/9'"),
            (json.dumps({"schema": SCHEMA, "id": "a", "command": "explode"}).encode(),
             "unknown_command", "unknown command 'explode'"),
            (json.dumps({"schema": SCHEMA, "id": "b", "command": "set", "name": "exposure",
                         "value": "long"}).encode(), "invalid", "exposure needs a finite"),
            (json.dumps({"schema": SCHEMA, "id": "c", "command": "set", "name": "exposure",
                         "value": -3}).encode(), "invalid", "exposure must be > 0"),
            (json.dumps({"schema": SCHEMA, "id": "d", "command": "set", "name": "gain",
                         "value": 1}).encode(), "invalid", "name: Input should be"),
            (json.dumps({"schema": SCHEMA, "id": "e", "command": "set", "name": "exposure",
                         "value": 9, "when": "now"}).encode(), "invalid", "when: unknown field"),
            (json.dumps({"schema": SCHEMA, "id": [1], "command": "status"}).encode(),
             "invalid", "id: "),
            (json.dumps({"schema": SCHEMA, "id": "f", "command": "engine.set",
                         "budget_ms": "fast"}).encode(), "invalid", "budget_ms"),
            (json.dumps({"schema": SCHEMA, "id": "g", "command": "set", "device": "SimLaser",
                         "property": "Power", "value": "bright"}).encode(), "invalid",
             "SimLaser/Power takes a number"),
            (json.dumps({"schema": SCHEMA, "id": "h", "command": "get", "device": "Nope",
                         "property": "X"}).encode(), "invalid", "no device 'Nope'; loaded: "),
            ([b'{"a": 1}', b"second part"], "malformed", "one message part"),
            # Over max_message_bytes (2048) but under ZeroMQ's hard limit (16x): a reply.
            (json.dumps({"schema": SCHEMA, "id": "i", "command": "status",
                         "pad": "x" * 4000}).encode(), "too_large", "over control."
             "max_message_bytes = 2048"),
        ]
        for payload, code, words in cases:
            reply = _raw_request(sock, payload)
            assert reply is not None, payload
            assert reply["ok"] is False and reply["schema"] == SCHEMA, reply
            assert reply["error"]["code"] == code and words in reply["error"]["message"], reply
            assert "result" not in reply
        assert _raw_request(sock, cases[5][0])["id"] == "a"  # type: ignore[index]
        # Far over the limit: ZeroMQ drops the connection before reading it (memory stays
        # bounded), so no reply at all; the DEALER reconnects by itself and works again.
        huge = json.dumps({"schema": SCHEMA, "id": "j", "command": "status",
                           "pad": "x" * (16 * 2048 + 10)}).encode()
        assert _raw_request(sock, huge, wait_s=1.0) is None
        again = _raw_request(sock, json.dumps({"schema": SCHEMA, "id": "k",
                                               "command": "status"}).encode())
        assert again is not None and again["ok"] and again["id"] == "k"
        sock.close(0)
        with ControlClient(p.control_endpoint or "") as ctl:
            after = ctl.status()
        assert after["settings"] == before["settings"]
        assert after["engine"]["changes"] == 0 and after["acquisition"] == "streaming"
        assert after["requests"]["refused"] >= len(cases) - 1
    finally:
        summary = p.stop()
    assert summary.acquired == summary.archived
    # Only the attempt that reached the device checks is in the event log, as refused.
    events = _events(Path(summary.run_dir or ""))
    assert [(e["command"], e["ok"]) for e in events] == [("run.start", True), ("set", False)]
    assert "SimLaser/Power takes a number" in events[1]["error"]["message"]


def test_default_port_taken_falls_back_to_a_free_one_and_control_json_says_which(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = socket.socket()
    try:  # another daemon may already hold it: then it is taken either way
        blocker.bind(("127.0.0.1", int(DEFAULT_ADDRESS.rsplit(":", 1)[1])))
        blocker.listen()
    except OSError:
        pass
    caplog.set_level(logging.WARNING, logger="dimscope.daemon.control")
    try:
        p = _running(tmp_path, control={"address": None})
        try:
            endpoint = p.control_endpoint or ""
            assert endpoint != DEFAULT_ADDRESS and endpoint.startswith("tcp://127.0.0.1:")
            info = json.loads((Path(p.run_dir or "") / "control.json").read_text())
            assert info["address"] == endpoint and info["fallback"] is True
            assert "5556 is taken" in caplog.text and endpoint in caplog.text
            with ControlClient.for_run(p.run_dir or "") as ctl:
                assert ctl.status()["control_address"] == endpoint
        finally:
            p.stop()
    finally:
        blocker.close()
    # A configured address that cannot be bound is a startup error: no run folder.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = tmp_path / "second"
        cfg = make_config(out, control={"address": f"tcp://127.0.0.1:{taken.getsockname()[1]}"})
        with pytest.raises(OSError, match="cannot bind the control socket"):
            Pipeline(cfg).start()
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())


def test_control_beyond_loopback_needs_curve_unless_insecure(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_config(tmp_path, control={"address": "tcp://0.0.0.0:*"})
    with pytest.raises(SecurityError, match="beyond loopback without CURVE"):
        Pipeline(cfg).start()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    caplog.set_level(logging.WARNING, logger="dimscope.daemon.security")
    p = _running(tmp_path, control={"address": "tcp://0.0.0.0:*", "insecure": True})
    try:
        assert "WITHOUT authentication" in caplog.text
        port = (p.control_endpoint or "").rsplit(":", 1)[1]
        with ControlClient(f"tcp://127.0.0.1:{port}") as ctl:
            assert ctl.status()["state"] == "running"
    finally:
        p.stop()


def test_curve_control_answers_only_allowed_keys_and_logs_a_refused_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    server, _ = create_keys(keys, "daemon")
    alice, alice_secret = create_keys(keys, "alice")
    _, mallory_secret = create_keys(keys, "mallory")
    allowed.mkdir()
    (allowed / "alice.key").write_bytes(alice.read_bytes())
    caplog.set_level(logging.WARNING, logger="dimscope.daemon.security")
    p = _running(tmp_path, control={"curve": True},
                 security={"server_secret_key": str(keys / "daemon.key_secret"),
                           "allowed_clients": str(allowed)})
    try:
        endpoint = p.control_endpoint or ""
        # No CURVE at all: the handshake never completes, nothing comes back.
        plain = zmq.Context.instance().socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(endpoint)
        assert _raw_request(plain, json.dumps({"schema": SCHEMA, "command": "status"}).encode(),
                            wait_s=1.0) is None
        plain.close(0)
        with pytest.raises(ControlUnreachable, match="requires CURVE"), \
                ControlClient(endpoint, timeout_s=1.0) as no_keys:
            no_keys.status()
        # An allowed key works, and the event log names the client by its key file.
        with ControlClient(endpoint, server_key=server, client_key=alice_secret) as ctl:
            assert ctl.status()["curve"] is True
            assert ctl.set("exposure", 6)["value"] == 6.0
        # A key not in the allow-list is refused during the handshake, and logged.
        with pytest.raises(ControlRefused, match="not in the daemon's allow-list"), \
                ControlClient(endpoint, timeout_s=3.0, server_key=server,
                              client_key=mallory_secret) as stranger:
            stranger.status()
        refusals = [r for r in caplog.records if r.name == "dimscope.daemon.security"
                    and "refused a client with an unknown public key" in r.getMessage()]
        assert refusals
        info = json.loads((Path(p.run_dir or "") / "control.json").read_text())
        assert info["curve"] is True and info["server_public_key"] in server.read_text()
    finally:
        summary = p.stop()
    events = _events(Path(summary.run_dir or ""))
    assert events[-1]["command"] == "set" and events[-1]["client"]["name"] == "alice"
    assert len(events) == 2


def test_ctl_cli_drives_a_running_daemon(tmp_path: Path) -> None:
    address = free_tcp_address()
    config = write_config(tmp_path / "c.toml", (
        '[source]\nkind = "sim"\nwidth = 96\nheight = 64\nexposure_ms = 10\n'
        f'[engine]\nname = "identity"\n[control]\naddress = "{address}"\n'))
    summary_path = tmp_path / "s.json"
    daemon = subprocess.Popen([*CLI, "run", "-c", str(config), "--duration", "60", "--out",
                               str(tmp_path / "runs"), "-q", "--summary-json",
                               str(summary_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    ctl = ("ctl", "--address", address)
    try:
        with ControlClient(address, timeout_s=0.5) as probe:
            _wait_for(lambda: _answers(probe), timeout_s=30, what="the daemon to answer")
        status = dimscope(*ctl, "status")
        assert status.returncode == 0 and "acquisition streaming" in status.stdout
        as_json = dimscope(*ctl, "status", "--json")
        assert json.loads(as_json.stdout)["frames"]["acquired"] > 0
        changed = dimscope(*ctl, "set", "exposure", "20")
        assert changed.returncode == 0 and "exposure = 20 ms (was 10 ms) from frame" in \
            changed.stdout, changed.stderr
        assert dimscope(*ctl, "get", "exposure").stdout.strip() == "exposure = 20 ms"
        refused = dimscope(*ctl, "set", "laser_power", "5")
        assert refused.returncode == 1 and "outside its limits [0, 1]" in refused.stderr
        usage = dimscope(*ctl, "set", "brightness", "5")
        assert usage.returncode == 2 and "unknown setting 'brightness'" in usage.stderr
        engine = dimscope(*ctl, "engine", "vst_gaussian", "--budget-ms", "50")
        assert engine.returncode == 0 and "engine vst_gaussian" in engine.stdout
        assert dimscope(*ctl, "stop").returncode == 0
        plan = tmp_path / "plan.yaml"
        plan.write_text("time_plan:\n  interval: 0.01\n  loops: 3\n")
        mda = dimscope(*ctl, "mda", str(plan))
        assert mda.returncode == 0 and "3 frame(s)" in mda.stdout, mda.stderr
        # SIGINT as a terminal gives it (a disposition of "ignore" inherited from whatever
        # started the suite would make Python never raise KeyboardInterrupt)
        watch = subprocess.Popen([*CLI, *ctl, "status", "--watch", "--interval", "0.2"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                  signal.SIG_DFL))
        assert watch.stdout is not None
        first = watch.stdout.readline()  # drawing: imported and connected (slow under load)
        time.sleep(1.6)
        watch.send_signal(signal.SIGINT)
        out, _ = watch.communicate(timeout=20)
        out = first + out
        assert watch.returncode == 0 and out.count("\x1b[2K") >= 8 and "\x1b[" in out
        assert dimscope(*ctl, "start").returncode == 0
        nobody = dimscope("ctl", "--address", free_tcp_address(), "--timeout", "0.5", "status")
        assert nobody.returncode == 2 and "no daemon answered" in nobody.stderr
    finally:
        daemon.send_signal(signal.SIGINT)
        daemon.communicate(timeout=60)
    assert daemon.returncode == 0
    summary = json.loads(summary_path.read_text())
    assert summary["acquired"] == summary["archived"] and summary["control_address"] == address
    index = read_index(Path(summary["run_dir"]))[0]
    assert index[0]["exposure_ms"] == 10.0 and index[-1]["exposure_ms"] == 20.0
    commands = [e["command"] for e in _events(Path(summary["run_dir"]))]
    assert commands == ["run.start", "set", "set", "engine.set", "acquisition.stop", "mda.run",
                        "acquisition.start"]


def _answers(client: ControlClient) -> bool:
    try:
        client.status()
        return True
    except ControlUnreachable:
        return False
