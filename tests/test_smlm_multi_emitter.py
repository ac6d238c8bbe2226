"""The multi-emitter refit: two emitters a PSF width or two apart come out as two, at their
positions; an isolated emitter stays one; the simulated filaments get closer to the bound;
results independent of block boundaries; a wrong PSF width, empty and broken input."""

from __future__ import annotations

import numpy as np
import pytest

from dimscope.smlm.block import LocBlock, concat
from dimscope.smlm.localize import LocalizerSettings, SmappyLocalizer
from dimscope.smlm.metrics import crlb_pixelated, match, score
from dimscope.smlm.multi_emitter import MultiEmitterSettings, refit_overlaps
from dimscope.smlm.psf import stamp
from dimscope.smlm.simulate import Camera, SimSettings, SMLMSimulator
from dimscope.smlm.simulate import filaments as make_filaments

pytest.importorskip("smappy")

SETTINGS = LocalizerSettings(pixel_nm=100.0, psf_sigma_nm=130.0, gain_adu_per_e=2.0,
                             offset_adu=100.0, read_noise_e=1.5, roisize=7)
SINGLE = SETTINGS.model_copy(update={"multi_emitter": None})


def _frames(xy_nm: list[np.ndarray], photons: float, n: int, seed: int) -> np.ndarray:
    """n frames of 32², each with the emitters `xy_nm[i]` (k×2, x/y nm) on background 20."""
    rng = np.random.default_rng(seed)
    out = [rng.poisson(stamp((32, 32), p[:, 0] / 100, p[:, 1] / 100, photons, 1.3) + 20)
           for p in xy_nm[:n]]
    return (np.stack(out) * 2 + 100).astype(np.uint16)


def test_a_close_pair_is_fitted_as_two_emitters() -> None:
    rng = np.random.default_rng(3)
    n = 120
    # pairs 250 nm apart (1.9 PSF widths), random orientation, near the frame's centre, in
    # every other frame; a lone emitter in the others (a block of pairs alone would look
    # like a wider PSF, and be left unrefitted)
    centre = rng.uniform(1400, 1800, (n, 2))
    angle = rng.uniform(0, np.pi, n)
    half = 125.0 * np.c_[np.cos(angle), np.sin(angle)]
    pairs = [np.stack([c - d, c + d]) if i % 2 else c[None]
             for i, (c, d) in enumerate(zip(centre, half, strict=True))]
    frames = _frames(pairs, 3000.0, n, seed=4)
    truth_f = np.concatenate([np.full(len(p), i) for i, p in enumerate(pairs)])
    truth = np.concatenate(pairs)

    def scored(settings: LocalizerSettings) -> tuple[float, float]:
        locs = SmappyLocalizer(settings).localize(frames)
        m = match(truth_f, truth[:, 0], truth[:, 1], locs.frame, locs.x_nm, locs.y_nm, 250)
        s = score(m, 250)
        return s.recall, s.rmse_lateral_nm

    cx, cy = crlb_pixelated(1600.0, 1600.0, 3000.0, 20.0, 130.0, 100.0, 1.5, roisize=7)
    bound = float(np.hypot(cx[0], cy[0]))
    recall_single, rmse_single = scored(SINGLE)
    recall_multi, rmse_multi = scored(SETTINGS)
    # the library's single-emitter fits find about one of each pair, between the two
    assert recall_single < 0.8 and rmse_single > 5 * bound
    # the refit finds both, each near its place (the bound is that of an emitter alone)
    assert recall_multi > 0.95
    assert rmse_multi < 2.5 * bound


def test_an_isolated_emitter_stays_one() -> None:
    rng = np.random.default_rng(5)
    n = 150
    xy = [rng.uniform(1000, 2200, (1, 2)) for _ in range(n)]
    frames = _frames(xy, 2000.0, n, seed=6)
    single = SmappyLocalizer(SINGLE).localize(frames)
    multi = SmappyLocalizer(SETTINGS).localize(frames)
    assert abs(len(single) - n) <= 3  # (a rare noise detection, a rare miss)
    assert len(multi) == len(single)  # no emitter invented next to a lone one
    assert np.all(multi["emitters_in_fit"] <= 1)  # the library's fits (0) or refits alone
    truth = np.concatenate(xy)
    m = match(np.arange(n), truth[:, 0], truth[:, 1], multi.frame, multi.x_nm, multi.y_nm, 250)
    m0 = match(np.arange(n), truth[:, 0], truth[:, 1], single.frame, single.x_nm, single.y_nm,
               250)
    # refitted lone emitters (width off by noise) are as good as the library's fits
    assert score(m, 250).rmse_lateral_nm < 1.15 * score(m0, 250).rmse_lateral_nm


def test_dense_filaments_come_closer_to_the_bound() -> None:
    cam = Camera(pixel_nm=100.0, gain_adu_per_e=2.0, offset_adu=100.0, read_noise_e=1.5)
    s = SimSettings(camera=cam)
    st = make_filaments(s.extent_nm, np.random.default_rng(21))
    s = s.model_copy(update={"activation_power": s.kinetics.power_for(len(st.labels_nm), 30)})
    stack, gt = SMLMSimulator(st, s, seed=22).run(200)
    gx, gy = gt.x_nm + gt.drift_nm[gt.frame, 0], gt.y_nm + gt.drift_nm[gt.frame, 1]
    w, h = s.extent_nm
    inside = (gx >= 0) & (gx < w) & (gy >= 0) & (gy < h)

    def scored(settings: LocalizerSettings) -> tuple[float, float]:
        loc = SmappyLocalizer(settings)
        locs = loc.localize(stack)
        m = match(gt.frame[inside], gx[inside], gy[inside], locs.frame, locs.x_nm, locs.y_nm,
                  250)
        sc = score(m, 250)
        return sc.jaccard, sc.rmse_lateral_nm

    jac_single, rmse_single = scored(SINGLE)
    jac_multi, rmse_multi = scored(SETTINGS)
    assert jac_multi > jac_single + 0.02
    assert rmse_multi < 0.6 * rmse_single


