"""Stage queue policies, counters, engines and the wire format, on real objects."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pytest
import zmq

from dimscope.daemon.client import Subscriber
from dimscope.daemon.frame import Frame
from dimscope.daemon.publisher import PublishSocket, PublishStage
from dimscope.daemon.stage import OverflowPolicy, QueueFullError, Stage
from dimscope.daemon.wire import SCHEMA, decode, encode_header
from dimscope.engines import CameraCalibration, EngineError, EngineInfo, make_engine
from dimscope.engines.vst_gaussian import anscombe, inverse_anscombe


def _frame(i: int, value: int = 0) -> Frame:
    px = np.full((8, 12), value or i, dtype=np.uint16)
    px.flags.writeable = False
    return Frame(frame_id=i, pixels=px, acquired_unix_ns=time.time_ns(), exposure_ms=2.0,
                 pixel_size_um=0.2, source="test", marks=(("acquired", time.monotonic_ns()),))


class _Recorder(Stage):
    def __init__(self, policy: OverflowPolicy, capacity: int, delay: float = 0.0) -> None:
        super().__init__("rec", capacity, policy)
        self.seen: list[int] = []
        self.delay = delay

    def process(self, frame: Frame) -> None:
        time.sleep(self.delay)
        self.seen.append(frame.frame_id)
        self.emit(frame)


def test_fail_policy_refuses_instead_of_dropping() -> None:
    stage = _Recorder(OverflowPolicy.FAIL, capacity=3)  # not started: nothing drains
    for i in range(3):
        stage.offer(_frame(i))
    with pytest.raises(QueueFullError, match="queue is full"):
        stage.offer(_frame(3))
    assert stage.counters.received == 3 and stage.counters.dropped == 0


def test_drop_oldest_keeps_newest_and_counts_every_drop() -> None:
    stage = _Recorder(OverflowPolicy.DROP_OLDEST, capacity=2, delay=0.01)
    stage.start()
    for i in range(50):
        stage.offer(_frame(i))
    stage.stop()
    c = stage.counters
    assert c.received == 50
    assert c.passed + c.dropped == 50 and c.dropped > 0
    assert stage.seen[-1] == 49  # the newest frame is always processed
    assert stage.seen == sorted(stage.seen)


def test_failing_stage_reports_and_counts_what_it_held() -> None:
    class Broken(Stage):
        def process(self, frame: Frame) -> None:
            time.sleep(0.05)
            raise RuntimeError("boom")

    errors: list[str] = []
    stage = Broken("broken", 10, OverflowPolicy.DROP_OLDEST)
    stage.on_error(lambda s, e: errors.append(f"{s.name}: {e}"))
    stage.start()
    for i in range(5):
        stage.offer(_frame(i))
    stage.stop()
    assert errors == ["broken: boom"]
    c = stage.counters
    assert c.errors == 1 and c.errors + c.dropped == 5


def test_wire_header_round_trip_over_a_real_socket() -> None:
    sock = PublishSocket("tcp://127.0.0.1:*", send_hwm=10)
    stage = PublishStage("enhanced", sock, queue_frames=4)
    sub = Subscriber(sock.endpoint, topics=["enhanced"])
    time.sleep(0.3)  # PUB/SUB: let the subscription propagate
    stage.start()
    info = EngineInfo("vst_gaussian", "1-sigma1.5", "numpy", "fp32")
    for i in (0, 1, 3):  # frame 2 "lost" upstream: the seq numbers stay contiguous
        f = _frame(i).replace(kind="enhanced", engine=info, source_ids=(i,)).marked("engine_done")
        stage.offer(f)
    msgs = list(sub.frames(count=3, timeout_s=5))
    stage.stop()
    sub.close()
    sock.close()
    assert [m.header["frame_id"] for m in msgs] == [0, 1, 3]
    assert [m.header["seq"] for m in msgs] == [0, 1, 2]
    h = msgs[2].header
    assert h["schema"] == SCHEMA and h["kind"] == "enhanced" and h["dtype"] == "<u2"
    assert h["engine"] == {"name": "vst_gaussian", "version": "1-sigma1.5", "runtime": "numpy",
                           "precision": "fp32", "scale": 1, "model_version": "1-sigma1.5",
                           "adaptation": None, "model_sha256": None, "verified": True}
    assert set(h["latency_ms"]) == {"engine_done", "published", "total"}
    np.testing.assert_array_equal(msgs[2].pixels, np.full((8, 12), 3, np.uint16))


def test_subscriber_reports_gaps_in_seq() -> None:
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = Subscriber(f"tcp://127.0.0.1:{port}", topics=["raw"])
    time.sleep(0.3)
    for seq in (0, 1, 4):
        f = _frame(seq)
        header = encode_header(f, topic="raw", seq=seq, published_unix_ns=time.time_ns(),
                               published_mono_ns=time.monotonic_ns())
        pub.send_multipart([b"raw", header, f.pixels])
    msgs = list(sub.frames(count=3, timeout_s=5))
    assert [m.gap for m in msgs] == [0, 0, 2] and sub.gaps["raw"] == 2
    with pytest.raises(ValueError, match="3 message parts"):
        decode([b"raw", b"{}"])
    sub.close()
    pub.close(0)


def test_vst_gaussian_denoises_simulated_low_light() -> None:
    from dimscope.daemon.config import SimSourceConfig
    from dimscope.drivers.sim import SimSource

    src = SimSource(SimSourceConfig(width=128, height=128, exposure_ms=2.0, photons_per_ms=5.0,
                                    ground_truth_history=8))
    src.open()
    try:
        core = src.core
        core.setShutterOpen(True)
        core.startSequenceAcquisition(1, 0, True)
        while not core.getRemainingImageCount():
            time.sleep(0.001)
        raw, md = core.popNextImageAndMD()
        truth = src.ground_truth(int(md["SimFrame"])) * 2.0 + 100.0  # in ADU
    finally:
        src.close()
    engine = make_engine("vst_gaussian", sigma=1.0)
    engine.prepare(raw.shape, raw.dtype, CameraCalibration(2.0, 100.0, 1.6))
    out = engine.process(raw)
    rmse_raw = float(np.sqrt(np.mean((raw - truth) ** 2)))
    rmse_out = float(np.sqrt(np.mean((out - truth) ** 2)))
    assert out.dtype == np.float32 and out.shape == raw.shape
    assert rmse_out < 0.7 * rmse_raw
    ident = make_engine("identity")
    assert ident.process(raw) is raw


def test_anscombe_inverse_is_unbiased_at_low_counts() -> None:
    rng = np.random.default_rng(0)
    for lam in (2.0, 5.0, 20.0):
        x = rng.poisson(lam, 400_000).astype(np.float64)
        est = inverse_anscombe(np.full(1, anscombe(x, 0.0).mean()), 0.0)[0]
        assert est == pytest.approx(lam, rel=0.05)


def test_engine_errors_are_specific() -> None:
    with pytest.raises(EngineError, match="unknown engine 'nope'"):
        make_engine("nope")
    with pytest.raises(EngineError, match="sigma"):
        make_engine("vst_gaussian", radius=3)
    engine = make_engine("vst_gaussian")
    with pytest.raises(EngineError, match="2-D grey frames"):
        engine.prepare((4, 4, 3), np.dtype(np.uint8), CameraCalibration())


class _RecordingSink:
    """A sink that remembers every call (the protocol: setup/append/skip/flush/close)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def setup(self) -> None:
        self.calls.append(("setup", None))

    def append(self, frame: Frame) -> bool:
        self.calls.append(("append", frame.frame_id))
        return frame.frame_id % 2 == 0  # refuses odd frames

    def skip(self, frame_ids: Sequence[int]) -> None:
        self.calls.append(("skip", list(frame_ids)))

    def flush(self) -> None:
        self.calls.append(("flush", None))

    def close(self) -> None:
        self.calls.append(("close", None))


def test_sink_stage_drives_the_sink_protocol_and_counts() -> None:
    from dimscope.daemon.sinks import Sink, SinkStage

    sink = _RecordingSink()
    assert isinstance(sink, Sink)
    stage = SinkStage("recorder", sink, 2, OverflowPolicy.DROP_OLDEST)
    for i in range(5):  # not started yet: 0, 1 and 2 are pushed out by 3 and 4
        stage.offer(_frame(i))
    stage.start()
    stage.stop()
    names = [c[0] for c in sink.calls]
    assert names[0] == "setup" and names[-1] == "close"
    assert ("skip", [0, 1, 2]) in sink.calls  # told before the next append
    assert [c[1] for c in sink.calls if c[0] == "append"] == [3, 4]
    c = stage.counters
    assert (c.received, c.passed, c.dropped) == (5, 1, 4)  # 4 accepted, 3 refused
