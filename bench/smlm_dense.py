"""Sparse-to-dense quality on held-out structures (issue 17, "Dense quality"; simulation).

Two folds, each structure class and each real density map in exactly one evaluation set:

- fold A trains on filaments and the density maps of BPAE actin, BPAE mitochondria and HeLa,
  and is evaluated on NPC-like rings and the maps of BBBC022 U2OS, NEUBIAS tubulin/H2B,
  NEUBIAS cell and BPAE nuclei;
- fold B the other way round;
- both also train on `random`: smooth random densities (blurred noise above a random level),
  which no evaluation set holds.

Every evaluation field is a fresh simulation (`engines/training/dense.py`: 10,000 frames of
the simulator's kinetics, ~30 emitting labels per frame, localizations at the Cramér–Rao bound,
the simulator's widefield frame). Input: the first 1 %, 5 % and 10 % of the frames. Target:
the full reconstruction (all frames, Gaussian render σ 20 nm at 20 nm pixels). PSNR/SSIM
after the affine fit to the normalised target (`engines.evaluation.quality.score`).

Baselines on the same sparse localizations: the histogram render, and the Gaussian render
with its σ tuned per fraction on the fold's *training* fields (grid of σ, best mean PSNR).
The model's output is blurred by the width its card holds for the input's localization
density, calibrated on the fold's training fields after training
(`engines.training.dense.calibrate_output_smoothing`); the unsmoothed network output is
reported beside it. The shipped model (`engines/models/dense.onnx`) is trained on every
class with `--ship`.

    .venv/bin/python bench/smlm_dense.py [--steps 3000] [--ship]
    # ~35 min on 2 cores (3 trainings); writes results/smlm_dense.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dimscope.engines.evaluation.quality import score
from dimscope.engines.model_file import read_card
from dimscope.engines.training.dense import (
    DenseTrainSettings,
    SimField,
    simulate_fields,
    train_dense,
    tune_gaussian_sigma,
    write_output_smoothing,
)
from dimscope.smlm.dense import (
    DenseGrid,
    DensePredictor,
    frames_for_fraction,
    gaussian_baseline,
    localization_density,
    model_input,
    smooth_output,
)
from dimscope.smlm.render import histogram_xy

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "singles"
CACHE = ROOT / "bench" / ".cache" / "dense"
RESULTS = ROOT / "results"
FRACTIONS = (0.01, 0.05, 0.10)
GRID = DenseGrid()

IMAGES_A = ["BPAE_actin.tif", "BPAE_mito.tif", "hela-cells.tif"]
IMAGES_B = ["bbbc022_u2os_3ch.tif", "neubias_tub_h2b_cyx.tif",
            "neubias_cell_dna_mts_actin_cyx.tif", "BPAE_nuclei.tif"]


def images(names: list[str]) -> list[str]:
    return [f"image:{DATA / n}" for n in names if (DATA / n).is_file()]


def folds() -> dict[str, tuple[list[str], list[str]]]:
    a = ["filaments", *images(IMAGES_A)]
    b = ["rings", *images(IMAGES_B)]
    # `random` (smooth random densities) is in every training set and no evaluation set.
    return {"A": (["random", *a], b), "B": (["random", *b], a)}


def label(spec: str) -> str:
    return Path(spec.split(":", 1)[1]).stem if spec.startswith("image:") else spec


def evaluate(model: DensePredictor, fields: list[SimField], sigmas: dict[float, float]
             ) -> list[dict[str, Any]]:
    rows = []
    for f in fields:
        for fraction in FRACTIONS:
            n = frames_for_fraction(f.frames, fraction)
            sparse = f.sparse(n)
            hist = histogram_xy(sparse.x_nm, sparse.y_nm, GRID.render_pixel_nm, f.extent_nm)
            gauss = gaussian_baseline(sparse, f.extent_nm, GRID, sigmas[fraction])
            inputs = model_input(sparse, f.widefield, f.extent_nm, model.grid)
            density = localization_density(sparse, f.extent_nm)
            network = model.predict_input(inputs)
            dense = smooth_output(network, model.smoothing_px(density))
            row: dict[str, Any] = {"structure": f.structure, "fraction": fraction,
                                   "frames": n, "localizations": len(sparse),
                                   "sigma_nm": sigmas[fraction],
                                   "blur_px": model.smoothing_px(density)}
            for name, img in (("histogram", hist), ("gaussian", gauss), ("network", network),
                              ("model", dense)):
                s = score(f.target, img)
                row[name] = {"psnr": round(s["psnr"], 3), "ssim": round(s["ssim"], 4)}
            rows.append(row)
    return rows


def train_fold(name: str, specs: list[str], steps: int, per_structure: int,
               seed: int, cache: Path = CACHE, base: str = "sparse",
               recalibrate: bool = False) -> tuple[Path, list[SimField]]:
    cache.mkdir(parents=True, exist_ok=True)
    tag = "" if base == "sparse" else f"_{base}"
    out = cache / f"dense_{name}_s{steps}_f{per_structure}{tag}.onnx"
    settings = DenseTrainSettings(structures=specs, fields_per_structure=per_structure,
                                  steps=steps, seed=seed, name=f"dense_{name}",
                                  grid=DenseGrid(base=base))
    fields = simulate_fields(specs, per_structure, settings.frames_full, GRID, seed)
    if not out.is_file():
        t = time.monotonic()
        train_dense(settings, out, fields, resume=True)  # a finished checkpoint: export
        print(f"fold {name}: trained in {time.monotonic() - t:.0f} s", file=sys.stderr)
    card = read_card(out)
    stale = card.dense is not None and (not card.dense.output_smoothing or recalibrate)
    if stale:  # trained before the calibration existed, or asked
        print(f"fold {name}: output blur {write_output_smoothing(out, fields)}",
              file=sys.stderr)
    return out, fields


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fraction in FRACTIONS:
        sel = [r for r in rows if r["fraction"] == fraction]
        margins = {b: [r["model"]["psnr"] - r[b]["psnr"] for r in sel]
                   for b in ("histogram", "gaussian")}
        ssim_margins = [r["model"]["ssim"] - r["gaussian"]["ssim"] for r in sel]
        worst = min(sel, key=lambda r: r["model"]["psnr"] - r["gaussian"]["psnr"])
        out[str(fraction)] = {
            "n": len(sel),
            "model_psnr": round(float(np.mean([r["model"]["psnr"] for r in sel])), 2),
            "network_psnr": round(float(np.mean([r["network"]["psnr"] for r in sel])), 2),
            "model_ssim": round(float(np.mean([r["model"]["ssim"] for r in sel])), 4),
            "gaussian_ssim": round(float(np.mean([r["gaussian"]["ssim"] for r in sel])), 4),
            "ssim_won_vs_gaussian": sum(r["model"]["ssim"] > r["gaussian"]["ssim"]
                                        for r in sel),
            "gaussian_psnr": round(float(np.mean([r["gaussian"]["psnr"] for r in sel])), 2),
            "histogram_psnr": round(float(np.mean([r["histogram"]["psnr"] for r in sel])), 2),
            "margin_vs_gaussian_db": round(float(np.mean(margins["gaussian"])), 2),
            "margin_vs_histogram_db": round(float(np.mean(margins["histogram"])), 2),
            "ssim_margin_vs_gaussian": round(float(np.mean(ssim_margins)), 4),
            "won_vs_gaussian": sum(m > 0 for m in margins["gaussian"]),
            "won_vs_histogram": sum(m > 0 for m in margins["histogram"]),
            "worst": {"structure": worst["structure"],
                      "margin_db": round(worst["model"]["psnr"] - worst["gaussian"]["psnr"], 2)},
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Sparse-to-dense quality — simulation (`bench/smlm_dense.py`)", "",
        f"Measured {result['date']} on {result['machine']}, OpenVINO FP32 on the CPU.", "",
        "**Simulation**, not real localization data (`../shared/data` has none). Each fold's "
        "model never saw the structure classes or the real density maps it is evaluated "
        "on (fold A: trained on filaments + BPAE actin/mito + HeLa maps, evaluated on rings + "
        "BBBC022/NEUBIAS/BPAE-nuclei maps; fold B the reverse; both also trained on smooth "
        "random densities). Input: the localizations of "
        "the first 1/5/10 % of 10,000 frames plus the simulator's widefield frame (PSF 15 % "
        "wider than the localization PSF). Target: all 10,000 frames' localizations (Gaussian "
        "render, σ 20 nm, 20 nm pixels). PSNR (dB) and SSIM after an affine fit to the "
        "normalised target. Baselines on the same sparse localizations: histogram render; "
        "Gaussian render with σ tuned per fraction on the fold's training fields. The "
        + ("network adds its output to the widefield channel."
           if result.get("base") == "widefield" else
           "network adds its output to the sparse render (σ 20 nm).")
        + f" {result['steps']} training steps per fold. **model**: the network's output "
        "blurred by the width its card holds for the input density (calibrated on the "
        "fold's training fields); *network*: unblurred.", "",
        "| fraction of frames | fields | histogram | Gaussian (tuned σ) | *network* | "
        "**model** | model − Gaussian (won) | model − histogram (won) | SSIM Gaussian → "
        "model (won) | worst field vs Gaussian |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for fraction, s in result["summary"].items():
        lines.append(
            f"| {float(fraction):.0%} | {s['n']} | {s['histogram_psnr']:.2f} | "
            f"{s['gaussian_psnr']:.2f} | *{s['network_psnr']:.2f}* | "
            f"**{s['model_psnr']:.2f}** | "
            f"{s['margin_vs_gaussian_db']:+.2f} ({s['won_vs_gaussian']}/{s['n']}) | "
            f"{s['margin_vs_histogram_db']:+.2f} ({s['won_vs_histogram']}/{s['n']}) | "
            f"{s['gaussian_ssim']:.3f} → {s['model_ssim']:.3f} "
            f"({s['ssim_won_vs_gaussian']}/{s['n']}) | {s['worst']['margin_db']:+.2f} "
            f"({s['worst']['structure']}) |")
    lines += ["", "Per field (PSNR dB / SSIM):", "",
              "| fold | structure | fraction | localizations | σ nm | histogram | Gaussian | "
              "*network* | blur px | model |", "|---|---|---|---|---|---|---|---|---|---|"]
    for fold, rows in result["folds"].items():
        for r in rows["rows"]:
            lines.append(
                f"| {fold} | {r['structure']} | {r['fraction']:.0%} | {r['localizations']} | "
                f"{r['sigma_nm']:g} | {r['histogram']['psnr']:.2f} / "
                f"{r['histogram']['ssim']:.3f} | {r['gaussian']['psnr']:.2f} / "
                f"{r['gaussian']['ssim']:.3f} | *{r['network']['psnr']:.2f} / "
                f"{r['network']['ssim']:.3f}* | {r['blur_px']:.1f} | "
                f"{r['model']['psnr']:.2f} / {r['model']['ssim']:.3f} |")
    lines += ["", "Tuned Gaussian σ per fold and fraction: " + "; ".join(
        f"{fold}: " + ", ".join(f"{float(k):.0%} → {v:g} nm" for k, v in rows["sigmas"].items())
        for fold, rows in result["folds"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--train-fields", type=int, default=6, help="fields per training structure")
    p.add_argument("--eval-fields", type=int, default=2, help="fields per held-out structure")
    p.add_argument("--cache", type=Path, default=CACHE, help="fold models (reused)")
    p.add_argument("--base", choices=["sparse", "widefield"], default="sparse",
                   help="the input channel the network's residual is added to")
    p.add_argument("--folds", nargs="+", default=["A", "B"])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--ship", action="store_true",
                   help="also train the shipped model on every class (engines/models/dense)")
    p.add_argument("--ship-only", action="store_true",
                   help="train the shipped model only, its card's table from results/")
    p.add_argument("--recalibrate", action="store_true",
                   help="calibrate the cached fold models' output blur again")
    p.add_argument("--calibrate-shipped", action="store_true",
                   help="only store the output blur on the shipped model, calibrated on "
                        "its training fields (a model trained before the calibration)")
    args = p.parse_args(argv)
    import torch

    if args.calibrate_shipped:
        from dimscope.engines.model_file import SHIPPED_DIR

        shipped = SHIPPED_DIR / "dense.onnx"
        table = write_output_smoothing(shipped, simulate_fields(
            ship_specs(), 3, 10_000, GRID, seed=SHIP_SEED))
        record_evaluation(shipped, json.loads(
            (args.results / "smlm_dense.json").read_text())["summary"])
        print(f"shipped dense model: output blur {table}")
        return 0
    if args.ship_only:
        ship(args, json.loads((args.results / "smlm_dense.json").read_text())["summary"])
        return 0

    torch.set_num_threads(2)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"),
                              "machine": f"{platform.machine()}, 2 CPU cores",
                              "steps": args.steps, "base": args.base, "folds": {}}
    all_rows: list[dict[str, Any]] = []
    for i, (name, (train_specs, eval_specs)) in enumerate(folds().items()):
        if name not in args.folds:
            continue
        model_path, train_fields = train_fold(name, train_specs, args.steps,
                                              args.train_fields, seed=10 + i, cache=args.cache,
                                              base=args.base, recalibrate=args.recalibrate)
        sigmas = {fr: tune_gaussian_sigma(train_fields, fr, GRID) for fr in FRACTIONS}
        eval_fields = simulate_fields(eval_specs, args.eval_fields, 10_000, GRID, seed=500 + i)
        model = DensePredictor(model_path)
        rows = evaluate(model, eval_fields, sigmas)
        model.close()
        result["folds"][name] = {"train": [label(s) for s in train_specs],
                                 "eval": [label(s) for s in eval_specs],
                                 "sigmas": {str(k): v for k, v in sigmas.items()},
                                 "rows": rows}
        all_rows += rows
        print(f"fold {name}: {json.dumps(summarise(rows))}", file=sys.stderr)
    result["summary"] = summarise(all_rows)
    args.results.mkdir(exist_ok=True)
    (args.results / "smlm_dense.json").write_text(json.dumps(result, indent=1))
    (args.results / "smlm_dense.md").write_text(markdown(result))
    print(markdown(result))
    if args.ship:
        ship(args, result["summary"])
    return 0


SHIP_SEED = 7


def ship_specs() -> list[str]:
    """Every structure class and density map of both folds, with `random`."""
    return sorted({s for a, b in folds().values() for s in a + b})


def ship(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    """The shipped model: every class, the folds' recipe; its card holds the fold table."""
    from dimscope.engines.model_file import SHIPPED_DIR

    out = SHIPPED_DIR / "dense.onnx"
    settings = DenseTrainSettings(structures=ship_specs(),
                                  fields_per_structure=args.train_fields,
                                  steps=args.steps, seed=SHIP_SEED, name="dense",
                                  grid=DenseGrid(base=args.base))
    train_dense(settings, out)
    record_evaluation(out, summary)


def record_evaluation(model: Path, summary: dict[str, Any]) -> None:
    """The folds' table on the shipped model's card."""
    from dimscope.engines.model_file import write_card_metadata

    card = read_card(model)
    write_card_metadata(model, card.model_copy(update={"evaluation": {
        "protocol": "bench/smlm_dense.py: two folds, structure classes and density maps "
                    "held out (simulation); PSNR/SSIM after an affine fit to the full "
                    "reconstruction, against the tuned Gaussian render; the output blurred "
                    "as calibrated on each fold's training fields",
        "summary": summary}}))


if __name__ == "__main__":
    raise SystemExit(main())
