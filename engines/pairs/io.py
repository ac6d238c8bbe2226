"""Files for pair registration: finding the pairs, reading images and their pixel sizes,
writing the results (`register_pairs`) and applying saved transforms (`apply_transforms`).

LOW and HIGH are two files (one pair, whatever their names, named after LOW) or two folders
(files paired by name: the file name without .tif/.tiff/.ome.tif/.ome.tiff). Pixel sizes come
from the OME metadata (PhysicalSizeX/Y) or are given for all files at once.

Everything is checked before anything is written, and the results are written into a hidden
folder beside `out` that is renamed onto it at the end: a bad input or a failure half-way
leaves nothing behind. Output (DIR):

- `low/<name>.tif`: LOW resampled onto HIGH's full grid, float32, 0 outside the overlap;
- `high/<name>.tif`: HIGH as float32;
- `mask/<name>.tif`: the overlap, uint8 (1 inside);
- `transform/<name>.tif`: float32 (2, H, W), LOW's (row, column) for each HIGH pixel; its
  TIFF description (JSON) records both pixel sizes and LOW's shape, for `apply_transforms`;
- `montage/<name>.png`: HIGH | LOW registered | overlay before | overlay after
  (HIGH magenta, LOW green);
- `report.json`: per pair NCC before/after, residual shift (median, p95), status, reason.

Images are written for registered pairs only: a rejected pair is listed in the report with
its reason and nothing else.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .register import (
    Registration,
    RegistrationOptions,
    project_planes,
    register,
    resample_low,
    to_high_pixels,
)

__all__ = ["TRANSFORM_MEANING", "Pair", "PairsError", "apply_transforms", "find_pairs",
           "image_name", "pixel_size_um", "read_image", "register_pairs"]

SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif")
TRANSFORM_MEANING = ("for each HIGH pixel (row, column), the (row, column) in LOW's own pixel "
                     "coordinates that the registration maps onto it")
_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6,
             "Å": 1e-4, "pm": 1e-6}


class PairsError(ValueError):
    """Bad input (the message names the file or folder); nothing has been written."""


@dataclass(frozen=True)
class Pair:
    name: str
    low: Path
    high: Path
    low_um: float
    high_um: float


def image_name(path: Path) -> str:
    """The name pairs are matched by: the file name without its TIFF suffix."""
    lower = path.name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            return path.name[:-len(suffix)]
    return path.stem


def _is_image(path: Path) -> bool:
    name = path.name
    return path.is_file() and name.lower().endswith(SUFFIXES) and not name.startswith(".")


def _images(folder: Path, role: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not _is_image(path):
            continue
        name = image_name(path)
        if name in found:
            raise PairsError(f"{role} folder {folder}: two images are named {name!r} "
                             f"({found[name].name}, {path.name}); pairs are matched by name")
        found[name] = path
    if not found:
        raise PairsError(f"{role} folder {folder}: no TIFF images in it "
                         f"(looked for {', '.join(SUFFIXES)})")
    return found


def pixel_size_um(path: Path) -> float | None:
    """Square pixel size in µm from the file's OME metadata; None when it records none.
    Raises PairsError for a file that is not a readable TIFF or whose pixels are not square."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata
    except Exception as exc:  # tifffile raises several types for a file that is not a TIFF
        raise PairsError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise PairsError(f"{path}: its OME metadata is not valid XML ({exc})") from None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            return None
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if unit not in _UNITS_UM:
            raise PairsError(f"{path}: pixel size unit {unit!r} is not one of "
                             f"{', '.join(_UNITS_UM)}")
        try:
            sizes.append(float(value) * _UNITS_UM[unit])
        except ValueError:
            raise PairsError(f"{path}: PhysicalSize{axis}={value!r} is not a number") from None
    sx, sy = sizes
    if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
        raise PairsError(f"{path}: pixel size {sx} × {sy} µm is not positive")
    if abs(sx - sy) > 0.01 * max(sx, sy):
        raise PairsError(f"{path}: pixels are not square ({sx:g} × {sy:g} µm); "
                         "registration assumes square pixels")
    return sx


def read_image(path: Path) -> np.ndarray:
    """The image as float32 (…, Y, X), singleton axes dropped. PairsError when it is not a
    readable numeric TIFF of at least 32 × 32 pixels."""
    import tifffile

    try:
        data = np.asarray(tifffile.imread(path))
    except Exception as exc:  # tifffile raises several types for a file that is not a TIFF
        raise PairsError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise PairsError(f"{path}: pixel type {data.dtype} is not a real number type")
    data = np.squeeze(data)
    if data.ndim < 2 or min(data.shape[-2:]) < 32:
        raise PairsError(f"{path}: not an image of at least 32 × 32 pixels (shape {data.shape})")
    if not np.isfinite(data).all():
        raise PairsError(f"{path}: contains NaN or infinite pixels")
    return data.astype(np.float32)


