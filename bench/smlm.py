"""Localization speed and accuracy on simulated SMLM data (issue 17, "what must be shown").

Data: `dimscope.smlm.simulate`, 128×128 camera of 100 nm pixels, Gaussian PSF σ = 130 nm,
1–5 k photons per emitter-frame (times its on-part of the frame), 20 background photons per
pixel, read noise 1.5 e⁻, gain 2 ADU/e⁻, slow drift; ~30 emitting labels per frame.

**Speed**, on the same frames in the same run, alternating (the machine is shared):
- *library batch*: `smappy.fit(stack, camera=…)` — the library's own batch call on the whole
  stack in memory;
- *live push, same work*: `SmappyLocalizer.push(frame)` one frame at a time, as a pipeline
  stage gets them, a block closed every 100 frames, camera→photons here — with the library's
  own edge handling (`pad_px=0`, no edge refit) and no multi-emitter refit, i.e. the same
  fits as the batch call;
- *live push, defaults*: the same with edge padding and the EM refit of edge fits (more fits:
  the emitters near the edge that the library drops), and the multi-emitter refit of
  overlapping emitters.

**Accuracy** against the ground truth (emitters on the camera, drift included, inside the
field), by optimal matching at 250 nm (`metrics.match`): Jaccard, recall, precision, lateral
RMSE, SMLM-challenge efficiency, and RMSE / CRLB, where the CRLB is that of a
pixel-integrated Gaussian with background and read noise at each matched emitter's true
position, photons and background (`metrics.crlb_pixelated`). Reported for all matched pairs
and for isolated emitters (no other emitting label within 600 nm in that frame), so that
what overlapping emitters cost is visible. Filaments (main), NPC-like rings, a real image
(`../shared/data/singles/BPAE_actin.tif`) as a density map, and filaments at 10 per frame.

**Picasso** (`picassosr`'s CPU `gaussmle`), when `--picasso-python` names an interpreter that
has it (it cannot be installed into dimscope's environment, see the results): run by
`bench/smlm_picasso.py` on the same frames written to a TIFF, its min. net gradient picked
on a separate simulation (seed 99) from a few values by Jaccard; smappy's settings are its
defaults (cutoff 1.7) and a 7 px box, not tuned on the test data either.

    .venv/bin/python bench/smlm.py [--frames 2000] [--picasso-python /tmp/picasso-venv/bin/python]
    # ~3 min on 2 shared cores; writes results/smlm.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from dimscope.smlm.block import LocBlock, concat
from dimscope.smlm.drift import rcc
from dimscope.smlm.frc import frc
from dimscope.smlm.localize import LocalizerSettings, SmappyLocalizer
from dimscope.smlm.metrics import crlb_pixelated, match, score
from dimscope.smlm.simulate import (
    Camera,
    GroundTruth,
    SimSettings,
    SMLMSimulator,
    density_image,
    filaments,
    load_plane,
    rings,
)

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT.parent / "shared" / "data" / "singles" / "BPAE_actin.tif"
CAM = Camera(pixel_nm=100.0, gain_adu_per_e=2.0, offset_adu=100.0, read_noise_e=1.5)
SIM = SimSettings(camera=CAM, psf_sigma_nm=130.0, background_photons=20.0)
MAIN = "live, defaults (padding + edge EM + multi-emitter), filaments 30/frame"
LOC = LocalizerSettings(pixel_nm=100.0, psf_sigma_nm=130.0, gain_adu_per_e=2.0,
                        offset_adu=100.0, read_noise_e=1.5, roisize=7, flush_frames=100)
TOL = 250.0


def simulate(kind: str, frames: int, seed: int, emitting: float = 30.0
             ) -> tuple[np.ndarray, GroundTruth]:
    rng = np.random.default_rng(seed)
    if kind == "filaments":
        st = filaments(SIM.extent_nm, rng)
    elif kind == "rings":
        st = rings(SIM.extent_nm, rng, n=250)
    else:
        st = density_image(load_plane(IMAGE), SIM.extent_nm, rng, n_labels=20000,
                           origin_px=(20, 300), name="BPAE_actin")
    s = SIM.model_copy(update={"activation_power": SIM.kinetics.power_for(
        len(st.labels_nm), emitting)})
    return SMLMSimulator(st, s, seed=seed + 1).run(frames)


def evaluate(gt: GroundTruth, frame: np.ndarray, x: np.ndarray, y: np.ndarray
             ) -> dict[str, Any]:
    gx = gt.x_nm + gt.drift_nm[gt.frame, 0]
    gy = gt.y_nm + gt.drift_nm[gt.frame, 1]
    w, h = SIM.extent_nm
    inside = (gx >= 0) & (gx < w) & (gy >= 0) & (gy < h)
    idx = np.flatnonzero(inside)
    m = match(gt.frame[idx], gx[idx], gy[idx], frame, x, y, TOL)
    sc = score(m, TOL)
    t = idx[m.truth]
    cx, cy = crlb_pixelated(gx[t], gy[t], gt.photons[t], SIM.background_photons,
                            SIM.psf_sigma_nm, CAM.pixel_nm, CAM.read_noise_e, roisize=LOC.roisize)
    crlb2 = cx ** 2 + cy ** 2
    err2 = m.dx_nm ** 2 + m.dy_nm ** 2
    # isolated: no other emitting label within 600 nm in the same frame
    nn = np.full(len(gt.frame), np.inf)
    order = np.argsort(gt.frame, kind="stable")
    _, starts = np.unique(gt.frame[order], return_index=True)
    stops = np.append(starts[1:], len(order))
    for a, b in zip(starts, stops, strict=True):
        i = order[a:b]
        if len(i) > 1:
            d, _ = cKDTree(np.c_[gx[i], gy[i]]).query(np.c_[gx[i], gy[i]], k=2)
            nn[i] = d[:, 1]
    iso = nn[t] > 600
    iso_all = inside & (nn > 600)
    crlb = math.sqrt(float(np.mean(crlb2)))
    return {
        "truths": len(idx), "localizations": len(frame), "tp": sc.tp, "fp": sc.fp,
        "fn": sc.fn, "jaccard": sc.jaccard, "recall": sc.recall, "precision": sc.precision,
        "rmse_lateral_nm": sc.rmse_lateral_nm, "bias_x_nm": sc.bias_x_nm,
        "bias_y_nm": sc.bias_y_nm, "efficiency_lateral": sc.efficiency_lateral,
        "crlb_lateral_nm": crlb, "rmse_over_crlb": sc.rmse_lateral_nm / crlb,
        "median_error_over_crlb": float(np.median(np.sqrt(err2 / crlb2))),
        "share_beyond_5_crlb": float(np.mean(err2 > 25 * crlb2)),
        "isolated_share_of_truths": float(iso_all.sum() / max(len(idx), 1)),
        "isolated_recall": float(iso.sum() / max(iso_all.sum(), 1)),
        "isolated_rmse_over_crlb": math.sqrt(float(np.mean(err2[iso]) / np.mean(crlb2[iso]))),
    }


def library_batch(stack: np.ndarray) -> tuple[Any, float]:
    import smappy

    cam = {"conversion": 1.0 / CAM.gain_adu_per_e, "offset": CAM.offset_adu,
           "pixelsize_um": CAM.pixel_nm / 1000.0, "read_noise_e": CAM.read_noise_e,
           "em_on": False}
    t0 = time.perf_counter()
    locs = smappy.fit(stack, camera=cam, sigma=LOC.psf_sigma_nm / LOC.pixel_nm,
                      roisize=LOC.roisize, max_fit_distance=LOC.max_fit_distance_px)
    return locs, time.perf_counter() - t0


def live_push(stack: np.ndarray, settings: LocalizerSettings = LOC) -> tuple[LocBlock, float]:
    loc = SmappyLocalizer(settings)
    blocks: list[LocBlock] = []
    t0 = time.perf_counter()
    for i, frame in enumerate(stack):
        blocks += loc.push(frame, i)
    blocks += loc.flush()
    return concat(blocks), time.perf_counter() - t0


def run_picasso(python: str, stack: np.ndarray, min_ng: float, tmp: Path, pad: int = 0
                ) -> dict[str, Any]:
    import tifffile

    frames = stack
    if pad:
        # the same edge padding as SmappyLocalizer (each frame's median), in ADU
        med = np.median(stack.reshape(len(stack), -1), axis=1)
        frames = np.empty((len(stack), stack.shape[1] + 2 * pad, stack.shape[2] + 2 * pad),
                          stack.dtype)
        frames[:] = med[:, None, None].astype(stack.dtype)
        frames[:, pad:-pad, pad:-pad] = stack
    raw, out = tmp / f"raw_{pad}.tif", tmp / f"picasso_{min_ng:g}_{pad}.npz"
    tifffile.imwrite(raw, frames)
    cmd = [python, str(ROOT / "bench" / "smlm_picasso.py"), str(raw), str(out), "--pixel-nm",
           str(CAM.pixel_nm), "--gain", str(CAM.gain_adu_per_e), "--offset",
           str(CAM.offset_adu), "--min-ng", str(min_ng), "--box", str(LOC.roisize)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    z = np.load(out)
    # Picasso puts pixel centres at integers (measured: −½ px bias otherwise), dimscope at ½
    x = (z["x_px"] + 0.5 - pad) * CAM.pixel_nm
    y = (z["y_px"] + 0.5 - pad) * CAM.pixel_nm
    w, h = SIM.extent_nm
    keep = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    return {"frame": z["frame"][keep].astype(np.int64), "x": x[keep], "y": y[keep],
            "seconds": float(z["seconds"].sum()), "identify_s": float(z["seconds"][0]),
            "fit_s": float(z["seconds"][1])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--picasso-python", default=None)
    ap.add_argument("--picasso-frames", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    from importlib.metadata import version

    import smappy  # noqa: F401 — fail early

    res: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(),
                    "python": platform.python_version(),
                    "smappy_smlm": version("smappy-smlm")},
        "data": {"shape": list(SIM.shape), "pixel_nm": CAM.pixel_nm,
                 "psf_sigma_nm": SIM.psf_sigma_nm, "photons_range": list(SIM.photons_range),
                 "background_photons": SIM.background_photons,
                 "read_noise_e": CAM.read_noise_e, "frames": args.frames},
        "localizer": LOC.model_dump(mode="json"), "tolerance_nm": TOL}
    t_start = time.perf_counter()
    stack, gt = simulate("filaments", args.frames, seed=1)
    res["data"]["emitting_per_frame"] = len(gt.frame) / args.frames
    print(f"simulated {args.frames} frames, {len(gt.frame) / args.frames:.1f} emitting/frame",
          flush=True)

    # ---- speed: library batch vs live push, alternating on the same frames
    plain = LOC.model_copy(update={"pad_px": 0, "edge_em_iterations": 0,
                                   "multi_emitter": None})
    batch_s, same_s, live_s = [], [], []
    live = lib = same = None
    for _ in range(args.reps):
        lib, t = library_batch(stack)
        batch_s.append(t)
        same, t = live_push(stack, plain)
        same_s.append(t)
        live, t = live_push(stack)
        live_s.append(t)
        print(f"batch {args.frames / batch_s[-1]:.0f} /s, live same work "
              f"{args.frames / same_s[-1]:.0f} /s, live defaults {args.frames / live_s[-1]:.0f}"
              " /s", flush=True)
    assert live is not None and lib is not None and same is not None
    n = args.frames
    res["speed"] = {
        "library_batch_fps": [n / t for t in batch_s],
        "live_same_work_fps": [n / t for t in same_s],
        "live_defaults_fps": [n / t for t in live_s],
        "library_batch_fps_median": n / float(np.median(batch_s)),
        "live_same_work_fps_median": n / float(np.median(same_s)),
        "live_defaults_fps_median": n / float(np.median(live_s)),
        "live_same_work_over_batch": float(np.median(batch_s) / np.median(same_s)),
        "live_defaults_over_batch": float(np.median(batch_s) / np.median(live_s)),
    }

    # ---- accuracy on the main data
    acc: dict[str, Any] = {}
    acc[MAIN] = evaluate(gt, live.frame, live.x_nm, live.y_nm)
    single, _ = live_push(stack, LOC.model_copy(update={"multi_emitter": None}))
    acc["live, single-emitter fits only (padding + edge EM), filaments 30/frame"] = evaluate(
        gt, single.frame, single.x_nm, single.y_nm)
    acc["live, same work as the batch (no padding), filaments 30/frame"] = evaluate(
        gt, same.frame, same.x_nm, same.y_nm)
    no_em, _ = live_push(stack, LOC.model_copy(update={"edge_em_iterations": 0}))
    acc["live, padding without edge EM, filaments 30/frame"] = evaluate(
        gt, no_em.frame, no_em.x_nm, no_em.y_nm)
    lx = np.asarray(lib["x_nm"]) + 0.5 * CAM.pixel_nm  # smappy: pixel centres at integers
    ly = np.asarray(lib["y_nm"]) + 0.5 * CAM.pixel_nm
    acc["library batch (smappy, no padding), filaments 30/frame"] = evaluate(
        gt, np.asarray(lib["frame"]), lx, ly)
    for tol in (0.3, 0.1):
        keep = np.abs(single["sigma_nm"] / LOC.psf_sigma_nm - 1) < tol
        acc[f"single-emitter fits with abs(σ/σ_PSF − 1) < {tol}, filaments 30/frame"] = (
            evaluate(gt, single.frame[keep], single.x_nm[keep], single.y_nm[keep]))

    # ---- drift and FRC on the live table
    est = rcc(live, n_frames=n, n_segments=10, extent_nm=SIM.extent_nm)
    err = np.stack([est.dx_nm, est.dy_nm], 1) - gt.drift_nm
    err -= err.mean(0)
    res["drift"] = {"true_peak_to_peak_nm": np.ptp(gt.drift_nm, 0).tolist(),
                    "rcc_error_rms_nm": float(np.sqrt(np.mean(np.sum(err ** 2, 1)))),
                    "segments": 10, "pairs_used": est.pairs_used}
    corrected = est.apply(live)
    res["frc"] = {f"block_{b}": {"raw_nm": frc(live, 5.0, b, SIM.extent_nm).resolution_nm,
                                 "drift_corrected_nm": frc(corrected, 5.0, b,
                                                           SIM.extent_nm).resolution_nm}
                  for b in (100, 500)}

    # ---- other structures and a lower density (live path)
    others = [("rings", "rings", 30.0), ("filaments", "filaments", 10.0)]
    if IMAGE.exists():
        others.insert(1, ("image", "BPAE_actin density map", 30.0))
    for kind, label, emitting in others:
        st, g = simulate(kind, 1000, seed=7, emitting=emitting)
        b, _ = live_push(st)
        acc[f"live, {label} {emitting:g}/frame"] = evaluate(g, b.frame, b.x_nm, b.y_nm)
        print(f"{label}: Jaccard {acc[f'live, {label} {emitting:g}/frame']['jaccard']:.3f}",
              flush=True)
    res["accuracy"] = acc

    # ---- Picasso
    if args.picasso_python:
        with tempfile.TemporaryDirectory() as td:
            tmp = Path(td)
            tune_stack, tune_gt = simulate("filaments", 300, seed=99)
            tuning: dict[str, float] = {}
            for ng in (300.0, 700.0, 1500.0):
                p = run_picasso(args.picasso_python, tune_stack, ng, tmp)
                tuning[f"{ng:g}"] = evaluate(tune_gt, p["frame"], p["x"], p["y"])["jaccard"]
            best = float(max(tuning, key=lambda k: tuning[k]))
            m = args.picasso_frames
            sub = stack[:m]
            sub_gt_mask = gt.frame < m
            sub_gt = GroundTruth(gt.frame[sub_gt_mask], gt.ids[sub_gt_mask],
                                 gt.x_nm[sub_gt_mask], gt.y_nm[sub_gt_mask],
                                 gt.photons[sub_gt_mask], gt.drift_nm[:m])
            pic = run_picasso(args.picasso_python, sub, best, tmp)
            pic_pad = run_picasso(args.picasso_python, sub, best, tmp, pad=LOC.roisize // 2)
            _, t_lib = library_batch(sub)
            sm_live, t_live = live_push(sub)
            res["picasso"] = {
                "frames": m, "min_net_gradient": best, "tuning_jaccard": tuning,
                "picasso_fps": m / pic["seconds"], "picasso_identify_s": pic["identify_s"],
                "picasso_fit_s": pic["fit_s"], "picasso_padded_fps": m / pic_pad["seconds"],
                "smappy_batch_fps": m / t_lib, "smappy_live_fps": m / t_live,
                "accuracy": {
                    "picasso gaussmle": evaluate(sub_gt, pic["frame"], pic["x"], pic["y"]),
                    "picasso gaussmle + padding": evaluate(sub_gt, pic_pad["frame"],
                                                           pic_pad["x"], pic_pad["y"]),
                    "smappy live, defaults (padding + edge EM + multi-emitter)": evaluate(
                        sub_gt, sm_live.frame, sm_live.x_nm, sm_live.y_nm)}}
            print(f"picasso {m / pic['seconds']:.0f} /s", flush=True)
    res["wall_s"] = time.perf_counter() - t_start
    args.out.mkdir(exist_ok=True)
    (args.out / "smlm.json").write_text(json.dumps(res, indent=2, default=float))
    (args.out / "smlm.md").write_text(report(res))
    print(report(res))


def report(r: dict[str, Any]) -> str:
    d, s = r["data"], r["speed"]
    a = r["accuracy"][MAIN]
    ok = {"jaccard": a["jaccard"] >= 0.8, "rmse": a["rmse_over_crlb"] <= 1.5,
          "rate": s["live_same_work_over_batch"] >= 0.9,
        "rate2": s["live_defaults_over_batch"] >= 0.9}
    lines = [
        "# SMLM localization: speed and accuracy (simulation)",
        "",
        f"`bench/smlm.py` on {r['machine']['platform']}, {r['machine']['cpus']} CPU cores "
        "(shared with another engineer's jobs while this ran), smappy-smlm "
        f"{r['machine']['smappy_smlm']}. Simulated data: {d['shape'][0]}×{d['shape'][1]}, "
        f"{d['pixel_nm']:g} nm pixels, PSF σ {d['psf_sigma_nm']:g} nm, "
        f"{d['photons_range'][0]:g}–{d['photons_range'][1]:g} photons per emitter-frame "
        f"(times its on-part of the frame), {d['background_photons']:g} background "
        f"photons/pixel, read noise {d['read_noise_e']:g} e⁻, {d['frames']} frames, "
        f"{d['emitting_per_frame']:.1f} emitting labels per frame on filaments, with drift.",
        "",
        "## The issue's bars",
        "",
        "| bar | measured | met |",
        "|---|---|---|",
        f"| Jaccard ≥ 0.8 at 250 nm | {a['jaccard']:.3f} | {'yes' if ok['jaccard'] else 'NO'}"
        " |",
        f"| RMSE ≤ 1.5 × CRLB | {a['rmse_over_crlb']:.2f} × ({a['rmse_lateral_nm']:.1f} nm vs "
        f"{a['crlb_lateral_nm']:.1f} nm) | {'yes' if ok['rmse'] else 'NO'} |",
        f"| live rate ≥ 0.9 × library batch rate, same fits | "
        f"{s['live_same_work_over_batch']:.2f} × ({s['live_same_work_fps_median']:.0f} vs "
        f"{s['library_batch_fps_median']:.0f} frames/s) | {'yes' if ok['rate'] else 'NO'} |",
        f"| the same, live with its defaults (edge padding + EM refit + multi-emitter refit)"
        f" | {s['live_defaults_over_batch']:.2f} × ({s['live_defaults_fps_median']:.0f} "
        f"frames/s) | {'yes' if ok['rate2'] else 'NO'} |",
        "",
        "Speed runs, alternating on the same frames (frames/s): library batch "
        + ", ".join(f"{v:.0f}" for v in s["library_batch_fps"]) + "; live, same work "
        + ", ".join(f"{v:.0f}" for v in s["live_same_work_fps"]) + "; live, defaults "
        + ", ".join(f"{v:.0f}" for v in s["live_defaults_fps"])
        + ". Medians are compared. The live rate includes camera→photons here and closing a "
        "block every 100 frames. This is the localizer alone, not the issue's 60 s pipeline "
        "run with render, dense, trust and the archive (not built yet).",
        "",
        "## Accuracy against ground truth",
        "",
        "Matching at 250 nm, optimal per frame. CRLB: pixel-integrated Gaussian with "
        "background and read noise at each matched emitter's true position and photons. "
        "*Isolated*: no other emitting label within 600 nm in that frame.",
        "",
        "| localizations | Jaccard | recall | precision | RMSE nm | CRLB nm | RMSE/CRLB | "
        "median err/CRLB | > 5 CRLB | efficiency | isolated share | isolated recall | "
        "isolated RMSE/CRLB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in r["accuracy"].items():
        lines.append(_acc_row(name, v))
    lines += [
        "",
        "What the numbers say: isolated emitters are localized at the bound "
        "(isolated RMSE/CRLB ≈ 1). With the library's single-emitter fits alone, the RMSE "
        "over all pairs is dominated by emitters that overlap within about two PSF widths in "
        "the same frame: one localization between them, still within 250 nm of one of them, "
        "so it counts as a match with a large error; rejecting fits whose fitted PSF width is "
        "off trades Jaccard for RMSE and no threshold gives both bars. The multi-emitter "
        "refit (`dimscope.smlm.multi_emitter`: groups with a fit of the wrong width refitted "
        "jointly, emitters added while the deviance falls) finds both emitters of such pairs "
        "(recall up) and puts each at its place (RMSE down); pairs closer than about one PSF "
        "width stay one localization. The SMLM-challenge efficiency is "
        "100 − √((100 − 100·Jaccard)² + (1 nm⁻¹·RMSE)²). The CRLB column is the RMS of the "
        "pairs' bounds, so a few dim emitter-frames (an emitter on for a sliver of the frame) "
        "can dominate it, as on the density map; the median error/CRLB does not depend on "
        "that. The speed runs share 2 cores with another job, hence their spread.",
        "",
        "## Drift and FRC (live table, filaments)",
        "",
        f"RCC (10 segments): error {r['drift']['rcc_error_rms_nm']:.1f} nm rms against the "
        f"simulated drift (peak to peak {r['drift']['true_peak_to_peak_nm'][0]:.0f} × "
        f"{r['drift']['true_peak_to_peak_nm'][1]:.0f} nm), after removing the global "
        "translation, which localizations cannot observe.",
        "",
        "| FRC, alternating blocks of | raw | drift-corrected |",
        "|---|---|---|",
    ]
    for k, v in r["frc"].items():
        lines.append(f"| {k.split('_')[1]} frames | {v['raw_nm']:.1f} nm | "
                     f"{v['drift_corrected_nm']:.1f} nm |")
    lines += ["", "## smappy vs Picasso", ""]
    if "picasso" in r:
        p = r["picasso"]
        lines += [
            f"First {p['frames']} frames of the same stack. Picasso `gaussmle` (CPU, numba) "
            f"through `bench/smlm_picasso.py` in a separate environment, min. net gradient "
            f"{p['min_net_gradient']:g} (picked on seed 99 by Jaccard: "
            + ", ".join(f"{k} → {v:.3f}" for k, v in p["tuning_jaccard"].items())
            + "), box 7. Picasso's time is identify + fit, its movie read from a TIFF in a "
            "temporary folder (page cache), after an untimed warm-up (numba compilation); "
            "smappy's rows are the calls above on the same frames in memory.",
            "",
            "| | frames/s |",
            "|---|---|",
            f"| Picasso gaussmle (identify {p['picasso_identify_s']:.2f} s + fit "
            f"{p['picasso_fit_s']:.2f} s) | {p['picasso_fps']:.0f} |",
            f"| Picasso gaussmle on edge-padded frames | {p['picasso_padded_fps']:.0f} |",
            f"| smappy library batch | {p['smappy_batch_fps']:.0f} |",
            f"| smappy live push, defaults (padding + edge EM + multi-emitter) | "
            f"{p['smappy_live_fps']:.0f} |",
            "",
            "| localizations | Jaccard | recall | precision | RMSE nm | CRLB nm | RMSE/CRLB | "
            "median err/CRLB | > 5 CRLB | efficiency | isolated share | isolated recall | "
            "isolated RMSE/CRLB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, v in p["accuracy"].items():
            lines.append(_acc_row(name, v))
        pa, sa = p["accuracy"]["picasso gaussmle"], p["accuracy"][
            "smappy live, defaults (padding + edge EM + multi-emitter)"]
        lines += [
            "",
            "Choice: **smappy** — its batch call is "
            f"{p['smappy_batch_fps'] / p['picasso_fps']:.1f}× Picasso's rate on the same "
            f"frames, and its Jaccard is higher ({sa['jaccard']:.3f} "
            f"with dimscope's edge handling vs Picasso's {pa['jaccard']:.3f}, or "
            f"{p['accuracy']['picasso gaussmle + padding']['jaccard']:.3f} on padded frames); "
            "both single-emitter fitters reach the bound on isolated emitters, and both lose "
            "the same way on overlapping ones (RMSE/CRLB ≈ 4 without dimscope's multi-emitter "
            "refit). Picasso's min. net gradient was tuned, smappy's cutoff was not."]
    else:
        lines.append("Not run (no `--picasso-python`).")
    lines += [
        "",
        "`picassosr` 0.11.3 is not a backend inside dimscope: installing it into the project "
        "environment downgrades pandas 3.1 → 2.3 (it pins `pandas<3`) and pulls ~40 packages "
        "(streamlit, SQLAlchemy, numba/llvmlite, PyTables, scikit-learn, plotly, nd2…); numpy "
        "would stay. It was measured from its own virtual environment instead.",
        "",
        f"Wall time of this run: {r['wall_s']:.0f} s.",
        "",
        "    .venv/bin/python bench/smlm.py --picasso-python /tmp/picasso-venv/bin/python",
    ]
    return "\n".join(lines) + "\n"


def _acc_row(name: str, v: dict[str, Any]) -> str:
    return (f"| {name} | {v['jaccard']:.3f} | {v['recall']:.3f} | {v['precision']:.3f} | "
            f"{v['rmse_lateral_nm']:.1f} | {v['crlb_lateral_nm']:.1f} | "
            f"{v['rmse_over_crlb']:.2f} | {v['median_error_over_crlb']:.2f} | "
            f"{100 * v['share_beyond_5_crlb']:.1f} % | {v['efficiency_lateral']:.1f} | "
            f"{100 * v['isolated_share_of_truths']:.0f} % | {v['isolated_recall']:.3f} | "
            f"{v['isolated_rmse_over_crlb']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
