"""Noise model (calibration and estimation), noise-aware temporal engine, BM3D/BM4D, enhance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from dimscope.engines import CameraCalibration, EngineError, make_engine
from dimscope.engines.evaluation.quality import score
from dimscope.engines.model_file import ModelCard, read_card
from dimscope.engines.nets import build_network
from dimscope.engines.noise_model import CameraNoise, NoiseModel, estimate_noise_model
from dimscope.engines.normalize import VSTNorm
from dimscope.engines.training.export import export_onnx

CAM = CameraCalibration(gain_adu_per_e=0.8, offset_adu=400.0, read_noise_e=2.2)


def blobs(t: int, h: int = 96, w: int = 96, shift: float = 0.8) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    im = np.zeros((h, w))
    for k in range(12):
        cy, cx = 10 + 7 * k % (h - 20) + shift * t, 8 + 13 * k % (w - 16) + 0.6 * shift * t
        im += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (1.5 + k % 3) ** 2))
    return im / im.max()


def camera(clean: np.ndarray, photons: float, rng: np.random.Generator,
           cal: CameraCalibration = CAM) -> np.ndarray:
    e = rng.poisson(photons * clean) + rng.normal(0, cal.read_noise_e, clean.shape)
    return np.round(cal.offset_adu + cal.gain_adu_per_e * e).astype(np.float32)


def test_calibration_gives_the_poisson_gaussian_variance_and_gat_stabilises_it() -> None:
    model = NoiseModel.from_calibration(CAM)
    rng = np.random.default_rng(0)
    for electrons in (3.0, 30.0, 300.0):
        x = camera(np.full((200, 200), 1.0), electrons, rng)
        expected = model.variance(np.array(CAM.offset_adu + CAM.gain_adu_per_e * electrons))
        assert float(np.var(x)) == pytest.approx(float(expected), rel=0.06)
        assert float(np.std(model.gat(x))) == pytest.approx(1.0, abs=0.07)
    level = np.linspace(0, 5000, 50).astype(np.float32) + 400
    assert np.allclose(model.inverse_gat(model.gat(level)), level, rtol=1e-4, atol=1e-2)


def test_noise_model_is_estimated_from_the_data() -> None:
    rng = np.random.default_rng(1)
    truth = NoiseModel.from_calibration(CAM)
    stack = np.stack([camera(blobs(t, 128, 128, shift=0.3), 60.0, rng) for t in range(6)])
    # Consecutive frames of a slowly moving sample within 15%; one frame alone (edges leak
    # into its detail image) within 30%.
    for frames, tolerance in ((stack, 0.15), (stack[0], 0.3)):
        est = estimate_noise_model(frames)
        assert est.source == "estimated"
        # The variance it predicts at dark and bright levels is what matters for the VST.
        for level in (CAM.offset_adu + 2, CAM.offset_adu + 0.8 * 50):
            assert float(est.variance(np.array(level))) == pytest.approx(
                float(truth.variance(np.array(level))), rel=tolerance)
    with pytest.raises(ValueError, match="at least"):
        estimate_noise_model(np.zeros((8, 8), np.float32))
    # A closed shutter (flat) or a background mostly clipped at zero: constant noise at the
    # measured level, never a failure (an engine must not stop on a dark frame).
    for frame in (np.full((64, 64), 100.0, np.float32),
                  np.where(rng.random((64, 64)) < 0.9, 0.0, rng.poisson(5.0, (64, 64)))):
        dark = estimate_noise_model(frame.astype(np.float32))
        assert dark.alpha > 0 and np.all(np.isfinite(dark.gat(frame)))


def test_camera_noise_uses_the_calibration_or_estimates_then_refines() -> None:
    rng = np.random.default_rng(2)
    frames = [camera(blobs(t), 40.0, rng) for t in range(5)]
    measured = CameraNoise(CAM)
    assert measured.update(frames[:1]).source == "calibration"
    unknown = CameraNoise(CameraCalibration(measured=False), refine_after=4)
    first = unknown.update(frames[:1])
    assert first.source == "estimated"
    assert unknown.update(frames[:2]) is first
    refined = unknown.update(frames[:4])
    assert refined is not first and unknown.update(frames) is refined


@pytest.fixture(scope="module")
def temporal_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 3-frame noise-aware network, exported like a trained one."""
    torch.manual_seed(0)
    hp = {"channels": 4, "levels": 1, "scale": 1, "window": 3, "noise_map": True}
    net = build_network("restore", **hp)
    card = ModelCard(name="t3", task="denoise", arch="restore", hparams=hp, multiple=4,
                     window=3, normalization=VSTNorm().as_dict())
    return export_onnx(net, card, tmp_path_factory.mktemp("m") / "t3.onnx")


