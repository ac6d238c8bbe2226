"""Live self-supervised adaptation: it learns from noisy frames alone, the engine swaps the
adapted model in while running, no raw frame is lost, and only a real improvement is used."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from dimscope.daemon.config import ConfigError
from dimscope.drivers.specimen import Specimen
from dimscope.engines import CameraCalibration, EngineError, make_engine
from dimscope.engines import adaptation as adaptation_module
from dimscope.engines.adaptation import AdaptSettings, AdaptTrainer
from dimscope.engines.evaluation.quality import score
from dimscope.engines.model_file import ModelCard, file_digest, read_card
from dimscope.engines.nets import build_network
from dimscope.engines.noise_model import NoiseModel
from dimscope.engines.normalize import PercentileNorm, VSTNorm
from dimscope.engines.training.export import export_onnx
from dimscope.engines.training.train import TrainSettings, train

from .conftest import make_config

CAM = CameraCalibration(gain_adu_per_e=0.8, offset_adu=400.0, read_noise_e=2.2)
PHOTONS = 20.0


def _restore_net(path: Path, window: int = 5, vst: bool = True, seed: int = 0) -> Path:
    """An untrained small restore network, exported like a trained one."""
    torch.manual_seed(seed)
    hp = {"channels": 8, "levels": 2, "scale": 1, "window": window, "noise_map": vst}
    card = ModelCard(name="t5", task="denoise", arch="restore", hparams=hp, multiple=8,
                     window=window, version="1",
                     normalization=(VSTNorm() if vst else PercentileNorm()).as_dict())
    return export_onnx(build_network("restore", **hp), card, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    torch.set_num_threads(1)
    # Deliberately weak: 200 steps of supervised training on simulated clips (~5 s).
    weak = folder / "weak.onnx"
    train(TrainSettings(task="denoise", window=5, vst=True, steps=200, batch=4, patch=48,
                        lr=2e-3, hparams={"channels": 16, "levels": 2}, val_every=10_000,
                        checkpoint_every=10_000, sim_fraction=1.0), weak, progress=False)
    return {"weak": weak, "untrained": _restore_net(folder / "untrained.onnx"),
            "other": _restore_net(folder / "other.onnx", seed=1),
            "window3": _restore_net(folder / "w3.onnx", window=3),
            "percentile": _restore_net(folder / "pct.onnx", window=1, vst=False)}


@pytest.fixture(scope="module")
def movie() -> tuple[np.ndarray, np.ndarray]:
    """(noisy, truth) 96 frames of 128² of the simulated specimen (drifting filaments,
    moving puncta) at 20 photons, Poisson–Gaussian with the camera `CAM`; truth in ADU."""
    spec = Specimen(128, 128, seed=3, n_tubules=30, n_puncta=15, drift_px_per_s=2.0)
    rel = np.stack([spec.render(spec.state_at(0.05 * t, 1.0)) for t in range(96)]) + 0.02
    rng = np.random.default_rng(0)
    e = rng.poisson(rel * PHOTONS) + rng.normal(0, CAM.read_noise_e, rel.shape)
    noisy = np.round(CAM.offset_adu + CAM.gain_adu_per_e * e).astype(np.float32)
    return noisy, (CAM.offset_adu + CAM.gain_adu_per_e * PHOTONS * rel).astype(np.float32)


def _psnr(model: Path, noisy: np.ndarray, truth: np.ndarray) -> float:
    """Mean PSNR against the truth of the engine's causal restoration, frames 4 on."""
    engine = make_engine("model", model=str(model), runtime="openvino")
    engine.prepare(noisy.shape[1:], np.dtype(np.float32), CAM)
    values = []
    for t, frame in enumerate(noisy):
        out = engine.process(frame)
        if t >= 4:
            values.append(score(truth[t], out, with_ssim=False)["psnr"])
    engine.close()
    return float(np.mean(values))


def test_adapting_a_weak_model_lowers_the_held_back_loss_and_restores_better(
        tmp_path: Path, models: dict[str, Path], movie: tuple[np.ndarray, np.ndarray]) -> None:
    noisy, truth = movie
    trainer = AdaptTrainer(models["weak"], tmp_path,
                           AdaptSettings(lr=1e-3, min_export_interval_s=0.0),
                           NoiseModel.from_calibration(CAM))
    trainer.add_stack(noisy)
    assert trainer.train_blocks and trainer.val_blocks
    held = {int(n) for b in trainer.val_blocks for n in range(b.index * trainer.block_len,
                                                               (b.index + 1) * trainer.block_len)}
    trained = {int(n) for b in trainer.train_blocks
               for n in range(b.index * trainer.block_len, (b.index + 1) * trainer.block_len)}
    assert not held & trained  # no held-back frame is ever an input or a target
    reports = [trainer.run_round() for _ in range(6)]
    first, last = reports[0], reports[-1]
    # The held-back self-supervised loss fell, round after round ...
    assert all(r.improved for r in reports[:3])
    assert last.loss_adapted < 0.95 * first.loss_served
    # ... and so did the error against the truth it never saw.
    before = _psnr(models["weak"], noisy, truth)
    assert trainer.last_path is not None
    after = _psnr(trainer.last_path, noisy, truth)
    assert after > before + 0.3, (before, after)
    card = read_card(trainer.last_path)
    assert card.version == f"1@adapted-{trainer.exported}" and trainer.exported >= 3
    note = card.training
    assert note["frames_used"] == len(noisy) // trainer.block_len * trainer.block_len
    assert note["steps"] == last.total_steps and note["loss_after"] < note["loss_before"]
    assert card.window == 5 and card.hparams == read_card(models["weak"]).hparams


