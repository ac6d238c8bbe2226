"""Super-resolution images from localizations, at a pixel size in nm.

- `histogram`: localizations counted per pixel (the plain render; FRC and the network's
  sparse input use it);
- `gaussian`: each localization as a normalised Gaussian of its own precision (or a fixed σ),
  clipped to `[min_sigma_nm, max_sigma_nm]` — the floor keeps the spot at least about a pixel
  wide, the ceiling bounds the stamp size for badly fitted rows.

Both return float32 images with rows = y, on the grid of `psf` (pixel j covers
`[j·p, (j+1)·p)` nm), covering `extent_nm` = (width, height) from the origin.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from .block import LocBlock
from .psf import stamp

F32 = npt.NDArray[np.float32]


def grid_shape(extent_nm: tuple[float, float], pixel_nm: float) -> tuple[int, int]:
    """(rows, columns) of a render of `extent_nm` (width, height)."""
    if pixel_nm <= 0:
        raise ValueError(f"pixel size must be > 0 nm, got {pixel_nm}")
    return (math.ceil(extent_nm[1] / pixel_nm), math.ceil(extent_nm[0] / pixel_nm))


def extent_of(locs: LocBlock, margin_nm: float = 0.0) -> tuple[float, float]:
    """A (width, height) from the origin that holds every localization."""
    if len(locs) == 0:
        return (1.0, 1.0)
    return (float(locs.x_nm.max()) + margin_nm + 1.0, float(locs.y_nm.max()) + margin_nm + 1.0)


def histogram_xy(x_nm: npt.ArrayLike, y_nm: npt.ArrayLike, pixel_nm: float,
                 extent_nm: tuple[float, float]) -> F32:
    h, w = grid_shape(extent_nm, pixel_nm)
    col = np.floor(np.asarray(x_nm, np.float64) / pixel_nm).astype(np.int64)
    row = np.floor(np.asarray(y_nm, np.float64) / pixel_nm).astype(np.int64)
    ok = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    return np.bincount(row[ok] * w + col[ok], minlength=h * w).reshape(h, w).astype(np.float32)


def histogram(locs: LocBlock, pixel_nm: float = 20.0,
              extent_nm: tuple[float, float] | None = None) -> F32:
    """Localizations per pixel."""
    return histogram_xy(locs.x_nm, locs.y_nm, pixel_nm, extent_nm or extent_of(locs))


def gaussian(locs: LocBlock, pixel_nm: float = 20.0,
             extent_nm: tuple[float, float] | None = None, sigma_nm: float | None = None,
             min_sigma_nm: float | None = None, max_sigma_nm: float = 50.0) -> F32:
    """Each localization a Gaussian of integral 1 and σ = its precision (or `sigma_nm`)."""
    extent = extent_nm or extent_of(locs)
    shape = grid_shape(extent, pixel_nm)
    floor = pixel_nm / 2 if min_sigma_nm is None else min_sigma_nm
    if sigma_nm is not None:
        sig: float | npt.NDArray[np.float64] = max(sigma_nm, floor)
    else:
        sig = np.clip(locs["precision_nm"].astype(np.float64), floor, max(max_sigma_nm, floor))
        sig = np.where(np.isfinite(sig), sig, max_sigma_nm)
    img = stamp(shape, locs.x_nm / pixel_nm, locs.y_nm / pixel_nm, 1.0,
                np.asarray(sig) / pixel_nm)
    return img.astype(np.float32)


def to_uint8(img: npt.NDArray[np.floating], percentile: float = 99.5) -> npt.NDArray[np.uint8]:
    """For a PNG: scaled so that `percentile` of the non-zero pixels is white."""
    nz = img[img > 0]
    top = float(np.percentile(nz, percentile)) if nz.size else 1.0
    return np.asarray(np.clip(img / max(top, 1e-12) * 255.0, 0, 255), np.uint8)
