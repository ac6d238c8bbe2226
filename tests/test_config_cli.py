"""Configs round-trip; bad input gets an error naming the file, the key and the expectation."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dimscope.daemon.config import Config, ConfigError, load_config, parse_config

from .conftest import REPO


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", ["sim", "democam", "replay", "fulldose", "lowdose"])
def test_shipped_configs_validate_and_round_trip(name: str) -> None:
    if name == "democam":
        pytest.importorskip("mm_test_adapters")
    if name == "replay" and not (REPO.parent / "shared" / "data").is_dir():
        pytest.skip("replay.toml points at ../shared/data, which is absent")
    cfg = load_config(REPO / "configs" / f"{name}.toml")
    again = Config.model_validate(json.loads(cfg.model_dump_json()))
    assert again == cfg


def test_sim_toml_documents_exactly_the_defaults() -> None:
    data = tomllib.loads((REPO / "configs" / "sim.toml").read_text())
    assert parse_config(data) == Config()


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(Exception, match="frozen"):
        cfg.engine.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(("text", "expected"), [
    ('[source]\nkind = "sim"\nexposur_ms = 3\n', "source.exposur_ms: unknown key"),
    ('[source]\nkind = "sim"\nwidth = "big"\n', "source.width: Input should be a valid integer"),
    ('[source]\nkind = "laser"\n', "source.kind must be one of 'sim', 'mm', 'replay'"),
    ('[engine]\nname = "magic"\n',
     "engine.name: unknown engine 'magic'; available: bm3d, bm4d, denoise"),
    ('[publish]\naddress = "localhost:5555"\n', "publish.address: expected a ZeroMQ endpoint"),
    ('[archive]\nqueue_frames = 0\n', "archive.queue_frames: Input should be greater than"),
    ('[source]\nkind = "mm"\nconfig_file = "missing.cfg"\n',
     "Micro-Manager config file 'missing.cfg' not found"),
    ('[source]\nkind = "replay"\npath = "nope.tif"\n', "source.path: recording"),
    ('[source\nkind = "sim"\n', "not valid TOML"),
])
def test_bad_config_errors_name_file_key_and_expectation(tmp_path: Path, text: str,
                                                          expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message
    result = _cli("check-config", str(path))
    assert result.returncode == 2 and expected in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = _cli("run", "-c", str(tmp_path / "absent.toml"), "--frames", "1")
    assert result.returncode == 2
    assert "absent.toml: cannot read config file" in result.stderr


def test_unknown_engine_on_command_line(tmp_path: Path) -> None:
    result = _cli("run", "--engine", "turbo", "--frames", "1", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "unknown engine 'turbo'" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing started, nothing half-written


def test_cli_run_writes_summary_json_and_subscribe_saves(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[source]\nkind = "sim"\nwidth = 96\nheight = 64\nexposure_ms = 5.0\n'
                   f'[publish]\naddress = "{address}"\n[engine]\nname = "vst_gaussian"\n')
    saved = tmp_path / "enh.tif"
    sub = subprocess.Popen([sys.executable, "-m", "dimscope.daemon.cli", "subscribe",
                            "--address", address, "--topic", "enhanced", "--count", "10",
                            "--save", str(saved), "--timeout", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    summary_path = tmp_path / "summary.json"
    run = _cli("run", "-c", str(cfg), "--duration", "3", "--out", str(tmp_path / "runs"),
               "--summary-json", str(summary_path))
    out, err = sub.communicate(timeout=60)
    assert run.returncode == 0, run.stderr
    assert "== dimscope run summary ==" in run.stdout and "archive:" in run.stdout
    summary = json.loads(summary_path.read_text())
    for key in ("acquired", "archived", "run_dir", "stages", "latency_ms"):
        assert key in summary
    assert summary["acquired"] == summary["archived"] > 0
    assert {"acquisition", "archive", "engine", "publish_raw", "publish_enhanced"} <= set(
        summary["stages"])
    assert sub.returncode == 0, err
    assert out.count("enhanced  frame") == 10
    import tifffile

    stack = tifffile.imread(saved)
    ids = json.loads(Path(str(saved) + ".frames.json").read_text())
    assert stack.shape == (10, 64, 96) and len(ids) == 10
    assert all(i["topic"] == "enhanced" for i in ids)
    assert [i["frame_id"] for i in ids] == sorted(i["frame_id"] for i in ids)


def test_publish_port_in_use_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    import zmq

    blocker = zmq.Context.instance().socket(zmq.PUB)
    port = blocker.bind_to_random_port("tcp://127.0.0.1")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[publish]\naddress = "tcp://127.0.0.1:{port}"\n')
    try:
        result = _cli("run", "-c", str(cfg), "--frames", "5", "--out", str(tmp_path / "runs"))
    finally:
        blocker.close(0)
    assert result.returncode == 2
    assert f"cannot bind ZeroMQ publisher to tcp://127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "runs").exists()