def test_a_round_whose_held_back_loss_does_not_fall_is_not_exported(
        tmp_path: Path, models: dict[str, Path], movie: tuple[np.ndarray, np.ndarray]) -> None:
    noisy, _ = movie
    noise = NoiseModel.from_calibration(CAM)
    for settings, steps in ((AdaptSettings(lr=0.0), None), (AdaptSettings(), 0),
                            (AdaptSettings(lr=1e-3, margin=0.99), None)):
        trainer = AdaptTrainer(models["weak"], tmp_path / "out", settings, noise)
        trainer.add_stack(noisy[:48])
        report = trainer.run_round(steps=steps)
        assert not report.improved and report.path is None and report.version is None
        if settings.lr == 0.0 or steps == 0:
            assert report.loss_adapted == pytest.approx(report.loss_served, rel=1e-6)
            assert not report.reset
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    with pytest.raises(EngineError, match="at least"):
        AdaptTrainer(models["weak"], tmp_path, AdaptSettings(), noise).add_stack(noisy[:10])


def test_hot_swap_keeps_the_window_and_noise_model_and_names_the_new_version(
        models: dict[str, Path], movie: tuple[np.ndarray, np.ndarray]) -> None:
    noisy, _ = movie
    frames = noisy[:6, :64, :72]
    swapped = make_engine("model", model=str(models["untrained"]), runtime="openvino")
    swapped.prepare(frames.shape[1:], np.dtype(np.float32), CameraCalibration(measured=False))
    for f in frames[:5]:
        swapped.process(f)
    noise_before = swapped.noise.model  # type: ignore[attr-defined]
    swapped.swap_model(models["other"])  # type: ignore[attr-defined]
    assert swapped.info.version == f"1+{file_digest(models['other'])}"
    assert swapped.info.runtime == "openvino"
    fresh = make_engine("model", model=str(models["other"]), runtime="openvino")
    fresh.prepare(frames.shape[1:], np.dtype(np.float32), CameraCalibration(measured=False))
    for f in frames[:5]:
        fresh.process(f)
    # Same window (the last 5 frames), same noise model: the same output as an engine that
    # ran the new model all along.
    assert swapped.noise.model is noise_before  # type: ignore[attr-defined]
    assert np.allclose(swapped.process(frames[5]), fresh.process(frames[5]), atol=1e-3)
    assert swapped.info.version == fresh.info.version
    with pytest.raises(EngineError, match="window"):
        swapped.swap_model(models["window3"])  # type: ignore[attr-defined]


def test_adapt_needs_a_noise_aware_model_and_says_which(tmp_path: Path,
                                                        models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="engine 'vst_gaussian' is not a trained model"):
        make_config(tmp_path, engine={"name": "vst_gaussian", "adapt": True})
    with pytest.raises(ConfigError, match=r"pct\.onnx .*'percentile' normalisation"):
        make_config(tmp_path, engine={"name": "model", "adapt": True,
                                      "options": {"model": str(models["percentile"])}})
    cfg = make_config(tmp_path, engine={"name": "model", "adapt": True,
                                        "options": {"model": str(models["untrained"])}})
    assert cfg.engine.adapt
    assert not make_config(tmp_path).engine.adapt  # off by default


