"""Faults a facility meets, each with real processes, signals, filesystems and sockets.

Buffer sizes that do not divide the frame, several daemons on one archive
folder, SIGTERM while the writer is behind, a full disk, a hostile peer on the
publish socket, a damaged archive index, a recording that ends.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zmq

from dimscope.daemon.archive import RawArchive, read_frame, read_index
from dimscope.daemon.client import Subscriber
from dimscope.daemon.frame import Frame

from .procs import CLI, dimscope, free_tcp_address, rss_mb, run_summary, write_config

SIM_IDENTITY = '[source]\nkind = "sim"\nwidth = {w}\nheight = {h}\nexposure_ms = {exp}\n' \
               '{extra}\n[engine]\nname = "identity"\n'


def _sim_config(path: Path, w: int = 64, h: int = 64, exp: float = 2.0, extra: str = "",
                tail: str = "", address: str | None = None) -> Path:
    return write_config(path, SIM_IDENTITY.format(w=w, h=h, exp=exp, extra=extra) + tail,
                        address=address)


# -- the core's sequence buffer ---------------------------------------------------------------


def test_frame_size_that_does_not_divide_the_buffer_runs_without_false_overflow(
        tmp_path: Path) -> None:
    # 130x130x2 bytes does not divide 8 MiB: pymmcore-plus's buffer used to flag an
    # overflow after ~247 frames although every frame had been popped.
    config = _sim_config(tmp_path / "odd.toml", 130, 130, 1.0, "buffer_mb = 8")
    result, summary = run_summary(tmp_path, config, "--frames", "1500", "--out",
                                  str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    assert summary["error"] is None
    assert summary["acquired"] == summary["archived"] == 1500
    assert summary["finish_reason"] == "frame_limit"


def test_a_real_buffer_overrun_stops_and_says_how_many_frames_were_lost(tmp_path: Path) -> None:
    # 128 kB frames in a 1 MB buffer (8 frames) at ~500 frames/s, popped only every 100 ms:
    # the camera overwrites frames dimscope never saw.
    config = _sim_config(tmp_path / "overrun.toml", 256, 256, 1.0, "buffer_mb = 1",
                         tail="[acquisition]\npoll_sleep_ms = 100\n")
    result, summary = run_summary(tmp_path, config, "--duration", "20", "--out",
                                  str(tmp_path / "runs"))
    assert result.returncode == 1, result.stderr
    assert "skipped" in summary["error"] and "frame(s)" in summary["error"]
    lost = int(summary["error"].split("skipped ")[1].split()[0])
    assert lost >= 1
    # Everything popped before the loss is archived.
    assert summary["archived"] == summary["acquired"] > 0


# -- the archive folder -----------------------------------------------------------------------


# Imports everything first, then waits for a common instant, so that the daemons choose
# and create their run folders at the same moment (the window of the old race).
_DAEMON_AT = r"""
import sys, time
from dimscope.daemon import cli, pipeline  # noqa: F401  (imported before the start line)
start_at = float(sys.argv[1])
time.sleep(max(0.0, start_at - time.time()))
sys.exit(cli.main(sys.argv[2:]))
"""


def test_daemons_started_together_on_one_out_folder_never_share_a_run_folder(
        tmp_path: Path) -> None:
    out = tmp_path / "runs"
    n = 6
    # Any free port, chosen by each daemon at bind time: ports picked here in advance could
    # collide between six daemons starting at once.
    configs = [_sim_config(tmp_path / f"d{i}.toml", address="tcp://127.0.0.1:*")
               for i in range(n)]
    start_at = time.time() + 8.0  # after every interpreter has imported
    procs = [subprocess.Popen([sys.executable, "-c", _DAEMON_AT, str(start_at), "run", "-c",
                               str(c), "--frames", "60", "--out", str(out), "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c in configs]
    outputs = [p.communicate(timeout=120)[1].decode() for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * n, [err for err, code in zip(outputs, codes, strict=True) if code]
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == n
    for run in runs:
        ids = [r["frame_id"] for r in read_index(run)[0]]
        assert ids == list(range(60)), f"{run.name}: {len(ids)} frames, duplicates or gaps"


def test_run_folder_creation_is_create_or_fail_under_contention(tmp_path: Path) -> None:
    from dimscope.daemon.archive import create_run_dir

    barrier = threading.Barrier(16)
    made: list[Path] = []

    def create() -> None:
        barrier.wait()
        made.append(create_run_dir(tmp_path / "runs", "20261125-120000-sim"))

    threads = [threading.Thread(target=create) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 16 and all(p.is_dir() for p in made)


# -- SIGTERM while the writer is behind --------------------------------------------------------

# A disk slower than the camera: every archive write takes 10 ms longer. The daemon's raw
# archive node is replaced through the node-kind registry (the plugin seam), in its own process.
_SLOW_DISK_DAEMON = r"""
import sys, time
from dimscope.daemon.archive import RawArchive
from dimscope.daemon.graph import register_node_kind

