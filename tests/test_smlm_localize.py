"""The smappy localizer: accuracy against ground truth, push == batch, blocks, sCMOS data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dimscope.smlm.block import REQUIRED, LocBlock, MissingColumnsError, concat
from dimscope.smlm.localize import (
    Localizer,
    LocalizerSettings,
    SmappyLocalizer,
    iter_tiff,
    localize_frames,
)
from dimscope.smlm.metrics import crlb_pixelated, match, score
from dimscope.smlm.simulate import Camera, GroundTruth, ScmosMaps, SimSettings, SMLMSimulator
from dimscope.smlm.simulate import filaments as make_filaments

pytest.importorskip("smappy")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "smlm"
RAW = SHARED / "storm_scmos_raw_11frames.tif"
CALIB = SHARED / "storm_scmos_calibration_offset_variance_gain.tif"

CAM = Camera(pixel_nm=100.0, gain_adu_per_e=2.0, offset_adu=100.0, read_noise_e=1.5)
SETTINGS = LocalizerSettings(pixel_nm=100.0, psf_sigma_nm=130.0, gain_adu_per_e=2.0,
                             offset_adu=100.0, read_noise_e=1.5, roisize=7)


@pytest.fixture(scope="module")
def simulated() -> tuple[np.ndarray, GroundTruth]:
    s = SimSettings(camera=CAM)
    st = make_filaments(s.extent_nm, np.random.default_rng(11))
    s = s.model_copy(update={"activation_power": s.kinetics.power_for(len(st.labels_nm), 30)})
    return SMLMSimulator(st, s, seed=12).run(300)


def _camera_xy(gt: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    return gt.x_nm + gt.drift_nm[gt.frame, 0], gt.y_nm + gt.drift_nm[gt.frame, 1]


def test_accuracy_against_ground_truth(simulated: tuple[np.ndarray, GroundTruth]) -> None:
    stack, gt = simulated
    locs = SmappyLocalizer(SETTINGS).localize(stack)
    assert set(REQUIRED) <= set(locs.columns)
    gx, gy = _camera_xy(gt)
    inside = (gx >= 0) & (gx < 12800) & (gy >= 0) & (gy < 12800)
    m = match(gt.frame[inside], gx[inside], gy[inside], locs.frame, locs.x_nm, locs.y_nm, 250)
    sc = score(m, 250)
    assert sc.jaccard > 0.8 and sc.precision > 0.97
    # no offset between the simulator's pixel grid and the localizer's
    assert abs(sc.bias_x_nm) < 2 and abs(sc.bias_y_nm) < 2
    # well-separated, bright emitters are localized at the Cramér–Rao bound
    idx = np.flatnonzero(inside)[m.truth]
    cx, cy = crlb_pixelated(gx[idx], gy[idx], gt.photons[idx], 20.0, 130.0, 100.0, 1.5)
    ratio = np.hypot(m.dx_nm, m.dy_nm) / np.hypot(cx, cy)
    assert 0.85 < np.median(ratio) < 1.25
    # the library's precision column is that bound, too
    reported = locs["precision_nm"][m.loc] * np.sqrt(2)
    assert np.median(reported / np.hypot(cx, cy)) == pytest.approx(1.0, abs=0.15)


def test_push_one_frame_at_a_time_equals_batch(
        simulated: tuple[np.ndarray, GroundTruth]) -> None:
    stack, _ = simulated
    stack = stack[:120]
    batch = SmappyLocalizer(SETTINGS).localize(stack)
    live = SmappyLocalizer(SETTINGS.model_copy(update={"flush_frames": 25}))
    assert isinstance(live, Localizer)
    blocks: list[LocBlock] = []
    for i, frame in enumerate(stack):
        blocks += live.push(frame, i)
    blocks += live.flush()
    # blocks tile the frames: every 25 frames, no gap, no overlap
    assert [(b.frame_start, b.frame_stop) for b in blocks] == [
        (0, 25), (25, 50), (50, 75), (75, 100), (100, 120)]
    for b in blocks:
        assert np.all((b.frame >= b.frame_start) & (b.frame < b.frame_stop))
    joined = concat(blocks)
    key = np.lexsort((batch.x_nm, batch.frame))
    key2 = np.lexsort((joined.x_nm, joined.frame))
    assert len(joined) == len(batch)
    np.testing.assert_allclose(joined.x_nm[key2], batch.x_nm[key], atol=1e-3)
    np.testing.assert_allclose(joined["photons"][key2], batch["photons"][key], rtol=1e-4)


def test_frames_must_come_in_order() -> None:
    loc = SmappyLocalizer(SETTINGS)
    frame = np.full((32, 32), 120, np.uint16)
    loc.push(frame, 0)
    with pytest.raises(ValueError, match="expected frame 1, got 2"):
        loc.push(frame, 2)
    with pytest.raises(ValueError, match="shape changed"):
        loc.push(np.zeros((16, 16), np.uint16), 1)


def test_empty_frames_still_close_blocks() -> None:
    loc = SmappyLocalizer(SETTINGS.model_copy(update={"flush_frames": 10}))
    rng = np.random.default_rng(0)
    frames = rng.poisson(20, (25, 32, 32)) * 2 + 100
    blocks = loc.push(frames, 0) + loc.flush()
    assert [(b.frame_start, b.frame_stop) for b in blocks] == [(0, 10), (10, 20), (20, 25)]


def test_localize_a_tiff_through_the_live_path(
        tmp_path: Path, simulated: tuple[np.ndarray, GroundTruth]) -> None:
    import tifffile

    stack, _ = simulated
    path = tmp_path / "raw.tif"
    tifffile.imwrite(path, stack[:60])
    got: list[LocBlock] = []
    n = localize_frames(iter_tiff(path, chunk=16), SmappyLocalizer(SETTINGS), got.append)
    assert n == 60
    direct = SmappyLocalizer(SETTINGS).localize(stack[:60])
    assert len(concat(got)) == len(direct)


def test_block_names_missing_columns() -> None:
    with pytest.raises(MissingColumnsError, match="background, photons"):
        LocBlock(0, 1, {"frame": [0], "x_nm": [1.0], "y_nm": [1.0], "precision_nm": [5.0]})


@pytest.mark.skipif(not (RAW.exists() and CALIB.exists()), reason="shared/data/smlm absent")
def test_real_scmos_frames_with_the_per_pixel_calibration() -> None:
    import tifffile

    raw = tifffile.imread(RAW)
    maps = ScmosMaps.from_tif(CALIB)
    loc = SmappyLocalizer(LocalizerSettings(pixel_nm=160.0, psf_sigma_nm=208.0), maps)
    # photons come from the per-pixel offset and gain
    ph = loc.to_photons(raw[:1])
    np.testing.assert_allclose(ph[0], (raw[0] - maps.offset) / maps.gain, rtol=1e-5,
                               atol=1e-3)
    locs = loc.localize(raw)
    per_frame = np.bincount(locs.frame, minlength=11)
    assert per_frame.min() > 30  # blinking molecules in every frame
    assert np.median(locs["photons"]) > 50 and np.median(locs["background"]) > 0
    # the fitted PSF is a diffraction-limited spot: about one pixel of 160 nm
    assert 0.8 < np.median(locs["sigma_nm"]) / 160 < 1.6
    assert np.all((locs.x_nm >= 0) & (locs.x_nm < 256 * 160))
    meta = loc.metadata()
    assert meta["scmos_calibration"] and meta["library"] == "smappy-smlm"
    with pytest.raises(ValueError, match="do not match the sCMOS calibration"):
        loc2 = SmappyLocalizer(LocalizerSettings(pixel_nm=160.0), maps)
        loc2.push(raw[:, :128, :128], 0)


def test_edge_fits_are_refined_by_em() -> None:
    from dimscope.smlm.psf import stamp

    # one emitter per frame, 120–180 nm from the left edge: its box reaches into the padding
    rng = np.random.default_rng(0)
    n = 150
    x = rng.uniform(120, 180, n)
    y = rng.uniform(1200, 2000, n)
    frames = np.stack([rng.poisson(stamp((32, 32), [xi / 100], [yi / 100], [3000.0], 1.3) + 20)
                       for xi, yi in zip(x, y, strict=True)]) * 2 + 100

    def errors(em: int) -> np.ndarray:
        # the EM refit alone: the multi-emitter refit also fixes such fits (it leaves pixels
        # off the camera out of its likelihood)
        locs = SmappyLocalizer(SETTINGS.model_copy(update={
            "edge_em_iterations": em, "multi_emitter": None})).localize(frames.astype(np.uint16))
        m = match(np.arange(n), x, y, locs.frame, locs.x_nm, locs.y_nm, 250)
        assert m.tp > 0.95 * n
        return np.hypot(m.dx_nm, m.dy_nm)

    cx, cy = crlb_pixelated(140.0, 1600.0, 3000.0, 20.0, 130.0, 100.0, 1.5, roisize=7)
    crlb = float(np.hypot(cx[0], cy[0]))
    plain, refined = np.median(errors(0)), np.median(errors(10))
    assert plain > 2.5 * crlb  # padding alone pulls edge fits inwards
    assert refined < 1.6 * crlb and refined < 0.5 * plain
