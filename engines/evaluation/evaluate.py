"""`dimscope eval denoise|sr2`: every method against a same-field ground truth.

Methods on equal terms (the metric convention is in quality.py):
- `raw` — the low-light input itself (for sr2: bicubic upsampling of it),
- classical: `vst_gaussian` (the skeleton's variance-stabilised denoiser),
  `nlm` (non-local means, scikit-image, noise level estimated per image),
  `bm3d` (the `bm3d` package, on the Anscombe-stabilised image);
  for sr2 each classical denoiser is followed by bicubic upsampling,
- each model given (default: the shipped model for the task).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from scipy.ndimage import zoom

from ..base import CameraCalibration
from ..vst_gaussian import VSTGaussianEngine, anscombe, inverse_anscombe
from .quality import fit_to, normalize_truth, score

log = logging.getLogger(__name__)

Method = Callable[[np.ndarray], np.ndarray]


def read_stack(path: Path) -> np.ndarray:
    """A 2-D image or a stack of them (leading axes flattened), as float32."""
    data = np.asarray(tifffile.imread(path), dtype=np.float32)
    if data.ndim < 2:
        raise ValueError(f"{path}: not an image (shape {data.shape})")
    return data.reshape(-1, *data.shape[-2:])


def _unit(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = np.percentile(image, [0.1, 99.9])
    span = max(float(hi - lo), 1e-6)
    return (image - lo) / span, float(lo), span


def vst_gaussian(image: np.ndarray) -> np.ndarray:
    engine = VSTGaussianEngine()
    # Unknown camera: treat the lowest values as offset and 1 ADU per electron.
    engine.prepare(image.shape, image.dtype, CameraCalibration(
        offset_adu=float(np.percentile(image, 0.1)), gain_adu_per_e=1.0))
    return engine.process(image)


def nlm(image: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_nl_means, estimate_sigma

    unit, lo, span = _unit(image)
    sigma = float(estimate_sigma(unit))
    out = denoise_nl_means(unit, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                           fast_mode=True)
    return np.asarray(out, dtype=np.float32) * span + lo


def bm3d_vst(image: np.ndarray) -> np.ndarray:
    """BM3D on the Anscombe-stabilised image (noise ≈ unit Gaussian after the VST)."""
    import bm3d
    from skimage.restoration import estimate_sigma

    offset = float(np.percentile(image, 0.1))
    stable = anscombe(np.maximum(image - offset, 0), 0.0)
    sigma = max(float(estimate_sigma(stable)), 1e-3)
    out = np.asarray(bm3d.bm3d(stable, sigma_psd=sigma), dtype=np.float32)
    return inverse_anscombe(out, 0.0) + offset


def bicubic(image: np.ndarray, scale: int = 2) -> np.ndarray:
    return np.asarray(zoom(image, scale, order=3, mode="reflect"), dtype=np.float32)


def classical_methods(task: str, skip: Sequence[str] = ()) -> dict[str, Method]:
    denoisers: dict[str, Method] = {"vst_gaussian": vst_gaussian, "nlm": nlm, "bm3d": bm3d_vst}
    try:
        import bm3d  # noqa: F401
    except ImportError:
        log.warning("bm3d is not installed; skipping it (pip install 'dimscope[eval]')")
        denoisers.pop("bm3d")
    denoisers = {k: v for k, v in denoisers.items() if k not in skip}
    if task == "denoise":
        return {"raw": lambda x: x, **denoisers}
    out: dict[str, Method] = {"raw (bicubic)": bicubic}
    for name, fn in denoisers.items():
        out[f"{name}+bicubic"] = _then_bicubic(fn)
    return out


def _then_bicubic(fn: Method) -> Method:
    def run(image: np.ndarray) -> np.ndarray:
        return bicubic(fn(image))

    return run


def model_method(model: str, runtime: str = "auto") -> tuple[str, Method]:
    """A model as a method: a model engine's name (`transfer_hq`: its model with the
    engine's options, e.g. the rotation/flip ensemble), a shipped model or an .onnx path.
    The camera is not known here: noise-aware models estimate its noise from each image."""
    from .. import is_model_engine, make_engine
    from ..model_engine import ModelEngine

    # Quality is measured in FP32 (`auto` would take BF16 on CPUs that have it).
    engine = (make_engine(model, runtime=runtime, precision="fp32") if is_model_engine(model)
              else ModelEngine(model=model, runtime=runtime, precision="fp32"))
    assert isinstance(engine, ModelEngine)
    prepared: dict[str, tuple[int, ...]] = {}

    def run(image: np.ndarray) -> np.ndarray:
        if prepared.get("shape") != image.shape:
            engine.prepare(image.shape, image.dtype, CameraCalibration(measured=False))
            prepared["shape"] = image.shape
        return engine.process(image)

    run.needs_warmup = True  # type: ignore[attr-defined]  # compile outside the timing
    ensemble = ", rotation/flip ensemble" if engine.ensemble else ""
    return f"{engine.card.name} ({Path(engine.path).name}{ensemble})", run


def evaluate(task: str, low: np.ndarray, high: np.ndarray, methods: dict[str, Method],
             with_ssim: bool = True) -> dict[str, Any]:
    """Average and per-pair PSNR/SSIM/NRMSE of each method; outputs kept for the montage."""
    scale = 2 if task == "sr2" else 1
    if len(low) != len(high):
        raise ValueError(f"LOW has {len(low)} image(s) but HIGH has {len(high)}")
    for lo_img, hi_img in zip(low, high, strict=True):
        if tuple(s * scale for s in lo_img.shape) != hi_img.shape:
            raise ValueError(f"HIGH must be {scale}x the size of LOW; got {lo_img.shape} and "
                             f"{hi_img.shape}")
    results: dict[str, Any] = {}
    for name, fn in methods.items():
        per_pair, seconds = [], 0.0
        if getattr(fn, "needs_warmup", False):
            fn(low[0])
        for lo_img, hi_img in zip(low, high, strict=True):
            t0 = time.perf_counter()
            out = fn(lo_img)
            seconds += time.perf_counter() - t0
            per_pair.append(score(hi_img, out, with_ssim))
        keys = per_pair[0].keys()
        results[name] = {k: float(np.mean([p[k] for p in per_pair])) for k in keys}
        results[name]["per_pair"] = per_pair
        results[name]["seconds_per_image"] = seconds / len(low)
    return results


def montage(path: Path, low: np.ndarray, high: np.ndarray, outputs: list[np.ndarray],
            labels: list[str], crop: int = 256) -> None:
    """A PNG: raw | each output | ground truth, centre crops on the truth's scale."""
    from PIL import Image, ImageDraw

    t = normalize_truth(high)
    h, w = t.shape
    c = min(crop, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    scale = high.shape[0] // low.shape[0]
    raw_up = np.kron(low, np.ones((scale, scale), dtype=np.float32)) if scale > 1 else low
    panels = [fit_to(t, raw_up)] + [fit_to(t, o) for o in outputs] + [t]
    names = ["raw", *labels, "ground truth"]
    tiles = []
    for panel, name in zip(panels, names, strict=True):
        crop_img = np.clip(panel[y0:y0 + c, x0:x0 + c], 0, 1)
        img = Image.fromarray((crop_img * 255).astype(np.uint8)).convert("RGB")
        ImageDraw.Draw(img).text((4, 4), name, fill=(255, 255, 0))
        tiles.append(img)
    sheet = Image.new("RGB", (c * len(tiles) + 4 * (len(tiles) - 1), c), (0, 0, 0))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * (c + 4), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def run_eval(task: str, low_path: Path, high_path: Path, models: list[str],
             runtime: str = "auto", skip: Sequence[str] = (), limit: int | None = None,
             montage_path: Path | None = None) -> dict[str, Any]:
    low, high = read_stack(low_path), read_stack(high_path)
    if limit is not None:
        low, high = low[:limit], high[:limit]
    methods = classical_methods(task, skip)
    model_names = []
    for model in models:
        name, fn = model_method(model, runtime)
        methods[name] = fn
        model_names.append(name)
    results = evaluate(task, low, high, methods)
    if montage_path is not None:
        outs = [methods[n](low[0]) for n in model_names]
        montage(montage_path, low[0], high[0], outs, [n.split(" ")[0] for n in model_names])
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'method':<34}{'PSNR dB':>9}{'SSIM':>8}{'NRMSE':>8}{'s/img':>8}"]
    for name, r in results.items():
        lines.append(f"{name:<34}{r['psnr']:>9.2f}{r.get('ssim', float('nan')):>8.3f}"
                     f"{r['nrmse']:>8.4f}{r['seconds_per_image']:>8.2f}")
    return "\n".join(lines)


