"""Trust maps (issue 11): the physics of the score, and what a live run publishes and keeps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dimscope.daemon.trust_log import read_trust_log
from dimscope.engines import CameraCalibration, register_engine
from dimscope.engines.noise_model import NoiseModel
from dimscope.engines.trust import TrustMeter, alert_threshold, forward_model

from .conftest import make_config, run_and_record

CAL = CameraCalibration(gain_adu_per_e=2.0, offset_adu=100.0, read_noise_e=1.5)
NOISE = NoiseModel.from_calibration(CAL)


def _scene(shape: tuple[int, int] = (256, 256), seed: int = 0) -> np.ndarray:
    """Expected ADU: background plus filaments and puncta (a fluorescence-like truth)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    photons = np.full(shape, 2.0, np.float32)
    for _ in range(6):
        a, c = rng.uniform(0, np.pi), rng.uniform(0, shape[1])
        d = (yy - shape[0] / 2) * np.cos(a) - (xx - c) * np.sin(a)
        photons += 40 * np.exp(-d**2 / 2)
    for _ in range(15):
        cy, cx = rng.uniform(10, shape[0] - 10), rng.uniform(10, shape[1] - 10)
        photons += 60 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.5)
    return photons * np.float32(CAL.gain_adu_per_e) + np.float32(CAL.offset_adu)


