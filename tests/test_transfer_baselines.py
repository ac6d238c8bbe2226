"""Classical transfer baselines: tuned on training pairs only, scored per image after the
affine fit, RL that is skimage's, the relative blur found, scale 2 and 3-D stacks handled.

The pairs are a sparse random structure seen through two optics: LOW (widefield-like) blurred
with σ 2.2 px and Poisson noise at ~100 photons at the brightest, HIGH (confocal-like) blurred
with σ 0.8 px. The blur that takes HIGH to LOW is √(2.2² − 0.8²) ≈ 2.05 px.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from dimscope.engines.evaluation import transfer_baselines as tb
from dimscope.engines.evaluation.quality import fit_to, normalize_truth, psnr

RELATIVE_BLUR = math.sqrt(2.2**2 - 0.8**2)


def structure(rng: np.random.Generator, shape: tuple[int, ...], density: float = 0.01
              ) -> np.ndarray:
    s = np.zeros(shape)
    on = rng.random(shape) < density
    s[on] = rng.uniform(0.5, 1.0, int(on.sum()))
    return s


def make_pair(seed: int, n: int = 96, photons: float = 100.0, low_sigma: float = 2.2,
              scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = structure(rng, (n, n))
    high = ndi.gaussian_filter(s, 0.8)
    low = ndi.gaussian_filter(s, low_sigma)
    low = rng.poisson(low / low.max() * photons + 2.0).astype(np.float64)
    if scale > 1:
        low = low.reshape(n // scale, scale, n // scale, scale).mean(axis=(1, 3))
    return low.astype(np.float32), high.astype(np.float32)


def make_stack_pair(seed: int, z: int = 8, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = structure(rng, (z, n, n), density=0.004)
    high = ndi.gaussian_filter(s, (0.5, 0.8, 0.8))
    low = ndi.gaussian_filter(s, (1.5, 2.2, 2.2))
    low = rng.poisson(low / low.max() * 100.0 + 2.0)
    return low.astype(np.float32), high.astype(np.float32)


def test_richardson_lucy_is_skimages() -> None:
    from skimage.restoration import richardson_lucy

    rng = np.random.default_rng(0)
    for shape, psf in (((40, 44), tb.gaussian_psf((1.5, 1.5))),
                       ((6, 20, 22), tb.gaussian_psf((1.0, 1.5, 1.5)))):
        image = (rng.random(shape) + 0.05).astype(np.float32)
        steps = dict(tb.richardson_lucy_steps(image, psf, [15, 3]))
        assert sorted(steps) == [3, 15]
        for n in (3, 15):
            ref = richardson_lucy(image, psf, num_iter=n, clip=False)
            np.testing.assert_allclose(steps[n], ref, rtol=2e-4, atol=1e-6)
            np.testing.assert_allclose(tb.richardson_lucy(image, psf, n), ref, rtol=2e-4,
                                       atol=1e-6)
    # a 2-D PSF on a stack deconvolves each plane
    stack = (rng.random((3, 30, 30)) + 0.05).astype(np.float32)
    psf2 = tb.gaussian_psf((1.2, 1.2))
    np.testing.assert_allclose(tb.richardson_lucy(stack, psf2, 7)[1],
                               richardson_lucy(stack[1], psf2, num_iter=7, clip=False),
                               rtol=2e-4, atol=1e-6)


def test_fitted_psnr_is_the_quality_convention() -> None:
    low, high = make_pair(1)
    truth = normalize_truth(high)
    for image in (low, tb.rl2d(low, psf_sigma=2.0, iterations=10), np.zeros_like(low)):
        assert tb.fitted_psnr(truth, image) == pytest.approx(psnr(truth, fit_to(truth, image)),
                                                             abs=1e-6)


def test_tuning_finds_the_relative_blur_and_rl_beats_bicubic() -> None:
    train = [make_pair(seed) for seed in range(4)]
    test = [make_pair(seed) for seed in range(100, 103)]
    rl = tb.tune("rl2d", train)
    assert abs(rl.params["psf_sigma"] - RELATIVE_BLUR) <= 0.45, rl
    assert rl.n_train == 4
    tuned = {"bicubic": tb.tune("bicubic", train), "rl2d": rl}
    report = tb.compare(test, tuned)
    bic, rld = report.methods["bicubic"], report.methods["rl2d"]
    assert rld.mean_psnr > bic.mean_psnr + 2.0
    assert all(r > b for r, b in zip(rld.psnr, bic.psnr, strict=True))
    assert rld.mean_ssim > bic.mean_ssim
    assert tb.best_baseline(report) == "rl2d"
    assert rl.train_psnr == pytest.approx(np.mean([tb.fitted_psnr(normalize_truth(h), rl.apply(lo))
                                                   for lo, h in train]), abs=1e-4)


def test_tuning_never_sees_the_test_pairs() -> None:
    train = [make_pair(seed) for seed in range(3)]
    grid = {"psf_sigma": (1.0, 1.4, 2.0, 2.5), "iterations": (10, 40)}
    tuned = {"rl2d": tb.tune("rl2d", train, grid)}
    # two test sets whose own optimum differs (the second is much less blurred)
    test_a = [make_pair(seed) for seed in range(200, 202)]
    test_b = [make_pair(seed, low_sigma=1.2) for seed in range(300, 302)]
    assert tb.tune("rl2d", test_b, grid).params != tuned["rl2d"].params
    report_a, report_b = tb.compare(test_a, tuned), tb.compare(test_b, tuned)
    assert report_a.methods["rl2d"].baseline == report_b.methods["rl2d"].baseline
    assert report_a.methods["rl2d"].baseline == tb.tune("rl2d", train, grid)
    assert tuned["rl2d"].params == report_a.as_dict()["methods"]["rl2d"]["baseline"]["params"]


def test_scale_two() -> None:
    low, high = make_pair(7, n=96, scale=2)
    assert low.shape == (48, 48) and tb.pair_scale(low, high) == 2
    for out in (tb.bicubic(low, 2), tb.rl2d(low, 2, 1.0, 10),
                tb.bm3d_rl(low, 2, 1.0, 1.0, 10)):
        assert out.shape == (96, 96) and out.dtype == np.float32
    np.testing.assert_array_equal(tb.bicubic(low, 1), low)
    train = [make_pair(seed, scale=2) for seed in range(3)]
    tuned = {"bicubic": tb.tune("bicubic", train),
             "rl2d": tb.tune("rl2d", train, {"psf_sigma": (0.8, 1.1, 1.5), "iterations": (5, 20)})}
    report = tb.compare([(low, high)], tuned)
    assert report.methods["rl2d"].mean_psnr > report.methods["bicubic"].mean_psnr
    with pytest.raises(ValueError, match="times 1, 2 or 4"):
        tb.pair_scale(low, high[:, :90])
    with pytest.raises(ValueError, match="scale"):
        tb.bicubic(low, 3)


def test_rl3d_on_a_small_stack() -> None:
    train = [make_stack_pair(seed) for seed in range(2)]
    low, high = make_stack_pair(50)
    grid = {"sigma_xy": (1.0, 2.0), "sigma_z": (0.5, 1.5), "iterations": (10, 40)}
    tuned = {"bicubic": tb.tune("bicubic", train), "rl2d": tb.tune("rl2d", train, {
        "psf_sigma": (1.0, 2.0), "iterations": (10, 40)}), "rl3d": tb.tune("rl3d", train, grid)}
    assert tuned["rl3d"].params["sigma_xy"] == 2.0
    out = tuned["rl3d"].apply(low)
    assert out.shape == low.shape and out.dtype == np.float32
    assert tb.rl2d(low, 1, 2.0, 10).shape == low.shape  # a stack, plane by plane
    report = tb.compare([(low, high)], tuned, names=["nucleus"])
    scores = {k: m.mean_psnr for k, m in report.methods.items()}
    assert scores["rl3d"] > scores["bicubic"] + 1.0
    assert 0.0 < report.methods["rl3d"].mean_ssim <= 1.0
    with pytest.raises(ValueError, match="stack"):
        tb.rl3d(low[0])
    assert set(tb.tune_all(train[:1], grids={"rl2d": {"psf_sigma": (2.0,), "iterations": (5,)},
                                             "rl3d": {"sigma_xy": (2.0,), "sigma_z": (1.0,),
                                                      "iterations": (5,)},
                                             "bm3d_rl": {"sigma_factor": (1.0,),
                                                         "psf_sigma": (2.0,),
                                                         "iterations": (5,)}})) == set(tb.METHODS)


def test_bm3d_once_per_pair_and_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[int, ...], float]] = []
    real = tb.bm3d_denoise

    def counting(low: np.ndarray, sigma_factor: float = 1.0) -> np.ndarray:
        calls.append((low.shape, sigma_factor))
        return real(low, sigma_factor)

    monkeypatch.setattr(tb, "bm3d_denoise", counting)
    train = [make_pair(seed, n=96) for seed in range(2)]
    tuned = tb.tune("bm3d_rl", train, {"sigma_factor": (0.5, 1.5), "psf_sigma": (1.6, 2.0),
                                       "iterations": (10, 40)}, max_pixels=48 * 48)
    assert sorted(calls) == [((48, 48), 0.5)] * 2 + [((48, 48), 1.5)] * 2  # central crops
    assert set(tuned.params) == {"sigma_factor", "psf_sigma", "iterations",
                                 "background_percentile"}
    assert tuned.apply(train[0][0]).shape == (96, 96)


def test_noise_estimate_in_any_units() -> None:
    rng = np.random.default_rng(3)
    s = ndi.gaussian_filter(structure(rng, (128, 128)), 2.2)
    counts = rng.poisson(s / s.max() * 100 + 5).astype(np.float32)
    adu = 2.0 * counts + 100 + rng.normal(0, 3, counts.shape)
    assert tb.estimate_noise(adu)[0] == pytest.approx(2.0, rel=0.25)
    assert tb.estimate_noise(counts / 50)[0] == pytest.approx(1 / 50, rel=0.25)


def test_report_per_image_worst_and_json() -> None:
    train = [make_pair(seed) for seed in range(2)]
    test = [make_pair(400), make_pair(401, photons=5.0), make_pair(402)]
    tuned = {"bicubic": tb.tune("bicubic", train),
             "rl2d": tb.tune("rl2d", train, {"psf_sigma": (2.0,), "iterations": (20,)})}
    report = tb.compare(test, tuned, names=["a", "dim", "c"])
    for m in report.methods.values():
        assert len(m.psnr) == len(m.ssim) == len(m.seconds) == 3
        assert m.worst == 1  # the 5-photon image
    data = json.loads(json.dumps(report.as_dict()))
    assert data["methods"]["bicubic"]["worst"]["name"] == "dim"
    assert len(data["methods"]["rl2d"]["per_image"]) == 3
    assert data["best"] == tb.best_baseline(report)
    assert data["methods"]["rl2d"]["mean"]["psnr"] == pytest.approx(
        float(np.mean(report.methods["rl2d"].psnr)))
    assert tb.TunedBaseline.from_dict(tuned["rl2d"].as_dict()) == tuned["rl2d"]
    assert "dim" in tb.format_report(report)
    low, high = test[0]
    scores = tb.score_outputs(high, {"raw": low, "rl": tuned["rl2d"].apply(low)})
    assert set(scores["raw"]) == {"psnr", "ssim", "nrmse"}
    assert scores["rl"]["psnr"] == pytest.approx(report.methods["rl2d"].psnr[0])
    # an affine change of an output does not change its score
    again = tb.score_outputs(high, {"raw": 3.0 * low - 7.0})["raw"]
    assert again["psnr"] == pytest.approx(scores["raw"]["psnr"], abs=1e-3)


def test_bad_inputs() -> None:
    low, high = make_pair(0, n=32)
    with pytest.raises(ValueError, match="unknown method"):
        tb.tune("wiener", [(low, high)])
    with pytest.raises(ValueError, match="no parameter"):
        tb.tune("rl2d", [(low, high)], {"sigma": (1.0,)})
    with pytest.raises(ValueError, match="at least one"):
        tb.tune("rl2d", [])
    with pytest.raises(ValueError, match="shape"):
        tb.score_outputs(high, {"x": low[:10]})