def _check_pixel_size(pixel_size: tuple[float, float] | None) -> None:
    if pixel_size is not None and not all(v > 0 and math.isfinite(v) for v in pixel_size):
        raise PairsError(f"--pixel-size must be two positive numbers (µm), got "
                         f"{pixel_size[0]:g} {pixel_size[1]:g}")


def _size(path: Path, given: float | None, role: str) -> float:
    if given is not None:
        pixel_size_um(path)  # still checks that the file is a readable TIFF
        return given
    size = pixel_size_um(path)
    if size is None:
        raise PairsError(f"{path}: no pixel size in its OME metadata (PhysicalSizeX/Y) for "
                         f"{role}; give both with --pixel-size LOW_UM HIGH_UM")
    return size


def find_pairs(low: Path, high: Path, pixel_size: tuple[float, float] | None = None
               ) -> tuple[list[Pair], dict[str, list[str]]]:
    """The pairs to register and the names found on one side only ("low_only",
    "high_only"). Raises PairsError for bad input: a missing path, a file against a folder,
    an empty folder, no names in common, a missing or bad pixel size, an unreadable file."""
    _check_pixel_size(pixel_size)
    for role, path in (("LOW", low), ("HIGH", high)):
        if not path.exists():
            raise PairsError(f"{role} {path}: no such file or folder")
    lo_um, hi_um = pixel_size if pixel_size is not None else (None, None)
    if low.is_file() and high.is_file():
        pair = Pair(image_name(low), low, high, _size(low, lo_um, "LOW"),
                    _size(high, hi_um, "HIGH"))
        return [pair], {"low_only": [], "high_only": []}
    if not (low.is_dir() and high.is_dir()):
        raise PairsError(f"LOW {low} and HIGH {high} must both be files or both be folders")
    lows, highs = _images(low, "LOW"), _images(high, "HIGH")
    common = sorted(set(lows) & set(highs))
    if not common:
        raise PairsError(f"LOW folder {low} ({_names(lows)}) and HIGH folder {high} "
                         f"({_names(highs)}) have no image names in common")
    pairs = [Pair(n, lows[n], highs[n], _size(lows[n], lo_um, "LOW"),
                  _size(highs[n], hi_um, "HIGH")) for n in common]
    return pairs, {"low_only": sorted(set(lows) - set(highs)),
                   "high_only": sorted(set(highs) - set(lows))}


def _names(found: dict[str, Path], limit: int = 5) -> str:
    names = sorted(found)
    return ", ".join(names[:limit]) + (f", … {len(names)} in all" if len(names) > limit else "")


# ---- writing --------------------------------------------------------------------------------

def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise PairsError(f"--out {out} exists and is not an empty folder; choose a new one")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise PairsError(f"--out {out}: its parent folder {parent} does not exist")