def test_live_adaptation_swaps_the_model_in_a_running_pipeline_and_loses_no_raw_frame(
        tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from dimscope.daemon.archive import read_index
    from dimscope.daemon.client import Recorder
    from dimscope.daemon.pipeline import Pipeline

    monkeypatch.setattr(adaptation_module, "LIVE_SETTINGS",
                        replace(AdaptSettings(), lr=1e-3, steps_per_round=20, collect_every=5,
                                idle_priority=False))
    cfg = make_config(tmp_path, engine={"name": "model", "adapt": True, "options": {
        "model": str(models["untrained"]), "runtime": "openvino"}})
    pipeline = Pipeline(cfg)
    pipeline.start()
    try:
        recorder = Recorder(pipeline.publish_endpoint or "", ["enhanced"])
        stage = pipeline.stage("engine")
        assert stage is not None
        # A cap, not a timing claim: the child starts torch and trains (seconds when busy).
        deadline = time.monotonic() + 90
        swapped_at = None
        while time.monotonic() < deadline:
            pipeline.wait(duration_s=0.25)
            swapped = stage.snapshot()["adapt_swaps"]
            if swapped and swapped_at is None:
                swapped_at = time.monotonic()
            if swapped_at is not None and time.monotonic() > swapped_at + 1.5:
                break
        adapter = stage.adapter  # type: ignore[attr-defined]
        assert adapter is not None and adapter.alive and swapped_at is not None
        # Adaptation dying (here: killed) is reported; enhancement goes on with the model in
        # service.
        os.kill(adapter._process.pid, signal.SIGKILL)
        passed = stage.counters.passed
        pipeline.wait(duration_s=1.5)
        assert "exited" in str(stage.snapshot()["adapt_error"])
        assert stage.counters.passed > passed + 10
    except BaseException:
        pipeline.stop()  # a failed check must not leave the core's threads running
        raise
    summary = pipeline.stop().to_dict()
    received = recorder.close()
    assert summary["error"] is None
    engine = summary["stages"]["engine"]
    assert engine["adapt_swaps"] >= 1, engine
    assert engine["adapt_rounds"] >= engine["adapt_swaps"]
    assert "@adapted-" in engine["adapt_version"]
    assert engine["adapt_frames_used"] > 0
    assert engine["adapt_frames_used"] + engine["adapt_frames_dropped"] <= summary["acquired"]
    # Every header carries the version in service; once adapted, later frames never go back.
    versions = [h["engine"]["version"] for _, h, _ in sorted(received,
                                                             key=lambda m: m[1]["frame_id"])]
    adapted = [i for i, v in enumerate(versions) if "@adapted-" in v]
    assert adapted and not versions[0].count("@adapted-")
    assert all("@adapted-" in v for v in versions[adapted[0]:])
    numbers = [int(v.split("@adapted-")[1].split("+")[0]) for v in versions[adapted[0]:]]
    assert numbers == sorted(numbers)
    # No raw frame lost while adapting: every acquired frame archived and indexed.
    assert summary["acquired"] > 0 and summary["archived"] == summary["acquired"]
    assert summary["not_archived"] == []
    run_dir = Path(summary["run_dir"])
    assert len(read_index(run_dir)[0]) == summary["acquired"]
    # The adapted files are kept with the run, each with its card; the child is gone.
    files = sorted((run_dir / "adapted").glob("*.onnx"))
    assert len(files) >= engine["adapt_swaps"]
    assert read_card(files[0]).training["loss_after"] < read_card(files[0]).training[
        "loss_before"]
    assert not adapter.alive


def test_enhance_adapt_and_the_adapt_command(tmp_path: Path, models: dict[str, Path],
                                             movie: tuple[np.ndarray, np.ndarray]) -> None:
    from dimscope.daemon.cli import main

    noisy, _ = movie
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, noisy[:48].astype(np.uint16), photometric="minisblack")
    out = tmp_path / "out.tif"
    rc = main(["enhance", str(path), str(out), "--engine", "model", "--model",
               str(models["untrained"]), "--runtime", "openvino", "--gain", "0.8", "--offset",
               "400", "--read-noise", "2.2", "--adapt", "--adapt-seconds", "20",
               "--adapt-rounds", "2", "-q"])
    assert rc == 0
    provenance = json.loads((tmp_path / "out.tif.json").read_text())
    assert provenance["adaptation"]["adapted"] and provenance["adaptation"]["rounds"] == 2
    assert "@adapted-" in provenance["engine"]["version"]
    assert provenance["adaptation"]["loss_after"] < provenance["adaptation"]["loss_before"]
    assert read_card(tmp_path / "out.adapted.onnx").version.startswith("1@adapted-")
    assert tifffile.imread(out).shape == (48, 128, 128)
    # `dimscope adapt` on a run folder: its raw_*.ome.tif files, memory-mapped.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tifffile.imwrite(run_dir / "raw_000.ome.tif", noisy[:48].astype(np.uint16), ome=True)
    model = tmp_path / "adapted.onnx"
    assert main(["adapt", str(run_dir), "--out", str(model), "--model",
                 str(models["untrained"]), "--seconds", "20", "--rounds", "1", "-q"]) == 0
    assert read_card(model).version == "1@adapted-1"
    assert read_card(model).training["frames_used"] == 45  # five blocks of 9 frames
    assert main(["adapt", str(path), "--out", str(model), "--model",
                 str(models["percentile"]), "-q"]) == 2