def test_temporal_engine_restores_each_frame_from_its_causal_window(temporal_model: Path
                                                                     ) -> None:
    from dimscope.engines.runtime.pytorch import network_from_file

    card = read_card(temporal_model)
    assert card.channels == 4
    net = network_from_file(temporal_model, card).eval()
    rng = np.random.default_rng(3)
    frames = [camera(blobs(t, 40, 44), 20.0, rng) for t in range(5)]  # 40x44: padded to 4s
    engine = make_engine("model", model=str(temporal_model), runtime="openvino")
    engine.prepare(frames[0].shape, np.dtype(np.float32), CAM)
    noise, norm = NoiseModel.from_calibration(CAM), VSTNorm()
    for t, frame in enumerate(frames):
        out = engine.process(frame)
        # What the engine must have fed the network: the last 3 frames, the oldest
        # repeated while fewer have arrived (a single image repeats itself).
        window = frames[max(0, t - 2):t + 1]
        window = [window[0]] * (3 - len(window)) + window
        x, lo, span = norm.inputs(np.stack(window), noise)
        with torch.no_grad():
            y = net(torch.from_numpy(x[None])).numpy()[0, 0]
        expected = norm.invert(y, noise, lo, span)
        assert out.shape == frame.shape and out.dtype == np.float32
        assert np.allclose(out, expected, rtol=1e-3, atol=1e-2 * float(np.std(expected)))
    assert "calibration" in engine.info.noise
    engine.reset()
    assert np.allclose(engine.process(frames[4]), _single(temporal_model, frames[4]), atol=1e-3)


def test_a_new_noise_model_mid_stream_transforms_the_whole_window_again(temporal_model: Path
                                                                        ) -> None:
    """The engine transforms each frame once and reuses it while the frame is in the
    window; a noise model that changes (refined from the data) must apply to every
    frame of the window, not only to frames that arrive after the change."""
    rng = np.random.default_rng(5)
    frames = [camera(blobs(t, 40, 44), 20.0, rng) for t in range(5)]
    engine = make_engine("model", model=str(temporal_model), runtime="openvino")
    engine.prepare(frames[0].shape, np.dtype(np.float32), CAM)
    for frame in frames[:3]:
        engine.process(frame)
    assert engine.noise is not None
    calibrated = NoiseModel.from_calibration(CAM)
    changed = NoiseModel(alpha=calibrated.alpha * 1.5, beta=calibrated.beta)
    engine.noise.model = changed
    out = engine.process(frames[3])
    reference = make_engine("model", model=str(temporal_model), runtime="openvino")
    reference.prepare(frames[0].shape, np.dtype(np.float32), CAM)
    assert reference.noise is not None
    reference.noise.model = changed
    for frame in frames[1:4]:
        expected = reference.process(frame)  # a window transformed wholly with `changed`
    assert np.allclose(out, expected, atol=1e-4 * float(np.std(expected)))
    calibrated_run = make_engine("model", model=str(temporal_model), runtime="openvino")
    calibrated_run.prepare(frames[0].shape, np.dtype(np.float32), CAM)
    for frame in frames[1:4]:
        unchanged = calibrated_run.process(frame)
    assert not np.allclose(out, unchanged, atol=1e-2 * float(np.std(expected)))  # it matters


def _single(model: Path, frame: np.ndarray) -> np.ndarray:
    engine = make_engine("model", model=str(model), runtime="openvino")
    engine.prepare(frame.shape, np.dtype(np.float32), CAM)
    return engine.process(frame)