class _Staging:
    """A hidden folder beside `out`, renamed onto `out` by `commit`; removed otherwise."""

    def __init__(self, out: Path) -> None:
        self.out = out
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-",
                                              dir=out.absolute().parent))
        except OSError as exc:
            raise PairsError(f"--out {out}: cannot create a folder beside it "
                             f"({exc.strerror or exc})") from None

    def __enter__(self) -> _Staging:
        return self

    def commit(self) -> None:
        if self.out.exists():
            self.out.rmdir()  # checked empty at the start
        self.path.rename(self.out)

    def __exit__(self, *exc: object) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def _ome_axes(ndim: int) -> str:
    # A stack's leading axes are not known to be Z: OME needs a letter, and the pixel size
    # is what matters here.
    return {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TCZYX"}.get(ndim, "")


def _write_image(path: Path, data: np.ndarray, um: float) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    axes = _ome_axes(data.ndim)
    if axes:
        tifffile.imwrite(path, data, ome=True, metadata={
            "axes": axes, "PhysicalSizeX": um, "PhysicalSizeY": um,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
    else:
        tifffile.imwrite(path, data)


def _write_transform(path: Path, transform: np.ndarray, pair: Pair, low_shape: tuple[int, ...]
                     ) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dimscope": "pairs transform", "meaning": TRANSFORM_MEANING, "axes": "CYX",
            "low_pixel_um": pair.low_um, "high_pixel_um": pair.high_um,
            "low_shape": list(low_shape), "low_file": pair.low.name, "high_file": pair.high.name}
    tifffile.imwrite(path, transform.astype(np.float32), description=json.dumps(meta),
                     metadata=None)


def _u8(img: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    vals = img[valid] if valid is not None and valid.any() else img
    lo, hi = np.percentile(vals, [0.5, 99.5])
    return (np.clip((img - lo) / max(float(hi - lo), 1e-12), 0, 1) * 255).astype(np.uint8)


def _write_montage(path: Path, high: np.ndarray, low_before: np.ndarray, before_valid: np.ndarray,
                   reg: Registration) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    h8 = _u8(high)
    after = reg.low_on_high if reg.low_on_high.ndim == 2 else \
        reg.low_on_high.reshape(-1, *high.shape).mean(axis=0)
    a8 = _u8(after, reg.mask)
    a8[~reg.mask] = 0
    b8 = _u8(low_before, before_valid)
    b8[~before_valid] = 0

    def overlay(g: np.ndarray) -> np.ndarray:  # BGR: HIGH magenta, LOW green
        return np.stack([h8, g, h8], axis=-1)

    gap = np.full((high.shape[0], 4, 3), 255, np.uint8)
    panels = [np.repeat(h8[..., None], 3, -1), np.repeat(a8[..., None], 3, -1),
              overlay(b8), overlay(a8)]
    labels = ["HIGH", "LOW registered", "before", "after"]
    row = []
    for i, (panel, label) in enumerate(zip(panels, labels, strict=True)):
        panel = np.ascontiguousarray(panel)
        cv2.putText(panel, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1,
                    cv2.LINE_AA)
        row += [gap, panel] if i else [panel]
    if not cv2.imwrite(str(path), np.hstack(row)):
        raise OSError(f"{path}: could not write the montage")


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None  # JSON has no NaN


def _entry(pair: Pair, reg: Registration | None, error: str | None = None) -> dict[str, Any]:
    base: dict[str, Any] = {"name": pair.name, "low": str(pair.low), "high": str(pair.high),
                            "low_pixel_um": pair.low_um, "high_pixel_um": pair.high_um}
    if reg is None:
        return {**base, "status": "rejected", "reason": error, "ncc_before": None,
                "ncc_after": None, "residual_shift_px": None}
    return {**base, "status": reg.status, "reason": reg.reason,
            "ncc_before": _finite(reg.ncc_before), "ncc_after": _finite(reg.ncc_after),
            "residual_shift_px": {"median": _finite(reg.residual_median_px),
                                  "p95": _finite(reg.residual_p95_px),
                                  "blocks": reg.stats.get("blocks_for_residual")},
            "details": _jsonable(reg.stats)}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _finite(obj)
    return obj


def register_pairs(low: Path, high: Path, out: Path,
                   pixel_size: tuple[float, float] | None = None,
                   options: RegistrationOptions | None = None,
                   on_pair: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Register every pair (`find_pairs`) and write DIR as the module docstring says.

    Returns the report (also in `out/report.json`); `report["registered"]` counts the pairs
    that registered. Raises PairsError for bad input, before anything is written.
    `on_pair` is called with each pair's report entry as soon as it is done.
    """
    opts = options or RegistrationOptions()
    pairs, unpaired = find_pairs(low, high, pixel_size)
    _check_out(out)
    entries: list[dict[str, Any]] = []
    with _Staging(out) as stage:
        for pair in pairs:
            lo_img, hi_img = read_image(pair.low), read_image(pair.high)
            try:
                reg = register(lo_img, hi_img, pair.low_um, pair.high_um, opts)
            except (ValueError, RuntimeError) as exc:  # too small; SimpleITK gave up
                entry = _entry(pair, None, f"registration failed: {exc}")
            else:
                entry = _entry(pair, reg)
                if reg.status == "registered":
                    _write_outputs(stage.path, pair, lo_img, hi_img, reg)
            entries.append(entry)
            if on_pair is not None:
                on_pair(entry)
        registered = sum(e["status"] == "registered" for e in entries)
        report = {"dimscope": "pairs register", "low": str(low), "high": str(high),
                  "pixel_size_um_given": list(pixel_size) if pixel_size else None,
                  "options": _jsonable(asdict(opts)),
                  "registered": registered, "rejected": len(entries) - registered,
                  "pairs": entries, "unpaired": unpaired}
        (stage.path / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        stage.commit()
    return report


def _write_outputs(root: Path, pair: Pair, lo_img: np.ndarray, hi_img: np.ndarray,
                   reg: Registration) -> None:
    name = pair.name
    _write_image(root / "low" / f"{name}.tif", reg.low_on_high, pair.high_um)
    _write_image(root / "high" / f"{name}.tif", hi_img.astype(np.float32), pair.high_um)
    _write_image(root / "mask" / f"{name}.tif", reg.mask.astype(np.uint8), pair.high_um)
    _write_transform(root / "transform" / f"{name}.tif", reg.transform, pair, lo_img.shape)
    # "before": LOW at HIGH's pixel size, laid on HIGH's grid from the top-left corner.
    high2 = project_planes(hi_img)
    scaled = to_high_pixels(project_planes(lo_img), pair.low_um, pair.high_um)
    before = np.zeros_like(high2)
    valid = np.zeros(high2.shape, bool)
    h, w = min(high2.shape[0], scaled.shape[0]), min(high2.shape[1], scaled.shape[1])
    before[:h, :w], valid[:h, :w] = scaled[:h, :w], True
    _write_montage(root / "montage" / f"{name}.png", high2, before, valid, reg)


# ---- pairs apply ----------------------------------------------------------------------------

def _read_transform(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            desc = tif.pages.first.description
            data = np.asarray(tif.asarray(), dtype=np.float32)
        meta = json.loads(desc)
    except Exception as exc:  # tifffile / json raise several types for a foreign file
        raise PairsError(f"{path}: not a transform written by `dimscope pairs register` "
                         f"({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("dimscope") != "pairs transform" \
            or data.ndim != 3 or data.shape[0] != 2:
        raise PairsError(f"{path}: not a transform written by `dimscope pairs register`")
    return data, meta


def apply_transforms(transform_dir: Path, other_low: Path, out: Path,
                     on_image: Callable[[str, Path], None] | None = None) -> dict[str, Any]:
    """Resample another channel of LOW (a file, or a folder matched by name) with the saved
    transforms in `transform_dir` (a `pairs register` output, or its transform/ folder).

    Writes `out/low/<name>.tif`, `out/mask/<name>.tif` and `out/report.json`, exactly as
    `register_pairs` wrote `low/` and `mask/`: applied to the registered LOW itself it
    reproduces `low/`. Raises PairsError for bad input, before anything is written.
    """
    tdir = transform_dir / "transform" if (transform_dir / "transform").is_dir() else transform_dir
    if not tdir.is_dir():
        raise PairsError(f"TRANSFORM_DIR {transform_dir}: no such folder")
    transforms = _images(tdir, "transform")
    if not other_low.exists():
        raise PairsError(f"OTHER_LOW {other_low}: no such file or folder")
    if other_low.is_file():
        if len(transforms) == 1:
            jobs = [(next(iter(transforms)), other_low)]
        elif image_name(other_low) in transforms:
            jobs = [(image_name(other_low), other_low)]
        else:
            raise PairsError(f"OTHER_LOW {other_low}: {tdir} holds {len(transforms)} "
                             f"transforms ({_names(transforms)}) and none is named "
                             f"{image_name(other_low)!r}")
    else:
        lows = _images(other_low, "OTHER_LOW")
        common = sorted(set(lows) & set(transforms))
        if not common:
            raise PairsError(f"OTHER_LOW folder {other_low} ({_names(lows)}) and {tdir} "
                             f"({_names(transforms)}) have no names in common")
        jobs = [(n, lows[n]) for n in common]
    loaded = []
    for name, path in jobs:  # everything read and checked before anything is written
        transform, meta = _read_transform(transforms[name])
        img = read_image(path)
        want = tuple(meta.get("low_shape", ()))[-2:]
        if img.shape[-2:] != want:
            raise PairsError(f"{path}: {img.shape[-2]} × {img.shape[-1]} pixels, but the "
                             f"transform {transforms[name].name} was registered on a LOW of "
                             f"{want[0]} × {want[1]}: not the same field of view")
        loaded.append((name, path, transform, meta, img))
    _check_out(out)
    entries = []
    with _Staging(out) as stage:
        for name, path, transform, meta, img in loaded:
            low_on_high, mask = resample_low(img, transform, float(meta["low_pixel_um"]),
                                             float(meta["high_pixel_um"]))
            _write_image(stage.path / "low" / f"{name}.tif", low_on_high,
                         float(meta["high_pixel_um"]))
            _write_image(stage.path / "mask" / f"{name}.tif", mask.astype(np.uint8),
                         float(meta["high_pixel_um"]))
            entries.append({"name": name, "low": str(path), "transform": str(transforms[name])})
            if on_image is not None:
                on_image(name, path)
        report = {"dimscope": "pairs apply", "transform_dir": str(transform_dir),
                  "other_low": str(other_low), "applied": entries}
        (stage.path / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        stage.commit()
    return report

