"""Cross-modality transfer (issue 16): simulated pairs, training from registered pairs, the
`transfer` engine and its trust check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dimscope.engines import CameraCalibration
from dimscope.engines.noise_model import NoiseModel
from dimscope.engines.pairs.simulate import (
    HELD_OUT_CLASSES,
    TRAIN_CLASSES,
    PairOptics,
    density,
    render_pair,
)
from dimscope.engines.trust import TrustMeter

from .conftest import make_config, run_and_record

OPTICS = PairOptics()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_every_structure_class_renders_both_modalities() -> None:
    rng = np.random.default_rng(0)
    for kind in (*TRAIN_CLASSES[:-1], *HELD_OUT_CLASSES):
        truth = density(kind, rng, (96, 96))
        pair = render_pair(truth, PairOptics(scale=2), rng, photons=20.0)
        assert pair.low.shape == (48, 48) and pair.high_clean.shape == (96, 96), kind
        assert pair.high_clean.max() == pytest.approx(1.0) and pair.low.std() > 0, kind
    with pytest.raises(ValueError, match="unknown structure class"):
        density("galaxies", rng, (32, 32))


def test_the_fitted_forward_blur_is_the_relative_psf() -> None:
    from dimscope.engines.training.transfer import fit_forward_sigma

    rng = np.random.default_rng(1)
    pairs = []
    for kind in ("filaments", "puncta", "rings"):
        pair = render_pair(density(kind, rng, (128, 128)), OPTICS, rng, photons=100.0)
        pairs.append((pair.low, pair.high_clean))
    assert fit_forward_sigma(pairs, 1) == pytest.approx(OPTICS.relative_sigma_px, abs=0.1)


def _write_sim_pair(folder: Path, seed: int) -> None:
    """A widefield-like / confocal-like pair on disk, LOW shifted by a few pixels."""
    rng = np.random.default_rng(seed)
    truth = density("filaments", rng, (160, 160)) + density("puncta", rng, (160, 160))
    pair = render_pair(truth, OPTICS, rng, photons=300.0, high_photons=300.0)
    (folder / "low").mkdir(parents=True, exist_ok=True)
    (folder / "high").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "low" / f"field{seed}.tif", np.roll(pair.low, (3, -2), (0, 1)))
    tifffile.imwrite(folder / "high" / f"field{seed}.tif", (pair.high * 1000).astype(np.uint16))


def test_train_transfer_from_registered_pairs_resumes_and_records_them(tmp_path: Path) -> None:
    """The whole chain on real files: register, train (pause, resume), and a card that says
    what the model maps between and learned from; then the engine runs it."""
    from dimscope.engines import make_engine
    from dimscope.engines.model_file import open_model_card
    from dimscope.engines.training.train import TrainSettings, train

    src = tmp_path / "pairs"
    for seed in (1, 2):
        _write_sim_pair(src, seed)
    reg = _cli("pairs", "register", str(src / "low"), str(src / "high"), "--out",
               str(tmp_path / "registered"), "--pixel-size", "0.1", "0.1")
    assert reg.returncode == 0, reg.stderr
    settings = TrainSettings(task="transfer", pairs=[str(tmp_path / "registered")],
                             sim_fraction=0.5, sim_classes=["filaments"], steps=8, batch=2,
                             patch=48, val_every=4, checkpoint_every=4,
                             hparams={"channels": 8, "levels": 2})
    out = tmp_path / "model" / "transfer.onnx"
    first = train(settings, out, pause_at=4, progress=False)
    assert first["steps"] == 4
    resumed = train(settings, out, resume=True, progress=False)
    assert resumed["steps"] == 8 and [h["step"] for h in resumed["history"]] == [4, 8]

    card = open_model_card(out).card
    assert card.task == "transfer" and card.transfer is not None
    provenance = card.transfer
    assert (provenance.low_modality, provenance.high_modality) == ("widefield", "confocal")
    assert (provenance.low_pixel_um, provenance.high_pixel_um) == (0.1, 0.1)
    assert sorted(p["name"] for p in provenance.pairs) == ["field1", "field2"]
    assert all(r["ncc_after"] > r["ncc_before"] for r in provenance.registration)
    assert provenance.loss == "l1+ssim" and provenance.adversarial_loss is False
    assert 0.5 < provenance.forward_psf_sigma_px < 3.5

    engine = make_engine("transfer", model=str(out))
    engine.prepare((64, 80), np.dtype(np.uint16), CameraCalibration())
    restored = engine.process(np.random.default_rng(0).poisson(50, (64, 80)).astype(np.uint16))
    assert restored.shape == (64, 80) and np.isfinite(restored).all()
    assert engine.info.forward_fits_intensity
    assert engine.info.forward_psf_sigma_px == provenance.forward_psf_sigma_px


def test_train_transfer_refuses_a_folder_that_is_not_a_registration(tmp_path: Path) -> None:
    (tmp_path / "not_registered").mkdir()
    result = _cli("train", "transfer", "--pairs", str(tmp_path / "not_registered"),
                  "--steps", "1", "--out", str(tmp_path / "m.onnx"), "-q")
    assert result.returncode == 2 and "report.json" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


# -- trust with the transfer forward model ------------------------------------------------
CAL = CameraCalibration(gain_adu_per_e=1.3, offset_adu=100.0, read_noise_e=1.6)


def _held_out(seed: int, photons: float) -> tuple[np.ndarray, np.ndarray, NoiseModel]:
    rng = np.random.default_rng(seed)
    truth = density(HELD_OUT_CLASSES[seed % 2], rng, (192, 192))
    pair = render_pair(truth, OPTICS, rng, photons=photons, gain=CAL.gain_adu_per_e,
                       offset=CAL.offset_adu, read_noise_e=CAL.read_noise_e)
    return pair.low, pair.high_clean, NoiseModel.from_calibration(CAL)


def test_an_honest_transfer_output_is_consistent_in_any_intensity_units() -> None:
    """The confocal-like truth, in units unrelated to the camera's, blurred by the fitted
    forward PSF and fitted in intensity, agrees with the widefield raw frame."""
    meter = TrustMeter(CAL)
    for seed in range(6):
        raw, truth, noise = _held_out(seed, (20.0, 100.0)[seed % 2])
        score = meter.measure(raw, truth * 37.0 + 5.0, noise=noise,
                              psf_sigma_px=OPTICS.relative_sigma_px, fit_intensity=True).score
        assert not score.alert, score
        assert 0.85 < score.residual_sd < 1.15
        assert "gaussian blur sigma 1.83" in score.forward and "intensity fitted" in score.forward
    # Without the forward blur the same honest output is inconsistent: the check needs it.
    raw, truth, noise = _held_out(1, 100.0)
    assert meter.measure(raw, truth * 37.0, noise=noise, fit_intensity=True).score.alert


def test_a_filament_inserted_into_the_transfer_output_at_3_sigma_is_flagged() -> None:
    meter = TrustMeter(CAL)
    sigma_blur = OPTICS.relative_sigma_px
    for seed in range(4):
        raw, truth, noise = _held_out(seed, 100.0)
        gain = 100.0 * CAL.gain_adu_per_e  # truth (max 1) -> ADU above background
        yy, xx = np.mgrid[:192, :192].astype(np.float32)
        line = np.exp(-((xx - 60 - 20 * seed) ** 2) / (2 * 0.8**2)) * (np.abs(yy - 96) < 40)
        from dimscope.engines.trust import forward_model

        # Contrast after the forward model, in the raw frame's noise sigma at that place.
        seen = forward_model(line.astype(np.float32), 1, sigma_blur) * gain
        local_sd = float(np.sqrt(noise.variance(np.float32(np.median(raw)))))
        amplitude = 3.0 * local_sd / float(seen.max())
        fake = truth + amplitude * line
        score = meter.measure(raw, fake, noise=noise, psf_sigma_px=sigma_blur,
                              fit_intensity=True).score
        assert score.alert and score.max_z < 0, score  # negative: the output is brighter


def test_a_live_transfer_run_publishes_enhanced_frames_with_trust_maps(tmp_path: Path) -> None:
    """`[engine] name = "transfer"` with the shipped widefield -> confocal-like model on the
    simulated microscope (widefield-like PSF): every enhanced frame has its trust map, whose
    header names the forward model."""
    cfg = make_config(tmp_path, source={"kind": "sim", "width": 128, "height": 128,
                                        "exposure_ms": 10.0, "photons_per_ms": 5.0,
                                        "psf_sigma_px": 2.0},
                      engine={"name": "transfer"}, trust={"enabled": True})
    summary, messages = run_and_record(cfg, 3.0, ["enhanced", "trust"])
    enhanced = {h["frame_id"]: h for t, h, _ in messages if t == "enhanced"
                and h["kind"] == "enhanced"}
    trust = {h["frame_id"]: h for t, h, _ in messages if t == "trust"}
    assert len(enhanced) >= 5, summary
    assert set(enhanced) <= set(trust)
    header = next(iter(enhanced.values()))
    assert header["engine"]["name"] == "transfer"
    scores = [h["trust"] for h in enhanced.values()]
    assert all("gaussian blur sigma" in s["forward"] for s in scores)
    run_dir = Path(summary["run_dir"])
    assert sum(1 for _ in (run_dir / "trust.jsonl").open()) >= len(enhanced)
    json.dumps(scores, allow_nan=False)
