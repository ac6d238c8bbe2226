"""Trained-model engines inside the live pipeline, and `dimscope eval`, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dimscope.daemon.archive import read_index
from dimscope.daemon.cli import main
from dimscope.engines.runtime.openvino_cpu import native_bf16

from .conftest import make_config, run_and_record
from .test_engines import _export_fresh


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export_fresh(tmp_path_factory.mktemp("sr") / "sr.onnx", scale=2)


def test_sr2_stream_is_twice_the_size_and_says_so_while_raw_archive_is_unchanged(
        tmp_path: Path, sr_model: Path) -> None:
    cfg = make_config(tmp_path, engine={"name": "model",
                                        "options": {"model": str(sr_model),
                                                    "runtime": "openvino"}})
    summary, received = run_and_record(cfg, 2.0, ["raw", "enhanced"])
    assert summary["error"] is None and summary["engine_error"] is None
    assert summary["engine_info"]["runtime"] == "openvino"
    assert summary["engine_info"]["scale"] == 2
    enhanced = [(h, px) for t, h, px in received if t == "enhanced"]
    raw = [(h, px) for t, h, px in received if t == "raw"]
    assert enhanced and raw
    for h, px in enhanced:
        assert px.shape == (192, 256) and h["shape"] == [192, 256] and h["scale"] == 2
        assert h["pixel_size_um"] == pytest.approx(raw[0][0]["pixel_size_um"] / 2)
        assert h["engine"]["runtime"] == "openvino"
        assert h["engine"]["precision"] == ("bf16" if native_bf16() else "fp32")
        assert h["engine"]["version"].endswith(summary["engine_info"]["version"].split("+")[1])
    archived, _torn = read_index(Path(summary["run_dir"]))
    assert len(archived) == summary["acquired"]
    assert tifffile.imread(summary["archive_files"][0]).shape[1:] == (96, 128)


def test_missing_model_runs_raw_only_and_archives_every_frame(tmp_path: Path) -> None:
    missing = tmp_path / "gone.onnx"
    cfg = make_config(tmp_path, engine={"name": "model", "options": {"model": str(missing)}})
    summary, received = run_and_record(cfg, 1.5, ["raw", "enhanced"])
    assert summary["error"] is None
    assert f"model file not found: {missing}" in summary["engine_error"]
    assert summary["acquired"] == summary["archived"] > 10
    assert len(read_index(Path(summary["run_dir"]))[0]) == summary["acquired"]
    assert {t for t, _, _ in received} == {"raw"}
    assert "engine" not in summary["stages"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_corrupt_model_cli_says_so_keeps_archiving_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[source]\nkind = "sim"\nwidth = 64\nheight = 64\n'
                   '[publish]\naddress = "tcp://127.0.0.1:*"\n'
                   f'[engine]\nname = "model"\noptions = {{ model = "{bad}" }}\n')
    check = _cli("check-config", str(cfg))
    assert check.returncode == 2 and "is not a valid ONNX model" in check.stderr
    run = _cli("run", "-c", str(cfg), "--frames", "20", "--out", str(tmp_path / "runs"), "-q",
               "--summary-json", str(tmp_path / "s.json"))
    assert run.returncode == 1
    assert "ENGINE ERROR, running raw only" in run.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["acquired"] == summary["archived"] == 20
    # With the strict policy the same problem refuses to start and writes nothing.
    strict = tmp_path / "strict.toml"
    strict.write_text(cfg.read_text().replace('name = "model"',
                                              'name = "model"\non_failure = "stop"'))
    refused = _cli("run", "-c", str(strict), "--frames", "5", "--out", str(tmp_path / "r2"))
    assert refused.returncode == 2 and "is not a valid ONNX model" in refused.stderr
    assert not (tmp_path / "r2").exists()


def test_eval_cli_reports_every_method_and_writes_json_and_montage(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dimscope.drivers.camera_noise import CameraNoise
    from dimscope.drivers.specimen import Specimen

    spec = Specimen(64, 64, seed=5, n_tubules=20)
    truths = [spec.render(spec.state_at(t, 1.0)) * 20 for t in (0.0, 2.0)]
    noise = CameraNoise(seed=1)
    lows = [noise.expose(t, read_noise_e=1.0, gain_adu_per_e=1.0, offset_adu=10.0, bit_depth=16)
            for t in truths]
    tifffile.imwrite(tmp_path / "low.tif", np.stack(lows))
    tifffile.imwrite(tmp_path / "high.tif", np.stack(truths))
    model = _export_fresh(tmp_path / "m.onnx")
    rc = main(["eval", "denoise", "--low", str(tmp_path / "low.tif"), "--high",
               str(tmp_path / "high.tif"), "--model", str(model), "--json",
               str(tmp_path / "r.json"), "--montage", str(tmp_path / "m.png")])
    assert rc == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert {"raw", "vst_gaussian", "nlm", "bm3d", "fresh (m.onnx)"} <= set(results)
    for r in results.values():
        assert {"psnr", "ssim", "nrmse"} <= set(r) and len(r["per_pair"]) == 2
    # The classical denoisers do denoise these frames.
    assert results["bm3d"]["psnr"] > results["raw"]["psnr"] + 2
    assert "PSNR dB" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(tmp_path / "m.png").size == (64 * 3 + 8, 64)


def test_eval_rejects_mismatched_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    tifffile.imwrite(tmp_path / "low.tif", np.zeros((2, 32, 32), np.uint16))
    tifffile.imwrite(tmp_path / "high.tif", np.zeros((2, 32, 32), np.uint16))
    rc = main(["eval", "sr2", "--low", str(tmp_path / "low.tif"), "--high",
               str(tmp_path / "high.tif"), "--model", "/nonexistent/x.onnx"])
    assert rc == 2 and "model file not found" in capsys.readouterr().err


def test_eval_sr2_and_interp_write_the_same_json_shape(tmp_path: Path, sr_model: Path) -> None:
    from dimscope.drivers.specimen import Specimen
    from dimscope.engines.training.crappify import bin_mean

    spec = Specimen(48, 48, seed=9, n_tubules=10, n_puncta=10)
    fine = [spec.render(spec.state_at(t, 1.0), 2) * 50 for t in (0.0, 1.0, 2.0, 3.0, 4.0)]
    tifffile.imwrite(tmp_path / "high.tif", np.stack(fine[:2]))
    tifffile.imwrite(tmp_path / "low.tif", np.stack([bin_mean(f, 2) for f in fine[:2]]))
    rc = main(["eval", "sr2", "--low", str(tmp_path / "low.tif"), "--high",
               str(tmp_path / "high.tif"), "--model", str(sr_model), "--skip", "bm3d", "nlm",
               "--json", str(tmp_path / "sr.json")])
    assert rc == 0
    sr = json.loads((tmp_path / "sr.json").read_text())
    assert {"raw (bicubic)", "vst_gaussian+bicubic", "fresh (sr.onnx)"} == set(sr)
    tifffile.imwrite(tmp_path / "movie.tif", np.stack([bin_mean(f, 2) for f in fine]))
    rc = main(["eval", "interp", "--stack", str(tmp_path / "movie.tif"), "--factor", "2",
               "--json", str(tmp_path / "in.json")])
    assert rc == 0
    interp = json.loads((tmp_path / "in.json").read_text())
    assert {"repeat", "linear", "flow", "interp (interp)"} == set(interp)
    for r in (*sr.values(), *interp.values()):
        assert {"psnr", "ssim", "nrmse", "per_pair"} <= set(r)
    assert len(interp["linear"]["per_pair"]) == 2  # frames 1 and 3 were dropped and rebuilt


def test_eval_without_the_eval_extra_says_which_package_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "skimage" else real(name, *a))
    rc = main(["eval", "denoise", "--low", str(tmp_path / "l.tif"), "--high",
               str(tmp_path / "h.tif")])
    err = capsys.readouterr().err
    assert rc == 2 and "needs the `eval` extra" in err and "missing: skimage" in err
