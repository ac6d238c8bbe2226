"""End-to-end: the real UniMMCore sim, real ZMQ sockets on loopback, real files read back."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zmq

from dimscope.daemon.archive import read_frame, read_index
from dimscope.daemon.client import Subscriber
from dimscope.daemon.pipeline import Pipeline

from .conftest import make_config


def _collect(sub: Subscriber, stop: threading.Event, into: list) -> None:
    while not stop.is_set():
        msg = sub.recv(timeout_s=0.1)
        if msg is not None:
            into.append((msg.topic, msg.header, np.array(msg.pixels), msg.gap))


def test_sim_run_publishes_raw_and_enhanced_and_archives_everything(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, engine={"name": "vst_gaussian"})
    pipeline = Pipeline(cfg)
    pipeline.start(max_frames=None)
    received: list = []
    stop = threading.Event()
    sub = Subscriber(pipeline.publish_endpoint or "", topics=["raw", "enhanced"])
    worker = threading.Thread(target=_collect, args=(sub, stop, received))
    worker.start()
    pipeline.wait(duration_s=2.0)
    summary = pipeline.stop().to_dict()
    time.sleep(0.3)
    stop.set()
    worker.join()
    sub.close()

    assert summary["error"] is None
    assert summary["acquired"] > 50
    # Raw frames are sacred: every acquired frame is archived.
    assert summary["archived"] == summary["acquired"]
    raw = {h["frame_id"]: (h, px) for t, h, px, _ in received if t == "raw"}
    enhanced = {h["frame_id"]: (h, px) for t, h, px, _ in received if t == "enhanced"}
    assert len(raw) > 20 and len(enhanced) > 20
    # Enhanced frames name the raw frame they came from and carry provenance.
    assert set(enhanced) & set(raw)
    for fid, (h, px) in enhanced.items():
        assert h["kind"] == "enhanced" and h["source_ids"] == [fid]
        assert h["engine"]["name"] == "vst_gaussian" and h["engine"]["version"]
        assert px.shape == (96, 128) and px.dtype == np.float32
        assert h["latency_ms"]["total"] >= h["latency_ms"]["engine_done"] >= 0
    for h, _ in raw.values():
        assert h["kind"] == "raw" and h["engine"] is None
        assert h["published_unix_ns"] >= h["acquired_unix_ns"]

    # Every published raw frame is bit-identical to its archived copy.
    run_dir = Path(summary["run_dir"])
    records, bad = read_index(run_dir)
    assert bad == 0
    assert [r["frame_id"] for r in records] == list(range(summary["acquired"]))
    by_id = {r["frame_id"]: r for r in records}
    for fid, (_, px) in raw.items():
        np.testing.assert_array_equal(read_frame(run_dir, by_id[fid]), px)
    # ... and the OME-TIFF itself (not just the index) holds them all, with plane metadata.
    with tifffile.TiffFile(run_dir / "raw_000.ome.tif") as tif:
        assert tif.is_ome
        stack = tif.asarray()
        ome = tif.ome_metadata or ""
    assert stack.shape == (summary["acquired"], 96, 128)
    assert ome.count("<Plane ") == summary["acquired"] and 'ExposureTime="5.0"' in ome
    for fid, (_, px) in raw.items():
        np.testing.assert_array_equal(stack[fid], px)


def test_stopped_subscriber_does_not_reduce_archived_frames(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, source={"kind": "sim", "width": 256, "height": 256,
                                        "exposure_ms": 2.0},
                      publish={"send_hwm": 2})
    pipeline = Pipeline(cfg)
    pipeline.start(max_frames=300)
    # A subscriber that connects and never reads: its socket fills, then ZMQ drops for it.
    ctx = zmq.Context.instance()
    stuck = ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 1)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(pipeline.publish_endpoint or "")
    pipeline.wait()
    summary = pipeline.stop().to_dict()
    stuck.close(0)
    assert summary["error"] is None
    assert summary["acquired"] == 300
    assert summary["archived"] == 300
    assert len(read_index(Path(summary["run_dir"]))[0]) == 300


def test_frame_limit_gives_exactly_that_many_frames(tmp_path: Path) -> None:
    from dimscope.daemon.acquisition import FinishReason
    from dimscope.daemon.summary import RunState, RunSummary

    pipeline = Pipeline(make_config(tmp_path))
    assert pipeline.state is RunState.IDLE
    pipeline.start(max_frames=25)
    assert pipeline.state is RunState.RUNNING
    pipeline.wait()
    summary = pipeline.stop()
    assert summary.state is RunState.FINISHED
    assert summary.finish_reason is FinishReason.FRAME_LIMIT
    assert (summary.acquired, summary.archived) == (25, 25)
    engine = summary.stages["engine"]
    # Nothing vanishes: every frame offered to the engine was processed or counted dropped.
    assert engine.received == engine.passed + engine.dropped + engine.errors
    # The run folder holds the same summary, typed, and the config.
    run_dir = Path(str(summary.run_dir))
    on_disk = RunSummary.model_validate_json((run_dir / "summary.json").read_text())
    assert on_disk == summary
    assert "config" in json.loads((run_dir / "run.json").read_text())


class BrokenEngine:
    """An engine that fails on every frame (a model that cannot run); registered below as a
    plugin through the public `register_engine`, so the config names it like any other."""

    scale = 1

    def __init__(self) -> None:
        from dimscope.engines import EngineInfo

        self.info = EngineInfo("broken", "0")

    def prepare(self, shape: object, dtype: object, calibration: object) -> None:
        pass

    def process(self, pixels: np.ndarray) -> np.ndarray:
        raise RuntimeError("model exploded")

    def close(self) -> None:
        pass


@pytest.fixture
def broken_engine() -> Iterator[str]:
    from dimscope.engines import register_engine, unregister_engine

    register_engine("broken", f"{__name__}:BrokenEngine")
    yield "broken"
    unregister_engine("broken")


def test_failing_engine_never_costs_raw_frames(tmp_path: Path, broken_engine: str) -> None:
    pipeline = Pipeline(make_config(tmp_path, engine={"name": broken_engine}))
    pipeline.start(max_frames=60)
    pipeline.wait()
    summary = pipeline.stop().to_dict()
    # Enhancement is out of service, loudly; acquisition and the archive are not affected.
    assert summary["error"] is None
    assert summary["acquired"] == summary["archived"] == 60
    engine = summary["stages"]["engine"]
    assert "failed on 10 consecutive frames" in engine["error"]
    assert engine["errors"] >= 10 and summary["enhanced"] == 0
    assert engine["received"] == 60 == engine["passed"] + engine["dropped"] + engine["errors"]
    assert summary["stages"]["publish_raw"]["passed"] == 60
