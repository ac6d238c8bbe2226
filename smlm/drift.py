"""Drift by redundant cross-correlation (RCC; Wang et al., Opt. Express 2014).

The frames are cut into `n_segments` consecutive blocks; each block's localizations are
rendered (histogram, `pixel_nm`, Gaussian-blurred by `blur_px`) and **every pair** of blocks
is cross-correlated (FFT). The peak of pair (i, j), refined to sub-pixel by a parabola through
the log of the 3×3 neighbourhood, measures r_ij = d_j − d_i, the drift of block j relative to
block i. The k−1 unknown block drifts (d_0 = 0) are the least-squares solution of those
k(k−1)/2 equations; pairs whose residual exceeds `max_residual_nm` are dropped (worst first,
one at a time) and the rest solved again — the redundancy is what makes a bad correlation
visible. The block drifts, placed at the blocks' mean frames, are interpolated to every frame
(linear, extended linearly beyond the first and last block's mean frames) and referenced to
frame 0 (drift(0) = 0). A global translation is not observable from the localizations alone:
the estimate is the drift relative to frame 0's position.

`DriftEstimate.apply` subtracts it: x − dx[frame], and records what it subtracted in the
`drift_x_nm`/`drift_y_nm` columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter

from .block import LocBlock
from .render import extent_of, histogram_xy

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class DriftEstimate:
    """Per-frame drift (nm) relative to frame 0, and how it was found."""

    dx_nm: F64  # (n_frames,)
    dy_nm: F64
    segment_frames: F64  # mean frame of each block
    segment_drift_nm: F64  # (k, 2) block drifts, block 0 = 0
    pairs_used: int
    pairs_total: int
    residual_rms_nm: float

    @property
    def n_frames(self) -> int:
        return len(self.dx_nm)

    def apply(self, locs: LocBlock) -> LocBlock:
        """Localizations with the drift subtracted (frames past the estimate: its last value)."""
        f = np.clip(locs.frame, 0, self.n_frames - 1)
        dx, dy = self.dx_nm[f], self.dy_nm[f]
        return locs.with_columns(x_nm=locs.x_nm - dx, y_nm=locs.y_nm - dy,
                                 drift_x_nm=dx, drift_y_nm=dy)


def _peak(corr: F64, max_shift_px: int) -> tuple[float, float]:
    """Sub-pixel (dy, dx) of the correlation peak within ±max_shift_px of zero shift."""
    c = np.fft.fftshift(corr)
    h, w = c.shape
    cy, cx = h // 2, w // 2
    win = c[cy - max_shift_px:cy + max_shift_px + 1, cx - max_shift_px:cx + max_shift_px + 1]
    iy, ix = np.unravel_index(int(np.argmax(win)), win.shape)
    py, px = cy - max_shift_px + iy, cx - max_shift_px + ix
    nb = c[py - 1:py + 2, px - 1:px + 2]
    if nb.shape != (3, 3) or np.any(nb <= 0):
        return float(py - cy), float(px - cx)
    lg = np.log(nb)

    def vertex(m1: float, z: float, p1: float) -> float:
        den = m1 - 2 * z + p1
        return 0.0 if den >= 0 else float(np.clip(0.5 * (m1 - p1) / den, -0.5, 0.5))

    return (py - cy + vertex(lg[0, 1], lg[1, 1], lg[2, 1]),
            px - cx + vertex(lg[1, 0], lg[1, 1], lg[1, 2]))


def _interp_extrapolate(x: F64, xp: F64, fp: F64) -> F64:
    """Linear interpolation, continued linearly past both ends (a drift keeps going)."""
    y = np.interp(x, xp, fp)
    if len(xp) >= 2:
        lo, hi = x < xp[0], x > xp[-1]
        y[lo] = fp[0] + (x[lo] - xp[0]) * (fp[1] - fp[0]) / max(xp[1] - xp[0], 1e-9)
        y[hi] = fp[-1] + (x[hi] - xp[-1]) * (fp[-1] - fp[-2]) / max(xp[-1] - xp[-2], 1e-9)
    return np.asarray(y, np.float64)


def rcc(locs: LocBlock, n_frames: int | None = None, n_segments: int = 8,
        pixel_nm: float = 20.0, blur_px: float = 1.0, max_shift_nm: float = 500.0,
        max_residual_nm: float = 15.0,
        extent_nm: tuple[float, float] | None = None) -> DriftEstimate:
    """Estimate the drift of `locs` (see the module docstring)."""
    if n_segments < 2:
        raise ValueError("RCC needs at least 2 segments")
    n_frames = n_frames or max(locs.frame_stop, int(locs.frame.max()) + 1 if len(locs) else 1)
    extent = extent_nm or extent_of(locs)
    edges = np.linspace(0, n_frames, n_segments + 1)
    seg = np.clip(np.searchsorted(edges, locs.frame, side="right") - 1, 0, n_segments - 1)
    ffts = []
    centres = np.empty(n_segments)
    for k in range(n_segments):
        m = seg == k
        img = histogram_xy(locs.x_nm[m], locs.y_nm[m], pixel_nm, extent).astype(np.float64)
        img = gaussian_filter(img, blur_px)
        ffts.append(np.fft.rfft2(img - img.mean()))
        centres[k] = float(locs.frame[m].mean()) if m.any() else 0.5 * (edges[k] + edges[k + 1])
    shape = histogram_xy([], [], pixel_nm, extent).shape
    max_px = max(1, min(int(max_shift_nm / pixel_nm), min(shape) // 2 - 2))
    rows, shifts = [], []
    for i in range(n_segments):
        for j in range(i + 1, n_segments):
            corr = np.fft.irfft2(np.conj(ffts[i]) * ffts[j], s=shape)
            dy, dx = _peak(corr, max_px)
            a = np.zeros(n_segments)
            a[j], a[i] = 1.0, -1.0
            rows.append(a[1:])  # d_0 = 0: block 0 is the reference
            shifts.append((dx * pixel_nm, dy * pixel_nm))
    design, obs = np.array(rows), np.array(shifts)
    keep = np.ones(len(obs), bool)
    while True:
        sol, *_ = np.linalg.lstsq(design[keep], obs[keep], rcond=None)
        res = np.hypot(*(design @ sol - obs).T)
        res_kept = np.where(keep, res, -1.0)
        worst = int(np.argmax(res_kept))
        if res_kept[worst] <= max_residual_nm:
            break
        trial = keep.copy()
        trial[worst] = False
        # every block must stay tied to the others, or its drift is undetermined
        if np.linalg.matrix_rank(design[trial]) < n_segments - 1:
            break
        keep = trial
    seg_drift = np.vstack([[0.0, 0.0], sol])
    frames = np.arange(n_frames, dtype=np.float64)
    drift_x, drift_y = (_interp_extrapolate(frames, centres, seg_drift[:, i]) for i in (0, 1))
    return DriftEstimate(drift_x - drift_x[0], drift_y - drift_y[0], centres, seg_drift,
                         int(keep.sum()), len(obs), float(np.sqrt(np.mean(res[keep] ** 2))))
