"""Renders, RCC drift, FRC and the metrics, on localizations made from simulated truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dimscope.smlm.block import LocBlock
from dimscope.smlm.drift import rcc
from dimscope.smlm.frc import frc, split_halves
from dimscope.smlm.metrics import crlb_mortensen, crlb_pixelated, match, score
from dimscope.smlm.render import gaussian, histogram
from dimscope.smlm.simulate import Drift, GroundTruth, SimSettings, SMLMSimulator, filaments

FIELD = (12800.0, 12800.0)


def truth(frames: int, drift: Drift, seed: int = 0) -> GroundTruth:
    """Ground truth only: the simulator's emitters, no camera frames needed."""
    s = SimSettings(drift=drift)
    st = filaments(s.extent_nm, np.random.default_rng(seed))
    s = s.model_copy(update={"activation_power": s.kinetics.power_for(len(st.labels_nm), 30)})
    gt = SMLMSimulator(st, s, seed=seed).truth_only(frames)
    # the truth's photons vary; these tests want one precision for all
    return GroundTruth(gt.frame, gt.ids, gt.x_nm, gt.y_nm, np.full(len(gt.frame), 2000.0),
                       gt.drift_nm)


def as_locs(gt: GroundTruth, noise_nm: float, seed: int = 1, drifted: bool = True) -> LocBlock:
    rng = np.random.default_rng(seed)
    n = len(gt.frame)
    dx = gt.drift_nm[gt.frame] if drifted else np.zeros((n, 2))
    return LocBlock(0, int(gt.frame.max()) + 1, {
        "frame": gt.frame, "x_nm": gt.x_nm + dx[:, 0] + rng.normal(0, noise_nm, n),
        "y_nm": gt.y_nm + dx[:, 1] + rng.normal(0, noise_nm, n), "photons": gt.photons,
        "background": np.full(n, 20.0), "precision_nm": np.full(n, noise_nm)})


def test_renders_count_every_localization() -> None:
    locs = as_locs(truth(100, Drift(velocity_nm=(0, 0), amplitude_nm=(0, 0))), 10.0)
    inside = np.count_nonzero((locs.x_nm >= 0) & (locs.x_nm < FIELD[0])
                              & (locs.y_nm >= 0) & (locs.y_nm < FIELD[1]))
    h = histogram(locs, 20.0, FIELD)
    assert h.shape == (640, 640) and h.sum() == inside
    g = gaussian(locs, 20.0, FIELD)
    assert g.sum() == pytest.approx(inside, rel=0.01)
    # one localization: the histogram pixel that holds it
    one = LocBlock(0, 1, {"frame": [0], "x_nm": [45.0], "y_nm": [130.0], "photons": [1.0],
                          "background": [0.0], "precision_nm": [10.0]})
    assert np.argwhere(histogram(one, 20.0, (200.0, 200.0))).tolist() == [[6, 2]]


def test_rcc_recovers_a_simulated_drift() -> None:
    drift = Drift(velocity_nm=(0.04, -0.03), amplitude_nm=(25.0, 15.0), period_frames=2500)
    gt = truth(3000, drift)
    est = rcc(as_locs(gt, 10.0), n_frames=3000, n_segments=10, extent_nm=FIELD)
    true = gt.drift_nm
    err = np.stack([est.dx_nm, est.dy_nm], 1) - true
    err -= err.mean(0)  # a global translation is not observable
    assert np.ptp(true[:, 0]) > 100 and np.ptp(true[:, 1]) > 60  # a real drift to find
    assert np.sqrt(np.mean(np.sum(err ** 2, 1))) < 4.0
    assert est.pairs_total == 45
    # applying it removes the drift from the localizations
    corrected = est.apply(as_locs(gt, 0.0))
    resid = np.stack([corrected.x_nm - gt.x_nm, corrected.y_nm - gt.y_nm], 1)
    assert np.sqrt(np.mean(np.sum((resid - resid.mean(0)) ** 2, 1))) < 4.0
    assert "drift_x_nm" in corrected.columns


