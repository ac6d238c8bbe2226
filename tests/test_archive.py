"""The raw archive under stress: SIGKILL mid-run, a writer that falls behind, a full disk."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dimscope.daemon.archive import RawArchive, read_frame, read_index, recover_run
from dimscope.daemon.client import Subscriber
from dimscope.daemon.frame import Frame
from dimscope.daemon.graph import BuildContext
from dimscope.daemon.pipeline import Pipeline

from .conftest import make_config


def _free_tcp_address() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_sigkill_mid_acquisition_is_recovered_with_every_indexed_frame(tmp_path: Path) -> None:
    address = _free_tcp_address()
    config = tmp_path / "kill.toml"
    config.write_text(
        '[source]\nkind = "sim"\nwidth = 160\nheight = 120\nexposure_ms = 4.0\n'
        f'[archive]\nout_dir = "{tmp_path / "runs"}"\n'
        f'[publish]\naddress = "{address}"\n')
    received: dict[int, np.ndarray] = {}
    stop = threading.Event()

    def listen() -> None:
        with Subscriber(address, topics=["raw"]) as sub:
            while not stop.is_set():
                msg = sub.recv(timeout_s=0.1)
                if msg is not None:
                    received[msg.header["frame_id"]] = np.array(msg.pixels)

    listener = threading.Thread(target=listen)
    listener.start()
    proc = subprocess.Popen([sys.executable, "-m", "dimscope.daemon.cli", "run", "-c",
                             str(config), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        index = None
        while time.monotonic() < deadline:
            runs = list((tmp_path / "runs").glob("*/index.jsonl"))
            if runs and sum(1 for _ in runs[0].open()) >= 150:
                index = runs[0]
                break
            time.sleep(0.1)
        assert index is not None, "run never archived 150 frames"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop.set()
        listener.join()
    run_dir = index.parent
    assert not (run_dir / "run.json").exists()  # it really died without a clean stop
    # The killed file has no complete TIFF structure for its frames...
    records, _ = read_index(run_dir)
    result = subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", "recover",
                             str(run_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with tifffile.TiffFile(run_dir / "recovered_000.ome.tif") as tif:
        assert tif.is_ome
        stack = tif.asarray()
    ids = json.loads((run_dir / "recovered_000.frames.json").read_text())
    assert ids == [r["frame_id"] for r in records] == list(range(len(records)))
    assert stack.shape == (len(records), 120, 160)
    # ... and the recovered pixels are exactly what was published live.
    matched = [fid for fid in ids if fid in received]
    assert len(matched) > 20
    for fid in matched:
        np.testing.assert_array_equal(stack[fid], received[fid])


def _frame(i: int, shape: tuple[int, int] = (32, 48)) -> Frame:
    px = np.full(shape, i, dtype=np.uint16)
    px.flags.writeable = False
    return Frame(frame_id=i, pixels=px, acquired_unix_ns=time.time_ns(), exposure_ms=1.0,
                 pixel_size_um=0.1, source="test", marks=(("acquired", time.monotonic_ns()),))


def test_archive_rotates_files_and_recover_reads_all(tmp_path: Path) -> None:
    archive = RawArchive(tmp_path, queue_frames=64, rotate_bytes=20_000, pixel_size_um=0.1)
    archive.start()
    for i in range(30):
        archive.offer(_frame(i))
    archive.stop()
    assert len(archive.files) > 3  # 3 kB frames, 20 kB files
    total = 0
    for path in archive.files:
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome
            data = tif.asarray()
            total += data.shape[0] if data.ndim == 3 else 1
    assert total == 30
    report = recover_run(tmp_path)
    assert report.recovered == 30 and not report.missing_frames
    stack = tifffile.imread(report.outputs[0])
    assert [int(stack[i, 0, 0]) for i in range(30)] == list(range(30))


class _SlowArchive(RawArchive):
    """A writer on a disk slower than the camera (for `stall_s` seconds, or for good)."""

    stall_s = float("inf")

    def process(self, frame: Frame) -> None:
        if not hasattr(self, "_started"):
            self._started = time.monotonic()
        if time.monotonic() - self._started < self.stall_s:
            time.sleep(0.05)
        super().process(frame)


@pytest.fixture
def slow_disk() -> Iterator[None]:
    """The raw archive node built on a disk slower than the camera (a node-kind plugin)."""
    from dimscope.daemon.graph import NODE_KINDS, register_node_kind

    def build(node: object, ctx: BuildContext) -> _SlowArchive:
        cfg = ctx.config.archive
        return _SlowArchive(ctx.run_dir, queue_frames=cfg.queue_frames,
                            rotate_bytes=int(cfg.rotate_gb * 2**30),
                            pixel_size_um=ctx.pixel_size_um, fsync_every_s=cfg.fsync_every_s)

    previous = register_node_kind("archive", build)
    yield
    assert previous is not None
    NODE_KINDS["archive"] = previous


@pytest.mark.usefixtures("slow_disk")
def test_archive_falling_behind_stops_acquisition_with_a_specific_error(
        tmp_path: Path) -> None:
    cfg = make_config(tmp_path, source={"kind": "sim", "width": 64, "height": 64,
                                        "exposure_ms": 2.0},
                      archive={"queue_frames": 8, "backpressure_s": 0})
    pipeline = Pipeline(cfg)
    pipeline.start()
    pipeline.wait(duration_s=20)
    summary = pipeline.stop().to_dict()
    assert summary["error"] is not None
    assert "could not be archived" in summary["error"] and "queue is full" in summary["error"]
    # No data already acquired is lost: everything accepted before the stop is on disk.
    records, _ = read_index(Path(summary["run_dir"]))
    assert len(records) == summary["archived"] == summary["stages"]["archive"]["received"]
    assert [r["frame_id"] for r in records] == list(range(len(records)))


_FULL_DISK_SCRIPT = r"""
import resource, signal, sys, json
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))
from dimscope.daemon.config import parse_config
from dimscope.daemon.pipeline import Pipeline
out = Path(sys.argv[1])
cfg = parse_config({"source": {"kind": "sim", "width": 128, "height": 96, "exposure_ms": 2.0},
                    "archive": {"out_dir": str(out), "fsync_every_s": 0},
                    "publish": {"address": "tcp://127.0.0.1:*"}})
