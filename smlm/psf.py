"""Point sources onto a pixel grid: the pixel-integrated Gaussian PSF, vectorised.

Convention used everywhere in `dimscope.smlm`: pixel (row i, column j) covers
`[j·a, (j+1)·a) × [i·a, (i+1)·a)` nm for a pixel size `a`, so its centre is at `(j + ½)·a`.
A source at `x` nm sits at `x / a` in pixel units on that grid.

Each source is stamped as the outer product of two 1-D integrals of the Gaussian over the
pixel edges (erf differences) in a square patch of ±`radius` pixels, and all patches are added
at once with `np.bincount` — no per-pixel Python loop. The expected counts are exact for a
Gaussian PSF up to the tail beyond the patch (< 1e-4 of the photons at 4 σ).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy.special import erf

F64 = npt.NDArray[np.float64]

_SQRT2 = math.sqrt(2.0)


def patch_radius(sigma_px: float) -> int:
    """Half-width of the stamp in pixels: 4 σ, at least 2."""
    return max(2, math.ceil(4.0 * sigma_px))


def stamp(shape: tuple[int, int], x_px: npt.ArrayLike, y_px: npt.ArrayLike,
          amplitude: npt.ArrayLike, sigma_px: float | npt.ArrayLike,
          chunk: int = 20_000) -> F64:
    """Sum of pixel-integrated Gaussians on a `shape` grid (rows, columns).

    `x_px`, `y_px`: positions in pixel units (0 = the left/top edge of the first pixel);
    `amplitude`: the integral of each source (photons); `sigma_px`: one width for all or one
    per source. Sources off the grid contribute only the part that falls on it.
    """
    h, w = shape
    x = np.atleast_1d(np.asarray(x_px, np.float64))
    y = np.atleast_1d(np.asarray(y_px, np.float64))
    amp = np.broadcast_to(np.asarray(amplitude, np.float64), x.shape)
    sig = np.broadcast_to(np.asarray(sigma_px, np.float64), x.shape)
    out = np.zeros(h * w, np.float64)
    if x.size == 0:
        return out.reshape(h, w)
    r = patch_radius(float(sig.max()))
    k = np.arange(-r, r + 1, dtype=np.float64)
    # chunks bound the (n, K, K) temporary for large label counts (widefield, renders)
    for s in range(0, x.size, chunk):
        xs, ys, a, sg = x[s:s + chunk], y[s:s + chunk], amp[s:s + chunk], sig[s:s + chunk]
        cx = np.floor(xs)[:, None] + k  # (n, K) pixel columns of each patch
        cy = np.floor(ys)[:, None] + k
        inv = 1.0 / (_SQRT2 * sg[:, None])
        ex = 0.5 * (erf((cx + 1.0 - xs[:, None]) * inv) - erf((cx - xs[:, None]) * inv))
        ey = 0.5 * (erf((cy + 1.0 - ys[:, None]) * inv) - erf((cy - ys[:, None]) * inv))
        vals = a[:, None, None] * ey[:, :, None] * ex[:, None, :]
        cols = np.broadcast_to(cx[:, None, :], vals.shape)
        rows = np.broadcast_to(cy[:, :, None], vals.shape)
        ok = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        flat = rows[ok].astype(np.int64) * w + cols[ok].astype(np.int64)
        out += np.bincount(flat, weights=vals[ok], minlength=h * w)
    return out.reshape(h, w)
