"""`dimscope train`, `dimscope eval` and `dimscope models`: the model side of the command
line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from .cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUN_FAILED


def _missing_extra(extra: str, *modules: str) -> bool:
    """Say which optional packages a command lacks (True), before it fails deep inside."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(f"dimscope: this command needs the `{extra}` extra (pip install "
              f"'dimscope[{extra}]'); missing: {', '.join(missing)}", file=sys.stderr)
    return bool(missing)


def cmd_train(args: argparse.Namespace) -> int:
    if _missing_extra("train", "torch"):
        return EXIT_BAD_INPUT
    from dimscope.engines import EngineError
    from dimscope.engines.training.train import TrainSettings, train

    hparams: dict[str, Any] = {}
    if args.channels:
        hparams["channels"] = args.channels
    if args.levels:
        hparams["levels"] = args.levels
    settings = TrainSettings(
        task=args.task, data=[str(d) for d in args.data], sim_fraction=args.sim_fraction,
        crappifier=args.crappifier, arch=args.arch, hparams=hparams, steps=args.steps,
        batch=args.batch, patch=args.patch, lr=args.lr, seed=args.seed,
        val_low=str(args.val_low) if args.val_low else None,
        val_high=str(args.val_high) if args.val_high else None, val_every=args.val_every,
        checkpoint_every=args.val_every, init=args.init, name=args.name, version=args.version,
        window=args.window, vst=args.vst, movies=[str(m) for m in args.movies],
        photons=(args.photons[0], args.photons[1]), noise_weight=args.noise_weight,
        pairs=[str(p) for p in args.pairs], planes=args.planes, transfer_scale=args.scale,
        low_modality=args.modalities[0], high_modality=args.modalities[1],
        pixel_um=(args.pixel_size[0], args.pixel_size[1]) if args.pixel_size else None,
        ssim_weight=args.ssim_weight, guide=args.guide, pool=args.pool,
        pool_files=[str(f) for f in args.pool_files], rl_sigma_px=args.rl_sigma,
        rl_iterations=args.rl_iterations,
        **({"sim_classes": args.sim_classes} if args.sim_classes else {}))
    if args.task == "transfer" and not args.pairs and not args.sim_fraction:
        print("dimscope: train transfer needs --pairs (registered pair folders) or a "
              "--sim-fraction above 0", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.out or Path(f"{args.name or args.task}.onnx")
    try:
        result = train(settings, out, checkpoint=args.checkpoint, resume=args.resume,
                       progress=not args.quiet)
    except (FileNotFoundError, ValueError, EngineError) as exc:  # EngineError: --init model
        print(f"dimscope: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {result['model']} (+ {Path(result['model']).with_suffix('.json').name}): "
          f"{result['steps']} steps, loss {result['loss']:.4f}, "
          f"validation PSNR {result['val_psnr']:.2f} dB")
    return EXIT_OK


def add_train_parser(sub: Any) -> None:
    t = sub.add_parser("train", help="train a model from good images (crappifier) or "
                       "registered image pairs (transfer) and export it as ONNX with a card")
    t.add_argument("task", choices=["denoise", "sr2", "interp", "transfer"])
    t.add_argument("--data", type=Path, nargs="*", default=[],
                   help="folders or TIFF files of good images (every 2-D plane is used)")
    t.add_argument("--sim-fraction", type=float, default=0.5,
                   help="share of training crops taken from the simulated microscope's "
                        "ground truth (1.0 when no --data)")
    t.add_argument("--crappifier", choices=["physical", "pssr"], default="physical")
    t.add_argument("--arch", choices=["restore", "care_unet", "interp"], default="restore")
    t.add_argument("--channels", type=int, default=None)
    t.add_argument("--levels", type=int, default=None)
    t.add_argument("--window", type=int, default=1,
                   help="denoise: frames of causal temporal context (oldest first; 1 = single)")
    t.add_argument("--vst", action="store_true",
                   help="denoise: noise-aware inputs (camera's Anscombe transform + noise level)")
    t.add_argument("--movies", type=Path, nargs="*", default=[],
                   help="time-lapses (T,Y,X or T,C,Y,X TIFFs) for temporal training clips")
    t.add_argument("--photons", type=float, nargs=2, default=(2.0, 1000.0),
                   metavar=("MIN", "MAX"), help="photon budget range of the noise-aware "
                   "crappifier (photoelectrons at the brightest structure)")
    t.add_argument("--noise-weight", type=float, default=0.0,
                   help="noise-aware clips: weight each sample's MSE by sigma^-W (0: plain "
                        "MSE, dominated by the darkest samples; 2: every photon level alike)")
    gd = t.add_argument_group("guided denoise, sr2 and transfer (offline quality models "
                              "that refine a classical estimate)")
    gd.add_argument("--guide", choices=["bm3d", "bm4d"], default=None,
                    help="refine BM3D+VST of the newest frame (--window 1) or BM4D+VST over "
                         "the window (implies --vst); sr2: BM3D+VST at the camera's "
                         "sampling, upsampled; transfer (bm3d, scale 1): BM3D+VST "
                         "deconvolved by Richardson-Lucy (--rl-sigma, --rl-iterations)")
    gd.add_argument("--rl-sigma", type=float, default=2.0,
                    help="guided transfer: the Richardson-Lucy PSF's sigma in LOW pixels")
    gd.add_argument("--rl-iterations", type=int, default=15,
                    help="guided transfer: Richardson-Lucy iterations")
    gd.add_argument("--pool", type=int, default=1200,
                    help="training samples to make (each needs one BM3D/BM4D run; saved "
                         "beside the model as OUT.pool.npz and reused)")
    gd.add_argument("--pool-files", type=Path, nargs="*", default=[],
                    help="train from these saved pools instead of making one")
    tr = t.add_argument_group("transfer (cross-modality, from two-instrument pairs)")
    tr.add_argument("--pairs", type=Path, nargs="*", default=[],
                    help="`dimscope pairs register` output folders")
    tr.add_argument("--planes", default=None,
                    help="stack planes to train on, e.g. 0:10,25:45 (hold the others out)")
    tr.add_argument("--scale", type=int, choices=[1, 2, 4], default=1,
                    help="HIGH's sampling relative to LOW's")
    tr.add_argument("--sim-classes", nargs="*", default=None,
                    help="structure classes of the simulated pairs mixed in, a class "
                         "listed twice drawn twice as often (default: "
                         "filaments puncta nuclei shapes images; `images` uses --data as "
                         "densities)")
    tr.add_argument("--modalities", nargs=2, default=("widefield", "confocal"),
                    metavar=("LOW", "HIGH"), help="the two modalities' names for the card")
    tr.add_argument("--pixel-size", type=float, nargs=2, default=None,
                    metavar=("LOW_UM", "HIGH_UM"), help="pixel sizes when training on "
                    "simulated pairs alone (registered pairs record theirs)")
    tr.add_argument("--ssim-weight", type=float, default=1.0,
                    help="loss = L1 + W·(1 − SSIM); 0 = L1 alone")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--patch", type=int, default=128, help="input crop size in pixels")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-low", type=Path, default=None, help="real low-SNR validation stack")
    t.add_argument("--val-high", type=Path, default=None, help="its high-SNR counterpart")
    t.add_argument("--val-every", type=int, default=100,
                   help="validate and checkpoint every N steps")
    t.add_argument("--init", default=None,
                   help="fine-tune: start from this model (shipped name or .onnx path)")
    t.add_argument("--out", type=Path, default=None, help="output .onnx (default TASK.onnx)")
    t.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint file (default: OUT with .ckpt)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    t.add_argument("--name", default=None, help="model name in the card (default TASK)")
    t.add_argument("--version", default="1", help="model version in the card")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)