def test_engine_without_calibration_estimates_the_noise_and_says_so(temporal_model: Path
                                                                     ) -> None:
    rng = np.random.default_rng(4)
    engine = make_engine("model", model=str(temporal_model), runtime="openvino")
    engine.prepare((64, 64), np.dtype(np.float32), CameraCalibration(measured=False))
    engine.process(camera(blobs(0, 64, 64), 30.0, rng))
    assert "estimated" in engine.info.noise


def test_bm3d_and_bm4d_engines_denoise_with_the_camera_vst() -> None:
    rng = np.random.default_rng(5)
    clean = [blobs(t, 64, 64, shift=0.0) for t in range(3)]
    noisy = [camera(c, 10.0, rng) for c in clean]
    truth = CAM.offset_adu + CAM.gain_adu_per_e * 10.0 * clean[-1]
    raw = score(truth, noisy[-1], with_ssim=False)["psnr"]
    results = {}
    for name, options in (("bm3d", {}), ("bm4d", {"window": 3})):
        engine = make_engine(name, **options)
        engine.prepare((64, 64), np.dtype(np.float32), CAM)
        for frame in noisy:
            out = engine.process(frame)
        results[name] = score(truth, out, with_ssim=False)["psnr"]
        assert engine.info.noise.endswith("(calibration)")
    assert results["bm3d"] > raw + 5
    assert results["bm4d"] > results["bm3d"]  # a still sample: the window helps
    with pytest.raises(EngineError, match="2-D"):
        make_engine("bm3d").prepare((2, 8, 8), np.dtype(np.float32), CAM)


def _enhance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", "enhance", *args],
                          capture_output=True, text=True, timeout=240)


def test_enhance_writes_one_float_frame_per_frame_with_provenance(tmp_path: Path,
                                                                  temporal_model: Path
                                                                  ) -> None:
    rng = np.random.default_rng(6)
    stack = np.stack([camera(blobs(t, 48, 48), 20.0, rng) for t in range(4)]).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", stack, photometric="minisblack")
    out = tmp_path / "out.tif"
    done = _enhance(str(tmp_path / "in.tif"), str(out), "--engine", "model", "--model",
                    str(temporal_model), "-q")
    assert done.returncode == 0, done.stderr
    assert "noise model: var = " in done.stderr and "(estimated)" in done.stderr
    result = tifffile.imread(out)
    assert result.shape == stack.shape and result.dtype == np.float32
    provenance = json.loads((tmp_path / "out.tif.json").read_text())
    assert provenance["engine"]["name"] == "t3" and provenance["frames_out"] == 4
    assert provenance["noise_model"]["source"] == "estimated"
    # Interpolation of the raw frames: (T-1)*N+1 frames, the acquired ones in place.
    x3 = tmp_path / "x3.tif"
    done = _enhance(str(tmp_path / "in.tif"), str(x3), "--engine", "none", "--interpolate",
                    "3", "--interp-method", "linear", "--gain", "0.8", "--offset", "400",
                    "--read-noise", "2.2", "-q")
    assert done.returncode == 0, done.stderr
    frames = tifffile.imread(x3)
    assert frames.shape == (10, 48, 48)
    assert np.array_equal(frames[::3], stack.astype(np.float32))
    assert "(calibration)" in done.stderr


@pytest.mark.parametrize("content", [b"not a tiff\n", None])
def test_enhance_refuses_what_is_not_an_image_stack(tmp_path: Path, content: bytes | None
                                                    ) -> None:
    path = tmp_path / "bad.tif"
    if content is None:
        tifffile.imwrite(path, np.zeros((3,), np.uint16))
    else:
        path.write_bytes(content)
    done = _enhance(str(path), str(tmp_path / "o.tif"), "-q")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "bad.tif" in done.stderr
    assert not (tmp_path / "o.tif").exists()
    done = _enhance(str(tmp_path / "missing.tif"), str(tmp_path / "o.tif"), "--gain", "1")
    assert done.returncode == 2 and "no such file" in done.stderr
