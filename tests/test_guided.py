"""Guided denoisers (offline quality models): a network that refines BM3D/BM4D+VST.

The guide is computed by the engine with the same noise model the network sees; a
network whose residual is zero must give back exactly the classical estimate, so
these tests pin the plumbing (channel order, units, the causal window) to the
classical engines' own output.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dimscope.engines import CameraCalibration, EngineError, make_engine
from dimscope.engines.model_file import ModelCard, read_card
from dimscope.engines.nets import RestoreNet, build_network
from dimscope.engines.normalize import VSTNorm
from dimscope.engines.training.export import export_onnx
from dimscope.engines.training.guided import intensity_weights, load_pools, save_pool

from .procs import CLI

pytest.importorskip("bm3d")
pytest.importorskip("bm4d")

CAM = CameraCalibration(gain_adu_per_e=1.1, offset_adu=300.0, read_noise_e=1.6)


def scene(t: int, side: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    im = np.zeros((side, side), np.float32)
    for k in range(6):
        cy, cx = 8 + 6 * k + 0.7 * t, 6 + 7 * k % (side - 12)
        im += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (1.2 + k % 3) ** 2))
    im[side // 2, :] += 0.6  # a filament
    return im / im.max()


def frames(n: int, photons: float = 30.0, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        e = rng.poisson(photons * scene(t)) + rng.normal(0, CAM.read_noise_e, (48, 48))
        out.append(np.round(CAM.offset_adu + CAM.gain_adu_per_e * e).astype(np.float32))
    return out


def zero_residual_model(path: Path, guide: str, window: int) -> Path:
    hp = {"channels": 4, "levels": 1, "scale": 1, "window": window, "noise_map": True,
          "guided": True}
    net = build_network("restore", **hp)
    assert isinstance(net, RestoreNet)
    with torch.no_grad():
        for p in net.head.parameters():
            p.zero_()
    card = ModelCard(name="hq", task="denoise", arch="restore", hparams=hp, multiple=4,
                     window=window, normalization=VSTNorm().as_dict(),
                     guide=guide)  # type: ignore[arg-type]
    return export_onnx(net, card, path)


@pytest.mark.parametrize(("guide", "window"), [("bm3d", 1), ("bm4d", 3)])
def test_a_zero_residual_gives_back_the_classical_estimate(tmp_path: Path, guide: str,
                                                           window: int) -> None:
    model = zero_residual_model(tmp_path / "hq.onnx", guide, window)
    assert read_card(model).channels == window + 2  # frames, guide, noise level
    engine = make_engine("model", model=str(model), runtime="openvino")
    classical = make_engine("bm3d" if guide == "bm3d" else "bm4d",
                            **({} if guide == "bm3d" else {"window": window}))
    for e in (engine, classical):
        e.prepare((48, 48), np.dtype(np.float32), CAM)
    stack = frames(4)
    for f in stack:  # every frame, so the causal windows (padded at the start) must agree
        out, reference = engine.process(f), classical.process(f)
        assert np.allclose(out, reference, rtol=1e-3, atol=0.05)
    # ...and the classical estimate really denoised (the frame is not just passed through).
    assert float(np.abs(out - stack[-1]).mean()) > 1.0


def test_a_guided_model_needs_the_noise_aware_normalisation(tmp_path: Path) -> None:
    hp = {"channels": 4, "levels": 1, "scale": 1, "window": 1, "noise_map": False,
          "guided": True}
    card = ModelCard(name="bad", task="denoise", arch="restore", hparams=hp, multiple=4,
                     guide="bm3d")
    path = export_onnx(build_network("restore", **hp), card, tmp_path / "bad.onnx")
    with pytest.raises(EngineError, match="needs the 'vst' normalisation"):
        make_engine("model", model=str(path))


def test_pools_refuse_another_models_samples(tmp_path: Path) -> None:
    x, y = np.zeros((2, 3, 8, 8), np.float32), np.zeros((2, 1, 8, 8), np.float32)
    save_pool(tmp_path / "a.npz", x, y, "bm3d", 1, "test")
    inputs, _ = load_pools([tmp_path / "a.npz"] * 2, "bm3d", 1)
    assert inputs.shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"a\.npz holds bm3d samples with window 1"):
        load_pools([tmp_path / "a.npz"], "bm4d", 5)
    # a guided transfer pool: one more channel, and the deconvolution it was made with
    rl = '{"psf_sigma_px": 2.0, "iterations": 15}'
    with pytest.raises(ValueError, match="3-channel inputs, not 4"):
        load_pools([tmp_path / "a.npz"], "bm3d", 1, deconvolution=rl)
    save_pool(tmp_path / "t.npz", np.zeros((2, 4, 8, 8), np.float32), y, "bm3d", 1, "test",
              deconvolution=rl)
    assert load_pools([tmp_path / "t.npz"], "bm3d", 1, deconvolution=rl)[0].shape[1] == 4
    with pytest.raises(ValueError, match="made with deconvolution"):
        load_pools([tmp_path / "t.npz"], "bm3d", 1, deconvolution=rl.replace("15", "9"))


def test_intensity_weights_favour_bright_pixels() -> None:
    x = torch.zeros(2, 3, 4, 4)
    x[:, -1] = 0.1  # noise level: span 10
    y = torch.linspace(0, 1, 16).reshape(1, 1, 4, 4).repeat(2, 1, 1, 1)
    w = intensity_weights(x, y)
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(w[0, 0, -1, -1]) > 10 * float(w[0, 0, 0, 0])


def test_train_guided_makes_a_pool_and_a_card_naming_its_guide(tmp_path: Path) -> None:
    out = tmp_path / "hq.onnx"
    cmd = [*CLI, "train", "denoise", "--guide", "bm3d",
           "--pool", "6", "--steps", "3", "--patch", "32", "--batch", "2", "--channels", "4",
           "--levels", "1", "--val-every", "3", "--out", str(out), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    card = read_card(out)
    assert card.guide == "bm3d" and card.hparams["guided"] and card.channels == 3
    pool = out.with_suffix(".pool.npz")
    with np.load(pool) as data:
        assert data["inputs"].shape == (6, 3, 32, 32) and str(data["guide"]) == "bm3d"
    engine = make_engine("model", model=str(out))
    engine.prepare((48, 48), np.dtype(np.float32), CAM)
    assert np.isfinite(engine.process(frames(1)[0])).all()
    bad = subprocess.run([*cmd[:len(CLI) + 2], "--guide", "bm3d", "--window", "3", "--out",
                          str(tmp_path / "x.onnx"), "-q"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "bm3d guide takes --window 1" in bad.stderr


@pytest.mark.parametrize("shape", [(48, 48), (48, 40)])
def test_the_ensemble_turns_every_output_back(tmp_path: Path, shape: tuple[int, int]) -> None:
    """Averaged over rotations/flips (8 square, 4 otherwise), a zero residual must still give
    back the classical estimate pixel for pixel: any output not turned back would smear it."""
    model = zero_residual_model(tmp_path / "hq.onnx", "bm3d", 1)
    engine = make_engine("model", model=str(model), runtime="openvino", ensemble=True)
    classical = make_engine("bm3d")
    for e in (engine, classical):
        e.prepare(shape, np.dtype(np.float32), CAM)
    frame = frames(1)[0][:shape[0], :shape[1]]
    assert np.allclose(engine.process(frame), classical.process(frame), rtol=1e-3, atol=0.05)


def test_guide_window_gives_a_bm3d_guided_model_bm4d_over_the_causal_window(
        tmp_path: Path) -> None:
    """`guide_window` 3 on a BM3D-guided single-frame model: with a zero residual it must give
    back exactly what the bm4d engine (window 3) gives, frame by frame."""
    model = zero_residual_model(tmp_path / "hq.onnx", "bm3d", 1)
    engine = make_engine("model", model=str(model), runtime="openvino", guide_window=3)
    classical = make_engine("bm4d", window=3)
    for e in (engine, classical):
        e.prepare((48, 48), np.dtype(np.float32), CAM)
    for f in frames(4):
        assert np.allclose(engine.process(f), classical.process(f), rtol=1e-3, atol=0.05)
    with pytest.raises(EngineError, match="guide_window applies to guided models"):
        make_engine("denoise", guide_window=3)


@pytest.mark.parametrize("engine", ["denoise_hq", "denoise_hq_t5"])
def test_enhance_with_the_shipped_quality_model_beats_the_classical_method_it_refines(
        tmp_path: Path, engine: str) -> None:
    """The shipped `denoise_hq` through `dimscope enhance`: each frame at least as close to
    the truth as BM3D (BM4D over the same causal window for `denoise_hq_t5`) gives, and the
    provenance names the model."""
    import json

    from dimscope.engines.evaluation.quality import score

    from .procs import CLI

    rng = np.random.default_rng(11)
    clean = np.stack([scene(t) for t in range(4)])
    truth = CAM.offset_adu + CAM.gain_adu_per_e * 8.0 * clean
    electrons = rng.poisson(8.0 * clean) + rng.normal(0, CAM.read_noise_e, clean.shape)
    stack = np.round(CAM.offset_adu + CAM.gain_adu_per_e * electrons).astype(np.uint16)
    import tifffile

    tifffile.imwrite(tmp_path / "in.tif", stack, photometric="minisblack")
    outs = {}
    for name in (engine, "bm3d" if engine == "denoise_hq" else "bm4d"):
        out = tmp_path / f"{name}.tif"
        done = subprocess.run([*CLI, "enhance", str(tmp_path / "in.tif"), str(out),
                               "--engine", name, "--gain", str(CAM.gain_adu_per_e),
                               "--offset", str(CAM.offset_adu), "--read-noise",
                               str(CAM.read_noise_e), "-q"], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        outs[name] = tifffile.imread(out)
    model, classical = outs[engine], outs["bm3d" if engine == "denoise_hq" else "bm4d"]
    for t in range(len(stack)):
        ours = score(truth[t], model[t], with_ssim=False)["psnr"]
        theirs = score(truth[t], classical[t], with_ssim=False)["psnr"]
        assert ours >= theirs - 0.1, (t, ours, theirs)
    provenance = json.loads((tmp_path / f"{engine}.tif.json").read_text())
    assert provenance["engine"]["name"] == "denoise_hq"


def test_train_guided_sr2_refines_bm3d_at_the_camera_sampling(tmp_path: Path) -> None:
    out = tmp_path / "sr2_hq.onnx"
    cmd = [*CLI, "train", "sr2", "--guide", "bm3d", "--pool", "6", "--steps", "3", "--patch",
           "32", "--batch", "2", "--channels", "4", "--levels", "1", "--val-every", "3",
           "--out", str(out), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    card = read_card(out)
    assert (card.task, card.scale, card.guide, card.channels) == ("sr2", 2, "bm3d", 3)
    pool = out.with_suffix(".pool.npz")
    with np.load(pool) as data:  # binned noisy frame, its BM3D, noise level -> the full grid
        assert data["inputs"].shape == (6, 3, 32, 32)
        assert data["targets"].shape == (6, 1, 64, 64) and int(data["scale"]) == 2
    with pytest.raises(ValueError, match="at scale 2, not bm3d with window 1 at scale 1"):
        load_pools([pool], "bm3d", 1)
    restored = runs_and_refuses(out, cmd, tmp_path, ["--guide", "bm4d", "--window", "3"],
                                "guided sr2 model takes --guide bm3d")
    assert restored.shape == (96, 80)


def runs_and_refuses(out: Path, cmd: list[str], tmp_path: Path, bad_args: list[str],
                     message: str) -> np.ndarray:
    """The trained model's ensemble output for a 48×40 frame (finite); and the same
    training command with `bad_args` must exit 2 saying `message`."""
    engine = make_engine("model", model=str(out), ensemble=True)
    engine.prepare((48, 40), np.dtype(np.float32), CAM)
    restored = engine.process(frames(1)[0][:, :40])
    assert np.isfinite(restored).all()
    bad = subprocess.run([*cmd[:len(CLI) + 2], *bad_args, "--out", str(tmp_path / "x.onnx"),
                          "-q"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and message in bad.stderr
    return restored


def test_a_zero_residual_guided_transfer_gives_back_bm3d_deconvolved(tmp_path: Path) -> None:
    """A guided transfer model's base is BM3D+VST deconvolved by Richardson–Lucy as its card
    says: with a zero residual the engine must give back exactly that."""
    from dimscope.engines.bm3d_engine import deconvolved_estimate
    from dimscope.engines.model_file import DeconvolutionGuide

    hp = {"channels": 4, "levels": 1, "scale": 1, "window": 1, "noise_map": True,
          "guided": True, "deconvolved": True}
    net = build_network("restore", **hp)
    with torch.no_grad():
        for p in net.head.parameters():  # type: ignore[union-attr]
            p.zero_()
    rl = DeconvolutionGuide(psf_sigma_px=1.5, iterations=10)
    card = ModelCard(name="thq", task="transfer", arch="restore", hparams=hp, multiple=4,
                     normalization=VSTNorm().as_dict(), guide="bm3d", deconvolution=rl)
    model = export_onnx(net, card, tmp_path / "thq.onnx")
    assert read_card(model).channels == 4  # frame, guide, its deconvolution, noise level
    engine = make_engine("model", model=str(model), runtime="openvino")
    classical = make_engine("bm3d")
    for e in (engine, classical):
        e.prepare((48, 48), np.dtype(np.float32), CAM)
    frame = frames(1)[0]
    expected = deconvolved_estimate(classical.process(frame), rl)
    out = engine.process(frame)
    # equal where the VST is invertible (it clips below the camera's dark level)
    bright = expected > CAM.offset_adu + 2.0
    assert bright.mean() > 0.15  # the scene: spots and a filament on a dark field
    assert np.allclose(out[bright], expected[bright], rtol=1e-3, atol=0.1)
    # ...and RL sharpened the estimate: its peak is higher than BM3D's
    assert expected.max() > classical.process(frame).max() + 1.0


def test_train_guided_transfer_refines_bm3d_deconvolved(tmp_path: Path) -> None:
    out = tmp_path / "transfer_hq.onnx"
    cmd = [*CLI, "train", "transfer", "--guide", "bm3d", "--rl-sigma", "1.8",
           "--rl-iterations", "7", "--pool", "6", "--steps", "3", "--patch", "32", "--batch",
           "2", "--channels", "4", "--levels", "1", "--val-every", "3", "--out", str(out), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    card = read_card(out)
    assert (card.task, card.guide, card.channels) == ("transfer", "bm3d", 4)
    assert card.deconvolution is not None
    assert (card.deconvolution.psf_sigma_px, card.deconvolution.iterations) == (1.8, 7)
    assert card.transfer is not None and card.transfer.loss == "intensity-weighted mse"
    assert card.transfer.forward_psf_sigma_px > 0  # the trust check's forward model
    with np.load(out.with_suffix(".pool.npz")) as data:
        assert data["inputs"].shape == (6, 4, 32, 32) and data["targets"].shape == (6, 1, 32, 32)
    restored = runs_and_refuses(out, cmd, tmp_path, ["--guide", "bm3d", "--scale", "2"],
                                "guided transfer model works at --scale 1")
    assert restored.shape == (48, 40)


def test_a_guided_transfer_pool_is_made_as_the_engine_makes_its_input(tmp_path: Path) -> None:
    """Training inputs (`guided_inputs`) and what the engine feeds the network must be the
    same array for the same frame and noise model, channel by channel."""
    from dimscope.engines.bm3d_engine import classical_library
    from dimscope.engines.model_file import DeconvolutionGuide
    from dimscope.engines.noise_model import NoiseModel
    from dimscope.engines.training.transfer import guided_inputs

    hp = {"channels": 4, "levels": 1, "scale": 1, "window": 1, "noise_map": True,
          "guided": True, "deconvolved": True}
    rl = DeconvolutionGuide(psf_sigma_px=1.7, iterations=9)
    card = ModelCard(name="thq", task="transfer", arch="restore", hparams=hp, multiple=4,
                     normalization=VSTNorm().as_dict(), guide="bm3d", deconvolution=rl)
    model = export_onnx(build_network("restore", **hp), card, tmp_path / "thq.onnx")
    engine = make_engine("model", model=str(model), runtime="openvino")
    engine.prepare((48, 48), np.dtype(np.float32), CAM)
    seen: list[np.ndarray] = []
    run = engine._run  # type: ignore[attr-defined]
    engine._run = lambda x: seen.append(x.copy()) or run(x)  # type: ignore[attr-defined]
    frame = frames(1)[0]
    engine.process(frame)
    expected, _, _ = guided_inputs(frame, NoiseModel.from_calibration(CAM), rl,
                                   classical_library(1))
    assert seen[0].shape == expected.shape == (4, 48, 48)
    # The raw frame and the noise level must match exactly; the BM3D estimate and its
    # deconvolution only to BM3D's own run-to-run rounding (its FFT plans change between
    # calls: ~1e-5 here, more on other CPUs), far below what a wrong step would change.
    assert np.array_equal(seen[0][[0, 3]], expected[[0, 3]])
    assert np.allclose(seen[0][1:3], expected[1:3], atol=1e-3)
    assert not np.allclose(expected[1], expected[2], atol=1e-2)  # RL did change the guide
