"""Training: a few real optimisation steps on tiny data, checkpoints, resume, fine-tune, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy.ndimage import gaussian_filter

from dimscope.daemon.cli import main
from dimscope.engines.model_file import read_card
from dimscope.engines.runtime.pytorch import network_from_file
from dimscope.engines.training.train import TrainSettings, train


@pytest.fixture
def good_images(tmp_path: Path) -> Path:
    folder = tmp_path / "good"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        img = gaussian_filter(rng.random((96, 80)), 2.0) * 1000
        tifffile.imwrite(folder / f"img{i}.tif", img.astype(np.uint16))
    tifffile.imwrite(folder / "stack.tif", (rng.random((2, 70, 70)) * 200).astype(np.uint8))
    return folder


def _settings(data: Path, steps: int, task: str = "denoise") -> TrainSettings:
    return TrainSettings(task=task, data=[str(data)], sim_fraction=0.0, steps=steps, batch=2,
                         patch=32, hparams={"channels": 4, "levels": 1}, val_every=2,
                         checkpoint_every=2, lr=1e-3)


def test_training_resumes_from_a_checkpoint_exactly(good_images: Path, tmp_path: Path) -> None:
    straight = train(_settings(good_images, 6), tmp_path / "a.onnx", progress=False)
    first = train(_settings(good_images, 6), tmp_path / "b.onnx", progress=False, pause_at=4)
    assert first["steps"] == 4 and (tmp_path / "b.ckpt").is_file()
    resumed = train(_settings(good_images, 6), tmp_path / "b.onnx", resume=True,
                    progress=False)
    assert resumed["steps"] == 6
    assert [h["step"] for h in resumed["history"]] == [2, 4, 6]
    a = network_from_file(tmp_path / "a.onnx", read_card(tmp_path / "a.onnx")).state_dict()
    b = network_from_file(tmp_path / "b.onnx", read_card(tmp_path / "b.onnx")).state_dict()
    # Same data order, same optimiser state: resuming continues the very same run.
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert straight["loss"] == pytest.approx(resumed["loss"], rel=1e-4)


def test_fine_tuning_starts_from_the_given_model(good_images: Path, tmp_path: Path) -> None:
    train(_settings(good_images, 2), tmp_path / "base.onnx", progress=False)
    settings = _settings(good_images, 2)
    settings.init = str(tmp_path / "base.onnx")
    settings.lr = 1e-12  # a negligible step: the weights must stay those of the base model
    train(settings, tmp_path / "tuned.onnx", progress=False)
    base = network_from_file(tmp_path / "base.onnx", read_card(tmp_path / "base.onnx"))
    tuned = network_from_file(tmp_path / "tuned.onnx", read_card(tmp_path / "tuned.onnx"))
    for (k, v), w in zip(base.state_dict().items(), tuned.state_dict().values(), strict=True):
        assert torch.allclose(v, w, atol=1e-6), k


def test_train_cli_sr2_on_simulated_truth_exports_a_carded_model(tmp_path: Path) -> None:
    out = tmp_path / "sr.onnx"
    rc = main(["train", "sr2", "--steps", "2", "--batch", "2", "--patch", "32",
               "--channels", "4", "--levels", "1", "--val-every", "1", "--out", str(out), "-q"])
    assert rc == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["task"] == "sr2" and card["scale"] == 2 and card["training"]["steps"] == 2
    assert card["training"]["settings"]["sim_fraction"] == 0.5
    assert card == json.loads(read_card(out).model_dump_json())


def test_train_cli_names_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    rc = main(["train", "denoise", "--data", str(tmp_path / "absent"), "--steps", "1",
               "--out", str(tmp_path / "x.onnx"), "-q"])
    assert rc == 2
    assert "training data not found" in capsys.readouterr().err