def _pairs_block(n: int, seed: int) -> tuple[LocBlock, np.ndarray]:
    """Library fits of n frames, a close pair in every other one and a lone emitter in the
    rest (the lone ones show the PSF's width), and the frames in photons."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(1400, 1800, (n, 2))
    offset = np.array([110.0, 40.0])
    pairs = [np.stack([c - offset, c + offset]) if i % 2 else c[None]
             for i, c in enumerate(centre)]
    frames = _frames(pairs, 3000.0, n, seed=seed + 1)
    locs = SmappyLocalizer(SINGLE).localize(frames)
    return locs, (frames.astype(np.float32) - 100.0) / 2.0


def test_the_refit_does_not_depend_on_where_blocks_start() -> None:
    locs, photons = _pairs_block(40, seed=8)
    settings = MultiEmitterSettings()
    whole, _ = refit_overlaps(locs, photons, 100.0, 130.0, 1.5, settings)
    parts = []
    for f in range(0, 40, 7):  # blocks of 7 frames: other groups batched together
        sel = (locs.frame >= f) & (locs.frame < f + 7)
        part = LocBlock(f, min(f + 7, 40), {k: v[sel] for k, v in locs.columns.items()})
        parts.append(refit_overlaps(part, photons[f:f + 7], 100.0, 130.0, 1.5, settings)[0])
    joined = concat(parts)
    assert len(joined) == len(whole) and (whole["emitters_in_fit"] >= 2).sum() > 20
    a, b = np.lexsort((whole.x_nm, whole.frame)), np.lexsort((joined.x_nm, joined.frame))
    np.testing.assert_allclose(joined.x_nm[b], whole.x_nm[a], atol=1e-3)
    np.testing.assert_allclose(joined.y_nm[b], whole.y_nm[a], atol=1e-3)


def test_a_wrong_psf_width_leaves_the_block_alone_and_says_so() -> None:
    locs, photons = _pairs_block(40, seed=9)
    out, counts = refit_overlaps(locs, photons, 100.0, 170.0, 1.5, MultiEmitterSettings())
    assert counts["blocks_with_other_psf_width"] == 1 and counts["emitters_added"] == 0
    assert len(out) == len(locs) and np.all(out["emitters_in_fit"] == 0)
    np.testing.assert_array_equal(out.x_nm, locs.x_nm)


def test_empty_and_broken_inputs() -> None:
    settings = MultiEmitterSettings()
    photons = np.full((3, 32, 32), 20.0, np.float32)
    out, counts = refit_overlaps(LocBlock.empty(0, 3, extra=["sigma_nm"]), photons, 100.0,
                                 130.0, 1.5, settings)
    assert len(out) == 0 and "emitters_in_fit" in out.columns and counts["groups_refitted"] == 0
    # a fit at the camera's corner with a NaN background: no crash, nothing non-finite out
    locs, ph = _pairs_block(5, seed=10)
    bad = locs.with_columns(background=np.full(len(locs), np.nan, np.float32),
                            x_nm=np.where(np.arange(len(locs)) == 0, 30.0, locs.x_nm),
                            y_nm=np.where(np.arange(len(locs)) == 0, 30.0, locs.y_nm))
    out, _ = refit_overlaps(bad, ph, 100.0, 130.0, 1.5, settings)
    refitted = out["emitters_in_fit"] > 0
    assert refitted.any()
    assert np.isfinite(out.x_nm).all() and np.isfinite(out["background"][refitted]).all()
    assert np.all((out.x_nm >= 0) & (out.x_nm < 3200) & (out.y_nm >= 0) & (out.y_nm < 3200))


def test_a_localizer_keeps_its_columns_through_empty_blocks() -> None:
    frames = _frames([np.array([[1600.0, 1600.0]])] * 30, 2000.0, 30, seed=12)
    frames[10:20] = 140  # frames with nothing in them: empty blocks between others
    loc = SmappyLocalizer(SETTINGS.model_copy(update={"flush_frames": 10}))
    table = loc.localize(frames)
    assert "emitters_in_fit" in table.columns and "sigma_nm" in table.columns


def test_a_psf_wider_than_configured_invents_no_emitters() -> None:
    rng = np.random.default_rng(13)
    n = 150
    xy = [rng.uniform(1000, 2200, (1, 2)) for _ in range(n)]
    wide = np.stack([rng.poisson(stamp((32, 32), p[:, 0] / 100, p[:, 1] / 100, 2000.0, 1.45)
                                 + 20) for p in xy]) * 2 + 100  # the PSF 11.5 % wider
    single = SmappyLocalizer(SINGLE).localize(wide.astype(np.uint16))
    loc = SmappyLocalizer(SETTINGS.model_copy(update={"flush_frames": 50}))
    multi = loc.localize(wide.astype(np.uint16))
    assert loc.multi_emitter_counts["blocks_with_other_psf_width"] == 3
    assert len(multi) == len(single) and np.all(multi["emitters_in_fit"] == 0)
