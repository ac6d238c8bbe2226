"""Cross-modality transfer against the strongest classical baselines (issue 16).

1. **Simulated pairs, held-out structure classes** (engines/pairs/simulate.py): widefield-
   like LOW (PSF sigma 2.0 px, 5 % background, Poisson + read noise at 20 and 100
   photons at the brightest structure) and the noise-free confocal-like truth (sigma
   0.8 px). The model was trained on other structure classes (its card lists them);
   it is scored on rings (nuclear-pore-like) and mitochondria only. The
   baselines — bicubic (the raw LOW at scale 1), Richardson–Lucy, BM3D then RL — are
   tuned (PSF sigma, iterations, BM3D sigma) on pairs of the *training* classes at the
   same photon level. Everything is fitted affinely to the truth before PSNR and SSIM.
2. **The real widefield/confocal pair** (one Hoechst nucleus, ../shared/data/pairs),
   registered with `dimscope pairs register`, scored on the held-out planes 15–19
   (baselines and 3-D Richardson–Lucy tuned on planes 0–9 and 25–44: a gap of 5 planes
   each side). A demonstration on one nucleus, not a claim.
3. **Trust for transfer**: the model's honest outputs on the held-out pairs scored
   against their raw LOW frames (false alarms), and structures painted into / erased from
   them at 3 and 5 σ of the raw frame's noise after the forward model (detection).
4. **Speed**: the live `transfer` engine on a 512² frame beside torch eager (as
   bench/engines.py).

The offline quality engine `transfer_hq` (a network refining BM3D+VST deconvolved by
Richardson–Lucy, averaged over rotations/flips) is scored and trust-checked beside the live
model when it is shipped (`--extra-model` names others instead).

    .venv/bin/python bench/transfer.py     # ~10 min on 2 cores; results/transfer.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_dilation

from dimscope.engines import CameraCalibration, available_engines, make_engine
from dimscope.engines.evaluation.transfer_eval import (
    evaluate_split,
    format_transfer,
    model_methods,
    registered_split,
    simulated_split,
)
from dimscope.engines.model_file import read_card, shipped_models
from dimscope.engines.noise_model import NoiseModel
from dimscope.engines.pairs.simulate import PairOptics
from dimscope.engines.trust import TrustMeter, forward_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pairs"
PHOTONS = (20.0, 100.0)
#: the camera of simulate.render_pair's defaults
CAMERA = CameraCalibration(gain_adu_per_e=1.3, offset_adu=100.0, read_noise_e=1.6)


def real_pair(models: list[str], runtime: str) -> dict | None:
    low, high = DATA / "dna_widefield_zyx.tif", DATA / "dna_confocal_zyx.tif"
    if not low.is_file():
        print(f"bench/transfer.py: {low} absent: no real pair", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "registered"
        subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", "pairs", "register",
                        str(low), str(high), "--out", str(out), "--pixel-size", "0.256",
                        "0.256"], check=True, capture_output=True)
        report = json.loads((out / "report.json").read_text())["pairs"][0]
        test = list(range(15, 20))
        tune = [*range(0, 10), *range(25, 45)]
        result = evaluate_split(registered_split(out, test, tune),
                                model_methods(models, runtime))
    return {**result, "test_planes": test, "tune_planes": tune, "gap_planes": 5,
            "registration": {k: report[k] for k in ("ncc_before", "ncc_after",
                                                     "residual_shift_px")}}


def _structure(shape: tuple[int, int], kind: str, rng: np.random.Generator
               ) -> tuple[np.ndarray, tuple[int, int]]:
    cy, cx = (int(rng.integers(24, s - 24)) for s in shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    if kind == "punctum":
        return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.8**2)), (cy, cx)
    angle = rng.uniform(0, np.pi)
    across = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
    along = (yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
    return np.exp(-across**2 / (2 * 0.8**2)) * (np.abs(along) <= 16), (cy, cx)


def _footprint_on_map(structure: np.ndarray, map_shape: tuple[int, ...]) -> np.ndarray:
    """Where a structure lies on the half-resolution trust map: any of each 2×2 block's
    pixels above 0.3 of its peak (sampling every other pixel would miss a PSF-sized punctum
    centred on an odd pixel)."""
    h, w = map_shape[0], map_shape[1]
    padded = np.zeros((2 * h, 2 * w), bool)
    inside = structure > 0.3
    padded[: inside.shape[0], : inside.shape[1]] = inside
    return padded.reshape(h, 2, w, 2).any(axis=(1, 3))


def trust(engine_name: str, model: str | None, draws: int) -> dict:
    """False alarms on honest outputs of engine `engine_name` (with `model`, if given);
    detection of structures painted into / erased from them."""
    from dimscope.engines.trust import _intensity_fit

    engine = make_engine(engine_name, **({"model": model} if model else {}))
    sigma = engine.info.forward_psf_sigma_px
    noise = NoiseModel.from_calibration(CAMERA)
    meter = TrustMeter(CAMERA)
    rng = np.random.default_rng(5)
    honest: list[bool] = []
    found: dict[str, list[bool]] = {}
    for photons in PHOTONS:
        for seed in range(draws):
            split = simulated_split(photons, n_tune=0, n_test=2, size=192, seed=100 + seed)
            for low, _ in split.test:
                engine.prepare(low.shape, low.dtype, CAMERA)
                out = engine.process(low)
                score = meter.measure(low, out, noise=noise, psf_sigma_px=sigma,
                                      fit_intensity=True).score
                honest.append(score.alert)
                expected = forward_model(out, 1, sigma)
                gain, offset = _intensity_fit(expected, low)
                for kind in ("punctum", "filament"):
                    for sign, verb in ((1, "inserted"), (-1, "erased")):
                        for contrast in (3.0, 5.0):
                            shape_, (cy, cx) = _structure(out.shape, kind, rng)
                            seen = forward_model(shape_.astype(np.float32), 1, sigma)
                            level = gain * float(expected[cy, cx]) + offset
                            sd = float(np.sqrt(max(noise.alpha * level + noise.beta, 1e-6)))
                            amp = contrast * sd / (abs(gain) * float(seen.max()))
                            fake = out + np.float32(sign * amp) * shape_
                            r = meter.measure(low, fake, noise=noise, psf_sigma_px=sigma,
                                              fit_intensity=True)
                            near = binary_dilation(_footprint_on_map(shape_, r.map.shape),
                                                   iterations=3)
                            hit = r.score.alert and bool(
                                np.any(np.abs(r.map[near]) >= r.score.threshold))
                            found.setdefault(f"{kind} {verb} {contrast:g}σ", []).append(hit)
    engine.close()
    return {"forward_psf_sigma_px": sigma, "honest_frames": len(honest),
            "false_alarm_rate": float(np.mean(honest)),
            "detection": {k: {"rate": float(np.mean(v)), "n": len(v)} for k, v in found.items()}}


def speed(model: str, repeat: int = 10) -> dict:
    import torch

    from dimscope.engines.runtime.pytorch import network_from_file

    engine = make_engine("transfer", model=model, precision="fp32")
    rng = np.random.default_rng(0)
    raw = (rng.poisson(40, (512, 512)) * 1.3 + 100).astype(np.float32)
    engine.prepare(raw.shape, raw.dtype, CAMERA)
    card = read_card(engine.path)  # type: ignore[attr-defined]
    net = network_from_file(engine.path, card).eval()  # type: ignore[attr-defined]
    x = torch.from_numpy(((raw - raw.min()) / np.ptp(raw))[None, None].astype(np.float32))

    def eager() -> None:
        with torch.inference_mode():
            net(x)

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        fn()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - t0) / repeat * 1000

    t_eager = timed(eager)
    t_ours = timed(lambda: engine.process(raw))
    result = {"size": 512, "ms": t_ours, "fps": 1000 / t_ours, "eager_ms": t_eager,
              "ratio_vs_eager": t_eager / t_ours,
              "runtime": f"{engine.info.runtime}/{engine.info.precision}"}
    engine.close()
    return result


def markdown(res: dict) -> str:
    lines = ["# Cross-modality transfer (`python bench/transfer.py`)", "",
             f"Measured {res['date']} on {res['machine']}; model `{res['model']}` "
             f"(card: {res['card_summary']}).", "",
             "PSNR/SSIM after an affine fit of each output to the truth (CSBDeep convention). "
             "Baselines tuned on the training split only (simulated: training structure "
             "classes at the same photon level; real: planes 0–9 and 25–44).", ""]
    lines.append(format_transfer({"simulated": res["simulated"], **(
        {"real": res["real"]} if res.get("real") else {})}))
    for name, t in {"transfer": res["trust"], **res.get("trust_extra", {})}.items():
        lines += [f"## Trust for `{name}`", "",
                  f"Forward model: Gaussian blur sigma {t['forward_psf_sigma_px']:.2f} px "
                  "(fitted to the training pairs) + per-frame gain/offset fit. Honest outputs "
                  f"on held-out pairs at {', '.join(f'{p:g}' for p in PHOTONS)} photons: "
                  f"**false alarms {100 * t['false_alarm_rate']:.1f} %** of "
                  f"{t['honest_frames']} frames.", "", "| structure | detected | n |",
                  "|---|---:|---:|"]
        for k, v in t["detection"].items():
            lines.append(f"| {k} | {100 * v['rate']:.0f} % | {v['n']} |")
        lines.append("")
    s = res["speed"]
    lines += ["", "## Speed", "",
              f"Live `transfer` engine at 512²: **{s['fps']:.1f} fps** ({s['ms']:.1f} ms, "
              f"{s['runtime']}), torch eager {s['eager_ms']:.1f} ms: ratio "
              f"{s['ratio_vs_eager']:.2f}×.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="transfer", help="model under test (shipped name/path)")
    ap.add_argument("--extra-model", action="append", default=None,
                    help="more models or model engines to score beside it (default: the "
                         "offline quality engine transfer_hq, when shipped)")
    ap.add_argument("--n-test", type=int, default=8, help="held-out images per photon level")
    ap.add_argument("--trust-draws", type=int, default=6)
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--record", action="store_true",
                    help="write each shipped model's held-out results into its card")
    args = ap.parse_args()
    extra = args.extra_model if args.extra_model is not None else (
        ["transfer_hq"] if "transfer_hq" in shipped_models() else [])
    models = [args.model, *extra]
    methods = model_methods(models, args.runtime)
    card = read_card(make_engine("transfer", model=args.model).path)  # type: ignore[attr-defined]
    res: dict = {"date": time.strftime("%Y-%m-%d"), "model": args.model,
                 "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores",
                 "card_summary": (f"{card.transfer.low_modality} -> "
                                  f"{card.transfer.high_modality}, trained on "
                                  f"{card.transfer.simulated.get('classes')}"
                                  if card.transfer else "not a transfer card"),
                 "optics": PairOptics().__repr__(), "simulated": {}}
    for photons in PHOTONS:
        t0 = time.perf_counter()
        split = simulated_split(photons, n_tune=8, n_test=args.n_test, size=192)
        res["simulated"][f"{photons:g}"] = evaluate_split(split, methods)
        print(f"simulated {photons:g} photons: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    res["real"] = real_pair(models, args.runtime)
    res["trust"] = trust("transfer", args.model, args.trust_draws)
    res["trust_extra"] = {m: trust(m, None, args.trust_draws) for m in extra
                          if m in available_engines()}
    res["speed"] = speed(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transfer.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (args.out / "transfer.md").write_text(markdown(res))
    print(markdown(res))
    if args.record:
        for model, label in zip(models, methods, strict=True):
            record_evaluation(model, label, res)


def record_evaluation(model: str, label: str, res: dict) -> None:
    """The held-out comparison of `model` (scored as `label`) into its shipped card."""
    from dimscope.engines.model_file import resolve_model, write_card_metadata

    name = model if model in shipped_models() else (
        make_engine(model).path.stem if model in available_engines() else None)  # type: ignore[attr-defined]
    if name is None or name not in shipped_models():
        return
    path = resolve_model(name)

    def summary(result: dict) -> dict:
        best, margin = result["best_baseline"], result["margins"][label]
        return {"best_baseline": best, "baseline_psnr": result["methods"][best]["mean"]["psnr"],
                "baseline_ssim": result["methods"][best]["mean"]["ssim"],
                "psnr": result["methods"][label]["mean"]["psnr"],
                "ssim": result["methods"][label]["mean"]["ssim"],
                "margin_psnr": margin["psnr_mean"], "margin_ssim": margin["ssim_mean"],
                "images_ahead": margin["images_ahead"], "images": margin["images"],
                "worst": margin["worst"]}

    evaluation = {"protocol": "bench/transfer.py: simulated pairs of held-out structure "
                              "classes (rings, mitochondria) at 20 and 100 photons; baselines "
                              "tuned on the training classes only; PSNR/SSIM after an affine "
                              "fit to the noise-free truth",
                  "date": res["date"], "machine": res["machine"],
                  "simulated": {ph: summary(r) for ph, r in res["simulated"].items()},
                  **({"real_pair_planes_15_19": summary(res["real"])} if res.get("real")
                     else {})}
    card = read_card(path)
    write_card_metadata(path, card.model_copy(update={"evaluation": evaluation}))
    print(f"wrote the held-out results into the card of {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
