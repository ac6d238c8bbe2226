"""`dimscope eval transfer` and bench/transfer.py: transfer models against the strongest
classical baselines, on data the model never saw.

Two kinds of test data:

- **simulated pairs** (`simulated_split`): the baselines are tuned on pairs of the
  *training* structure classes, and everything is scored on the *held-out* classes
  (rings, mitochondria), at each photon level separately;
- **registered real pairs** (`registered_split`): `dimscope pairs register` output, stacks
  split by plane — baselines tuned on the training planes, scored on a held-out block.
  With stacks, 3-D Richardson–Lucy deconvolves the whole stack (tuned on the training
  planes) and is scored on the held-out planes.

Every output is fitted affinely to its target before PSNR and SSIM
(`transfer_baselines.score_outputs`); per-image values, the mean and the worst image are
reported, and each model's margin over the best baseline (highest mean PSNR on the test
images) image by image.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..pairs.simulate import HELD_OUT_CLASSES, TRAIN_CLASSES, PairOptics, density, render_pair
from .transfer_baselines import TunedBaseline, score_outputs, tune, tune_all

Method = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Split:
    """Tuning pairs (never scored) and test pairs with their names."""

    tune: list[tuple[np.ndarray, np.ndarray]]
    test: list[tuple[np.ndarray, np.ndarray]]
    names: list[str]
    #: for stacks: the whole LOW/HIGH stacks and the test planes (for 3-D methods)
    stack: tuple[np.ndarray, np.ndarray] | None = None
    test_planes: tuple[int, ...] = ()
    tune_planes: tuple[int, ...] = ()


def simulated_split(photons: float, n_tune: int = 8, n_test: int = 8, size: int = 192,
                    scale: int = 1, seed: int = 0, optics: PairOptics | None = None) -> Split:
    """Tuning pairs from the training classes, test pairs from the held-out ones; LOW in ADU,
    HIGH the noise-free truth of the HIGH modality."""
    optics = optics or PairOptics(scale=scale)
    rng = np.random.default_rng(seed * 1000 + int(photons))
    train_classes = [c for c in TRAIN_CLASSES if c != "images"]

    def pair(kind: str) -> tuple[np.ndarray, np.ndarray]:
        p = render_pair(density(kind, rng, (size, size)), optics, rng, photons)
        return p.low, p.high_clean

    tune_pairs = [pair(train_classes[i % len(train_classes)]) for i in range(n_tune)]
    kinds = [HELD_OUT_CLASSES[i % len(HELD_OUT_CLASSES)] for i in range(n_test)]
    return Split(tune_pairs, [pair(k) for k in kinds],
                 [f"{k}-{i}@{photons:g}ph" for i, k in enumerate(kinds)])


def registered_split(folder: Path, test_planes: Sequence[int], tune_planes: Sequence[int],
                     name: str | None = None) -> Split:
    """A registered stack pair split by plane (inside the overlap's bounding box)."""
    import tifffile

    report = json.loads((folder / "report.json").read_text())
    entries = [e for e in report["pairs"] if e.get("status") == "registered"
               and (name is None or e["name"] == name)]
    if not entries:
        raise ValueError(f"{folder}: no registered pair{f' named {name}' if name else ''}")
    pair_name = entries[0]["name"]
    low = np.asarray(tifffile.imread(folder / "low" / f"{pair_name}.tif"), np.float32)
    high = np.asarray(tifffile.imread(folder / "high" / f"{pair_name}.tif"), np.float32)
    mask = np.asarray(tifffile.imread(folder / "mask" / f"{pair_name}.tif")) > 0
    box = inner_box(mask)
    if box[0].stop - box[0].start < 32 or box[1].stop - box[1].start < 32:
        raise ValueError(f"{folder}: the overlap of {pair_name} has no 32x32 block inside it")
    low, high = low[(slice(None), *box)], high[(slice(None), *box)]
    if low.ndim == 2:
        raise ValueError(f"{pair_name} is a single image: split by plane needs a stack")
    bad = [z for z in (*test_planes, *tune_planes) if not 0 <= z < len(low)]
    if bad:
        raise ValueError(f"planes {bad} are outside the stack's {len(low)} planes")
    return Split([(low[z], high[z]) for z in tune_planes], [(low[z], high[z])
                                                            for z in test_planes],
                 [f"{pair_name}/z{z}" for z in test_planes], stack=(low, high),
                 test_planes=tuple(test_planes), tune_planes=tuple(tune_planes))


def inner_box(mask: np.ndarray) -> tuple[slice, slice]:
    """A large axis-aligned box wholly inside `mask`: the mask's bounding box, shrunk one
    pixel at a time on the side with the most pixels outside the mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return slice(0, 0), slice(0, 0)
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    while y1 > y0 and x1 > x0:
        box = ~mask[y0:y1, x0:x1]
        if not box.any():
            break
        sides = {"top": box[0].sum(), "bottom": box[-1].sum(), "left": box[:, 0].sum(),
                 "right": box[:, -1].sum()}
        worst = max(sides, key=lambda k: sides[k])
        if worst == "top":
            y0 += 1
        elif worst == "bottom":
            y1 -= 1
        elif worst == "left":
            x0 += 1
        else:
            x1 -= 1
    return slice(y0, y1), slice(x0, x1)


def _summary(per_image: list[dict[str, float]], names: list[str]) -> dict[str, Any]:
    psnr = [p["psnr"] for p in per_image]
    worst = int(np.argmin(psnr))
    return {"mean": {"psnr": float(np.mean(psnr)),
                     "ssim": float(np.mean([p["ssim"] for p in per_image]))},
            "per_image": [{"name": n, **p} for n, p in zip(names, per_image, strict=True)],
            "worst": {"name": names[worst], **per_image[worst]}}


def evaluate_split(split: Split, models: dict[str, Method],
                   tuned: dict[str, TunedBaseline] | None = None,
                   max_pixels: int | None = 128 * 128) -> dict[str, Any]:
    """Tune the baselines on `split.tune` (unless given), run everything on `split.test`,
    score, and compare each model with the best baseline image by image."""
    t0 = time.perf_counter()
    tuned = tuned if tuned is not None else tune_all(
        split.tune, methods=["bicubic", "rl2d", "bm3d_rl"], max_pixels=max_pixels)
    tuning_s = time.perf_counter() - t0
    outputs: dict[str, list[np.ndarray]] = {k: [] for k in (*tuned, *models)}
    seconds: dict[str, float] = dict.fromkeys(outputs, 0.0)
    for low, high in split.test:
        scale = high.shape[-1] // low.shape[-1]
        for name, baseline in tuned.items():
            t = time.perf_counter()
            outputs[name].append(baseline.apply(low, scale))
            seconds[name] += time.perf_counter() - t
        for name, run in models.items():
            t = time.perf_counter()
            outputs[name].append(run(low))
            seconds[name] += time.perf_counter() - t
    if split.stack is not None and split.tune_planes:
        # 3-D Richardson–Lucy: tuned on the contiguous runs of training planes (as
        # sub-stacks), then the whole stack is deconvolved as one volume and scored on the
        # test planes.
        low_s, high_s = split.stack
        t = time.perf_counter()
        rl3d = tune("rl3d", [(low_s[a:b], high_s[a:b]) for a, b in _runs(split.tune_planes)
                             if b - a >= 3])
        volume = rl3d.apply(low_s, 1)
        tuned["rl3d"] = rl3d
        outputs["rl3d"] = [volume[z] for z in split.test_planes]
        seconds["rl3d"] = time.perf_counter() - t
    per_method: dict[str, list[dict[str, float]]] = {k: [] for k in outputs}
    for i, (_, high) in enumerate(split.test):
        scores = score_outputs(high, {k: v[i] for k, v in outputs.items()})
        for k, s in scores.items():
            per_method[k].append(s)
    n = len(split.test)
    methods = {k: {**_summary(v, split.names), "seconds_per_image": seconds[k] / n,
                   **({"params": tuned[k].params, "train_psnr": tuned[k].train_psnr}
                      if k in tuned else {})}
               for k, v in per_method.items()}
    baselines = [k for k in methods if k in tuned]
    best = max(baselines, key=lambda k: methods[k]["mean"]["psnr"])
    margins: dict[str, Any] = {}
    for model in models:
        d_psnr = [m["psnr"] - b["psnr"] for m, b in zip(per_method[model], per_method[best],
                                                        strict=True)]
        d_ssim = [m["ssim"] - b["ssim"] for m, b in zip(per_method[model], per_method[best],
                                                        strict=True)]
        worst = int(np.argmin(d_psnr))
        margins[model] = {"vs": best, "psnr_mean": float(np.mean(d_psnr)),
                          "ssim_mean": float(np.mean(d_ssim)),
                          "images_ahead": int(sum(d > 0 for d in d_psnr)), "images": n,
                          "ssim_images_ahead": int(sum(d > 0 for d in d_ssim)),
                          "worst": {"name": split.names[worst], "psnr": d_psnr[worst]}}
    return {"methods": methods, "best_baseline": best, "margins": margins,
            "tuning_seconds": tuning_s, "images": split.names}


def _runs(planes: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous runs of plane numbers as half-open ranges."""
    runs: list[tuple[int, int]] = []
    for z in sorted(planes):
        if runs and runs[-1][1] == z:
            runs[-1] = (runs[-1][0], z + 1)
        else:
            runs.append((z, z + 1))
    return runs


def model_methods(models: Sequence[str], runtime: str = "auto") -> dict[str, Method]:
    """Each model (shipped name or .onnx path) as a method, labelled by its card name and
    file."""
    from .evaluate import model_method

    methods: dict[str, Method] = {}
    for model in models:
        label, run = model_method(model, runtime)
        methods[label] = run
    return methods


def run_eval_transfer(models: Sequence[str], *, photons: Sequence[float] = (),
                      pairs: Path | None = None, planes: str | None = None,
                      tune_planes: str | None = None, runtime: str = "auto",
                      n_test: int = 8, n_tune: int = 8, size: int = 192) -> dict[str, Any]:
    """Every requested evaluation: simulated held-out classes at each photon level, and/or a
    registered stack's held-out planes. Keys: `simulated` (photons -> result), `real`."""
    from ..training.transfer import parse_planes

    if not photons and pairs is None:
        raise ValueError("eval transfer needs --sim (simulated held-out classes) and/or "
                         "--pairs DIR --planes Z0:Z1 --tune-planes ...")
    methods = model_methods(models, runtime)
    results: dict[str, Any] = {"models": list(methods), "simulated": {}}
    for ph in photons:
        split = simulated_split(float(ph), n_tune=n_tune, n_test=n_test, size=size)
        results["simulated"][f"{ph:g}"] = evaluate_split(split, methods)
    if pairs is not None:
        test, tune_ = parse_planes(planes), parse_planes(tune_planes)
        if test is None or tune_ is None:
            raise ValueError("--pairs needs --planes (held-out block) and --tune-planes")
        test_z = [z for a, b in test for z in range(a, b)]
        tune_z = [z for a, b in tune_ for z in range(a, b)]
        overlap = sorted(set(test_z) & set(tune_z))
        if overlap:
            raise ValueError(f"planes {overlap} are both held out and tuned on")
        gap = min(abs(a - b) for a in test_z for b in tune_z) - 1
        results["real"] = {**evaluate_split(registered_split(pairs, test_z, tune_z), methods),
                           "test_planes": test_z, "tune_planes": tune_z, "gap_planes": gap}
    return results


def format_transfer(results: dict[str, Any]) -> str:
    """Markdown: per evaluation, each method's mean PSNR/SSIM and worst image, then each
    model's margin over the best baseline."""
    lines: list[str] = []
    sections = [(f"simulated held-out classes, {ph} photons", r)
                for ph, r in results.get("simulated", {}).items()]
    if "real" in results:
        r = results["real"]
        sections.append((f"registered pair, held-out planes {r['test_planes'][0]}–"
                         f"{r['test_planes'][-1]} (gap {r['gap_planes']} planes)", r))
    for title, r in sections:
        lines += [f"### {title}", "", "| method | PSNR | SSIM | worst image (PSNR) | params |",
                  "|---|---:|---:|---|---|"]
        for name, m in r["methods"].items():
            params = ", ".join(f"{k} {v:g}" for k, v in m.get("params", {}).items())
            lines.append(f"| {name} | {m['mean']['psnr']:.2f} | {m['mean']['ssim']:.3f} | "
                         f"{m['worst']['name']} ({m['worst']['psnr']:.2f}) | {params} |")
        for model, d in r["margins"].items():
            lines.append(f"\n**{model}** − {d['vs']}: {d['psnr_mean']:+.2f} dB PSNR "
                         f"({d['images_ahead']}/{d['images']} images ahead), "
                         f"{d['ssim_mean']:+.3f} SSIM ({d['ssim_images_ahead']}/{d['images']}); "
                         f"worst {d['worst']['name']} {d['worst']['psnr']:+.2f} dB")
        lines.append("")
    return "\n".join(lines)
