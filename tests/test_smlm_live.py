"""Live localization: a `localize` node on the raw frames of a real run, its table, topics.

A simulated SMLM acquisition (blinking emitters on filaments, with ground truth) is played
through a real core by the replay source; the pipeline localizes every frame while it
archives them, writes the crash-safe table into the run folder, publishes each block on
`localizations` and a render every N frames on `render`. What it publishes and writes must
be what the same localizer finds on the same frames in one batch.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from dimscope.daemon.config import ConfigError, LocalizeNodeConfig

from .conftest import make_config, run_and_record
from .procs import CLI, free_tcp_address

pytest.importorskip("smappy")
pytest.importorskip("pyarrow")

from dimscope.smlm.block import concat
from dimscope.smlm.localize import LocalizerSettings, SmappyLocalizer
from dimscope.smlm.metrics import match, score
from dimscope.smlm.simulate import (
    GroundTruth,
    SimSettings,
    SMLMSimulator,
    make_structure,
)
from dimscope.smlm.table import block_from_ipc, read_table

FRAMES = 400


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, SMLMSimulator, GroundTruth]:
    settings = SimSettings(shape=(48, 48))
    rng = np.random.default_rng(5)
    structure = make_structure("filaments", settings, rng)
    power = settings.kinetics.power_for(len(structure.labels_nm), 8)
    sim = SMLMSimulator(structure, settings.model_copy(update={"activation_power": power}),
                        seed=6)
    frames, truth = sim.run(FRAMES)
    path = tmp_path_factory.mktemp("smlm") / "raw.tif"
    tifffile.imwrite(path, frames)
    return path, sim, truth


def stages(every: int = 100, queue: int = 8192, edge_em: int = 0,
           multi_emitter: bool = False) -> list[dict[str, object]]:
    return [{"kind": "localize", "name": "localize", "queue_frames": queue,
             "edge_em_iterations": edge_em, "multi_emitter": multi_emitter},
            {"kind": "publish", "name": "publish_localizations", "upstream": "localize",
             "topic": "localizations"},
            {"kind": "render", "name": "render", "upstream": "localize", "every_frames": every},
            {"kind": "publish", "name": "publish_render", "upstream": "render",
             "topic": "render"}]


def source(path: Path, sim: SMLMSimulator, fps: float) -> dict[str, object]:
    return {"kind": "replay", "path": str(path), "fps": fps, "loop": False,
            "pixel_size_um": sim.settings.camera.pixel_nm / 1000.0}


def camera(sim: SMLMSimulator) -> dict[str, float]:
    """`[camera]`: a recording played as recorded carries no calibration of its own."""
    cam = sim.settings.camera
    return {"gain_adu_per_e": cam.gain_adu_per_e, "offset_adu": cam.offset_adu,
            "read_noise_e": cam.read_noise_e}


def test_every_frame_is_localized_live_as_in_batch(
        tmp_path: Path, recording: tuple[Path, SMLMSimulator, GroundTruth]) -> None:
    path, sim, truth = recording
    # with the multi-emitter refit (off by default live): the live table is the batch's
    cfg = make_config(tmp_path, source=source(path, sim, 400.0),
                      stages=stages(multi_emitter=True),
                      engine={"name": "identity"}, trust={"enabled": False},
                      camera=camera(sim))
    summary, messages = run_and_record(cfg, 3.0, ["localizations", "render"])
    loc = summary["stages"]["localize"]
    assert loc["emitters_added"] > 0
    assert summary["archived"] == summary["acquired"] == FRAMES
    assert loc["frames_localized"] == FRAMES and loc["not_localized"] == 0
    assert loc["lag_frames"] == 0

    # The table in the run folder: closed cleanly, blocks tiling every frame.
    read = read_table(Path(loc["table"]))
    assert read.complete and read.frames_done == FRAMES
    assert read.units["x_nm"] == "nm" and read.units["precision_nm"] == "nm"
    table = read.table
    assert len(table) == loc["localizations"] > 5 * FRAMES
    assert (table["emitters_in_fit"] >= 2).sum() > 0  # rows from joint fits

    # The same localizer on the same frames in one batch finds the same molecules.
    cam = sim.settings.camera
    batch = SmappyLocalizer(LocalizerSettings(
        pixel_nm=cam.pixel_nm, gain_adu_per_e=cam.gain_adu_per_e, offset_adu=cam.offset_adu,
        read_noise_e=cam.read_noise_e, edge_em_iterations=0,
        flush_frames=LocalizeNodeConfig(name="localize").block_frames)
    ).localize(tifffile.imread(path))
    same = match(batch.frame, batch.x_nm, batch.y_nm, table.frame, table.x_nm, table.y_nm,
                 1.0)
    assert same.tp >= 0.995 * max(len(batch), len(table))

    # ...and agrees with the ground truth (the bar: Jaccard >= 0.8 at 250 nm).
    found = score(match(truth.frame, truth.x_nm, truth.y_nm, table.frame, table.x_nm,
                        table.y_nm, 250.0), 250.0)
    assert found.jaccard >= 0.8

    # Published: every block, once, in order, decodable, covering every frame...
    blocks = [(h, block_from_ipc(p.tobytes())) for t, h, p in messages if t == "localizations"]
    assert [h["seq"] for h, _ in blocks] == list(range(len(blocks)))
    received = concat([b for _, b in blocks])
    assert len(received) == len(table)
    assert blocks[-1][1].frame_stop == FRAMES
    assert all(h["kind"] == "localizations" and int(h["smlm"]["count"]) == len(b)
               for h, b in blocks)
    # ...and a render every 100 frames (and none twice), counts = localizations so far.
    renders = [(h, p) for t, h, p in messages if t == "render"]
    assert [int(h["smlm"]["frames"]) for h, _ in renders] == [100, 200, 300, 400]
    last_header, last = renders[-1]
    assert last.shape == (48 * 100 // 20, 48 * 100 // 20)
    assert last_header["pixel_size_um"] == pytest.approx(0.02)
    assert float(last.sum()) == pytest.approx(len(table), rel=0.01)


def localize_stage(tmp_path: Path, sim: SMLMSimulator, push_wait_s: float) -> Any:
    """A `localize` node on its own (no pipeline), for the simulator's camera."""
    from dimscope.daemon.localize_stage import LocalizeStage
    from dimscope.engines import CameraCalibration

    cam = sim.settings.camera
    return LocalizeStage(LocalizeNodeConfig(name="localize", push_wait_s=push_wait_s),
                         tmp_path, cam.pixel_nm / 1000.0, CameraCalibration(
                             cam.gain_adu_per_e, cam.offset_adu, cam.read_noise_e))


