"""`dimscope enhance IN OUT`: apply an engine (and interpolation) to a finished stack.

What users run on a finished experiment and what every quality comparison
runs: frames in acquisition order through the same engine code as the live
pipeline (`engines/offline.py`), one float32 frame out per frame in, plus
N−1 synthesised frames per interval with `--interpolate N`. The camera's noise
model comes from `--offset/--gain/--read-noise`, or is estimated from the stack
and printed. Provenance (engine, model version, noise model, command) goes in
the TIFF's description and a JSON file beside it.

With `--adapt` the noise-aware model is first adapted to the stack itself
(self-supervised, `--adapt-seconds`, as live adaptation would for that long) and the
stack is enhanced with the adapted model, kept as OUT.adapted.onnx.
`dimscope adapt RUN_DIR_OR_TIFF --out model.onnx` only adapts and writes the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUN_FAILED


def _read(path: Path) -> np.ndarray:
    import tifffile

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        data = np.asarray(tifffile.imread(path))
    except Exception as exc:  # tifffile raises several types for a file that is not a TIFF
        raise ValueError(f"{path}: not a TIFF image stack ({type(exc).__name__}: {exc})"
                         ) from None
    if data.ndim < 2 or data.ndim > 4 or min(data.shape[-2:]) < 16:
        raise ValueError(f"{path}: not an image stack of at least 16×16 pixels "
                         f"(shape {data.shape}); expected (Y, X), (T, Y, X) or (T, C, Y, X)")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise ValueError(f"{path}: pixel type {data.dtype} is not a real number type")
    return data


class _Progress:
    def __init__(self, total: int, quiet: bool) -> None:
        self.bar: Any = None
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="frame", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None

    def __call__(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _read_series(path: Path) -> list[np.ndarray]:
    """(T, Y, X) time series of a TIFF stack (one per channel), or of a run folder: each
    raw_*.ome.tif file one series, memory-mapped (a long run need not fit in memory)."""
    from dimscope.engines.offline import as_series

    if not path.is_dir():
        return list(as_series(_read(path))[0])
    files = sorted(path.glob("raw_*.ome.tif"))
    if not files:
        raise ValueError(f"{path}: a folder without raw_*.ome.tif files (not a run folder)")
    import tifffile

    out = []
    for f in files:
        data: np.ndarray
        try:
            data = tifffile.memmap(f, mode="r")
        except (ValueError, OSError):  # not contiguous: read it
            data = _read(f)
        out.append(data[None] if data.ndim == 2 else data)
    return out


def _noise_of(args: argparse.Namespace, series: Any) -> tuple[Any, Any]:
    """(noise model, calibration) from --gain/--offset/--read-noise, else from the stack."""
    from dimscope.engines import CameraCalibration
    from dimscope.engines.noise_model import NoiseModel, estimate_noise_model
    from dimscope.engines.offline import calibration_for

    if args.gain is not None or args.offset is not None:
        if args.gain is None or args.offset is None:
            raise ValueError("give both --gain and --offset (and --read-noise), or none: "
                             "then the noise model is estimated from the stack")
        cal = CameraCalibration(args.gain, args.offset, args.read_noise or 0.0)
        return NoiseModel.from_calibration(cal), cal
    noise = estimate_noise_model(np.asarray(series[0][:8], dtype=np.float32))
    return noise, calibration_for(noise)


def _adaptable_model(engine: str, model: str | None, allow_unverified: bool = False
                     ) -> tuple[Path, bool]:
    """The model file `--adapt` would adapt, and whether its weights match its card;
    ValueError naming why it cannot be adapted, ModelIntegrityError if its weights do not
    match its card and `allow_unverified` is not set."""
    from dimscope.engines.adaptation import check_adaptable
    from dimscope.engines.model_file import open_model_card, resolve_model

    if engine not in ("denoise", "model"):
        raise ValueError(f"--adapt needs a noise-aware denoising model (engine denoise or "
                         f"model); engine {engine!r} cannot be adapted")
    path = resolve_model(model or engine)
    opened = open_model_card(path, allow_unverified=allow_unverified)
    check_adaptable(opened.card, path)
    return path, opened.verified


def _adapt(series: Any, model: Path, noise: Any, seconds: float, rounds: int | None,
           keep: Path, quiet: bool) -> Any:
    """Adapt `model` to the stack's series; the adapted file (if any round lowered the
    held-back loss) is copied to `keep` (+ its card .json)."""
    import shutil
    import tempfile

    from dimscope.engines.offline import adapt_stack

    def show(report: Any) -> None:
        if not quiet:
            print(f"adapt {report.describe()}" + (f" -> {report.version}" if report.improved
                                                  else ""), file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="dimscope-adapt-") as tmp:
        result = adapt_stack(list(series), model, Path(tmp), noise, seconds,
                             max_rounds=rounds, on_round=show)
        if result.adapted:
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result.path, keep)
            shutil.copyfile(result.path.with_suffix(".json"), keep.with_suffix(".json"))
            result = type(result)(keep, result.version, result.reports, result.seconds)
    done = f"{result.rounds} rounds, {result.steps} steps, {result.seconds:.0f} s"
    if result.adapted:
        print(f"adaptation: held-back loss {result.loss_before:.5f} -> {result.loss_after:.5f} "
              f"({result.loss_after / result.loss_before - 1:+.2%}), {done}; adapted model "
              f"{result.version}: {keep}", file=sys.stderr)
    else:
        print(f"adaptation: the held-back loss did not fall by the margin ({done}); no "
              f"adapted model, {result.version} stays", file=sys.stderr)
    return result


def _adaptation_record(result: Any) -> dict[str, Any]:
    return {"version": result.version, "model": str(result.path),
            "adapted": result.adapted, "rounds": result.rounds, "steps": result.steps,
            "seconds": round(result.seconds, 1), "loss_before": result.loss_before,
            "loss_after": result.loss_after}


def _integrity(info: Any, base_verified: bool = True) -> dict[str, Any]:
    """The model integrity part of an engine's or interpolator's provenance (models only)."""
    if not info.model_sha256:
        return {}
    return {"model_sha256": info.model_sha256, "verified": info.verified and base_verified}


def cmd_enhance(args: argparse.Namespace) -> int:
    from dimscope.engines import EngineError, make_engine
    from dimscope.engines.interpolators import make_interpolator
    from dimscope.engines.offline import as_series, enhance_stack
    from dimscope.engines.options import validate_options

    from .config import MODEL_ENGINES

    adapt_model: Path | None = None
    #: False when the model adapted does not match its card: the adapted one derives from it
    base_verified = True
    try:
        stack = _read(args.input)
        series, _ = as_series(stack)
        noise, cal = _noise_of(args, series)
        print(f"noise model: {noise.describe()}", file=sys.stderr)
        if args.adapt:
            if args.adapt_seconds <= 0:
                raise ValueError(f"--adapt-seconds must be > 0, got {args.adapt_seconds:g}")
            adapt_model, base_verified = _adaptable_model(args.engine, args.model,
                                                          args.allow_unverified_model)
        engine_name = None if args.engine == "none" else args.engine
        options: dict[str, Any] = {}
        if args.model:
            options["model"] = args.model
        if args.runtime:
            options["runtime"] = args.runtime
        if engine_name in MODEL_ENGINES:
            options["precision"] = args.precision
        if args.allow_unverified_model and engine_name in MODEL_ENGINES:
            options["allow_unverified"] = True
        if engine_name is not None:
            options = validate_options(engine_name, options)
            make_engine(engine_name, **options).close()  # a bad name or model fails here
        interp_options: dict[str, Any] = {}
        if args.interp_method == "model":
            interp_options["precision"] = args.precision
            if args.allow_unverified_model:
                interp_options["allow_unverified"] = True
        interpolator = (make_interpolator(args.interp_method, **interp_options)
                        if args.interpolate > 1 else None)
    except (ValueError, EngineError, FileNotFoundError) as exc:
        print(f"dimscope: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    started = time.monotonic()
    adaptation = None
    if adapt_model is not None:
        keep = args.adapt_out or args.output.with_suffix(".adapted.onnx")
        try:
            adaptation = _adapt(series, adapt_model, noise, args.adapt_seconds,
                                args.adapt_rounds, keep, args.quiet)
        except (EngineError, OSError) as exc:
            print(f"dimscope: adaptation failed: {exc}", file=sys.stderr)
            return EXIT_RUN_FAILED
        options["model"] = str(adaptation.path)

    def factory() -> Any:
        assert engine_name is not None
        return make_engine(engine_name, **options)

    progress = _Progress(series.shape[0] * series.shape[1], args.quiet)
    try:
        result = enhance_stack(stack, factory if engine_name else None, interpolator,
                               args.interpolate, cal, tick=progress)
    except EngineError as exc:
        progress.close()
        print(f"dimscope: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    progress.close()
    seconds = time.monotonic() - started
    provenance = {
        "input": str(args.input), "frames_in": result.frames_in,
        "frames_out": result.frames_out, "interpolate": args.interpolate,
        "engine": None if result.engine is None else {
            "name": result.engine.name, "version": result.engine.version,
            "runtime": result.engine.runtime, "precision": result.engine.precision,
            "noise": result.engine.noise,
            **_integrity(result.engine, base_verified)},
        "interpolator": None if result.interpolator is None else {
            "name": result.interpolator.name, "version": result.interpolator.version,
            **_integrity(result.interpolator)},
        "noise_model": {"alpha": noise.alpha, "beta": noise.beta, "source": noise.source},
        "seconds": round(seconds, 2), "command": " ".join(["dimscope", *sys.argv[1:]]),
    }
    if adaptation is not None:
        provenance["adaptation"] = _adaptation_record(adaptation)
    import tifffile

    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(args.output, result.output.astype(np.float32),
                         description=json.dumps(provenance), metadata=None,
                         photometric="minisblack")
        args.output.with_suffix(args.output.suffix + ".json").write_text(
            json.dumps(provenance, indent=2) + "\n")
    except OSError as exc:
        print(f"dimscope: cannot write {args.output}: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    unverified = [i.name for i in (result.engine, result.interpolator)
                  if i is not None and i.model_sha256 and not i.verified]
    if adaptation is not None and adaptation.adapted and not base_verified:
        unverified.append(f"{adaptation.version} (adapted from an unverified model)")
    if unverified:
        print(f"dimscope: WARNING: made with UNVERIFIED model(s) (--allow-unverified-model): "
              f"{', '.join(unverified)}; the provenance says verified: false",
              file=sys.stderr)
    what = result.engine.name if result.engine else "raw"
    print(f"wrote {args.output}: {result.output.shape} float32 ({what}"
          + (f", ×{args.interpolate} {result.interpolator.name}" if result.interpolator else "")
          + f") in {seconds:.1f} s")
    return EXIT_OK


def add_enhance_parser(sub: Any) -> None:
    e = sub.add_parser("enhance", help="apply an engine to a finished TIFF stack, in "
                       "acquisition order, exactly as the live pipeline would")
    e.add_argument("input", type=Path, help="TIFF/OME-TIFF: (Y,X), (T,Y,X) or (T,C,Y,X)")
    e.add_argument("output", type=Path, help="output TIFF (float32, one frame per frame in)")
    e.add_argument("--engine", default="denoise",
                   help="denoise (default), sr2, denoise_hq / denoise_hq_t5 (the slower "
                        "quality model: BM3D, or for time-lapses BM4D over the last 5 frames, "
                        "refined by a network), sr2_hq (×2: BM3D refined and upsampled by a "
                        "network), transfer / transfer_hq (widefield -> confocal-like; hq: "
                        "BM3D and Richardson-Lucy refined by a network), bm3d, bm4d, "
                        "vst_gaussian, identity, model, or none (interpolate the raw frames)")
    e.add_argument("--model", default=None, help="model name or .onnx path (engine model)")
    e.add_argument("--runtime", default=None, help="runtime for model engines (default auto)")
    e.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="model engines' precision: offline, FP32 unless asked (the live "
                   "engine's `auto` takes BF16 where the CPU computes it natively)")
    e.add_argument("--interpolate", type=int, default=1, choices=[1, 2, 3, 4, 8],
                   help="N: synthesise N−1 frames between each pair ((T−1)·N+1 frames out)")
    e.add_argument("--interp-method", default="model",
                   help="interpolator: model (default), flow, linear, repeat")
    e.add_argument("--offset", type=float, default=None, help="camera offset (ADU)")
    e.add_argument("--gain", type=float, default=None, help="camera gain (ADU per e-)")
    e.add_argument("--read-noise", type=float, default=None, help="read noise (e- rms)")
    e.add_argument("--adapt", action="store_true",
                   help="first adapt the noise-aware model to this stack (self-supervised), "
                        "then enhance with the adapted model")
    e.add_argument("--adapt-seconds", type=float, default=60.0,
                   help="time adaptation gets (default 60)")
    e.add_argument("--adapt-rounds", type=int, default=None,
                   help="at most this many rounds of adaptation")
    e.add_argument("--adapt-out", type=Path, default=None,
                   help="where the adapted model goes (default OUT.adapted.onnx)")
    e.add_argument("--allow-unverified-model", action="store_true",
                   help="use models whose weights do not match the SHA-256 their card records "
                        "(or whose card records none) instead of refusing them; the output's "
                        "provenance then says verified: false")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_enhance)


def cmd_adapt(args: argparse.Namespace) -> int:
    from dimscope.engines import EngineError
    from dimscope.engines.model_file import ModelIntegrityError

    try:
        if args.seconds <= 0:
            raise ValueError(f"--seconds must be > 0, got {args.seconds:g}")
        series = _read_series(args.input)
        noise, _ = _noise_of(args, series)
        print(f"noise model: {noise.describe()}", file=sys.stderr)
        # Never an unverified model: the adapted file would carry a fresh hash of its own.
        model, _ = _adaptable_model("model", args.model)
    except ModelIntegrityError as exc:
        print(f"dimscope: {exc} (`dimscope adapt` takes no --allow-unverified-model: the "
              f"adapted model would be recorded as verified)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, EngineError, FileNotFoundError) as exc:
        print(f"dimscope: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = _adapt(series, model, noise, args.seconds, args.rounds, args.out, args.quiet)
    except (EngineError, OSError) as exc:
        print(f"dimscope: adaptation failed: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    if not result.adapted:
        return EXIT_RUN_FAILED
    print(f"wrote {args.out} ({result.version})")
    return EXIT_OK


def add_adapt_parser(sub: Any) -> None:
    a = sub.add_parser("adapt", help="adapt a noise-aware denoiser to a recording "
                       "(self-supervised, no clean data) and write the adapted model")
    a.add_argument("input", type=Path, help="a TIFF time-lapse or a run folder (raw_*.ome.tif)")
    a.add_argument("--out", type=Path, required=True, help="adapted model (.onnx; card beside)")
    a.add_argument("--model", default="denoise", help="model to adapt: shipped name or .onnx")
    a.add_argument("--seconds", type=float, default=60.0, help="time adaptation gets")
    a.add_argument("--rounds", type=int, default=None, help="at most this many rounds")
    a.add_argument("--offset", type=float, default=None, help="camera offset (ADU)")
    a.add_argument("--gain", type=float, default=None, help="camera gain (ADU per e-)")
    a.add_argument("--read-noise", type=float, default=None, help="read noise (e- rms)")
    a.add_argument("-q", "--quiet", action="store_true", help="no per-round lines")
    a.set_defaults(func=cmd_adapt)