def run_eval_interp(stack: np.ndarray, factor: int, models: list[str], runtime: str = "auto"
                    ) -> dict[str, Any]:
    """Drop frames from a real time-lapse, rebuild them with each method, score them.

    Frames 0, f, 2f, ... are kept; each dropped frame k·f + j is reconstructed from
    its two kept neighbours at t = j/f and compared with the real frame. Methods:
    `repeat`, `linear`, `flow` (classical optical flow, default options) and each model.
    """
    from ..interpolators import make_interpolator

    if stack.ndim != 3 or len(stack) < factor + 1:
        raise ValueError(f"need a (T, Y, X) time-lapse with more than {factor} frames, "
                         f"got shape {stack.shape}")
    # Read-only frames, as the live stage's: `flow` then estimates a pair's flows once
    # for all its t, so seconds_per_image is what a live run pays.
    stack = stack.view()
    stack.flags.writeable = False
    methods: dict[str, Any] = {"repeat": make_interpolator("repeat"),
                               "linear": make_interpolator("linear"),
                               "flow": make_interpolator("flow")}
    for model in models:
        interp = make_interpolator("model", model=model, runtime=runtime, precision="fp32")
        methods[f"{interp.info.name} ({Path(str(model)).name})"] = interp
    results: dict[str, Any] = {}
    for name, interp in methods.items():
        interp.prepare(stack.shape[1:])
        per_pair, seconds = [], 0.0
        for start in range(0, len(stack) - factor, factor):
            a, b = stack[start], stack[start + factor]
            for j in range(1, factor):
                t0 = time.perf_counter()
                out = interp.between(a, b, j / factor)
                seconds += time.perf_counter() - t0
                per_pair.append(score(stack[start + j], out))
        results[name] = {k: float(np.mean([p[k] for p in per_pair])) for k in per_pair[0]}
        results[name]["per_pair"] = per_pair
        results[name]["seconds_per_image"] = seconds / len(per_pair)
        interp.close()
    return results
