"""Bad input gets a clear error (exit 2, no traceback); the CLI says what it is doing."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from .procs import CLI, dimscope, free_tcp_address, write_config

REPO = Path(__file__).resolve().parents[1]


def _bad(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.mark.parametrize(("toml", "needles"), [
    ('[source]\nwidth = 64\n', ("source.kind", "'sim', 'mm', 'replay' or 'smlm_sim'")),
    ('[publish]\naddress = "tcp://127.0.0.1:70000"\n', ("publish.address", "1-65535")),
    ('[publish]\naddress = "127.0.0.1:5555"\n', ("publish.address", "tcp://")),
    ('[publish]\naddress = "tcp://no-such-host.invalid:5555"\n',
     ("publish.address", "no-such-host.invalid", "does not resolve")),
    ('[archive]\nout_dir = "/proc/no/such/dir"\n', ("archive.out_dir", "/proc")),
    ('[engine]\nname = "model"\n', ("engine", "options.model")),
])
def test_check_config_names_the_problem(tmp_path: Path, toml: str,
                                        needles: tuple[str, ...]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    _bad(dimscope("check-config", path, timeout=60), *needles)


def test_run_refuses_bad_command_line_values(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    _bad(dimscope("run", "--duration", "-1", "--out", out, timeout=60), "--duration", "> 0")
    _bad(dimscope("run", "--frames", "0", "--out", out, timeout=60), "--frames")
    _bad(dimscope("run", "--engine", "model", "--frames", "5", "--out", out, timeout=60),
         "options.model", "--model")
    _bad(dimscope("run", "--engine", "nope", "--frames", "5", "--out", out, timeout=60),
         "unknown engine 'nope'")
    assert not out.exists()  # nothing was started


def test_run_engine_model_with_a_model_runs_it(tmp_path: Path) -> None:
    config = write_config(tmp_path / "m.toml",
                          '[source]\nkind = "sim"\nwidth = 64\nheight = 64\nexposure_ms = 2.0\n')
    summary_path = tmp_path / "s.json"
    result = dimscope("run", "-c", config, "--engine", "model", "--model", "denoise",
                      "--frames", "5", "--out", tmp_path / "runs", "-q",
                      "--summary-json", summary_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["engine_info"]["name"] == "denoise" and summary["archived"] == 5


def test_subscribe_rejects_an_address_without_a_scheme() -> None:
    _bad(dimscope("subscribe", "--address", "127.0.0.1:5999", "--count", "1", "--timeout",
                  "2", timeout=60), "tcp://")


def test_subscribe_says_what_it_waits_for_and_gives_up_after_the_timeout() -> None:
    address = free_tcp_address()  # nobody publishes here
    result = dimscope("subscribe", "--address", address, "--timeout", "1.5", timeout=60)
    assert result.returncode == 1
    assert f"waiting for raw, enhanced, interpolated frames from {address}" in result.stderr
    assert f"no frames from {address} for 1.5 s" in result.stderr


def test_subscribe_save_writes_one_file_per_topic(tmp_path: Path) -> None:
    address = free_tcp_address()
    config = write_config(tmp_path / "c.toml",
                          '[source]\nkind = "sim"\nwidth = 96\nheight = 64\nexposure_ms = 5.0\n'
                          '[engine]\nname = "vst_gaussian"\n', address=address)
    saved = tmp_path / "both.tif"
    sub = subprocess.Popen([*CLI, "subscribe", "--address", address, "--count", "40",
                            "--save", str(saved), "--timeout", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    run = dimscope("run", "-c", config, "--duration", "4", "--out", tmp_path / "runs", "-q")
    _, err = sub.communicate(timeout=60)
    assert run.returncode == 0, run.stderr
    assert sub.returncode == 0, err
    raw = tifffile.imread(tmp_path / "both-raw.tif")
    enhanced = tifffile.imread(tmp_path / "both-enhanced.tif")
    assert raw.dtype == np.uint16 and enhanced.dtype == np.float32
    assert raw.shape[0] + enhanced.shape[0] == 40
    for topic, stack in (("raw", raw), ("enhanced", enhanced)):
        ids = json.loads((tmp_path / f"both-{topic}.tif.frames.json").read_text())
        assert len(ids) == stack.shape[0] and {i["topic"] for i in ids} == {topic}


def test_status_line_fits_an_80_column_terminal(tmp_path: Path) -> None:
    from dimscope.daemon.cli import _fmt_status
    from dimscope.daemon.pipeline import Pipeline

    from .conftest import make_config

    cfg = make_config(tmp_path, source={"kind": "sim", "width": 64, "height": 64,
                                        "exposure_ms": 1.0},
                      engine={"name": "vst_gaussian", "budget_ms": 50.0,
                              "tiers": [{"name": "identity"}]},
                      interpolate={"factor": 2, "method": "linear"})
    pipeline = Pipeline(cfg)
    pipeline.start()
    pipeline.wait(duration_s=1.5)
    line = _fmt_status(pipeline)
    pipeline.stop()
    assert "acq" in line and "arch" in line and "drop" in line
    assert len(line) <= 79, line


def test_run_announces_its_archive_data_rate_and_warns_when_high(tmp_path: Path) -> None:
    fast = write_config(tmp_path / "fast.toml",
                        '[source]\nkind = "sim"\nwidth = 512\nheight = 512\nexposure_ms = 2.0\n'
                        '[engine]\nname = "identity"\n')
    slow = write_config(tmp_path / "slow.toml",
                        '[source]\nkind = "sim"\nwidth = 64\nheight = 64\nexposure_ms = 50.0\n'
                        '[engine]\nname = "identity"\n')
    loud = dimscope("run", "-c", fast, "--frames", "3", "--out", tmp_path / "runs", "-q")
    quiet = dimscope("run", "-c", slow, "--frames", "3", "--out", tmp_path / "runs", "-q")
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "WARNING: archive grows up to 262 MB/s" in loud.stderr
    assert "archive grows up to 0 MB/s" in quiet.stderr and "WARNING" not in quiet.stderr


def test_service_stop_timeout_exceeds_the_archive_drain_timeout() -> None:
    from dimscope.daemon.config import ArchiveConfig

    unit = (REPO / "systemd" / "dimscope.service").read_text()
    stop_s = next(float(line.split("=", 1)[1]) for line in unit.splitlines()
                  if line.startswith("TimeoutStopSec="))
    assert stop_s > ArchiveConfig().drain_timeout_s + 10