def test_frc_uses_alternating_blocks_and_follows_the_precision() -> None:
    gt = truth(1200, Drift(velocity_nm=(0, 0), amplitude_nm=(0, 0)))
    locs = as_locs(gt, 10.0)
    a, b = split_halves(locs, 100)
    assert set(np.unique(a.frame // 100)) == {0, 2, 4, 6, 8, 10}
    assert set(np.unique(b.frame // 100)) == {1, 3, 5, 7, 9, 11}
    with pytest.raises(ValueError, match=">= 100 frames"):
        frc(locs, block_frames=1)
    sharp = frc(locs, 5.0, 100, FIELD).resolution_nm
    blurred = frc(as_locs(gt, 30.0), 5.0, 100, FIELD).resolution_nm
    assert 15 < sharp < blurred < 150
    assert blurred / sharp > 1.8


def test_optimal_matching_beats_greedy() -> None:
    # truth at 0 and 200, localizations at 110 and 330, tolerance 140 nm
    tx, lx = np.array([0.0, 200.0]), np.array([110.0, 330.0])
    m = match([0, 0], tx, [0, 0], [0, 0], lx, [0, 0], tolerance_nm=140)
    # greedy (nearest first) pairs 200↔110 (90 nm) and leaves 0 and 330 alone
    assert m.tp == 2
    assert sorted(np.abs(m.dx_nm)) == [110.0, 130.0]
    s = score(m, 140)
    assert s.jaccard == 1.0 and s.rmse_lateral_nm == pytest.approx(math.sqrt((110 ** 2 +
                                                                               130 ** 2) / 2))
    # frames never mix
    m2 = match([0, 1], tx, [0, 0], [1, 0], lx, [0, 0], tolerance_nm=140)
    assert m2.tp == 1 and m2.fp == 1 and m2.fn == 1


def test_scores_and_efficiency() -> None:
    m = match([0, 0, 0, 0], [0.0, 1000, 2000, 3000], [0.0] * 4, [0, 0, 0],
              [3.0, 1004, 5000], [4.0, 3, 0], tolerance_nm=250)
    s = score(m, 250)
    assert (s.tp, s.fp, s.fn) == (2, 1, 2)
    assert s.jaccard == pytest.approx(2 / 5) and s.recall == 0.5
    assert s.precision == pytest.approx(2 / 3) and s.rmse_lateral_nm == pytest.approx(5.0)
    assert s.efficiency_lateral == pytest.approx(100 - math.hypot(60, 5))


def test_crlb_pixelated_agrees_with_mortensen() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    x, y = rng.uniform(1000, 1100, n), rng.uniform(1000, 1100, n)
    for photons, bg in ((1000.0, 10.0), (5000.0, 20.0), (300.0, 5.0)):
        cx, _ = crlb_pixelated(x, y, photons, bg, 130.0, 100.0, roisize=21)
        mort = crlb_mortensen(photons, bg, 130.0, 100.0)
        # Mortensen's closed form is for the position-averaged bound (within a few %)
        assert float(np.mean(cx)) == pytest.approx(float(mort), rel=0.05)
    # read noise and a free PSF width only add uncertainty
    c0, _ = crlb_pixelated(x[:50], y[:50], 500.0, 5.0, 130.0, 100.0)
    c1, _ = crlb_pixelated(x[:50], y[:50], 500.0, 5.0, 130.0, 100.0, read_noise_e=3.0)
    c2, _ = crlb_pixelated(x[:50], y[:50], 500.0, 5.0, 130.0, 100.0, fit_sigma=True)
    assert np.all(c1 > c0) and np.all(c2 >= c0 * 0.999)
    # the photon-limited case: σ/√N without background
    lim = crlb_mortensen(1e6, 1e-9, 130.0, 1.0)
    assert float(lim) == pytest.approx(130.0 / 1000.0, rel=0.01)
