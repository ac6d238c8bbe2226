"""Live adaptation on held-out time-lapses: PSNR against the truth over time, through the pipeline.

For each movie of each fold of `bench/lodo.py` (the fold's model never saw it):

1. the clean movie (centre crop, scaled as in `bench/generalization.py`) is played by
   the `replay` source in a loop, re-noised live to 20 photons at the brightest
   structure with generalization's camera (fresh Poisson–Gaussian noise every frame), at
   a fixed frame rate, through the whole pipeline (archive, engine with a latency budget,
   publishing);
2. **baseline**: the fold model, adaptation off, for `--baseline-seconds`;
3. **adapting**: the same with `[engine] adapt = true` for `--seconds`; the stage is
   polled every 0.25 s for the model version in service (each swap and when it happened);
4. afterwards, with nothing else of ours running, the model in service at 0, 15, 30 and
   60 s since the start is scored on an evaluation pass — the movie degraded exactly as
   `bench/generalization.py` does (same seed: a noise realisation never streamed),
   restored causally frame by frame — mean PSNR (CSBDeep) over frames 4.. .

Reported per movie: raw and PSNR at each time, the swaps, the rounds, frames the adapter
used and skipped, and for both runs frames acquired vs archived (raw frames lost),
budget misses and skips, and the engine's latency. Also what `Adapter.offer()` costs
per frame. Results: results/adaptation.json and .md.

    python bench/adaptation.py                        # every fold (needs the fold models)
    python bench/adaptation.py --folds 0 --movies golgi_bfa/c0 --model my_dev.onnx  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalization as gen
import lodo

from dimscope.daemon.config import parse_config
from dimscope.daemon.pipeline import Pipeline
from dimscope.engines import make_engine
from dimscope.engines.model_file import read_card

ROOT = Path(__file__).resolve().parents[1]
MIN_FRAMES = 10  # shorter movies loop too often for a causal window of 5 (membrane_5frames)
PROTOCOL = (
    "Each held-out movie (leave-one-fold-out: the fold's model never saw it) is replayed in a "
    "loop through the whole pipeline, re-noised live (fresh Poisson–Gaussian noise every "
    "frame, generalization's camera); a baseline run without adaptation, then a run with "
    "`[engine] adapt = true`. The model in service at each time is scored afterwards on the "
    "movie degraded as in bench/generalization.py (a noise realisation never streamed), "
    "restored causally.")


def config(movie_tif: Path, model: Path, out_dir: Path, photons: float, fps: float,
           budget_ms: float, adapt: bool) -> Any:
    cam = gen.CAMERA
    return parse_config({
        "source": {"kind": "replay", "path": str(movie_tif), "fps": fps, "loop": True,
                   "photons": photons, "background_photons": gen.BACKGROUND * photons,
                   "read_noise_e": cam.read_noise_e, "gain_adu_per_e": cam.gain_adu_per_e,
                   "offset_adu": cam.offset_adu, "seed": 7},
        "archive": {"out_dir": str(out_dir), "fsync_every_s": 0},
        "publish": {"address": "tcp://127.0.0.1:*"},
        "engine": {"name": "model", "options": {"model": str(model), "runtime": "openvino"},
                   "budget_ms": budget_ms, "adapt": adapt},
    }, origin="bench/adaptation.py")


def run(cfg: Any, seconds: float, poll_s: float = 0.25) -> dict[str, Any]:
    """One run; the summary, the load average, and (adapting) the swaps over time."""
    pipeline = Pipeline(cfg)
    pipeline.start()
    started = time.monotonic()
    stage = pipeline.stage("engine")
    timeline: list[dict[str, Any]] = []
    version = None
    while time.monotonic() - started < seconds:
        pipeline.wait(duration_s=min(poll_s, seconds - (time.monotonic() - started)))
        if pipeline.error:
            break
        snap = stage.snapshot() if stage is not None else {}
        if snap.get("adapt_version") not in (None, version):
            version = snap["adapt_version"]
            timeline.append({"t": round(time.monotonic() - started, 2), "version": version,
                             "rounds": snap["adapt_rounds"],
                             "frames_used": snap["adapt_frames_used"]})
    load = os.getloadavg()[0]
    summary = pipeline.stop().to_dict()
    return {"summary": summary, "timeline": timeline, "load_1min": round(load, 2)}


def run_facts(result: dict[str, Any]) -> dict[str, Any]:
    s = result["summary"]
    e = s["stages"].get("engine", {})
    lat = s["latency_ms"].get("engine", {})
    return {"acquired": s["acquired"], "archived": s["archived"],
            "raw_lost": s["acquired"] - s["archived"] + len(s["not_archived"]),
            "error": s["error"], "enhanced": s["enhanced"],
            "budget_missed": e.get("late", 0), "budget_skipped": e.get("skipped", 0),
            "engine_queue_dropped": e.get("dropped", 0),
            "engine_ms_p50": lat.get("p50"), "engine_ms_p99": lat.get("p99"),
            "adapt_rounds": e.get("adapt_rounds"), "adapt_swaps": e.get("adapt_swaps"),
            "adapt_frames_used": e.get("adapt_frames_used"),
            "adapt_frames_dropped": e.get("adapt_frames_dropped"),
            "adapt_error": e.get("adapt_error"), "load_1min": result["load_1min"]}


def restore_psnr(model: Path, noisy: np.ndarray, truth: np.ndarray) -> float:
    engine = make_engine("model", model=str(model), runtime="openvino", precision="fp32")
    engine.prepare(noisy.shape[1:], np.dtype(np.float32), gen.CAMERA)
    values = []
    for t, frame in enumerate(noisy):
        out = engine.process(frame)
        if t >= gen.WINDOW - 1:
            values.append(gen.psnr(truth[t], out))
    engine.close()
    return round(float(np.mean(values)), 3)


def in_service(timeline: list[dict[str, Any]], t: float) -> str | None:
    """The adapted version in service at time t (None: the model as given)."""
    current = None
    for swap in timeline:
        if swap["t"] <= t and "@adapted-" in swap["version"]:
            current = swap["version"]
    return current


def model_file(run_dir: Path, version: str) -> Path:
    n = version.split("@adapted-")[1].split("+")[0]
    return next((run_dir / "adapted").glob(f"*@adapted-{n}.onnx"))


def offer_cost() -> dict[str, float]:
    """Microseconds per `Adapter.offer()` of a uint16 frame (the child is not started)."""
    from dimscope.engines.adaptation import Adapter

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "m.onnx"
        _tiny_model(model)
        for side in (256, 512, 2048):
            adapter = Adapter(model, Path(tmp), (side, side))
            frame = np.random.default_rng(0).integers(0, 4000, (side, side)).astype(np.uint16)
            n = 500
            t0 = time.perf_counter()
            for _ in range(n):
                adapter.offer(frame)
            out[f"{side}x{side}"] = round((time.perf_counter() - t0) / n * 1e6, 1)
            adapter.close()
    return out


def _tiny_model(path: Path) -> None:
    from dimscope.engines.model_file import ModelCard
    from dimscope.engines.nets import build_network
    from dimscope.engines.normalize import VSTNorm
    from dimscope.engines.training.export import export_onnx

    hp = {"channels": 4, "levels": 1, "scale": 1, "window": 5, "noise_map": True}
    export_onnx(build_network("restore", **hp), ModelCard(
        name="tiny", task="denoise", arch="restore", hparams=hp, multiple=4, window=5,
        normalization=VSTNorm().as_dict()), path)


def bench_movie(fold: int, name: str, clean: np.ndarray, model: Path, args: argparse.Namespace,
                work: Path) -> dict[str, Any]:
    movie_tif = work / "movie.tif"
    tifffile.imwrite(movie_tif, clean.astype(np.float32), photometric="minisblack")
    p = args.photons
    noisy, truth = gen.degrade(clean, p, gen.seed_of(name, p))
    row: dict[str, Any] = {"fold": fold, "movie": name, "frames": len(clean),
                           "shape": list(clean.shape[1:]), "photons": p,
                           "raw": round(float(np.mean([gen.psnr(truth[t], noisy[t])
                                                       for t in range(gen.WINDOW - 1,
                                                                      len(noisy))])), 3)}
    print(f"{name}: baseline {args.baseline_seconds:g} s", flush=True)
    base = run(config(movie_tif, model, work / "runs", p, args.fps, args.budget_ms, False),
               args.baseline_seconds)
    print(f"{name}: adapting {args.seconds:g} s", flush=True)
    adapted = run(config(movie_tif, model, work / "runs", p, args.fps, args.budget_ms, True),
                  args.seconds + 1.0)
    row["baseline"], row["adapting"] = run_facts(base), run_facts(adapted)
    row["swaps"] = adapted["timeline"]
    run_dir = Path(adapted["summary"]["run_dir"])
    scores: dict[str, Any] = {}
    cache: dict[str | None, float] = {}
    for c in args.checkpoints:
        version = in_service(adapted["timeline"], c)
        if version not in cache:
            cache[version] = restore_psnr(model if version is None
                                          else model_file(run_dir, version), noisy, truth)
        scores[f"{c:g}"] = {"version": version, "psnr": cache[version]}
    row["psnr"] = scores
    first, last = scores[f"{args.checkpoints[0]:g}"], scores[f"{args.checkpoints[-1]:g}"]
    row["gain"] = round(last["psnr"] - first["psnr"], 3)
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cps = meta["checkpoints"]
    lines = [
        "# Live adaptation on held-out time-lapses (`python bench/adaptation.py`)", "",
        f"{meta['protocol']}", "",
        f"Measured {meta['date']} on {meta['machine']}; {meta['photons']:g} photons, "
        f"{meta['fps']:g} frames/s, engine budget {meta['budget_ms']:g} ms, models: "
        f"{meta['models']}. `Adapter.offer()` per frame: "
        + ", ".join(f"{k} {v} µs" for k, v in meta["offer_us"].items()) + ".", "",
        "PSNR in dB (CSBDeep), mean over the evaluation pass's frames 4..; the model in service "
        "at each time since the pipeline started (adaptation starts with it).", "",
        "| fold | movie | frames | raw | " + " | ".join(f"{c:g} s" for c in cps)
        + " | gain | swaps | rounds | frames used / skipped by adaptation | raw lost "
        "(baseline, adapting) | budget missed + skipped (baseline → adapting) | engine p99 ms "
        "(baseline → adapting) | load |",
        "|---|---|---:|---:|" + "---:|" * len(cps) + "---:|---:|---:|---|---|---|---|---|"]
    for r in rows:
        b, a = r["baseline"], r["adapting"]
        nb, na = b["acquired"] or 1, a["acquired"] or 1
        lines.append(
            f"| {r['fold']} | {r['movie']} | {r['frames']} | {r['raw']:.2f} | "
            + " | ".join(f"{r['psnr'][f'{c:g}']['psnr']:.2f}" for c in cps)
            + f" | **{r['gain']:+.2f}** | {a['adapt_swaps']} | {a['adapt_rounds']} | "
            f"{a['adapt_frames_used']} / {a['adapt_frames_dropped']} | {b['raw_lost']}, "
            f"{a['raw_lost']} (of {b['acquired']}, {a['acquired']}) | "
            f"{b['budget_missed'] + b['budget_skipped']} ({100 * (b['budget_missed'] + b['budget_skipped']) / nb:.1f}%) → "  # noqa: E501
            f"{a['budget_missed'] + a['budget_skipped']} ({100 * (a['budget_missed'] + a['budget_skipped']) / na:.1f}%) | "  # noqa: E501
            f"{b['engine_ms_p99']} → {a['engine_ms_p99']} | {b['load_1min']}, "
            f"{a['load_1min']} |")
    if rows:
        gains = [r["gain"] for r in rows]
        lines += ["", f"Mean gain after {cps[-1]:g} s: {np.mean(gains):+.2f} dB over "
                  f"{len(rows)} movies (min {min(gains):+.2f}, max {max(gains):+.2f}); raw "
                  f"frames lost: {sum(r['baseline']['raw_lost'] + r['adapting']['raw_lost'] for r in rows)}."]  # noqa: E501
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folds", type=int, nargs="*", default=list(lodo.FOLDS))
    ap.add_argument("--movies", nargs="*", default=None, help="only these (dataset/cN)")
    ap.add_argument("--model", type=Path, default=None,
                    help="use this model for every fold (development), not the fold models")
    ap.add_argument("--photons", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=60.0, help="adapting run")
    ap.add_argument("--baseline-seconds", type=float, default=20.0)
    ap.add_argument("--fps", type=float, default=20.0)
    ap.add_argument("--budget-ms", type=float, default=50.0)
    ap.add_argument("--side", type=int, default=256, help="centre crop of each movie")
    ap.add_argument("--checkpoints", type=float, nargs="*", default=[0.0, 15.0, 30.0, 60.0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "adaptation")
    args = ap.parse_args()
    if not lodo.available():
        print(f"SKIP: the real data ({lodo.DATA}) is not here")
        return 0
    models = {f: args.model or gen.model_path(f) for f in args.folds}
    missing = [f for f, m in models.items() if not m.exists()]
    if missing:
        print(f"fold model(s) missing: {', '.join(str(models[f]) for f in missing)}; train "
              f"them with `python bench/generalization.py --train` (or pass --model)")
        return 1
    rows: list[dict[str, Any]] = []
    for fold in args.folds:
        for ds in (d for d in lodo.DATASETS if d.fold == fold and d.kind == "movie"):
            for name, clean in gen.movie_series(ds, args.side):
                if args.movies and name not in args.movies:
                    continue
                if len(clean) < MIN_FRAMES:
                    print(f"{name}: {len(clean)} frames, too short (< {MIN_FRAMES}); skipped")
                    continue
                with tempfile.TemporaryDirectory(prefix="dimscope-bench-adapt-") as tmp:
                    rows.append(bench_movie(fold, name, clean, models[fold], args, Path(tmp)))
    meta = {"protocol": PROTOCOL,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores",
            "photons": args.photons, "fps": args.fps, "budget_ms": args.budget_ms,
            "seconds": args.seconds, "baseline_seconds": args.baseline_seconds,
            "side": args.side, "checkpoints": args.checkpoints,
            "models": ", ".join(sorted({f"{read_card(m).name} {read_card(m).version}"
                                        for m in models.values()})),
            "command": " ".join(["python", *sys.argv]), "offer_us": offer_cost()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                        indent=1) + "\n")
    text = markdown(rows, meta)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
