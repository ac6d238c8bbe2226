"""Fourier ring correlation resolution of the plain render (Nieuwenhuizen et al., Nat
Methods 2013).

The localizations are split by frame into **alternating blocks** of `block_frames` frames
(≥ 100): blocks 0, 2, 4… make half A, blocks 1, 3, 5… half B. A molecule blinks over several
consecutive frames, so an odd/even-frame split would put the same blink in both halves and
correlate them beyond the real resolution; blocks much longer than a blink do not.

Each half is rendered as a histogram at `pixel_nm`, on a square grid, multiplied by a Tukey
window (the field's edges would otherwise correlate at every frequency). FRC(q) is the
normalised cross-correlation of the two transforms over rings of one frequency pixel, smoothed
over `smooth` rings; the resolution is 1/q at the first crossing of 1/7 (interpolated
linearly), NaN when the curve never crosses it below the Nyquist frequency. Never apply this to
a network's output: it measures the localizations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .block import LocBlock

F64 = npt.NDArray[np.float64]
THRESHOLD = 1.0 / 7.0
MIN_BLOCK_FRAMES = 100


@dataclass(frozen=True)
class FRCResult:
    resolution_nm: float  # NaN: no crossing
    frequency_per_nm: F64
    curve: F64
    pixel_nm: float
    block_frames: int
    n_a: int
    n_b: int
    threshold: float = THRESHOLD


def split_halves(locs: LocBlock, block_frames: int) -> tuple[LocBlock, LocBlock]:
    """(blocks 0, 2, 4…, blocks 1, 3, 5…) of `block_frames` frames each."""
    if block_frames < MIN_BLOCK_FRAMES:
        raise ValueError(f"FRC blocks must be >= {MIN_BLOCK_FRAMES} frames (blinks span "
                         f"several frames), got {block_frames}")
    odd = (locs.frame // block_frames) % 2 == 1
    return locs.select(~odd), locs.select(odd)


def frc_curve(img_a: F64, img_b: F64) -> tuple[F64, F64]:
    """(ring index q in cycles per image, FRC(q)) of two same-size square images."""
    n = img_a.shape[0]
    fa, fb = np.fft.fftshift(np.fft.fft2(img_a)), np.fft.fftshift(np.fft.fft2(img_b))
    yy, xx = np.indices(img_a.shape)
    r = np.rint(np.hypot(yy - n // 2, xx - n // 2)).astype(np.int64).ravel()
    nrings = n // 2
    ok = r < nrings
    num = np.bincount(r[ok], (fa * np.conj(fb)).real.ravel()[ok], nrings)
    den_a = np.bincount(r[ok], (np.abs(fa) ** 2).ravel()[ok], nrings)
    den_b = np.bincount(r[ok], (np.abs(fb) ** 2).ravel()[ok], nrings)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = num / np.sqrt(den_a * den_b)
    return np.arange(nrings, dtype=np.float64), np.nan_to_num(curve)


def frc(locs: LocBlock, pixel_nm: float = 5.0, block_frames: int = 500,
        extent_nm: tuple[float, float] | None = None, smooth: int = 5) -> FRCResult:
    """FRC resolution (nm) of `locs` (see the module docstring)."""
    # Imported here: the ready rule's settings (daemon config) import this module.
    from scipy.signal.windows import tukey

    from .render import extent_of, histogram_xy

    a, b = split_halves(locs, block_frames)
    ext = extent_nm or extent_of(locs)
    side = max(ext)
    n = math.ceil(side / pixel_nm)
    n += n % 2
    square = (n * pixel_nm, n * pixel_nm)
    win = np.outer(tukey(n, 0.25), tukey(n, 0.25))
    img_a = histogram_xy(a.x_nm, a.y_nm, pixel_nm, square).astype(np.float64) * win
    img_b = histogram_xy(b.x_nm, b.y_nm, pixel_nm, square).astype(np.float64) * win
    q, curve = frc_curve(img_a, img_b)
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        padded = np.pad(curve, smooth // 2, mode="edge")
        curve = np.convolve(padded, kernel, mode="valid")[:len(q)]
    freq = q / (n * pixel_nm)
    resolution = math.nan
    below = np.flatnonzero(curve[1:] < THRESHOLD) + 1
    if len(below) and len(a) and len(b):
        k = int(below[0])
        c0, c1 = curve[k - 1], curve[k]
        t = (c0 - THRESHOLD) / (c0 - c1) if c0 != c1 else 0.0
        f_cross = freq[k - 1] + t * (freq[k] - freq[k - 1])
        resolution = 1.0 / f_cross if f_cross > 0 else math.nan
    return FRCResult(resolution, freq, curve, pixel_nm, block_frames, len(a), len(b))
