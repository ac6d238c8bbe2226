"""`dimscope enhance IN OUT`: apply an engine (and interpolation) to a finished stack.

What users run on a finished experiment and what every quality comparison
runs: frames in acquisition order through the same engine code as the live
pipeline (`engines/offline.py`), one float32 frame out per frame in, plus
N−1 synthesised frames per interval with `--interpolate N`. The camera's noise
model comes from `--offset/--gain/--read-noise`, or is estimated from the stack
and printed. Provenance (engine, model version, noise model, command) goes in
the TIFF's description and a JSON file beside it.
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


def cmd_enhance(args: argparse.Namespace) -> int:
    from dimscope.engines import CameraCalibration, EngineError, make_engine
    from dimscope.engines.interpolators import make_interpolator
    from dimscope.engines.noise_model import NoiseModel, estimate_noise_model
    from dimscope.engines.offline import as_series, calibration_for, enhance_stack
    from dimscope.engines.options import validate_options

    try:
        stack = _read(args.input)
        series, _ = as_series(stack)
        if args.gain is not None or args.offset is not None:
            if args.gain is None or args.offset is None:
                raise ValueError("give both --gain and --offset (and --read-noise), or none: "
                                 "then the noise model is estimated from the stack")
            cal = CameraCalibration(args.gain, args.offset, args.read_noise or 0.0)
            noise = NoiseModel.from_calibration(cal)
        else:
            noise = estimate_noise_model(series[0, :8].astype(np.float32))
            cal = calibration_for(noise)
        print(f"noise model: {noise.describe()}", file=sys.stderr)
        engine_name = None if args.engine == "none" else args.engine
        options: dict[str, Any] = {}
        if args.model:
            options["model"] = args.model
        if args.runtime:
            options["runtime"] = args.runtime
        if engine_name is not None:
            options = validate_options(engine_name, options)
            make_engine(engine_name, **options).close()  # a bad name or model fails here
        interpolator = (make_interpolator(args.interp_method) if args.interpolate > 1
                        else None)
    except (ValueError, EngineError, FileNotFoundError) as exc:
        print(f"dimscope: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def factory() -> Any:
        assert engine_name is not None
        return make_engine(engine_name, **options)

    progress = _Progress(series.shape[0] * series.shape[1], args.quiet)
    started = time.monotonic()
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
            "noise": result.engine.noise},
        "interpolator": None if result.interpolator is None else {
            "name": result.interpolator.name, "version": result.interpolator.version},
        "noise_model": {"alpha": noise.alpha, "beta": noise.beta, "source": noise.source},
        "seconds": round(seconds, 2), "command": " ".join(["dimscope", *sys.argv[1:]]),
    }
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
                   help="denoise (default), sr2, bm3d, bm4d, vst_gaussian, identity, model, "
                        "or none (interpolate the raw frames)")
    e.add_argument("--model", default=None, help="model name or .onnx path (engine model)")
    e.add_argument("--runtime", default=None, help="runtime for model engines (default auto)")
    e.add_argument("--interpolate", type=int, default=1, choices=[1, 2, 3, 4, 8],
                   help="N: synthesise N−1 frames between each pair ((T−1)·N+1 frames out)")
    e.add_argument("--interp-method", default="model",
                   help="interpolator: model (default), flow, linear, repeat")
    e.add_argument("--offset", type=float, default=None, help="camera offset (ADU)")
    e.add_argument("--gain", type=float, default=None, help="camera gain (ADU per e-)")
    e.add_argument("--read-noise", type=float, default=None, help="read noise (e- rms)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_enhance)