def raw_frame(frames: np.ndarray, i: int) -> Any:
    from dimscope.daemon.frame import Frame, freeze

    return Frame(i, freeze(frames[i]), time.time_ns(), 10.0, 0.1, "test")


def test_frames_reach_the_localizer_in_whole_stacks_and_never_wait_for_the_next_frame(
        tmp_path: Path, recording: tuple[Path, SMLMSimulator, GroundTruth]) -> None:
    path, sim, _ = recording
    frames = tifffile.imread(path)
    stage = localize_stage(tmp_path, sim, push_wait_s=1.0)
    pushed: list[tuple[int, int]] = []
    real_push = stage._localizer.push

    def push(pixels: np.ndarray, first_frame: int | None = None) -> list[object]:
        pushed.append((int(first_frame or 0), len(pixels)))
        return list(real_push(pixels, first_frame=first_frame))

    stage._localizer.push = push
    blocks: list[object] = []
    stage.connect(blocks.append)
    stage.start()
    try:
        for i in range(130):  # 1.3 stacks, then the camera pauses
            stage.offer(raw_frame(frames, i))
        deadline = time.monotonic() + 5.0
        while stage.snapshot()["frames_localized"] < 130 and time.monotonic() < deadline:
            time.sleep(0.05)
        # The 30 frames of the unfinished stack went on after push_wait_s, with no new frame
        # and no stop.
        assert stage.snapshot()["frames_localized"] == 130
        assert stage.snapshot()["lag_frames"] == 0
        for i in range(130, FRAMES):  # a burst: the queue holds more than a stack
            stage.offer(raw_frame(frames, i))
    finally:
        stage.stop()
    assert sum(n for _, n in pushed) == FRAMES
    assert [first for first, _ in pushed] == list(np.cumsum([0] + [n for _, n in pushed])[:-1])
    # No stack is larger than push_frames or crosses a block's end (100 frames)...
    assert all(n <= 100 and first % 100 + n <= 100 for first, n in pushed)
    # ...so after the short one, the stacks are whole again: 100, 30, 70, 100, 100.
    assert pushed == [(0, 100), (100, 30), (130, 70), (200, 100), (300, 100)]
    assert [b.metadata["frame_start"] for b in blocks] == ["0", "100", "200", "300"]


