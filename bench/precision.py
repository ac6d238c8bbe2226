"""What BF16 costs: the shipped live models in OpenVINO FP32 vs BF16 on real data, same inputs.

The live engine's `precision = "auto"` runs BF16 where the CPU computes it natively (OpenVINO's
own default there); offline `enhance` and every quality benchmark run FP32. This measures the
difference that choice makes to the restored frames:
  - `denoise` on real images and time-lapse frames (the generalization protocol's datasets,
    2 per image dataset, frame 4 of each movie, 256² centre), degraded to 5, 20 and 100 photons
    with the protocol's camera; PSNR to the clean image, BF16 − FP32 per image;
  - `interp` on frame pairs of the real time-lapses (t and t+2 → t+1), PSNR to the middle frame.
Prints and writes `results/precision.{json,md}`; on a CPU without native BF16 it says so and
writes nothing. Not a test.

    python bench/precision.py [--out results]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalization as gen
import lodo

from dimscope.engines import make_engine
from dimscope.engines.interpolators import make_interpolator
from dimscope.engines.runtime.openvino_cpu import native_bf16

PHOTONS = (5.0, 20.0, 100.0)
SIDE = 256


def real_images() -> list[tuple[str, np.ndarray]]:
    images: list[tuple[str, np.ndarray]] = []
    for ds in lodo.DATASETS:
        if ds.kind == "image":
            images += gen.image_planes(ds, SIDE, limit=2)
        elif ds.kind == "movie":
            name, movie = gen.movie_series(ds, SIDE)[0]
            images.append((f"{name} t4", movie[4]))
    return images


def denoise_rows() -> list[dict[str, object]]:
    engines = {p: make_engine("denoise", runtime="openvino", precision=p)
               for p in ("fp32", "bf16")}
    rows: list[dict[str, object]] = []
    for name, clean in real_images():
        for photons in PHOTONS:
            noisy, truth = gen.degrade(clean, photons, gen.seed_of(name, photons))
            psnr = {}
            for precision, engine in engines.items():
                engine.prepare(noisy.shape, np.dtype(np.float32), gen.CAMERA)
                psnr[precision] = gen.psnr(truth, engine.process(noisy))
            rows.append({"image": name, "photons": photons, **psnr,
                         "bf16_minus_fp32": round(psnr["bf16"] - psnr["fp32"], 3)})
            print(f"denoise {name:45s} {photons:5.0f} ph  FP32 {psnr['fp32']:.3f}  "
                  f"BF16 {psnr['bf16']:.3f}  {rows[-1]['bf16_minus_fp32']:+.3f}", flush=True)
    return rows


def interp_rows() -> list[dict[str, object]]:
    interps = {p: make_interpolator("model", precision=p) for p in ("fp32", "bf16")}
    rows: list[dict[str, object]] = []
    for ds in lodo.DATASETS:
        if ds.kind != "movie":
            continue
        name, movie = gen.movie_series(ds, SIDE)[0]
        for t in range(0, len(movie) - 2, max(1, (len(movie) - 2) // 3)):
            a, mid, b = movie[t], movie[t + 1], movie[t + 2]
            psnr = {}
            for precision, interp in interps.items():
                interp.prepare(a.shape)
                psnr[precision] = gen.psnr(mid, interp.between(a, b, 0.5))
            rows.append({"pair": f"{name} t{t}-{t + 2}", **psnr,
                         "bf16_minus_fp32": round(psnr["bf16"] - psnr["fp32"], 3)})
            print(f"interp  {rows[-1]['pair']:45s}  FP32 {psnr['fp32']:.3f}  "
                  f"BF16 {psnr['bf16']:.3f}  {rows[-1]['bf16_minus_fp32']:+.3f}", flush=True)
    return rows


def summary(rows: list[dict[str, object]]) -> dict[str, float | int]:
    d = np.array([float(str(r["bf16_minus_fp32"])) for r in rows])
    return {"n": len(d), "mean": round(float(d.mean()), 4), "worst": round(float(d.min()), 4),
            "best": round(float(d.max()), 4)}


def markdown(result: dict[str, object]) -> str:
    s_den, s_int = result["denoise_summary"], result["interp_summary"]
    assert isinstance(s_den, dict) and isinstance(s_int, dict)
    lines = [
        "# BF16 vs FP32 (`python bench/precision.py`)", "",
        f"Measured {result['date']} on {result['machine']}: the shipped live models through "
        "OpenVINO in each precision, the same inputs (real data, the generalization protocol's "
        "datasets and camera). PSNR in dB; BF16 − FP32 per image.", "",
        "| model | cases | mean | worst | best |", "|---|---:|---:|---:|---:|",
        f"| denoise (5, 20, 100 photons) | {s_den['n']} | {s_den['mean']:+.3f} | "
        f"{s_den['worst']:+.3f} | {s_den['best']:+.3f} |",
        f"| interp (t, t+2 → t+1) | {s_int['n']} | {s_int['mean']:+.3f} | "
        f"{s_int['worst']:+.3f} | {s_int['best']:+.3f} |", "",
        "By photon count (denoise, mean / worst):", "",
    ]
    rows = result["denoise"]
    assert isinstance(rows, list)
    for photons in PHOTONS:
        d = [float(r["bf16_minus_fp32"]) for r in rows if r["photons"] == photons]
        lines.append(f"- {photons:g} photons: {np.mean(d):+.3f} / {min(d):+.3f} ({len(d)} images)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = ap.parse_args()
    if not native_bf16():
        print("this CPU has no native BF16: `auto` runs FP32 here, nothing to compare")
        return 0
    if not lodo.available():
        print(f"the real data ({lodo.DATA}) is absent: nothing to measure")
        return 0
    den, itp = denoise_rows(), interp_rows()
    result: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, native BF16, OpenVINO",
        "denoise_summary": summary(den), "interp_summary": summary(itp),
        "denoise": den, "interp": itp}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "precision.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
