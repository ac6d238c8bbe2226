"""Each frame source through the real core: DemoCamera (C++), replay, and the simulator."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dimscope.daemon.archive import read_frame, read_index
from dimscope.daemon.config import SimSourceConfig, load_config
from dimscope.daemon.pipeline import Pipeline
from dimscope.drivers.sim import SimSource

from .conftest import REPO, make_config


def test_democam_cfg_runs_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("mm_test_adapters")
    shipped = load_config(REPO / "configs" / "democam.toml")
    cfg = make_config(tmp_path, source=shipped.source.model_dump(),
                      engine={"name": "vst_gaussian"})
    pipeline = Pipeline(cfg)
    pipeline.start(max_frames=40)
    assert pipeline.source.core.getLoadedDevices()  # the real C++ adapters are loaded
    pipeline.wait()
    summary = pipeline.stop().to_dict()
    assert summary["error"] is None, summary["error"]
    assert summary["acquired"] == summary["archived"] == 40
    assert summary["source"] == "mm:MMConfig_demo.cfg"
    records, _ = read_index(Path(summary["run_dir"]))
    frame = read_frame(Path(summary["run_dir"]), records[-1])
    assert frame.shape == (512, 512) and frame.dtype == np.uint16 and frame.std() > 0


def test_process_with_cpp_adapters_exits_cleanly(tmp_path: Path) -> None:
    """The code-134 trap: C++ adapters left loaded at interpreter exit can abort Python."""
    pytest.importorskip("mm_test_adapters")
    result = subprocess.run(
        [sys.executable, "-m", "dimscope.daemon.cli", "run", "-c",
         str(REPO / "configs" / "democam.toml"), "--frames", "10", "--out", str(tmp_path),
         "-q"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _write_recording(path: Path) -> np.ndarray:
    rng = np.random.default_rng(7)
    stack = rng.integers(0, 4000, size=(12, 40, 56), dtype=np.uint16)
    tifffile.imwrite(path, stack)
    return stack


def test_replay_reproduces_the_recording(tmp_path: Path) -> None:
    stack = _write_recording(tmp_path / "rec.tif")
    cfg = make_config(tmp_path, source={"kind": "replay", "path": "rec.tif", "fps": 200,
                                        "loop": True})
    pipeline = Pipeline(cfg)
    pipeline.start(max_frames=30)  # wraps around the 12-frame recording
    pipeline.wait()
    summary = pipeline.stop().to_dict()
    assert summary["archived"] == 30
    run_dir = Path(summary["run_dir"])
    records, _ = read_index(run_dir)
    for rec in records:
        index = int(rec["metadata"]["ReplayFrame"])
        assert index == rec["frame_id"] % 12
        np.testing.assert_array_equal(read_frame(run_dir, rec), stack[index])


def test_replay_of_real_timelapse_renoised(tmp_path: Path, shared_data: Path) -> None:
    path = shared_data / "timelapse" / "cancer_migration_xyt.tif"
    cfg = make_config(tmp_path, source={"kind": "replay", "path": str(path), "fps": 200,
                                        "loop": False, "photons": 20.0})
    pipeline = Pipeline(cfg)
    pipeline.start(max_frames=10)
    pipeline.wait()
    summary = pipeline.stop().to_dict()
    assert summary["archived"] == 10
    records, _ = read_index(Path(summary["run_dir"]))
    truth = tifffile.imread(path)
    frame = read_frame(Path(summary["run_dir"]), records[3]).astype(np.float64)
    # Re-noised, but the real structure is there: correlated with the recording.
    assert np.corrcoef(frame.ravel(), truth[3].astype(np.float64).ravel())[0, 1] > 0.5


def _sim(**kw: object) -> SimSource:
    src = SimSource(SimSourceConfig(width=128, height=128, ground_truth_history=64,
                                    **kw))  # type: ignore[arg-type]
    src.open()
    return src


def _snap_sequence(src: SimSource, n: int) -> list[tuple[np.ndarray, dict[str, str]]]:
    core = src.core
    core.setShutterOpen(True)
    core.startSequenceAcquisition(n, 0, True)
    out = []
    while len(out) < n:
        if core.getRemainingImageCount():
            img, md = core.popNextImageAndMD()
            out.append((img, dict(md)))
    core.setShutterOpen(False)
    return out


def test_sim_noise_matches_its_ground_truth() -> None:
    src = _sim(exposure_ms=1.0, photons_per_ms=50.0, read_noise_e=1.5, gain_adu_per_e=2.0,
               offset_adu=100.0)
    try:
        frames = _snap_sequence(src, 4)
        for img, md in frames:
            truth = src.ground_truth(int(md["SimFrame"]))
            electrons = (img.astype(np.float64) - 100.0) / 2.0
            resid = electrons - truth
            # Poisson + Gaussian read noise: variance = mean + sigma^2 (gain removed).
            z = resid / np.sqrt(truth + 1.5**2)
            assert abs(resid.mean()) < 0.1
            assert 0.9 < z.var() < 1.1
        fine = src.ground_truth(int(frames[0][1]["SimFrame"]), scale=2)
        coarse = src.ground_truth(int(frames[0][1]["SimFrame"]))
        assert fine.shape == (256, 256)
        assert fine.sum() == pytest.approx(coarse.sum(), rel=0.02)  # same photons, finer grid
    finally:
        src.close()


def test_sim_exposure_and_power_are_core_properties() -> None:
    src = _sim(exposure_ms=2.0, photons_per_ms=20.0, background_photons_per_ms=0.0)
    try:
        core = src.core
        signal = []
        for exposure, power in [(2.0, 1.0), (4.0, 1.0), (4.0, 0.5)]:
            core.setExposure(exposure)
            core.setProperty("SimLaser", "Power", power)
            _img, md = _snap_sequence(src, 1)[0]
            signal.append(float(md["SimPhotonsPeak"]))
        assert signal[1] == pytest.approx(2 * signal[0], rel=0.01)
        assert signal[2] == pytest.approx(signal[0], rel=0.01)
        # Shutter closed: offset and read noise only, no photons.
        core.setAutoShutter(False)
        core.setShutterOpen(False)
        core.startSequenceAcquisition(1, 0, True)
        while not core.getRemainingImageCount():
            pass
        dark, md = core.popNextImageAndMD()
        assert float(md["SimPhotonsPeak"]) == 0.0
        assert abs(float(dark.mean()) - 100.0) < 1.0
    finally:
        src.close()


def test_sim_bleaches_with_dose() -> None:
    src = _sim(exposure_ms=1.0, bleach_dose=20.0)
    try:
        frames = _snap_sequence(src, 30)
        peaks = [float(md["SimPhotonsPeak"]) for _, md in frames]
        assert peaks[-1] < 0.5 * peaks[0]
        assert all(b <= a for a, b in itertools.pairwise(peaks))
    finally:
        src.close()