def test_a_localizer_failing_on_a_held_stack_fails_the_node_and_counts_the_frames(
        tmp_path: Path, recording: tuple[Path, SMLMSimulator, GroundTruth]) -> None:
    path, sim, _ = recording
    frames = tifffile.imread(path)
    stage = localize_stage(tmp_path, sim, push_wait_s=0.3)
    real_push = stage._localizer.push

    def push(pixels: np.ndarray, first_frame: int | None = None) -> list[object]:
        if first_frame:  # the second stack: pushed by the clock, no frame in hand
            raise OSError("simulated failure")
        return list(real_push(pixels, first_frame=first_frame))

    stage._localizer.push = push
    stage.connect(lambda frame: None)
    stage.start()
    for i in range(130):
        stage.offer(raw_frame(frames, i))
    deadline = time.monotonic() + 5.0
    while stage.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stage.stop()
    snap = stage.snapshot()
    assert isinstance(stage.error, OSError)  # the failure in `waiting` failed the node
    assert snap["frames_localized"] == 100
    assert snap["not_localized"] == 30 and snap["not_localized_ids"] == list(range(100, 130))


def test_a_localize_queue_overflow_leaves_a_named_gap_and_archives_everything(
        tmp_path: Path, recording: tuple[Path, SMLMSimulator, GroundTruth]) -> None:
    """A queue of 16 frames at 8,000 frames/s: localization falls behind; the frames it
    drops are counted and named, the table says exactly which frames it covers, and the
    raw archive keeps every frame."""
    from dimscope.daemon.pipeline import Pipeline
    from dimscope.daemon.prometheus import MetricsServer, PipelineCollector

    from .test_service import _scrape

    path, sim, _ = recording
    cfg = make_config(tmp_path, source=source(path, sim, 8000.0),
                      stages=stages(queue=16, edge_em=10), engine={"name": "identity"},
                      trust={"enabled": False}, camera=camera(sim))
    pipeline = Pipeline(cfg)
    server = MetricsServer("127.0.0.1:0", PipelineCollector(pipeline))
    try:
        pipeline.start()
        pipeline.wait(duration_s=3.0)
        summary = pipeline.stop().to_dict()
        metrics = _scrape(server.port)
    finally:
        server.close()
    loc = summary["stages"]["localize"]
    assert metrics["dimscope_frames_not_localized_total|stage=localize"] == loc["not_localized"]
    assert metrics["dimscope_localizations_total|stage=localize"] == loc["localizations"]
    assert metrics["dimscope_localize_lag_frames|stage=localize"] == 0
    assert summary["archived"] == summary["acquired"] == FRAMES
    assert loc["not_localized"] > 0, "the queue never overflowed: nothing tested"
    assert loc["frames_localized"] + loc["not_localized"] == FRAMES
    read = read_table(Path(loc["table"]))
    covered = np.zeros(FRAMES, bool)
    for b in read.blocks:
        covered[b.frame_start:b.frame_stop] = True
    assert sorted(np.flatnonzero(~covered).tolist()) == sorted(loc["not_localized_ids"])