class SlowDiskArchive(RawArchive):
    def process(self, frame):
        time.sleep(0.010)
        super().process(frame)

def build(node, ctx):
    cfg = ctx.config.archive
    return SlowDiskArchive(ctx.run_dir, queue_frames=cfg.queue_frames,
                           rotate_bytes=int(cfg.rotate_gb * 2**30),
                           pixel_size_um=ctx.pixel_size_um, fsync_every_s=cfg.fsync_every_s)

register_node_kind("archive", build)
from dimscope.daemon.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _sigterm_when_behind(tmp_path: Path, drain_timeout_s: float
                         ) -> tuple[int, str, dict[str, object], Path]:
    config = _sim_config(tmp_path / "slow.toml", 96, 96, 4.0,
                         tail=f"[archive]\ndrain_timeout_s = {drain_timeout_s}\n"
                              "queue_frames = 4000\n")
    summary_path = tmp_path / "summary.json"
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_DISK_DAEMON, "run", "-c", str(config),
                             "--out", str(out), "-q", "--summary-json", str(summary_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            index = list(out.glob("*/index.jsonl"))
            if index and sum(1 for _ in index[0].open()) >= 40:
                break
            time.sleep(0.05)
        time.sleep(1.0)  # ~250 frames acquired, ~100 written: the writer is behind
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads(summary_path.read_text())
    return proc.returncode, stderr, summary, Path(str(summary["run_dir"]))


def test_sigterm_with_the_writer_behind_archives_every_acquired_frame(tmp_path: Path) -> None:
    code, stderr, summary, run_dir = _sigterm_when_behind(tmp_path, drain_timeout_s=90)
    assert code == 0, stderr
    assert "closed file" not in stderr and "Traceback" not in stderr
    ids = [r["frame_id"] for r in read_index(run_dir)[0]]
    assert summary["stages"]["archive"]["max_depth"] > 20  # it really was behind
    assert ids == list(range(summary["acquired"]))  # type: ignore[call-overload]
    assert summary["not_archived"] == []


def test_sigterm_drain_that_runs_out_of_time_names_the_frames_not_on_disk(
        tmp_path: Path) -> None:
    code, stderr, summary, run_dir = _sigterm_when_behind(tmp_path, drain_timeout_s=0.3)
    assert code == 1, stderr
    assert "closed file" not in stderr and "Traceback" not in stderr
    on_disk = {r["frame_id"] for r in read_index(run_dir)[0]}
    acquired = set(range(summary["acquired"]))  # type: ignore[call-overload]
    missing = sorted(acquired - on_disk)
    assert missing, "the drain finished anyway: the test did not exercise the timeout"
    assert summary["not_archived"] == missing
    assert "not on disk: frame ids" in str(summary["error"])
    # Every frame the index names is intact.
    for rec in read_index(run_dir)[0]:
        assert read_frame(run_dir, rec).shape == (96, 96)


# -- a full disk (a real, small filesystem) -----------------------------------------------------


@contextlib.contextmanager
def _small_tmpfs(size_mb: int) -> Iterator[Path]:
    mount = Path(tempfile.mkdtemp(prefix="dimscope-tmpfs-"))
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a {size_mb} MB tmpfs here (needs root): "
                    f"{made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        mount.rmdir()


def test_disk_full_stops_cleanly_and_recover_writes_elsewhere(tmp_path: Path) -> None:
    with _small_tmpfs(12) as disk:
        config = _sim_config(tmp_path / "full.toml", 256, 256, 2.0)
        result, summary = run_summary(tmp_path, config, "--frames", "400", "--out", str(disk))
        assert result.returncode == 1
        assert "Traceback" not in result.stderr + result.stdout
        assert "== dimscope run summary ==" in result.stdout
        error = str(summary["error"])
        assert "disk full" in error and "raw_000.ome.tif" in error and "frame " in error
        run_dir = Path(str(summary["run_dir"]))
        records, _ = read_index(run_dir)
        assert len(records) == summary["archived"] > 0
        rec = dimscope("recover", run_dir, "--out", tmp_path / "recovered")
        assert rec.returncode == 0, rec.stderr
        stack = tifffile.imread(tmp_path / "recovered" / "recovered_000.ome.tif")
        assert stack.shape == (len(records), 256, 256)
        np.testing.assert_array_equal(stack[-1], read_frame(run_dir, records[-1]))


# -- a hostile peer on the publish socket --------------------------------------------------------


def _zmtp_flood(host: str, port: int, messages: int, size: int) -> None:
    """Speak ZMTP 3.0 as an unauthenticated SUB peer and send huge subscription messages."""
    import socket
    import struct

    def command(name: bytes, body: bytes) -> bytes:
        payload = bytes([len(name)]) + name + body
        return bytes([0x04, len(payload)]) + payload

    greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") \
        + b"\x00" + bytes(31)
    ready = command(b"READY", bytes([11]) + b"Socket-Type" + struct.pack(">I", 3) + b"SUB")
    for i in range(messages):
        with contextlib.suppress(OSError), socket.create_connection((host, port), 5) as peer:
            peer.sendall(greeting + ready)
            body = b"\x01" + bytes([i]) * (size - 1)  # a "subscription" of `size` bytes
            peer.sendall(bytes([0x02]) + struct.pack(">Q", len(body)))
            peer.sendall(body)
            time.sleep(0.1)


def test_huge_messages_from_an_unauthenticated_peer_do_not_grow_the_daemon(
        tmp_path: Path) -> None:
    port = int(free_tcp_address().rpartition(":")[2])
    config = _sim_config(tmp_path / "open.toml", address=f"tcp://0.0.0.0:{port}")
    proc = subprocess.Popen([*CLI, "run", "-c", str(config), "--duration", "60", "--out",
                             str(tmp_path / "runs"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Subscriber(f"tcp://127.0.0.1:{port}", topics=["raw"]) as sub:
            assert sub.recv(timeout_s=30) is not None, "daemon never published"
            before = rss_mb(proc.pid)
            _zmtp_flood("127.0.0.1", port, messages=12, size=16 * 2**20)
            time.sleep(2)
            assert proc.poll() is None, "the daemon died"
            grown = rss_mb(proc.pid) - before
            assert grown < 40, f"daemon RSS grew {grown:.0f} MB from 192 MB of messages"
            assert sub.recv(timeout_s=5) is not None, "daemon stopped publishing"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "open to every host" in stderr  # a bind on 0.0.0.0 says so


def test_subscriber_refuses_a_message_larger_than_its_limit() -> None:
    address = free_tcp_address()
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(address)
    header = json.dumps({"schema": "dimscope.frame/2", "seq": 0, "frame_id": 0,
                         "shape": [4 * 2**20], "dtype": "<u1"}).encode()
    try:
        with Subscriber(address, topics=["raw"], max_message_bytes=2**20) as small, \
                Subscriber(address, topics=["raw"]) as default:
            time.sleep(0.5)  # both connected and subscribed
            pub.send_multipart([b"raw", header, bytes(4 * 2**20)])
            got = default.recv(timeout_s=5)
            assert got is not None and got.pixels.nbytes == 4 * 2**20
            # libzmq drops the peer at the frame header: the 4 MB is never buffered.
            assert small.recv(timeout_s=1) is None
            # A malformed message is skipped and counted, not raised into the viewer.
            pub.send_multipart([b"raw", b"{not json", bytes(4)])
            pub.send_multipart([b"raw", header, bytes(4)])  # wrong size for its shape
            assert default.recv(timeout_s=1) is None
            assert default.malformed == 2
    finally:
        pub.close(0)


# -- a damaged archive ---------------------------------------------------------------------------


def _frame(i: int) -> Frame:
    px = np.full((32, 48), i, dtype=np.uint16)
    px[0, :8] = np.arange(8)  # not constant: a shifted offset reads other bytes
    px.flags.writeable = False
    return Frame(frame_id=i, pixels=px, acquired_unix_ns=time.time_ns(), exposure_ms=1.0,
                 pixel_size_um=0.1, source="test", marks=(("acquired", time.monotonic_ns()),))


def test_recover_names_and_skips_bad_records_and_recovers_the_rest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    archive = RawArchive(run, queue_frames=64, rotate_bytes=20_000, pixel_size_um=0.1)
    archive.start()
    for i in range(20):
        archive.offer(_frame(i))
    archive.stop()
    lines = (run / "index.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    del records[3]["offset"]                   # frame 3: a key missing
    records[5]["offset"] += 2                  # frame 5: offset shifted
    lost_file = records[-1]["file"]            # the last file is gone
    (run / lost_file).unlink()
    (run / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = dimscope("recover", run, "--out", tmp_path / "out")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "index line 4 (frame 3): missing key(s) offset" in result.stderr
    assert "(frame 5): checksum mismatch" in result.stderr
    gone = [r["frame_id"] for r in records if r["file"] == lost_file]
    assert f"archive file {run / lost_file} is missing" in result.stderr
    expected = [i for i in range(20) if i not in (3, 5, *gone)]
    ids = json.loads((tmp_path / "out" / "recovered_000.frames.json").read_text())
    assert ids == expected
    stack = tifffile.imread(tmp_path / "out" / "recovered_000.ome.tif")
    for plane, fid in zip(stack, ids, strict=True):
        np.testing.assert_array_equal(plane, _frame(fid).pixels)


# -- a recording that ends ------------------------------------------------------------------------


def test_replay_played_once_ends_normally_at_the_last_frame(tmp_path: Path) -> None:
    stack = np.random.default_rng(1).integers(0, 4000, size=(12, 40, 56), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rec.tif", stack)
    config = write_config(tmp_path / "once.toml",
                          '[source]\nkind = "replay"\npath = "rec.tif"\nfps = 100\nloop = false\n'
                          '[engine]\nname = "identity"\n')
    result, summary = run_summary(tmp_path, config, "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    assert "ERROR" not in result.stderr
    assert summary["finish_reason"] == "source_ended" and summary["error"] is None
    assert summary["acquired"] == summary["archived"] == 12


# -- memory over a long run -------------------------------------------------------------------


def test_sim_keeps_ground_truth_only_when_asked() -> None:
    from dimscope.daemon.config import SimSourceConfig
    from dimscope.drivers.sim import SimScope

    out = np.empty((32, 32), np.uint16)
    for history, kept in ((0, 0), (5, 5)):
        scope = SimScope(SimSourceConfig(width=32, height=32, ground_truth_history=history))
        scope.laser_open = True
        for _ in range(50):
            scope.capture(1.0, out)
        assert len(scope._states) == len(scope._signal) == kept


# -- counters that do not mislead --------------------------------------------------------------


def test_publisher_counts_add_up_when_producer_and_sender_both_drop() -> None:
    """Offers overflow the queue (dropped by the producer thread) while a full subscriber makes
    sends fail (dropped by the worker): every snapshot a metrics reader takes meanwhile adds up
    (received = passed + dropped + queued + at most the one frame being sent), and so do the
    final counts, exactly."""
    from dimscope.daemon.publisher import PublishSocket, PublishStage

    address = free_tcp_address()
    sock = PublishSocket(address, send_hwm=1)
    stalled = zmq.Context.instance().socket(zmq.SUB)  # connected, never reads
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.SUBSCRIBE, b"raw")
    stalled.connect(address)
    time.sleep(0.3)
    stage = PublishStage("raw", sock, 2)
    frame = Frame(frame_id=0, pixels=np.zeros((256, 256), np.uint16), acquired_unix_ns=0,
                  exposure_ms=1.0, pixel_size_um=0.1, source="test",
                  marks=(("acquired", time.monotonic_ns()),))
    done = threading.Event()
    unbalanced: list[dict[str, object]] = []

    def metrics_reader() -> None:
        while not done.is_set():
            snap = stage.snapshot()
            accounted = sum(int(snap[k]) for k in ("passed", "dropped", "depth"))  # type: ignore[call-overload]
            if not 0 <= int(snap["received"]) - accounted <= 1:  # type: ignore[call-overload]
                unbalanced.append(snap)

    reader = threading.Thread(target=metrics_reader)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        stage.start()
        reader.start()
        for _ in range(30_000):
            stage.offer(frame)
        stage.stop()
    finally:
        done.set()
        reader.join()
        sys.setswitchinterval(old)
        stalled.close(0)
        sock.close()
    c = stage.counters
    assert c.dropped > 0 and c.passed > 0
    assert c.received == c.passed + c.dropped, c
    assert not unbalanced, f"{len(unbalanced)} inconsistent snapshots, e.g. {unbalanced[0]}"


def test_subscriber_gets_the_tail_of_the_stream_when_the_run_ends(tmp_path: Path) -> None:
    """Frames still queued in the publisher when the run stops reach a viewer that reads them
    within `publish.linger_ms` (a socket closed without linger discards them)."""
    from dimscope.daemon.pipeline import Pipeline

    from .conftest import make_config

    address = free_tcp_address()
    cfg = make_config(tmp_path, source={"kind": "sim", "width": 256, "height": 256,
                                        "exposure_ms": 4.0}, engine={"name": "identity"},
                      acquisition={"raw_queue_frames": 256},  # the stage queue drops nothing
                      publish={"address": address, "send_hwm": 1000, "enhanced": False})
    # A viewer that takes nothing during the run: 25 MB of frames back up in the publisher.
    with Subscriber(address, topics=["raw"], rcv_hwm=2) as viewer:
        time.sleep(0.3)
        pipeline = Pipeline(cfg)
        pipeline.start(max_frames=200)
        pipeline.wait()
        summary = pipeline.stop().to_dict()
        assert summary["stages"]["publish_raw"]["passed"] == 200
        received = [msg.header["frame_id"] for msg in viewer.frames(timeout_s=3)]
    # The first frames may precede the subscription (ZeroMQ's slow joiner); after the first
    # one received, every frame to the very last arrives.
    assert received and received == list(range(received[0], 200)) and len(received) >= 100
