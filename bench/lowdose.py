"""The headline: the same movie at a fraction of the light, scored against the simulator's truth.

Runs both shipped time-lapse configs on the simulated microscope, one after
the other, through the whole pipeline (MDA runner, archive, engines, ZeroMQ):
  - configs/fulldose.toml: 40 ms exposure, a frame every 0.1 s (raw),
  - configs/lowdose.toml: 10 ms exposure, a frame every 0.2 s = 1/8 of the light,
    restored by `denoise` and interpolated ×2 by `interp` back to 0.1 s.
Every frame is compared with the noiseless truth of the specimen at its
(acquisition or synthetic) time; metrics as in engines/evaluation/quality.py. Not a test.

    python bench/lowdose.py [--out results/lowdose.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dimscope.daemon.archive import read_frame, read_index
from dimscope.daemon.client import Recorder
from dimscope.daemon.config import load_config
from dimscope.daemon.pipeline import Pipeline
from dimscope.engines.evaluation.quality import score

REPO = Path(__file__).resolve().parents[1]


def run(config: Path, out_dir: Path) -> tuple[dict[str, Any], list[Any], Any]:
    cfg = load_config(config)
    cfg = cfg.model_copy(update={
        "publish": cfg.publish.model_copy(update={"address": "tcp://127.0.0.1:*"}),
        # every frame's truth is scored after the run
        "source": cfg.source.model_copy(update={"ground_truth_history": 10_000})})
    pipeline = Pipeline(cfg, out_dir=out_dir)
    pipeline.start()
    recorder = Recorder(pipeline.publish_endpoint or "", ["enhanced", "interpolated"])
    pipeline.wait(duration_s=600)
    summary = pipeline.stop().to_dict()
    return summary, recorder.close(0.5), pipeline.source.scope  # type: ignore[attr-defined]


def truth_at(scope: Any, time_s: float) -> np.ndarray:
    spec = scope.specimen
    return np.asarray(spec.render(spec.state_at(time_s, 1.0)))


def frame_time(scope: Any, frame_id: int) -> float:
    return float(scope._states[frame_id].time_s)


def mean_scores(items: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    scores = [score(t, x) for t, x in items]
    return {k: float(np.mean([s[k] for s in scores])) for k in ("psnr", "ssim", "nrmse")} | {
        "frames": len(items)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "results" / "lowdose.json")
    args = ap.parse_args()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        full, _, full_scope = run(REPO / "configs" / "fulldose.toml", Path(tmp) / "full")
        entries, _ = read_index(Path(full["run_dir"]))
        report["full dose, raw (40 ms, every 0.1 s)"] = mean_scores(
            [(truth_at(full_scope, frame_time(full_scope, e["frame_id"])),
              read_frame(Path(full["run_dir"]), e)) for e in entries])

        low, received, scope = run(REPO / "configs" / "lowdose.toml", Path(tmp) / "low")
        entries, _ = read_index(Path(low["run_dir"]))
        report["low dose, raw (10 ms, every 0.2 s)"] = mean_scores(
            [(truth_at(scope, frame_time(scope, e["frame_id"])),
              read_frame(Path(low["run_dir"]), e)) for e in entries])
        enhanced = [(truth_at(scope, frame_time(scope, h["frame_id"])), px)
                    for topic, h, px in received if topic == "enhanced" and h["kind"] ==
                    "enhanced"]
        interpolated = []
        for topic, h, px in received:
            if topic == "interpolated":
                a, b = h["source_ids"]
                ta, tb = frame_time(scope, a), frame_time(scope, b)
                interpolated.append((truth_at(scope, ta + h["t"] * (tb - ta)), px))
        report["low dose, denoised (measured time points)"] = mean_scores(enhanced)
        report["low dose, interpolated (missing time points)"] = mean_scores(interpolated)
        report["low dose, denoised + interpolated (the full-rate movie)"] = mean_scores(
            enhanced + interpolated)
        report["runs"] = {"full": {k: full[k] for k in ("acquired", "archived", "mda_planned")},
                          "low": {k: low[k] for k in ("acquired", "archived", "mda_planned")},
                          "light_ratio": "1/8 (1/4 exposure x 1/2 frames)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'movie':<58}{'frames':>7}{'PSNR dB':>9}{'SSIM':>7}")
    for name, r in report.items():
        if name != "runs":
            print(f"{name:<58}{r['frames']:>7}{r['psnr']:>9.2f}{r['ssim']:>7.3f}")
    print(json.dumps(report["runs"]))


if __name__ == "__main__":
    main()