def _dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def cmd_eval(args: argparse.Namespace) -> int:
    if _missing_extra("eval", "skimage", *(["PIL"] if args.montage else [])):
        return EXIT_BAD_INPUT
    from dimscope.engines import EngineError
    from dimscope.engines.evaluation.evaluate import format_table, run_eval

    models = args.model or [args.task]
    try:
        if args.task == "transfer":
            from dimscope.engines.evaluation.transfer_eval import (
                format_transfer,
                run_eval_transfer,
            )

            results = run_eval_transfer(
                models, photons=args.sim or (), pairs=args.pairs, planes=args.planes,
                tune_planes=args.tune_planes, runtime=args.runtime,
                n_test=args.limit or 8)
            print(format_transfer(results))
            if args.json:
                _dump(results, args.json)
                print(f"wrote {args.json}", file=sys.stderr)
            return EXIT_OK
        if args.task == "interp":
            from dimscope.engines.evaluation.evaluate import read_stack, run_eval_interp

            if args.stack is None:
                raise ValueError("eval interp needs --stack T.tif (a time-lapse)")
            results = run_eval_interp(read_stack(args.stack), args.factor, models,
                                      runtime=args.runtime)
        else:
            if args.low is None or args.high is None:
                raise ValueError(f"eval {args.task} needs --low and --high")
            results = run_eval(args.task, args.low, args.high, models, runtime=args.runtime,
                               skip=args.skip, limit=args.limit, montage_path=args.montage)
    except (EngineError, ValueError, FileNotFoundError) as exc:
        print(f"dimscope: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_table(results))
    if args.json:
        _dump(results, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.montage:
        print(f"wrote {args.montage}", file=sys.stderr)
    return EXIT_OK


def add_eval_parser(sub: Any) -> None:
    e = sub.add_parser("eval", help="PSNR/SSIM/NRMSE of models and classical baselines on "
                       "same-field low/high images")
    e.add_argument("task", choices=["denoise", "sr2", "interp", "transfer"])
    e.add_argument("--low", type=Path, default=None, help="low-light image or stack")
    e.add_argument("--high", type=Path, default=None,
                   help="same-field ground truth (for sr2 at twice the sampling)")
    e.add_argument("--stack", type=Path, default=None,
                   help="interp: a real time-lapse (T, Y, X); frames are dropped and rebuilt")
    e.add_argument("--factor", type=int, choices=[2, 4], default=2,
                   help="interp: keep every FACTOR-th frame")
    tr = e.add_argument_group("transfer: baselines (bicubic, Richardson-Lucy 2-D/3-D, "
                              "BM3D+RL) tuned on a training split, scored on held-out data")
    tr.add_argument("--sim", type=float, nargs="*", default=None, metavar="PHOTONS",
                    help="simulated held-out structure classes at these photon levels")
    tr.add_argument("--pairs", type=Path, default=None,
                    help="a `dimscope pairs register` output folder (a stack pair)")
    tr.add_argument("--planes", default=None, help="held-out planes scored, e.g. 15:20")
    tr.add_argument("--tune-planes", default=None,
                    help="planes the baselines are tuned on, e.g. 0:10,25:45")
    e.add_argument("--model", action="append", default=None,
                   help="model name or .onnx path (repeatable; default: the shipped TASK model)")
    e.add_argument("--runtime", default="auto", help="runtime for the models (default auto)")
    e.add_argument("--skip", nargs="*", default=[], help="classical methods to leave out "
                   "(vst_gaussian, nlm, bm3d)")
    e.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    e.add_argument("--json", type=Path, default=None, help="write results as JSON")
    e.add_argument("--montage", type=Path, default=None,
                   help="write a PNG: raw | model(s) | ground truth")
    e.set_defaults(func=cmd_eval)


def cmd_models(args: argparse.Namespace) -> int:
    """List models with whether their weights match their card; `--stamp` records the hash
    of the network of each file given in its card (for files the user trusts as they are)."""
    from dimscope.engines import EngineError
    from dimscope.engines.model_file import (
        inspect_model,
        read_card,
        resolve_model,
        shipped_models,
        write_card_metadata,
    )

    names = args.model or shipped_models()
    if args.stamp:
        if not args.model:
            print("dimscope: --stamp needs the model files to stamp", file=sys.stderr)
            return EXIT_BAD_INPUT
        shipped = [n for n in names if n in shipped_models()]
        if shipped:
            print(f"dimscope: --stamp takes .onnx paths, not shipped models "
                  f"({', '.join(shipped)}: they are stamped when released)", file=sys.stderr)
            return EXIT_BAD_INPUT
    failed = 0
    for name in names:
        try:
            path = resolve_model(name)
            if args.stamp:
                card = write_card_metadata(path, read_card(path))
                print(f"{path}: recorded weights SHA-256 {card.weights_sha256} in its card "
                      f"(and {path.with_suffix('.json').name})")
                continue
            opened, problem = inspect_model(path)
        except (EngineError, OSError) as exc:
            print(f"dimscope: {exc}", file=sys.stderr)
            failed += 1
            continue
        card = opened.card
        state = "verified" if problem is None else "NOT VERIFIED"
        print(f"{name:<14} {card.task:<8} {card.name} {card.version}+{opened.digest}  "
              f"sha256 {opened.sha256[:16]}…  {state}")
        if problem is not None:
            print(f"  {problem}", file=sys.stderr)
            failed += 1
    return EXIT_RUN_FAILED if failed else EXIT_OK


def add_models_parser(sub: Any) -> None:
    m = sub.add_parser("models", help="list models (shipped, or the files given) and whether "
                       "their weights match the SHA-256 their card records")
    m.add_argument("model", nargs="*", help="shipped model names or .onnx paths "
                   "(default: every shipped model)")
    m.add_argument("--stamp", action="store_true",
                   help="record the SHA-256 of each given file's network in its card (for a "
                        "file you trust as it is, e.g. one exported before dimscope recorded "
                        "the hash); the card's other fields are kept")
    m.set_defaults(func=cmd_models)
