"""`dimscope smlm ...`: localization microscopy on recorded data (`dimscope.smlm`).

    smlm simulate --frames N --out DIR        raw stack + ground truth (+ widefield, structure)
    smlm localize STACK --out TABLE           raw TIFF stack → localization table
    smlm render TABLE --pixel-nm 20 --out IMG histogram (or --gaussian) render, PNG or TIFF
    smlm frc TABLE                            FRC resolution of the plain render
    smlm drift TABLE --out DRIFT.csv          RCC drift per frame (render/frc --drift apply it)
    smlm recover TABLE                        make a killed run's .arrows table valid again
    smlm dense TABLE --widefield WF --out IMG dense prediction (+ --error-map, plain-render FRC)
    smlm train --structures ... --out M.onnx  train a sparse-to-dense model on the simulator

TABLE by extension: `.arrows` (dimscope's crash-safe Arrow IPC stream; `localize` appends one
block at a time, so a killed `localize` leaves every finished block readable), `.csv`
(ThunderSTORM), `.hdf5` (Picasso, with its `.yaml`). `localize` pushes the file's frames
through the same `Localizer` a live stage drives.

`add_smlm_commands(subparsers)` adds them to a parser (`dimscope.daemon.cli` wires it).
Exit codes: 0 done; 2 bad input (a clear message, nothing partial written except an `.arrows`
table's finished blocks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _fail(message: str) -> int:
    print(f"dimscope: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


# ----------------------------------------------------------------------------- simulate
def cmd_smlm_simulate(args: argparse.Namespace) -> int:
    import numpy as np

    from dimscope.smlm.simulate import (
        Camera,
        ScmosMaps,
        SimSettings,
        SMLMSimulator,
        make_structure,
        write_simulation,
    )

    if args.frames < 1:
        return _fail(f"--frames must be >= 1, got {args.frames}")
    try:
        scmos = None
        shape = (args.size[0], args.size[1])
        if args.scmos_calibration is not None:
            scmos = ScmosMaps.from_tif(args.scmos_calibration).crop(shape)
        settings = SimSettings(shape=shape, camera=Camera(pixel_nm=args.pixel_nm),
                               psf_sigma_nm=args.psf_sigma_nm)
        rng = np.random.default_rng(args.seed)
        structure = make_structure(args.structure, settings, rng, image=args.image,
                                   channel=args.channel, image_pixel_nm=args.image_pixel_nm)
        power = settings.kinetics.power_for(len(structure.labels_nm), args.emitters)
        settings = settings.model_copy(update={"activation_power": power})
        sim = SMLMSimulator(structure, settings, seed=args.seed + 1, scmos=scmos)
        paths = write_simulation(args.out, sim, args.frames)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    meta = json.loads(Path(paths["meta"]).read_text())
    print(f"wrote {args.frames} frames of {args.structure} ({meta['n_labels']} labels, "
          f"{meta['localizations_true']} true emitter-frames) to {args.out}")
    return EXIT_OK


# ----------------------------------------------------------------------------- localize
def cmd_smlm_localize(args: argparse.Namespace) -> int:
    from dimscope.smlm.block import LocBlock, concat
    from dimscope.smlm.localize import (
        LocalizerSettings,
        SmappyLocalizer,
        iter_tiff,
        localize_frames,
    )
    from dimscope.smlm.simulate import ScmosMaps
    from dimscope.smlm.table import LocTableWriter, merge_molecules, save_localizations

    out: Path = args.out
    ext = out.suffix.lower()
    if ext not in (".arrows", ".arrow", ".csv", ".hdf5", ".h5"):
        return _fail(f"--out {out}: unknown table format {ext!r} (.arrows, .csv, .hdf5)")
    if out.exists() and not args.force:
        return _fail(f"{out} exists (use --force to replace it, or `smlm recover` for a "
                     "killed run's table)")
    if not args.stack.is_file():
        return _fail(f"{args.stack}: no such file")
    try:
        import tifffile

        with tifffile.TiffFile(str(args.stack)) as tf:
            shape = tuple(tf.series[0].shape)
        if len(shape) not in (2, 3):
            return _fail(f"{args.stack}: expected a T×Y×X stack, got shape {shape}")
        frame_shape = (int(shape[-2]), int(shape[-1]))
        scmos = None
        if args.calibration is not None:
            r, c = args.calibration_origin
            scmos = ScmosMaps.from_tif(args.calibration).crop(frame_shape, (r, c))
        settings = LocalizerSettings(
            pixel_nm=args.pixel_nm, psf_sigma_nm=args.psf_sigma_nm, gain_adu_per_e=args.gain,
            offset_adu=args.offset, read_noise_e=args.read_noise, roisize=args.roisize,
            cutoff=args.cutoff, **({"multi_emitter": None} if args.single_emitter else {}))
        localizer = SmappyLocalizer(settings, scmos)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    meta: dict[str, Any] = {**localizer.metadata(), "source": str(args.stack),
                            "frame_shape": list(frame_shape), "pixel_nm": args.pixel_nm,
                            "field_nm": [frame_shape[1] * args.pixel_nm,
                                         frame_shape[0] * args.pixel_nm]}
    if args.force and out.exists():
        out.unlink()
    blocks: list[LocBlock] = []
    writer = None
    try:
        if ext in (".arrows", ".arrow"):
            from dimscope.smlm.block import OPTIONAL

            writer = LocTableWriter(out, [c for c in OPTIONAL if c in localizer.columns], meta)

        def sink(block: LocBlock) -> None:
            if writer is not None:
                writer.append(block)
            blocks.append(block)

        n = localize_frames(iter_tiff(args.stack, args.chunk), localizer, sink)
    except (ValueError, OSError) as exc:
        return _fail(f"{args.stack}: {exc}")
    finally:
        if writer is not None:
            writer.close()
    table = concat(blocks)
    if writer is None:
        save_localizations(table, out, args.pixel_nm, frame_shape, meta)
    print(f"{len(table)} localizations from {n} frames ({n / max(localizer.seconds, 1e-9):.0f} "
          f"frames/s) → {out}")
    if args.merge_nm is not None:
        molecules = merge_molecules(table, args.merge_nm, args.merge_gap)
        mpath = out.with_name(out.stem + ".molecules" + out.suffix)
        if mpath.exists():
            mpath.unlink()
        save_localizations(molecules, mpath, args.pixel_nm, frame_shape,
                           {**meta, "merged": {"max_distance_nm": args.merge_nm,
                                               "max_gap": args.merge_gap}})
        print(f"{len(molecules)} molecules → {mpath}")
    return EXIT_OK


# ----------------------------------------------------------------------------- tables
def _load(args: argparse.Namespace) -> tuple[Any, tuple[float, float] | None]:
    """(the table, drift-corrected if --drift; the field in nm if the table says)."""
    import numpy as np

    from dimscope.smlm.drift import DriftEstimate
    from dimscope.smlm.table import load_localizations, read_table

    path: Path = args.table
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    field = None
    if path.suffix.lower() in (".arrows", ".arrow"):
        read = read_table(path)
        if not read.complete:
            print(f"dimscope: {path} was not closed cleanly; read its {len(read.blocks)} "
                  "complete block(s)", file=sys.stderr)
        locs = read.table
        f = read.metadata.get("field_nm")
        field = (float(f[0]), float(f[1])) if f else None
    else:
        locs = load_localizations(path, getattr(args, "table_pixel_nm", None))
    drift_path: Path | None = getattr(args, "drift", None)
    if drift_path is not None:
        d = np.loadtxt(drift_path, delimiter=",", skiprows=1, ndmin=2)
        est = DriftEstimate(d[:, 1], d[:, 2], np.zeros(0), np.zeros((0, 2)), 0, 0, float("nan"))
        locs = est.apply(locs)
    return locs, field


def cmd_smlm_render(args: argparse.Namespace) -> int:
    from dimscope.smlm.render import extent_of, gaussian, histogram, to_uint8

    try:
        locs, field = _load(args)
        extent = field or extent_of(locs)
        if args.gaussian:
            img = gaussian(locs, args.pixel_nm, extent, sigma_nm=args.sigma_nm)
        else:
            img = histogram(locs, args.pixel_nm, extent)
        ext = args.out.suffix.lower()
        if ext in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(str(args.out), img, resolution=(1e7 / args.pixel_nm,
                                                              1e7 / args.pixel_nm),
                             resolutionunit="CENTIMETER")
        elif ext == ".png":
            from PIL import Image

            Image.fromarray(to_uint8(img)).save(args.out)
        else:
            return _fail(f"--out {args.out}: write .png or .tif")
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    print(f"rendered {len(locs)} localizations at {args.pixel_nm:g} nm/pixel "
          f"({img.shape[1]}×{img.shape[0]}) → {args.out}")
    return EXIT_OK


def cmd_smlm_frc(args: argparse.Namespace) -> int:
    from dimscope.smlm.frc import frc

    try:
        locs, field = _load(args)
        result = frc(locs, args.pixel_nm, args.block_frames, field)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    report = {"resolution_nm": result.resolution_nm, "pixel_nm": result.pixel_nm,
              "block_frames": result.block_frames, "localizations_a": result.n_a,
              "localizations_b": result.n_b, "threshold": result.threshold}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"FRC resolution {result.resolution_nm:.1f} nm (1/7 threshold; alternating "
              f"blocks of {result.block_frames} frames: {result.n_a} + {result.n_b} "
              "localizations)")
    return EXIT_OK


def cmd_smlm_drift(args: argparse.Namespace) -> int:
    import numpy as np

    from dimscope.smlm.drift import rcc

    try:
        locs, field = _load(args)
        est = rcc(locs, n_segments=args.segments, pixel_nm=args.pixel_nm, extent_nm=field)
        frames = np.arange(est.n_frames)
        np.savetxt(args.out, np.column_stack([frames, est.dx_nm, est.dy_nm]), delimiter=",",
                   header="frame,dx_nm,dy_nm", comments="", fmt=["%d", "%.3f", "%.3f"])
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    print(f"drift over {est.n_frames} frames: x {np.ptp(est.dx_nm):.1f} nm, y "
          f"{np.ptp(est.dy_nm):.1f} nm peak to peak ({est.pairs_used}/{est.pairs_total} "
          f"pairs, residual {est.residual_rms_nm:.1f} nm rms) → {args.out}")
    return EXIT_OK


def cmd_smlm_recover(args: argparse.Namespace) -> int:
    from dimscope.smlm.table import recover_table

    try:
        rep = recover_table(args.table)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    state = "was complete" if rep.was_complete else f"cut {rep.bytes_dropped} byte(s)"
    print(f"{rep.path}: {rep.blocks} block(s), {rep.rows} localizations, frames 0–"
          f"{rep.frames_done} localized ({state})")
    return EXIT_OK


# ----------------------------------------------------------------------------- parser
# ----------------------------------------------------------------------------- dense
def cmd_smlm_dense(args: argparse.Namespace) -> int:
    """The sparse-to-dense prediction of a table, as the live `dense` node makes it."""
    import numpy as np
    import tifffile

    from dimscope.daemon.dense_stage import read_widefield
    from dimscope.engines import EngineError
    from dimscope.smlm import errormap
    from dimscope.smlm.dense import DensePredictor, first_frames, localization_density
    from dimscope.smlm.frc import frc

    predictor = None
    try:
        locs, field = _load(args)
        if args.frames is not None:
            locs = first_frames(locs, args.frames)
        wf, averaged = read_widefield(args.widefield)
        extent = (wf.shape[1] * args.camera_pixel_nm, wf.shape[0] * args.camera_pixel_nm)
        if field is not None and (abs(field[0] - extent[0]) > args.camera_pixel_nm
                                  or abs(field[1] - extent[1]) > args.camera_pixel_nm):
            raise ValueError(f"--widefield is {wf.shape[1]}×{wf.shape[0]} pixels of "
                             f"{args.camera_pixel_nm:g} nm = {extent[0]:.0f}×{extent[1]:.0f} "
                             f"nm, but the table's field is {field[0]:.0f}×{field[1]:.0f} nm: "
                             "the wrong image, or the wrong --camera-pixel-nm")
        x, y = np.asarray(locs.x_nm), np.asarray(locs.y_nm)
        outside = float(np.mean((x < 0) | (y < 0) | (x >= extent[0]) | (y >= extent[1]))
                        ) if len(locs) else 0.0
        if outside > 0.01:
            raise ValueError(f"{outside:.0%} of the localizations fall outside the widefield "
                             f"image's field ({extent[0]:.0f}×{extent[1]:.0f} nm): the wrong "
                             "image, or the wrong --camera-pixel-nm")
        predictor = DensePredictor(args.model, runtime=args.runtime,
                                   allow_unverified=args.allow_unverified_model)
        dense = predictor.predict(locs, wf, extent)
        blur = predictor.smoothing_px(localization_density(locs, extent))
        settings = errormap.ErrorMapSettings(gain_adu_per_e=args.gain, offset_adu=args.offset,
                                             read_noise_e=args.read_noise,
                                             flag_sigma=args.flag_sigma)
        emap = errormap.compute(dense, wf, predictor.grid.render_pixel_nm,
                                args.camera_pixel_nm, settings, frames_averaged=averaged)
        frames = int(np.asarray(locs.frame).max()) + 1 if len(locs) else 0
        resolution = (frc(locs, 10.0, 100, extent).resolution_nm if frames >= 200 else
                      float("nan"))
        px = predictor.grid.render_pixel_nm
        tifffile.imwrite(str(args.out), dense, resolution=(1e7 / px, 1e7 / px),
                         resolutionunit="CENTIMETER",
                         metadata={"model": predictor.label, "localizations": len(locs),
                                   "output_blur_px": blur})
        if args.error_map is not None:
            tifffile.imwrite(str(args.error_map), emap.error_sigma)
        label = predictor.label
    except (ValueError, OSError, EngineError) as exc:
        return _fail(str(exc))
    finally:
        if predictor is not None:
            predictor.close()
    report = {"model": label, "localizations": len(locs), "frames": frames,
              "out": str(args.out), "output_blur_px": blur,
              "frc_plain_render_nm": resolution, **emap.summary(),
              "limit": errormap.LIMIT_NOTE}
    print(json.dumps(report) if args.json else
          f"dense image of {len(locs)} localizations ({frames} frames) by {label}, "
          f"blurred {blur:g} render pixels → {args.out}; error map flags "
          f"{emap.flagged_fraction:.2%} of the field (fitted "
          f"widefield PSF σ {emap.psf_sigma_nm:.0f} nm); FRC of the plain render "
          f"{resolution:.1f} nm")
    return EXIT_OK


def cmd_smlm_train(args: argparse.Namespace) -> int:
    """A sparse-to-dense model trained on simulated acquisitions (engines/training/dense.py)."""
    try:
        import torch  # noqa: F401 (the train extra)
    except ImportError:
        return _fail("smlm train needs the `train` extra (pip install 'dimscope[train]')")
    import numpy as np

    from dimscope.engines.training.dense import DenseTrainSettings, structure_for, train_dense
    from dimscope.smlm.simulate import SimSettings

    for spec in args.structures:  # every structure checked before minutes of simulation
        try:
            structure_for(spec, SimSettings(shape=(32, 32)), np.random.default_rng(0))
        except (ValueError, OSError) as exc:
            return _fail(f"--structures {spec}: {exc}")
    settings = DenseTrainSettings(structures=list(args.structures),
                                  fields_per_structure=args.fields, frames_full=args.frames,
                                  steps=args.steps, batch=args.batch, seed=args.seed,
                                  name=args.out.stem)
    result = train_dense(settings, args.out, progress=not args.quiet, resume=args.resume)
    print(f"wrote {result['model']} (+ {args.out.with_suffix('.json').name}): "
          f"{result['steps']} steps, loss {result['loss']:.4f}; output blur by density "
          f"(localizations/µm² → render pixels): "
          + ", ".join(f"{d:g} → {b:g}" for d, b in result["output_smoothing"]))
    return EXIT_OK


def add_smlm_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add `smlm` and its subcommands to an `add_subparsers()` object; returns `smlm`'s parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "smlm", help="localization microscopy: simulate, localize, render, frc, drift, dense, "
        "train, recover")
    sub = p.add_subparsers(dest="smlm_command", required=True)

    s = sub.add_parser("simulate", help="simulated SMLM frames with their ground truth")
    s.add_argument("--frames", type=int, required=True)
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--structure", choices=["filaments", "rings", "image"], default="filaments")
    s.add_argument("--image", type=Path, default=None, help="TIFF used as a density map")
    s.add_argument("--channel", type=int, default=0)
    s.add_argument("--image-pixel-nm", type=float, default=20.0)
    s.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    s.add_argument("--pixel-nm", type=float, default=100.0)
    s.add_argument("--psf-sigma-nm", type=float, default=130.0)
    s.add_argument("--emitters", type=float, default=30.0, help="emitting per frame")
    s.add_argument("--scmos-calibration", type=Path, default=None,
                   help="3×H×W offset/variance/gain TIFF: per-pixel camera noise")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_smlm_simulate)

    lo = sub.add_parser("localize", help="localize a raw TIFF stack into a table")
    lo.add_argument("stack", type=Path)
    lo.add_argument("--out", type=Path, required=True, help=".arrows, .csv or .hdf5")
    lo.add_argument("--pixel-nm", type=float, default=100.0)
    lo.add_argument("--psf-sigma-nm", type=float, default=130.0)
    lo.add_argument("--gain", type=float, default=1.0, help="ADU per e⁻")
    lo.add_argument("--offset", type=float, default=0.0, help="ADU")
    lo.add_argument("--read-noise", type=float, default=1.0, help="rms e⁻")
    lo.add_argument("--calibration", type=Path, default=None,
                    help="per-pixel sCMOS calibration, 3×H×W offset (ADU) / variance (ADU²) / "
                         "gain (ADU/e⁻); replaces --gain/--offset/--read-noise")
    lo.add_argument("--calibration-origin", type=int, nargs=2, default=[0, 0],
                    metavar=("ROW", "COL"), help="where the frames sit on the calibration")
    lo.add_argument("--roisize", type=int, default=7)
    lo.add_argument("--cutoff", type=float, default=1.7)
    lo.add_argument("--single-emitter", action="store_true",
                    help="the library's single-emitter fits only: no multi-emitter refit of "
                    "overlapping emitters (about 3.5× faster at 30 emitters per 128² frame)")
    lo.add_argument("--chunk", type=int, default=200, help="frames read at a time")
    lo.add_argument("--merge-nm", type=float, default=None,
                    help="also write molecules (TABLE.molecules.EXT): merge localizations in "
                         "consecutive frames within this distance")
    lo.add_argument("--merge-gap", type=int, default=1, help="frames a molecule may skip")
    lo.add_argument("--force", action="store_true", help="replace an existing --out")
    lo.set_defaults(func=cmd_smlm_localize)

    def table_args(q: argparse.ArgumentParser, drift: bool = True) -> None:
        q.add_argument("table", type=Path, help=".arrows, .csv (ThunderSTORM) or .hdf5 "
                                                "(Picasso)")
        q.add_argument("--table-pixel-nm", type=float, default=None,
                       help="camera pixel of a Picasso file without a .yaml")
        if drift:
            q.add_argument("--drift", type=Path, default=None,
                           help="subtract this drift (CSV from `smlm drift`)")

    r = sub.add_parser("render", help="render a table (histogram or Gaussian)")
    table_args(r)
    r.add_argument("--pixel-nm", type=float, default=20.0)
    r.add_argument("--out", type=Path, required=True, help=".png or .tif")
    r.add_argument("--gaussian", action="store_true",
                   help="Gaussian of each localization's precision (default: histogram)")
    r.add_argument("--sigma-nm", type=float, default=None, help="one σ for all (--gaussian)")
    r.set_defaults(func=cmd_smlm_render)

    f = sub.add_parser("frc", help="FRC resolution of the plain render")
    table_args(f)
    f.add_argument("--pixel-nm", type=float, default=5.0)
    f.add_argument("--block-frames", type=int, default=500,
                   help="alternating blocks of this many frames (>= 100)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_smlm_frc)

    d = sub.add_parser("drift", help="RCC drift per frame")
    table_args(d, drift=False)
    d.add_argument("--out", type=Path, required=True, help="CSV frame,dx_nm,dy_nm")
    d.add_argument("--segments", type=int, default=8)
    d.add_argument("--pixel-nm", type=float, default=20.0)
    d.set_defaults(func=cmd_smlm_drift)

    de = sub.add_parser("dense", help="sparse-to-dense prediction of a table, with its error "
                                      "map against a widefield image")
    table_args(de)
    de.add_argument("--widefield", type=Path, required=True,
                    help="widefield TIFF on the camera grid (ADU), or raw frames (their mean)")
    de.add_argument("--out", type=Path, required=True, help="the dense image (.tif)")
    de.add_argument("--error-map", type=Path, default=None, help="the error map (.tif)")
    de.add_argument("--frames", type=int, default=None, help="use the first N frames only")
    de.add_argument("--model", default="dense", help="shipped name or .onnx path")
    de.add_argument("--runtime", default="cpu")
    de.add_argument("--allow-unverified-model", action="store_true")
    de.add_argument("--camera-pixel-nm", type=float, default=100.0)
    de.add_argument("--gain", type=float, default=1.0, help="ADU per e⁻ (error map noise)")
    de.add_argument("--offset", type=float, default=0.0, help="ADU")
    de.add_argument("--read-noise", type=float, default=0.0, help="rms e⁻")
    de.add_argument("--flag-sigma", type=float, default=5.0)
    de.add_argument("--json", action="store_true")
    de.set_defaults(func=cmd_smlm_dense)

    tr = sub.add_parser("train", help="train a sparse-to-dense model on simulated "
                                      "acquisitions (L1 + SSIM; no adversarial loss)")
    tr.add_argument("--structures", nargs="+", default=["filaments", "rings", "random"],
                    help="filaments, rings, random, image:PATH[::CHANNEL] (a density map)")
    tr.add_argument("--fields", type=int, default=6, help="simulated fields per structure")
    tr.add_argument("--frames", type=int, default=10_000, help="frames of a full acquisition")
    tr.add_argument("--steps", type=int, default=4000)
    tr.add_argument("--batch", type=int, default=8)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", type=Path, required=True, help="the model (.onnx; card beside)")
    tr.add_argument("--resume", action="store_true", help="from OUT's .ckpt")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=cmd_smlm_train)

    rc = sub.add_parser("recover", help="make a killed run's .arrows table valid again")
    rc.add_argument("table", type=Path)
    rc.set_defaults(func=cmd_smlm_recover)
    return p
