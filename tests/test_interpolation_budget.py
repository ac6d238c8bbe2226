"""Live interpolation, latency budgets and their degradation policy, end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dimscope.daemon.archive import read_index
from dimscope.daemon.trust_log import read_trust_log
from dimscope.engines.interpolators import make_interpolator
from dimscope.engines.model_file import ModelCard, read_card
from dimscope.engines.nets import build_network
from dimscope.engines.runtime import open_runtime
from dimscope.engines.runtime.openvino_cpu import native_bf16
from dimscope.engines.training.export import export_onnx

from .conftest import make_config, run_and_record


def test_interpolated_frames_arrive_in_time_order_between_their_sources(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, engine={"name": "identity"},
                      interpolate={"factor": 4, "method": "linear"})
    summary, received = run_and_record(cfg, 2.0, ["enhanced", "interpolated"])
    assert summary["error"] is None
    enhanced = {h["frame_id"]: (h, px) for t, h, px in received if t == "enhanced"}
    interp = [(h, px) for t, h, px in received if t == "interpolated"]
    assert len(interp) > 30
    checked = 0
    for i, (h, px) in enumerate(interp):
        a, b = h["source_ids"]
        assert a < b and h["kind"] == "interpolated" and h["engine"]["name"] == "linear"
        assert h["t"] in (0.25, 0.5, 0.75)
        if i and interp[i - 1][0]["source_ids"] == h["source_ids"]:
            assert h["t"] > interp[i - 1][0]["t"]  # in time order within the interval
        if a in enhanced and b in enhanced:
            ha, pa = enhanced[a]
            hb, pb = enhanced[b]
            assert ha["acquired_unix_ns"] < h["acquired_unix_ns"] < hb["acquired_unix_ns"]
            want = (1 - h["t"]) * pa.astype(np.float32) + h["t"] * pb.astype(np.float32)
            assert np.allclose(px, want, atol=1e-3)
            checked += 1
    assert checked > 10
    # Merged by timestamp, a viewer sees a movie at 4x the acquired rate.
    stamps = sorted([h["acquired_unix_ns"] for h, _ in enhanced.values()]
                    + [h["acquired_unix_ns"] for h, _ in interp])
    assert len(stamps) == len(set(stamps))
    # Interpolated frames never reach the raw archive.
    entries, _ = read_index(Path(summary["run_dir"]))
    assert len(entries) == summary["acquired"]
    assert summary["stages"]["publish_interpolated"]["passed"] == len(interp)


def test_interpolation_model_exports_to_onnx_and_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_network("interp", channels=8, depth=2).eval()
    card = ModelCard(name="interp-fresh", task="interp", arch="interp",
                     hparams={"channels": 8, "depth": 2}, multiple=4, inputs=2)
    path = export_onnx(net, card, tmp_path / "i.onnx")
    rng = np.random.default_rng(0)
    a, b = (rng.random((1, 1, 48, 64), dtype=np.float32) for _ in range(2))
    t = np.full((1, 1, 1, 1), 0.25, dtype=np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(t)).numpy()
    for kind in ("onnxruntime", "openvino"):
        rt = open_runtime(kind, path, read_card(path), "fp32")
        rt.compile(a.shape)  # type: ignore[arg-type]
        assert np.abs(rt.run(a, b, t) - want).max() < 1e-4, kind
    # `auto`: BF16 exactly where the CPU computes it natively, and then close to FP32.
    rt = open_runtime("openvino", path, read_card(path))
    rt.compile(a.shape)  # type: ignore[arg-type]
    assert rt.precision == ("bf16" if native_bf16() else "fp32")
    assert np.abs(rt.run(a, b, t) - want).max() < (2e-2 if native_bf16() else 1e-4)
    interp = make_interpolator("model", model=str(path), runtime="onnxruntime")
    interp.prepare((45, 61))  # not a multiple of 4: padded inside, cropped back
    assert interp.between(a[0, 0, :45, :61] * 100, b[0, 0, :45, :61] * 100, 0.5).shape == (45, 61)


def _budget_config(tmp_path: Path, **engine: Any) -> Any:
    return make_config(tmp_path, source={"kind": "sim", "width": 512, "height": 512,
                                         "exposure_ms": 5.0},
                       engine={"name": "denoise", "budget_ms": 4.0,
                               "options": {"runtime": "openvino"}, **engine})


def test_engine_slower_than_budget_switches_to_faster_tier(tmp_path: Path) -> None:
    cfg = _budget_config(tmp_path, tiers=[{"name": "identity"}])
    summary, received = run_and_record(cfg, 3.0, ["enhanced"])
    budget = summary["budget"]
    assert budget["tier_changes"] == 1 and budget["tier_name"] == "identity"
    assert summary["acquired"] == summary["archived"]
    assert len(read_index(Path(summary["run_dir"]))[0]) == summary["acquired"]
    names = [h["engine"]["name"] for t, h, _ in received if h["engine"]]
    assert names[-1] == "identity"


def test_engine_slower_than_budget_without_tiers_skips_and_counts(tmp_path: Path) -> None:
    summary, received = run_and_record(_budget_config(tmp_path), 3.0, ["enhanced", "trust"])
    budget = summary["budget"]
    assert budget["skipped"] > 0 and budget["tier_changes"] == 0
    flagged = [h for t, h, _ in received if t == "enhanced" and h.get("budget") == "skipped"]
    assert flagged and all(h["kind"] == "passthrough" and h["engine"] is None
                           and "trust" not in h for h in flagged)
    # Every enhanced frame that was late says so, and the count matches what viewers saw.
    late = [h for t, h, _ in received if t == "enhanced" and h.get("budget") == "missed"]
    assert budget["missed"] >= len(late)
    # "enhanced" counts frames the engine enhanced, not the skipped ones it passed on raw.
    engine = summary["stages"]["engine"]
    assert summary["enhanced"] == engine["passed"] - budget["skipped"] < engine["passed"]
    assert summary["acquired"] == summary["archived"] > 0
    assert len(read_index(Path(summary["run_dir"]))[0]) == summary["acquired"]
    # Passthrough frames get no trust map (there is nothing enhanced to check) and are
    # listed as passthrough in the run's trust log.
    trusted = {h["frame_id"] for t, h, _ in received if t == "trust"}
    assert not trusted & {h["frame_id"] for h in flagged}
    log = read_trust_log(Path(summary["run_dir"]))
    assert sum(e["kind"] == "passthrough" for e in log) == budget["skipped"]


def test_missing_interpolation_model_runs_without_interpolation(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, engine={"name": "identity"},
                      interpolate={"factor": 2, "method": "model",
                                   "options": {"model": str(tmp_path / "none.onnx")}})
    summary, _ = run_and_record(cfg, 1.0, ["enhanced"])
    assert "model file not found" in summary["interpolate_error"]
    assert summary["acquired"] == summary["archived"] > 0


def test_shipped_interp_model_beats_linear_blending_on_held_out_motion() -> None:
    from dimscope.drivers.specimen import Specimen
    from dimscope.engines.evaluation.quality import score

    spec = Specimen(128, 128, seed=2024, n_tubules=15, n_puncta=40, drift_px_per_s=3.0,
                    punctum_speed_px_per_s=10.0)
    model = make_interpolator("model")
    linear = make_interpolator("linear")
    model.prepare((128, 128))
    gains = []
    for t0 in (1.0, 7.0, 13.0):
        a, mid, b = (spec.render(spec.state_at(t0 + d, 1.0)) * 100 for d in (0.0, 0.5, 1.0))
        gains.append(score(mid, model.between(a, b, 0.5), with_ssim=False)["psnr"]
                     - score(mid, linear.between(a, b, 0.5), with_ssim=False)["psnr"])
    assert np.mean(gains) > 0.3, gains