def _measure(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    e = (expected - CAL.offset_adu) / CAL.gain_adu_per_e
    electrons = rng.poisson(e).astype(np.float32) + rng.normal(0, CAL.read_noise_e, e.shape)
    return np.round(electrons * CAL.gain_adu_per_e + CAL.offset_adu).astype(np.float32)


def _blob(shape: tuple[int, int], cy: int, cx: int, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_the_truth_scores_as_white_noise_and_never_alerts() -> None:
    truth, rng, meter = _scene(), np.random.default_rng(1), TrustMeter(CAL)
    scores = [meter.measure(_measure(truth, rng), truth, noise=NOISE).score for _ in range(20)]
    assert not any(s.alert for s in scores)
    assert all(0.9 < s.residual_sd < 1.1 and 0.72 < s.mean_abs_z < 0.88 for s in scores)
    assert max(abs(s.max_z) for s in scores) < scores[0].threshold


def test_raw_passed_off_as_enhanced_is_trivially_consistent() -> None:
    raw = _measure(_scene(), np.random.default_rng(2))
    for enhanced in (raw, raw.copy()):  # the shortcut, and the arithmetic
        score = TrustMeter(CAL).measure(raw, enhanced, noise=NOISE).score
        assert score.mean_abs_z == 0 and score.max_z == 0 and not score.alert


def test_an_engine_emitting_nan_alerts_and_the_header_stays_json() -> None:
    import json

    truth = _scene()
    raw = _measure(truth, np.random.default_rng(8))
    broken = truth.copy()
    broken[10:20, 10:20] = np.nan
    score = TrustMeter(CAL).measure(raw, broken, noise=NOISE).score
    assert score.alert
    json.loads(json.dumps(score.as_dict(), allow_nan=False))


def test_one_bad_sensor_column_does_not_decide_the_score() -> None:
    truth = _scene((512, 512))
    raw = _measure(truth, np.random.default_rng(9))
    raw[:, 0] += 40 * float(np.sqrt(NOISE.variance(np.float32(truth.mean()))))  # a hot column
    score = TrustMeter(CAL).measure(raw, truth, noise=NOISE).score
    assert 0.9 < score.residual_sd < 1.1


@pytest.mark.parametrize("sign", [1, -1], ids=["inserted", "erased"])
def test_an_inserted_or_erased_punctum_is_flagged_where_it_is(sign: int) -> None:
    truth = _scene()
    raw = _measure(truth, np.random.default_rng(3))
    cy, cx = 100, 140
    amplitude = 6 * float(np.sqrt(NOISE.variance(np.float32(truth[cy, cx]))))
    report = TrustMeter(CAL).measure(raw, truth + sign * amplitude * _blob(truth.shape, cy, cx,
                                                                           2.0), noise=NOISE)
    assert report.score.alert
    peak = np.unravel_index(np.argmax(np.abs(report.map)), report.map.shape)
    assert abs(peak[0] - cy // 2) <= 2 and abs(peak[1] - cx // 2) <= 2
    # Sign: an invented structure makes the raw dimmer than the enhanced frame (negative).
    assert np.sign(report.score.max_z) == -sign
    assert report.map.shape == (128, 128) and report.map.dtype == np.float32


def test_super_resolution_is_checked_through_the_camera_binning() -> None:
    fine = np.kron(_scene((128, 128)), np.ones((2, 2), np.float32))  # truth at 2x sampling
    raw = _measure(forward_model(fine, 2), np.random.default_rng(4))
    meter = TrustMeter(CAL)
    honest = meter.measure(raw, fine, scale=2, noise=NOISE).score
    faked = meter.measure(raw, fine + 80 * _blob(fine.shape, 120, 120, 3.0), scale=2,
                          noise=NOISE).score
    assert not honest.alert and faked.alert


def test_without_a_calibration_the_meter_estimates_the_noise() -> None:
    truth, rng = _scene(), np.random.default_rng(5)
    meter = TrustMeter(CameraCalibration(measured=False))
    scores = [meter.measure(_measure(truth, rng), truth).score for _ in range(6)]
    assert all("estimated" in s.noise for s in scores)
    assert not any(s.alert for s in scores) and 0.8 < scores[-1].residual_sd < 1.2


def test_alert_threshold_grows_with_the_frame() -> None:
    small, large = alert_threshold((128, 128), 1e-3), alert_threshold((2048, 2048), 1e-3)
    assert 4.5 < small < large < 7.5
    assert alert_threshold((512, 512), 1e-4) > alert_threshold((512, 512), 1e-2)


# -- live -------------------------------------------------------------------------------------

def test_every_enhanced_frame_has_a_trust_frame_and_a_log_line(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, engine={"name": "denoise"})
    summary, received = run_and_record(cfg, 2.5, ["enhanced", "trust"])
    enhanced = {h["frame_id"]: h for t, h, _ in received if t == "enhanced"}
    trust = {h["frame_id"]: (h, px) for t, h, px in received if t == "trust"}
    assert len(enhanced) > 10 and set(enhanced) == set(trust)
    for fid, h in enhanced.items():
        th, tmap = trust[fid]
        assert h["schema"] == "dimscope.frame/2" and h["kind"] == "enhanced"
        assert th["kind"] == "trust" and th["source_ids"] == h["source_ids"] == [fid]
        assert th["engine"] == h["engine"] and h["engine"]["verified"] is True
        assert len(h["engine"]["model_sha256"]) == 64
        assert h["trust"] == th["trust"] and "alert" in h["trust"]
        assert tmap.shape == ((h["shape"][0] + 1) // 2, (h["shape"][1] + 1) // 2)
        assert th["pixel_size_um"] == pytest.approx(2 * h["pixel_size_um"])
    log = read_trust_log(Path(summary["run_dir"]))
    engine = summary["stages"]["engine"]
    assert len(log) == engine["passed"] and {e["frame_id"] for e in log} >= set(enhanced)
    assert engine["trust_alerts"] == sum(e["trust"]["alert"] for e in log)
    assert engine["trust_ms"]["n"] == engine["passed"]


@pytest.fixture
def hallucinating_engine() -> Iterator[str]:
    from dimscope.engines import unregister_engine

    register_engine("hallucinating", "tests.fake_engines:HallucinatingEngine")
    yield "hallucinating"
    unregister_engine("hallucinating")


def test_a_hallucinating_engine_is_flagged_and_the_honest_one_is_not(
        tmp_path: Path, hallucinating_engine: str) -> None:
    rng = np.random.default_rng(6)
    movie = np.stack([_scene((128, 128), seed=0) for _ in range(4)])
    movie = np.clip((movie - CAL.offset_adu) / CAL.gain_adu_per_e, 0, None)  # clean photons
    tifffile.imwrite(tmp_path / "clean.tif", (movie * 10 + rng.uniform(0, 1, movie.shape)
                                             ).astype(np.uint16), photometric="minisblack")
    source = {"kind": "replay", "path": str(tmp_path / "clean.tif"), "fps": 20, "photons": 60,
              "gain_adu_per_e": CAL.gain_adu_per_e, "offset_adu": CAL.offset_adu,
              "read_noise_e": CAL.read_noise_e, "seed": 3}
    alerts = {}
    for name in ("denoise", hallucinating_engine):
        cfg = make_config(tmp_path / name, source=source, engine={"name": name})
        summary, _ = run_and_record(cfg, 2.0, [])
        log = [e for e in read_trust_log(Path(summary["run_dir"])) if e["kind"] == "enhanced"]
        assert len(log) > 5
        alerts[name] = sum(e["trust"]["alert"] for e in log) / len(log)
        assert summary["acquired"] == summary["archived"]
    assert alerts["denoise"] == 0.0
    assert alerts[hallucinating_engine] == 1.0


# -- interpolated frames ----------------------------------------------------------------------

def _drifting_pair(shift: float = 2.0, seed: int = 7) -> tuple[np.ndarray, ...]:
    """Expected ADU of a scene at t = 0 and 1, drifting `shift` px per frame, and their raw
    frames."""
    from scipy.ndimage import shift as move

    truth0 = _scene((128, 128), seed=seed)
    one = move(truth0, (0, shift), order=1, mode="nearest").astype(np.float32)
    rng = np.random.default_rng(seed)
    return truth0, one, _measure(truth0, rng), _measure(one, rng)


def test_an_exact_interpolation_of_subpixel_motion_does_not_alert() -> None:
    """The truth at t = 0.5 of a scene drifting 1.3 px per frame (sampling between pixels)
    is consistent with its neighbours' raw frames."""
    from scipy.ndimage import shift as move

    from dimscope.engines.trust import InterpolatedTrust

    truth0 = _scene((128, 128), seed=11)
    half, one = (move(truth0, (0.4 * k, 1.3 * k), order=3, mode="nearest").astype(np.float32)
                 for k in (0.5, 1.0))
    meter = InterpolatedTrust(CAL)
    rng = np.random.default_rng(12)
    truth0.flags.writeable = one.flags.writeable = False
    alerts = [meter.measure_interpolated(_measure(truth0, rng), _measure(one, rng), truth0, one,
                                         half, 0.5, noise=NOISE).score.alert
              for _ in range(10)]
    assert sum(alerts) == 0


def test_an_interpolated_frame_is_checked_against_its_neighbours_raw_frames() -> None:
    from dimscope.engines.interpolators import make_interpolator
    from dimscope.engines.trust import InterpolatedTrust

    a, b, raw_a, raw_b = _drifting_pair()
    for x in (a, b):
        x.flags.writeable = False
    flow = make_interpolator("flow")
    flow.prepare(a.shape)
    honest = flow.between(a, b, 0.5)
    meter = InterpolatedTrust(CAL)
    score = meter.measure_interpolated(raw_a, raw_b, a, b, honest, 0.5, noise=NOISE).score
    assert not score.alert and score.flow_inconsistent is not None
    assert score.flow_inconsistent < 0.2 and 0.7 < score.residual_sd < 1.3
    # a punctum that is in neither neighbour
    amplitude = 6 * float(np.sqrt(NOISE.variance(np.float32(honest[60, 40]))))
    faked = honest + amplitude * _blob(a.shape, 60, 40, 2.0)
    report = meter.measure_interpolated(raw_a, raw_b, a, b, faked, 0.5, noise=NOISE)
    peak = np.unravel_index(np.argmax(np.abs(report.map)), report.map.shape)
    assert report.score.alert and report.score.max_z < 0
    assert abs(peak[0] - 30) <= 2 and abs(peak[1] - 20) <= 2
    # plain blending of a moving scene leaves ghosts the measurements do not show
    ghosts = meter.measure_interpolated(raw_a, raw_b, a, b, 0.5 * (a + b), 0.5, noise=NOISE)
    assert ghosts.score.alert
    assert ghosts.score.flagged_fraction > 2 * score.flagged_fraction


def test_every_interpolated_frame_has_its_trust_map_and_log_line(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, engine={"name": "vst_gaussian"},
                      interpolate={"factor": 2, "method": "flow"})
    summary, received = run_and_record(cfg, 2.5, ["interpolated", "interp_trust"])
    interpolated = {(tuple(h["source_ids"]), h["t"]): h for t, h, _ in received
                    if t == "interpolated"}
    maps = {(tuple(h["source_ids"]), h["t"]): (h, px) for t, h, px in received
            if t == "interp_trust"}
    assert len(interpolated) > 10 and set(interpolated) == set(maps)
    for key, h in interpolated.items():
        th, tmap = maps[key]
        assert th["kind"] == "trust" and h["trust"] == th["trust"]
        assert "flow_inconsistent" in h["trust"]
        assert tmap.shape == ((h["shape"][0] + 1) // 2, (h["shape"][1] + 1) // 2)
    log = read_trust_log(Path(summary["run_dir"]), "trust_interpolated.jsonl")
    stage = summary["stages"]["interpolate"]
    assert len(log) == stage["passed"] and stage["trust_ms"]["n"] == stage["passed"]
    assert all(e["kind"] == "interpolated" and len(e["source_ids"]) == 2 for e in log)