@pytest.mark.parametrize(("nodes", "problem"), [
    ([{"kind": "render", "name": "render", "upstream": "engine"}],
     "render node takes localizations"),
    ([{"kind": "localize", "name": "localize", "upstream": "engine"}],
     "its upstream must be 'acquisition'"),
    ([{"kind": "localize", "name": "localize", "roisize": 6}], "roisize must be odd"),
])
def test_a_badly_declared_smlm_graph_is_a_config_error(tmp_path: Path,
                                                      nodes: list[dict[str, object]],
                                                      problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        make_config(tmp_path, stages=nodes)


def test_renders_more_often_than_blocks_are_never_repeated(
        tmp_path: Path, recording: tuple[Path, SMLMSimulator, GroundTruth]) -> None:
    path, sim, _ = recording
    nodes = stages(every=20)  # blocks of 100 frames: a render per block, none twice
    cfg = make_config(tmp_path, source=source(path, sim, 800.0), stages=nodes,
                      engine={"name": "identity"}, trust={"enabled": False},
                      camera=camera(sim))
    _, messages = run_and_record(cfg, 2.0, ["render"])
    covered = [int(h["smlm"]["frames"]) for t, h, _ in messages if t == "render"]
    assert covered == sorted(set(covered)) and covered[-1] == FRAMES


def test_sigkill_mid_run_recovers_the_raw_frames_and_the_table(
        tmp_path: Path, recording: tuple[Path, SMLMSimulator, GroundTruth]) -> None:
    path, sim, _ = recording
    cam = sim.settings.camera
    config = tmp_path / "smlm.toml"
    config.write_text(
        f'[source]\nkind = "replay"\npath = "{path}"\nfps = 100\nloop = true\n'
        f'pixel_size_um = {cam.pixel_nm / 1000}\n'
        f'[camera]\ngain_adu_per_e = {cam.gain_adu_per_e}\noffset_adu = {cam.offset_adu}\n'
        f'read_noise_e = {cam.read_noise_e}\n'
        f'[engine]\nname = "identity"\n[trust]\nenabled = false\n'
        f'[archive]\nout_dir = "{tmp_path / "runs"}"\n'
        f'[publish]\naddress = "{free_tcp_address()}"\n'
        '[[stages]]\nkind = "localize"\nname = "localize"\nblock_frames = 20\n')
    proc = subprocess.Popen([*CLI, "run", "-c", str(config), "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        table = None
        while time.monotonic() < deadline:
            tables = list((tmp_path / "runs").glob("*/localizations.arrows"))
            if tables and tables[0].stat().st_size > 20_000:  # some blocks on disk
                table = tables[0]
                break
            time.sleep(0.1)
        assert table is not None, "no localization blocks written"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = table.parent
    assert not read_table(table).complete  # killed: no end-of-stream marker
    done = subprocess.run([*CLI, "recover", str(run_dir)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "localizations.recovered.arrows" in done.stdout
    recovered = read_table(run_dir / "localizations.recovered.arrows")
    assert recovered.complete and recovered.frames_done >= 20 and len(recovered.table) > 0
    # Every block it kept covers frames the raw archive recovered.
    frames = json.loads((run_dir / "recovered_000.frames.json").read_text())
    assert recovered.frames_done <= len(frames)
    assert read_table(table).total_bytes == table.stat().st_size  # the original untouched


def test_the_simulated_smlm_microscope_runs_live_and_its_laser_drives_the_blinking(
        tmp_path: Path) -> None:
    """`smlm_sim` source: localized live against the emitter truth it hands out, and more
    labels switch on when the activation laser's power is raised through the core."""
    from dimscope.daemon.pipeline import Pipeline

    cfg = make_config(
        tmp_path, source={"kind": "smlm_sim", "width": 64, "height": 64, "fps": 300,
                          "emitters_per_frame": 6, "ground_truth_history": 100_000},
        stages=stages(every=200), engine={"name": "identity"}, trust={"enabled": False})
    pipeline = Pipeline(cfg)
    pipeline.start()
    pipeline.wait(duration_s=1.5)
    core = pipeline.source.core
    power = float(core.getProperty("Activation", "Power"))
    switched_at = pipeline.summary().acquired
    core.setProperty("Activation", "Power", power * 6)
    pipeline.wait(duration_s=1.5)
    summary = pipeline.stop().to_dict()
    loc = summary["stages"]["localize"]
    assert summary["archived"] == summary["acquired"] == loc["frames_localized"]
    table = read_table(Path(loc["table"])).table
    assert read_table(Path(loc["table"])).metadata["camera_calibrated"] is True
    # Frame ids are the simulation's frames (nothing lost): score against its truth.
    source = pipeline.source
    n = summary["acquired"]
    truth = GroundTruth.from_frames(
        [source.truth(f) for f in range(switched_at)])  # type: ignore[attr-defined]
    x = truth.x_nm + truth.drift_nm[truth.frame, 0]  # where the camera saw them
    y = truth.y_nm + truth.drift_nm[truth.frame, 1]
    inside = (x >= 0) & (x < 6400) & (y >= 0) & (y < 6400)
    early = table.frame < switched_at  # the sparse part (6 per frame): the regime
    found = score(match(truth.frame[inside], x[inside], y[inside], table.frame[early],
                        table.x_nm[early], table.y_nm[early], 250.0), 250.0)
    assert found.jaccard >= 0.8
    per_frame = np.bincount(table.frame, minlength=n)
    before = per_frame[switched_at // 2:switched_at].mean()
    after = per_frame[-(n - switched_at) // 2:].mean()
    assert after > 2 * before


def test_the_render_node_corrects_the_drift_and_records_it(tmp_path: Path) -> None:
    """A stage drifting 0.3/−0.2 nm per frame: the drift RCC finds on the live
    localizations (100-frame segments) matches the simulated one, each estimate is in
    drift.jsonl, and the renders say they were corrected."""
    from dimscope.smlm.simulate import Drift

    settings = SimSettings(shape=(64, 64), drift=Drift(velocity_nm=(0.3, -0.2),
                                                       amplitude_nm=(0.0, 0.0)))
    structure = make_structure("filaments", settings, np.random.default_rng(8))
    power = settings.kinetics.power_for(len(structure.labels_nm), 15)
    sim = SMLMSimulator(structure, settings.model_copy(update={"activation_power": power}),
                        seed=9)
    frames, truth = sim.run(600)
    path = tmp_path / "drift.tif"
    tifffile.imwrite(path, frames)
    nodes = stages(every=100)
    nodes[2].update(drift_segment_frames=100)
    cfg = make_config(tmp_path, source=source(path, sim, 600.0), stages=nodes,
                      engine={"name": "identity"}, trust={"enabled": False},
                      camera=camera(sim))
    summary, messages = run_and_record(cfg, 3.0, ["render"])
    run_dir = Path(summary["stages"]["localize"]["table"]).parent
    records = [json.loads(line) for line in (run_dir / "drift.jsonl").read_text().splitlines()]
    assert len(records) == summary["stages"]["render"]["drift_estimates"] >= 4
    last = records[-1]
    expected = truth.drift_nm[last["frames"] - 1]  # relative to frame 0 (which is 0 here)
    assert np.allclose(last["drift_at_last_frame_nm"], expected, atol=15.0), (last, expected)
    headers = [h for t, h, _ in messages if t == "render"]
    assert headers[0]["smlm"]["drift_corrected"] == "false"  # one segment: nothing to match
    assert headers[-1]["smlm"]["drift_corrected"] == "true"