p = Pipeline(cfg)
p.start(max_frames=200)
p.wait(duration_s=30)
print(p.stop().model_dump_json())
"""


def test_full_disk_stops_loudly_and_keeps_what_was_written(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", _FULL_DISK_SCRIPT, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["error"] is not None
    assert "raw archive: writing frame" in summary["error"]
    assert "disk full or file-size limit reached" in summary["error"]
    assert summary["acquired"] < 200
    run_dir = Path(summary["run_dir"])
    records, _ = read_index(run_dir)
    assert len(records) == summary["archived"] > 0
    for rec in records:  # every frame the index claims is readable
        assert read_frame(run_dir, rec).shape == (96, 128)


def test_recover_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", "recover",
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not a dimscope run folder" in result.stderr


def test_recover_skips_a_torn_last_index_line(tmp_path: Path) -> None:
    archive = RawArchive(tmp_path, queue_frames=8, rotate_bytes=2**30, pixel_size_um=0.1)
    archive.start()
    for i in range(5):
        archive.offer(_frame(i))
    archive.stop()
    with (tmp_path / "index.jsonl").open("a") as fh:
        fh.write('{"frame_id": 5, "file": "raw_000.ome.tif", "off')  # killed mid-line
    report = recover_run(tmp_path)
    assert report.recovered == 5 and report.unreadable_index_lines == 1
    assert report.outputs[0].stat().st_size > 5 * 32 * 48 * 2


@pytest.mark.usefixtures("slow_disk")
def test_a_stall_shorter_than_the_backpressure_costs_no_frame(tmp_path: Path) -> None:
    # The disk stalls for 1 s; acquisition waits for room while frames wait in the camera's
    # buffer, then the writer catches up: nothing is lost and the run goes on.
    _SlowArchive.stall_s = 1.0
    try:
        cfg = make_config(tmp_path, source={"kind": "sim", "width": 64, "height": 64,
                                            "exposure_ms": 2.0},
                          archive={"queue_frames": 8, "backpressure_s": 10})
        pipeline = Pipeline(cfg)
        pipeline.start(max_frames=800)
        pipeline.wait(duration_s=60)
        summary = pipeline.stop().to_dict()
    finally:
        _SlowArchive.stall_s = float("inf")
    assert summary["error"] is None
    assert summary["stages"]["archive"]["max_depth"] == 8  # it was full, and waited
    assert summary["acquired"] == summary["archived"] == 800
    assert [r["frame_id"] for r in read_index(Path(summary["run_dir"]))[0]] == list(range(800))
