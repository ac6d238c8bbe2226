"""The SMLM simulator: structures, kinetics, camera, drift, widefield, ground truth, speed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from dimscope.smlm.psf import stamp
from dimscope.smlm.simulate import (
    BLEACHED,
    Camera,
    Drift,
    GroundTruth,
    Kinetics,
    ScmosMaps,
    SimSettings,
    SMLMSimulator,
    Structure,
    density_image,
    filaments,
    load_plane,
    rings,
    write_simulation,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SINGLES = SHARED / "singles" / "BPAE_actin.tif"
CALIB = SHARED / "smlm" / "storm_scmos_calibration_offset_variance_gain.tif"


def _sim(seed: int = 0, emitting: float = 30.0, **kw: object) -> SMLMSimulator:
    s = SimSettings(**kw)  # type: ignore[arg-type]
    st = filaments(s.extent_nm, np.random.default_rng(seed))
    s = s.model_copy(update={"activation_power": s.kinetics.power_for(len(st.labels_nm),
                                                                      emitting)})
    return SMLMSimulator(st, s, seed=seed + 1)


def test_stamp_conserves_photons_and_centres_on_the_pixel_grid() -> None:
    img = stamp((32, 32), [10.5], [20.5], [1000.0], 1.3)
    assert img.sum() == pytest.approx(1000.0, rel=1e-4)
    # a source at (10.5, 20.5) px sits on the centre of pixel (row 20, column 10)
    assert np.unravel_index(np.argmax(img), img.shape) == (20, 10)
    cy, cx = (np.indices(img.shape) + 0.5).reshape(2, -1) @ img.ravel() / img.sum()
    assert (cx, cy) == (pytest.approx(10.5, abs=1e-3), pytest.approx(20.5, abs=1e-3))
    # half a source off the edge: half its light
    assert stamp((32, 32), [0.0], [16.5], [1000.0], 1.3).sum() == pytest.approx(500, rel=1e-3)


def test_deterministic_by_seed() -> None:
    a, ta = _sim(3).run(20)
    b, tb = _sim(3).run(20)
    c, _ = _sim(4).run(20)
    assert np.array_equal(a, b) and np.array_equal(ta.x_nm, tb.x_nm)
    assert not np.array_equal(a, c)


def test_speed_128_at_30_emitters() -> None:
    sim = _sim(1)
    sim.run(20)  # warm up
    best = 0.0
    for _ in range(2):  # the machine is shared: the better of two short runs
        t0 = time.perf_counter()
        _, truth = sim.run(200)
        best = max(best, 200 / (time.perf_counter() - t0))
    assert 20 <= len(truth.frame) / 200 <= 45
    assert best >= 200, f"{best:.0f} frames/s"


def test_activation_power_drives_blinking_and_bleaching_removes_labels() -> None:
    sim = _sim(2, emitting=20)
    _, low = sim.run(150)
    sim.activation_power = sim.activation_power * 4
    _, high = sim.run(150)
    assert len(high.frame) > 2.5 * len(low.frame)
    # bleaching: the unbleached count only falls, and does fall under strong activation
    before = sim.n_unbleached
    sim.activation_power = sim.activation_power * 20
    sim.run(100)
    assert sim.n_unbleached < 0.9 * before
    assert np.count_nonzero(sim._state == BLEACHED) == len(sim._state) - sim.n_unbleached


def test_kinetics_balance_matches_the_simulated_count() -> None:
    k = Kinetics(k_bleach=0.0)
    p = k.power_for(4000, 30)
    assert k.emitting_fraction(p) * 4000 == pytest.approx(30, rel=1e-6)
    sim = _sim(5, emitting=30, kinetics=k)
    _, truth = sim.run(400)
    assert len(truth.frame) / 400 == pytest.approx(30, rel=0.15)


def test_ground_truth_photons_are_what_the_camera_saw() -> None:
    cam = Camera(gain_adu_per_e=2.0, offset_adu=100.0, read_noise_e=1.0)
    sim = _sim(6, camera=cam, drift=Drift(velocity_nm=(0, 0), amplitude_nm=(0, 0)),
               background_photons=5.0)
    frames, truth = sim.run(50)
    electrons = (frames.astype(np.float64) - 100.0) / 2.0 - 5.0
    seen = electrons.reshape(50, -1).sum(1)
    true = np.bincount(truth.frame, truth.photons, 50)
    # the Poisson + read noise of 16k pixels, and light falling off the edge
    assert np.corrcoef(seen, true)[0, 1] > 0.97
    assert np.median(seen / np.maximum(true, 1)) == pytest.approx(1.0, abs=0.08)
    assert truth.photons.max() <= 5000 and truth.photons.min() > 0


def test_camera_noise_mean_and_variance() -> None:
    cam = Camera(gain_adu_per_e=2.0, offset_adu=100.0, read_noise_e=1.5)
    empty = Structure("empty", np.zeros((0, 2)), (6400.0, 6400.0))
    sim = SMLMSimulator(empty, SimSettings(shape=(64, 64), camera=cam,
                                           background_photons=10.0), seed=0)
    frames, truth = sim.run(40)
    assert len(truth.frame) == 0
    f = frames.astype(np.float64)
    assert f.mean() == pytest.approx(100 + 2 * 10, abs=0.1)
    # var = g² (λ + σ_read²) (+ 1/12 rounding)
    assert f.var() == pytest.approx(4 * (10 + 1.5 ** 2) + 1 / 12, rel=0.03)


@pytest.mark.skipif(not CALIB.exists(), reason="shared/data/smlm absent")
def test_scmos_maps_from_the_real_calibration() -> None:
    maps = ScmosMaps.from_tif(CALIB).crop((64, 64), (10, 20))
    empty = Structure("empty", np.zeros((0, 2)), (6400.0, 6400.0))
    sim = SMLMSimulator(empty, SimSettings(shape=(64, 64), background_photons=0.0), seed=0,
                        scmos=maps)
    frames, _ = sim.run(200)
    mean = frames.astype(np.float64).mean(0)
    # the per-pixel offset map is the mean of dark frames, within its standard error
    z = (mean - maps.offset) / np.sqrt((maps.variance + 1 / 12) / 200)
    assert np.abs(z).max() < 6 and abs(z.mean()) < 0.05
    # and the variance map their variance (the camera's hot pixels included)
    var = frames.astype(np.float64).var(0)
    assert np.corrcoef(var.ravel(), maps.variance.ravel())[0, 1] > 0.9
    with pytest.raises(ValueError, match="does not fit"):
        ScmosMaps.from_tif(CALIB).crop((300, 64))


def test_rings_are_eightfold_at_50nm() -> None:
    st = rings((6400.0, 6400.0), np.random.default_rng(0), n=30, labels_per_corner=1,
               corner_labelled=1.0, jitter_nm=0.0)
    assert len(st.labels_nm) == 30 * 8
    xy = st.labels_nm.reshape(30, 8, 2)
    centre = xy.mean(1, keepdims=True)
    r = np.hypot(*(xy - centre).transpose(2, 0, 1))
    assert np.allclose(r, 50.0)
    ang = np.sort(np.arctan2(*(xy - centre)[..., ::-1].transpose(2, 0, 1)), axis=1)
    assert np.allclose(np.diff(ang, axis=1), 2 * np.pi / 8)


def test_filaments_are_lines() -> None:
    st = filaments((6400.0, 6400.0), np.random.default_rng(0), n=1, jitter_nm=0.0,
                   persistence_nm=1e9)
    xy = st.labels_nm - st.labels_nm.mean(0)
    sv = np.linalg.svd(xy, compute_uv=False)
    assert sv[1] / sv[0] < 0.01  # straight with an infinite persistence length
    dens = st.density(10.0)
    assert dens.shape == (640, 640) and dens.sum() == len(st.labels_nm)


@pytest.mark.skipif(not SINGLES.exists(), reason="shared/data/singles absent")
def test_real_image_as_density_map() -> None:
    plane = load_plane(SINGLES)
    st = density_image(plane, (12800.0, 12800.0), np.random.default_rng(0),
                       image_pixel_nm=20.0, n_labels=20000)
    # labels follow the image: the label density per image pixel correlates with it
    crop = plane[:640, :640]
    dens = st.density(20.0)
    assert dens.shape == crop.shape

    def blocks(img: np.ndarray) -> np.ndarray:  # 8×8 sums: fewer Poisson-noisy pixels
        return img.reshape(80, 8, 80, 8).sum((1, 3)).ravel()

    assert np.corrcoef(blocks(dens), blocks(crop))[0, 1] > 0.8
    with pytest.raises(ValueError, match="too small"):
        density_image(plane, (12800.0, 12800.0), np.random.default_rng(0),
                      image_pixel_nm=1.0)


def test_widefield_psf_is_15_percent_wider() -> None:
    one = Structure("one", np.array([[3200.0, 3200.0]]), (6400.0, 6400.0))
    s = SimSettings(shape=(64, 64), background_photons=0.0, widefield_background_photons=0.0,
                    widefield_photons_per_label=2e5, drift=Drift(velocity_nm=(0, 0),
                                                                  amplitude_nm=(0, 0)),
                    camera=Camera(read_noise_e=0.0, offset_adu=0.0, gain_adu_per_e=1.0),
                    photons_range=(2e5, 2e5), kinetics=Kinetics(k_on_dark=50.0, k_off=0.01,
                                                                k_bleach=0.0))
    sim = SMLMSimulator(one, s, seed=0)
    wf = sim.widefield().astype(np.float64)
    frame, truth = sim.step()
    assert len(truth.ids) == 1

    def width(img: np.ndarray) -> float:
        yy, xx = np.indices(img.shape) + 0.5
        m = img.sum()
        cx, cy = (img * xx).sum() / m, (img * yy).sum() / m
        var = (img * ((xx - cx) ** 2 + (yy - cy) ** 2)).sum() / m / 2 - 1 / 12
        return float(np.sqrt(var)) * 100.0

    assert width(frame.astype(np.float64)) == pytest.approx(130.0, rel=0.02)
    assert width(wf) == pytest.approx(130.0 * 1.15, rel=0.02)


def test_drift_moves_the_emitters_and_is_in_the_truth() -> None:
    d = Drift(velocity_nm=(1.0, -0.5), amplitude_nm=(0, 0))
    assert np.allclose(d.at([0, 10]), [[0, 0], [10, -5]])
    sim = _sim(7, drift=d)
    _, truth = sim.run(30)
    assert np.allclose(truth.drift_nm, d.at(np.arange(30)))


def test_write_simulation_files_read_back(tmp_path: Path) -> None:
    import tifffile

    paths = write_simulation(tmp_path / "sim", _sim(8, shape=(64, 64)), 25)
    raw = tifffile.imread(paths["raw"])
    assert raw.shape == (25, 64, 64) and raw.dtype == np.uint16
    truth = GroundTruth.load(paths["truth"])
    assert truth.frame.max() < 25 and truth.drift_nm.shape == (25, 2)
    assert tifffile.imread(paths["widefield"]).shape == (64, 64)
    assert tifffile.imread(paths["structure"]).shape == (640, 640)
