"""What the live `restore` network gives up against a CARE-style U-Net trained the same way.

Trains both for the same steps on the same data and crappifier (about 15 minutes
on 2 CPU cores, most of it the U-Net), then scores them and the shipped `denoise`
on the real pairs and a simulated frame set. Writes results/care_comparison.json.

    python bench/care_comparison.py [--steps 500] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from quality import real_pairs, simulated  # type: ignore[import-not-found]

from dimscope.engines.evaluation.evaluate import evaluate, model_method
from dimscope.engines.training.train import TrainSettings, train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "care_comparison.json")
    args = ap.parse_args()
    w2s = args.data / "pairs" / "w2s"
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for arch in ("restore", "care_unet"):
            settings = TrainSettings(task="denoise", data=[str(args.data / "singles")],
                                     arch=arch, steps=args.steps, batch=8, val_every=250,
                                     checkpoint_every=250,
                                     val_low=str(w2s / "w2s_avg1_lowsnr.tif"),
                                     val_high=str(w2s / "w2s_avg400_highsnr.tif"))
            out = Path(tmp) / f"{arch}.onnx"
            train(settings, out)
            models[f"{arch}-{args.steps}"] = str(out)
        models["denoise_v2 (shipped)"] = "denoise_v2"  # the model the README table reports
        methods = {label: model_method(path)[1] for label, path in models.items()}
        pairs = real_pairs(args.data)
        pairs["simulated 20 photons"] = simulated(20.0, 1)
        report = {}
        for name, (low, high) in pairs.items():
            results = evaluate("denoise", low, high, methods)
            report[name] = {k: {m: v[m] for m in ("psnr", "ssim", "seconds_per_image")}
                            for k, v in results.items()}
            for k, v in results.items():
                print(f"{name[:40]:<42}{k:<24}{v['psnr']:7.2f} dB {v['ssim']:7.3f} "
                      f"{v['seconds_per_image']:7.3f} s")
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
