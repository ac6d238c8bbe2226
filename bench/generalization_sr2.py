"""Generalization of `sr2` (×2 super-resolution of a low-light frame): leave-one-fold-out.

The protocol of `bench/generalization.py` (its folds, camera, degradation and PSNR), for
the ×2 task: each clean image (single images, and frames of the time-lapses as stills) is
binned 2×2 (the mean: a camera with pixels twice as large), degraded to 5, 20 and 100
photons at the brightest structure, and restored to the full grid. The fold's model never
saw the dataset. The reference is the strongest classical method given the same input:
BM3D+VST (the `bm3d` engine, given the camera) at the low sampling, then bicubic ×2 — both
pixel-area-aligned bicubic (OpenCV) and corner-aligned (scipy), whichever scores higher on
each image.

    python bench/generalization_sr2.py [--train]   # results/generalization_sr2.{json,md}

Fold models: `bench/.cache/lodo/sr2_fold{0,1,2}.onnx`, made by the shipped `sr2` recipe
(`dimscope train sr2`, 4000 steps) on the fold's training sources (`lodo.training_sources`);
`--train` makes the missing ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalization as gen
import lodo

from dimscope.engines import make_engine
from dimscope.engines.training.crappify import bin_mean

ROOT = Path(__file__).resolve().parents[1]
SCORES = gen.CACHE / "gen" / "sr2_scores.json"


#: where each fold's model is ({fold} is filled in); --models changes it
MODEL_TEMPLATE = str(gen.MODELS / "sr2_fold{fold}.onnx")


def model_path(fold: int, template: str = MODEL_TEMPLATE) -> Path:
    return Path(template.format(fold=fold))


def train_command(fold: int) -> list[str]:
    images, movies = lodo.training_sources(fold)
    out = model_path(fold)
    return [str(ROOT / ".venv" / "bin" / "dimscope"), "train", "sr2", "--data",
            *map(str, images + movies), "--steps", "4000", "--batch", "8", "--val-every",
            "500", "--name", "sr2", "--version", f"1-fold{fold}", "--out", str(out),
            "--checkpoint", str(out.with_suffix(".ckpt")), "-q"]


# -- the offline quality family: sr2_hq, refining BM3D+VST (guided) ------------------------
#: samples per pool file, and files per source (the simulated microscope: twice as many)
HQ_POOL = (40, 3)
HQ_STEPS = 6000
HQ_TEMPLATE = str(gen.MODELS / "sr2_hq_{fold}.onnx")


def hq_path(fold: int | None) -> Path:
    return Path(HQ_TEMPLATE.format(fold=f"fold{fold}" if fold is not None else "all"))


def hq_pool_files(fold: int | None) -> list[Path]:
    """The pool files of `fold`'s training sources, made here when missing (a BM3D run per
    sample), as `generalization.pool_files` does for the guided denoiser."""
    from dimscope.engines.training.clips import ClipSampler, movie_channels
    from dimscope.engines.training.guided import build_pool, save_pool
    from dimscope.engines.training.train import image_planes as training_planes

    images, movies = lodo.training_sources(fold)
    sources = ([("image", p) for p in images] + [("movie", p) for p in movies]
               + [("sim", None)])
    size, chunks = HQ_POOL
    files = []
    for kind, path in sources:
        stem = "sim" if path is None else path.stem
        for chunk in range(chunks * (2 if kind == "sim" else 1)):
            out = gen.POOL_DIR / f"sr2_bm3d_{stem}_{chunk}.npz"
            files.append(out)
            if out.exists():
                continue
            rng = np.random.default_rng(gen.seed_of("sr2", stem, chunk))
            sampler = ClipSampler(1, 128, 1, training_planes(path) if kind == "image" and path
                                  else [], movie_channels(path) if kind == "movie" and path
                                  else [], rng, sim_fraction=1.0 if kind == "sim" else 0.0)
            if kind != "sim" and not (sampler.images or sampler.movies):
                files.pop()  # nothing 128² in it
                break
            started = time.monotonic()
            inputs, targets = build_pool(sampler, size, "bm3d", rng, scale=2)
            save_pool(out, inputs, targets, "bm3d", 1, str(path or "simulated"), scale=2)
            print(f"pool {out.name}: {len(inputs)} samples, {time.monotonic() - started:.0f} s",
                  flush=True)
    return files


def hq_train_command(fold: int | None) -> list[str]:
    out = hq_path(fold)
    version = f"1-fold{fold}" if fold is not None else "1"
    return [str(ROOT / ".venv" / "bin" / "dimscope"), "train", "sr2", "--guide", "bm3d",
            "--window", "1", "--pool-files", *map(str, hq_pool_files(fold)), "--steps",
            str(HQ_STEPS), "--lr", "1e-3", "--batch", "16", "--channels", "32", "--levels",
            "3", "--val-every", "500", "--name", "sr2_hq", "--version", version, "--out",
            str(out), "--checkpoint", str(out.with_suffix(".ckpt")), "-q"]


def stills(ds: lodo.Dataset, side: int, frames_per_movie: int) -> list[tuple[str, np.ndarray]]:
    """Clean stills (relative intensity) of a dataset: its images, or frames of its movies."""
    if ds.kind == "image":
        return gen.image_planes(ds, side)
    out = []
    for name, movie in gen.movie_series(ds, side):
        for t in np.unique(np.linspace(0, len(movie) - 1, frames_per_movie).round().astype(int)):
            out.append((f"{name} t{t}", movie[t]))
    return out


def bicubic_both(image: np.ndarray) -> list[np.ndarray]:
    import cv2
    from scipy.ndimage import zoom

    h, w = image.shape
    return [np.asarray(cv2.resize(image, (2 * w, 2 * h), interpolation=cv2.INTER_CUBIC),
                       np.float32),
            np.asarray(zoom(image, 2, order=3, mode="reflect"), np.float32)]


class Scores:
    def __init__(self) -> None:
        self.values: dict[str, float] = (json.loads(SCORES.read_text())
                                         if SCORES.exists() else {})

    def get(self, key: str, compute: object) -> float:
        if key not in self.values:
            self.values[key] = float(compute())  # type: ignore[operator]
            tmp = SCORES.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.values, indent=0, sort_keys=True))
            tmp.replace(SCORES)
        return self.values[key]


def evaluate_fold(fold: int, photons: list[float], side: int, frames_per_movie: int,
                  scores: Scores, template: str = MODEL_TEMPLATE, ensemble: bool = False
                  ) -> list[dict]:
    from dimscope.engines.model_file import file_digest

    model = model_path(fold, template)
    tag = f"{model.name}@{file_digest(model)}{'+ens' if ensemble else ''}"
    engine = make_engine("model", model=str(model), runtime="openvino", precision="fp32",
                         ensemble=ensemble)
    bm3d = make_engine("bm3d")
    rows = []
    for ds in (d for d in lodo.DATASETS if d.fold == fold and d.kind in ("image", "movie")):
        for name, image in stills(ds, side, frames_per_movie):
            clean = image[:image.shape[0] // 2 * 2, :image.shape[1] // 2 * 2]  # even sides
            low_clean = bin_mean(clean, 2)
            for p in photons:
                noisy, _ = gen.degrade(low_clean, p, gen.seed_of("sr2", name, p))
                _, truth = gen.degrade(clean, p, 0)  # the expected signal, full grid
                key = f"{name}@{side}|p{p:g}"

                def reference(noisy: np.ndarray = noisy, truth: np.ndarray = truth) -> float:
                    bm3d.prepare(noisy.shape, np.dtype(np.float32), gen.CAMERA)
                    denoised = bm3d.process(noisy)
                    return max(gen.psnr(truth, up) for up in bicubic_both(denoised))

                def restored(noisy: np.ndarray = noisy, truth: np.ndarray = truth) -> float:
                    engine.prepare(noisy.shape, np.dtype(np.float32), gen.CAMERA)
                    return gen.psnr(truth, engine.process(noisy))

                row = {"fold": fold, "dataset": ds.name, "kind": ds.kind, "image": name,
                       "photons": p,
                       "bm3d_bicubic": scores.get(f"sr2ref|{key}", reference),
                       "model": scores.get(f"{tag}|{key}", restored)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    engine.close()
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["photons"]), []).append(r)
    out = []
    for (ds, p), rs in sorted(groups.items()):
        deltas = [r["model"] - r["bm3d_bicubic"] for r in rs]
        worst = int(np.argmin(deltas))
        out.append({"fold": rs[0]["fold"], "dataset": ds, "kind": rs[0]["kind"],
                    "photons": p, "n": len(rs),
                    "bm3d_bicubic": round(float(np.mean([r["bm3d_bicubic"] for r in rs])), 2),
                    "model": round(float(np.mean([r["model"] for r in rs])), 2),
                    "margin": round(float(np.mean(deltas)), 2),
                    "won": int(sum(d > 0 for d in deltas)),
                    "worst_margin": round(float(deltas[worst]), 2),
                    "worst_image": rs[worst]["image"]})
    return out


def markdown(summary: list[dict], meta: dict) -> str:
    levels = sorted({s["photons"] for s in summary})
    by: dict[str, dict] = {}
    for s in summary:
        by.setdefault(s["dataset"], {"fold": s["fold"], "kind": s["kind"]})[s["photons"]] = (
            f"{s['margin']:+.2f} ({s['won']}/{s['n']})")
    lines = ["# Generalization of sr2: leave-one-fold-out (`python bench/generalization_sr2.py`)",
             "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Measured {meta['date']} on {meta['machine']}; fold models: {meta['models']}.",
             "", "sr2 − (BM3D+VST, then bicubic ×2) in dB PSNR, mean over the dataset's "
             "images (images won / images):", "",
             "| dataset (fold) | kind | " + " | ".join(f"{p:g} photons" for p in levels) + " |",
             "|---|---|" + "---:|" * len(levels)]
    for ds, row in sorted(by.items()):
        lines.append(f"| {ds} ({row['fold']}) | {row['kind']} | "
                     + " | ".join(row.get(p, "") for p in levels) + " |")
    lines += ["", "In full:", "", "| fold | dataset | photons | n | BM3D+bicubic | **sr2** | "
              "**margin** | won | worst (image) |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in summary:
        lines.append(f"| {s['fold']} | {s['dataset']} | {s['photons']:g} | {s['n']} | "
                     f"{s['bm3d_bicubic']:.2f} | **{s['model']:.2f}** | **{s['margin']:+.2f}** "
                     f"| {s['won']}/{s['n']} | {s['worst_margin']:+.2f} ({s['worst_image']}) |")
    allm = [s["margin"] for s in summary]
    lines += ["", f"Datasets × light levels at ≥ +0.3 dB: {sum(m >= 0.3 for m in allm)} of "
              f"{len(allm)}; lowest mean margin {min(allm):+.2f} dB."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folds", type=int, nargs="*", default=list(lodo.FOLDS))
    ap.add_argument("--photons", type=float, nargs="*", default=[5.0, 20.0, 100.0])
    ap.add_argument("--side", type=int, default=256, help="centre crop (full grid)")
    ap.add_argument("--frames-per-movie", type=int, default=2)
    ap.add_argument("--train", action="store_true", help="train missing fold models first")
    ap.add_argument("--ensemble", action="store_true",
                    help="the engine's test-time ensemble (8 rotations and flips)")
    ap.add_argument("--models", default=MODEL_TEMPLATE,
                    help="the fold models, {fold} filled in (default: the sr2 recipe's)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "generalization_sr2")
    ap.add_argument("--family", choices=["live", "hq"], default="live",
                    help="live: the sr2 recipe; hq: sr2_hq, refining BM3D+VST (guided, "
                         "evaluated with the engine's test-time ensemble)")
    ap.add_argument("--ship", action="store_true",
                    help="hq: also train the model of every dataset (engines/models/sr2_hq)")
    args = ap.parse_args()
    if not lodo.available():
        print(f"SKIP: the real data ({lodo.DATA}) is not here")
        return 0
    if args.family == "hq":
        args.models, args.ensemble = HQ_TEMPLATE.replace("{fold}", "fold{fold}"), True
        if args.out == ROOT / "results" / "generalization_sr2":
            args.out = ROOT / "results" / "generalization_sr2_hq"
        for fold in [*args.folds, *([None] if args.ship else [])]:
            if not hq_path(fold).exists():
                if not args.train:
                    print("fold model missing; train it with --train")
                    return 1
                subprocess.run(hq_train_command(fold), check=True)
    for fold in args.folds:
        if not model_path(fold, args.models).exists() and args.models != MODEL_TEMPLATE:
            print(f"no model {model_path(fold, args.models)}")
            return 1
        if args.family == "live" and not model_path(fold).exists():
            cmd = train_command(fold)
            print("fold model missing; train it with:\n  " + " ".join(cmd))
            if not args.train:
                return 1
            subprocess.run(cmd, check=True)
    scores = Scores()
    rows: list[dict] = []
    for fold in args.folds:
        rows += evaluate_fold(fold, args.photons, args.side, args.frames_per_movie, scores,
                              args.models, args.ensemble)
    summary = summarise(rows)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores",
            "models": ", ".join(model_path(f, args.models).name for f in args.folds),
            "command": " ".join(["python", *sys.argv])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    text = markdown(summary, meta)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
