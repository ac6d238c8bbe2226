"""Localizations against ground truth, and the precision limit.

**Matching** (`match`): per frame, ground-truth emitters and localizations are paired within
a tolerance by an optimal assignment (`scipy.optimize.linear_sum_assignment`): pairs closer
than the tolerance cost their distance, every other pair a cost larger than any sum of
distances, so the assignment first maximises the number of pairs within the tolerance and then
minimises their total distance. Unpaired localizations are false positives, unpaired truths
false negatives.

**Scores** (`score`), as the SMLM challenge defines them (Sage et al., Nat Methods 2015 and
2019): recall, precision, Jaccard index TP/(TP+FP+FN), lateral RMSE √mean(Δx²+Δy²) over the
pairs, and the lateral efficiency E = 100 − √((100 − 100·Jaccard)² + α²·RMSE²) with
α = 1 nm⁻¹ (2019 challenge; 100 is perfect, it can go below 0).

**Cramér–Rao bound**:
- `crlb_mortensen`: the closed form of Mortensen et al. (Nat Methods 2010, eq. 5) for MLE of a
  Gaussian PSF on square pixels with a uniform Poisson background, no read noise, infinite
  field — the textbook reference;
- `crlb_pixelated`: the bound of the model a fitter really fits — pixel-integrated Gaussian,
  background, Gaussian read noise as extra Poisson-like variance (the approximation smappy's
  likelihood uses), a finite fit box, the PSF width known (4 parameters) or free
  (5 parameters) — at each emitter's true position, from the Fisher information.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment
from scipy.special import erf

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Matching:
    """Indices of paired truths and localizations, and the pair distances (nm)."""

    truth: I64
    loc: I64
    dx_nm: F64  # localization − truth
    dy_nm: F64
    n_truth: int
    n_loc: int

    @property
    def tp(self) -> int:
        return len(self.truth)

    @property
    def fp(self) -> int:
        return self.n_loc - self.tp

    @property
    def fn(self) -> int:
        return self.n_truth - self.tp


def _runs(frames: I64) -> tuple[I64, I64, I64]:
    """Unique frames of a sorted array and their [start, stop) slices."""
    uniq, start = np.unique(frames, return_index=True)
    stop = np.append(start[1:], len(frames))
    return uniq, start, stop


def match(truth_frame: npt.ArrayLike, truth_x: npt.ArrayLike, truth_y: npt.ArrayLike,
          loc_frame: npt.ArrayLike, loc_x: npt.ArrayLike, loc_y: npt.ArrayLike,
          tolerance_nm: float = 250.0) -> Matching:
    """Optimal one-to-one pairing within `tolerance_nm`, frame by frame."""
    tf, tx, ty = (np.asarray(a) for a in (truth_frame, truth_x, truth_y))
    lf, lx, ly = (np.asarray(a) for a in (loc_frame, loc_x, loc_y))
    t_order = np.argsort(tf, kind="stable")
    l_order = np.argsort(lf, kind="stable")
    t_frames, t_start, t_stop = _runs(tf[t_order].astype(np.int64))
    l_frames, l_start, l_stop = _runs(lf[l_order].astype(np.int64))
    _, ti, li = np.intersect1d(t_frames, l_frames, return_indices=True)
    big = 1e9  # more than any sum of in-tolerance distances in one frame
    pairs_t: list[I64] = []
    pairs_l: list[I64] = []
    for a, b in zip(ti, li, strict=True):
        it = t_order[t_start[a]:t_stop[a]]
        il = l_order[l_start[b]:l_stop[b]]
        d = np.hypot(tx[it][:, None] - lx[il][None, :], ty[it][:, None] - ly[il][None, :])
        close = d <= tolerance_nm
        if not close.any():
            continue
        rows, cols = linear_sum_assignment(np.where(close, d, big))
        keep = close[rows, cols]
        pairs_t.append(it[rows[keep]])
        pairs_l.append(il[cols[keep]])
    t_idx = np.concatenate(pairs_t) if pairs_t else np.zeros(0, np.int64)
    l_idx = np.concatenate(pairs_l) if pairs_l else np.zeros(0, np.int64)
    return Matching(t_idx.astype(np.int64), l_idx.astype(np.int64),
                    (lx[l_idx] - tx[t_idx]).astype(np.float64),
                    (ly[l_idx] - ty[t_idx]).astype(np.float64), len(tf), len(lf))


@dataclass(frozen=True)
class Scores:
    """SMLM-challenge detection and accuracy scores of one matching."""

    tolerance_nm: float
    tp: int
    fp: int
    fn: int
    recall: float
    precision: float
    jaccard: float
    rmse_lateral_nm: float
    rmse_x_nm: float
    rmse_y_nm: float
    bias_x_nm: float
    bias_y_nm: float
    efficiency_lateral: float


def score(m: Matching, tolerance_nm: float) -> Scores:
    tp, fp, fn = m.tp, m.fp, m.fn
    jac = tp / (tp + fp + fn) if tp + fp + fn else 0.0
    if tp:
        rmse = math.sqrt(float(np.mean(m.dx_nm ** 2 + m.dy_nm ** 2)))
        rx, ry = (math.sqrt(float(np.mean(d ** 2))) for d in (m.dx_nm, m.dy_nm))
        bx, by = float(np.mean(m.dx_nm)), float(np.mean(m.dy_nm))
    else:
        rmse = rx = ry = bx = by = math.nan
    eff = (100.0 - math.hypot(100.0 - 100.0 * jac, rmse)) if tp else math.nan
    return Scores(tolerance_nm, tp, fp, fn, tp / (tp + fn) if tp + fn else 0.0,
                  tp / (tp + fp) if tp + fp else 0.0, jac, rmse, rx, ry, bx, by, eff)


# ----------------------------------------------------------------------------- the bound
_LAG_U, _LAG_W = np.polynomial.laguerre.laggauss(80)


def crlb_mortensen(photons: npt.ArrayLike, background: npt.ArrayLike, sigma_nm: float,
                   pixel_nm: float) -> F64:
    """Mortensen et al. 2010, eq. 5: the CRLB of x (nm) for MLE, per emitter.

    var = σa²/N · [1 + ∫₀¹ ln t / (1 + t/τ) dt]⁻¹, σa² = σ² + a²/12, τ = 2π σa² b / (N a²),
    b = background photons per pixel. The integral is computed with t = e⁻ᵘ by Gauss–Laguerre
    quadrature.
    """
    n = np.asarray(photons, np.float64)
    b = np.asarray(background, np.float64)
    sa2 = sigma_nm ** 2 + pixel_nm ** 2 / 12.0
    tau = 2 * math.pi * sa2 * np.maximum(b, 1e-12) / (n * pixel_nm ** 2)
    # ∫₀¹ ln t/(1+t/τ) dt = ∫₀^∞ e^{-u} · (−u)/(1 + e^{-u}/τ) du
    t = np.exp(-_LAG_U)
    integral = np.sum(_LAG_W * (-_LAG_U) / (1.0 + t / np.expand_dims(tau, -1)), axis=-1)
    return np.asarray(np.sqrt(sa2 / n / (1.0 + integral)), np.float64)


def crlb_pixelated(x_nm: npt.ArrayLike, y_nm: npt.ArrayLike, photons: npt.ArrayLike,
                   background: npt.ArrayLike, sigma_nm: float, pixel_nm: float,
                   read_noise_e: float = 0.0, roisize: int = 11, fit_sigma: bool = False,
                   chunk: int = 4096) -> tuple[F64, F64]:
    """CRLB of (x, y) in nm of each emitter at its true position (see the module docstring).

    The fit box is `roisize` pixels centred on the pixel holding the emitter; each pixel's
    variance is model + read_noise_e² (photo-electrons). Parameters: x, y, N, b (+ σ).
    """
    xs = np.atleast_1d(np.asarray(x_nm, np.float64)) / pixel_nm
    ys = np.atleast_1d(np.asarray(y_nm, np.float64)) / pixel_nm
    ns = np.broadcast_to(np.asarray(photons, np.float64), xs.shape)
    bs = np.broadcast_to(np.asarray(background, np.float64), xs.shape)
    s = sigma_nm / pixel_nm
    half = roisize // 2
    k = np.arange(-half, half + 1, dtype=np.float64)
    out_x = np.empty(xs.size)
    out_y = np.empty(xs.size)
    c = 1.0 / (math.sqrt(2.0) * s)
    for lo in range(0, xs.size, chunk):
        x, y = xs[lo:lo + chunk, None], ys[lo:lo + chunk, None]
        n = ns[lo:lo + chunk, None, None]
        b = bs[lo:lo + chunk, None, None]
        px = np.floor(x) + k  # left edges of the box's pixels
        py = np.floor(y) + k

        def axis(edge: F64, pos: F64) -> tuple[F64, F64, F64]:
            u0, u1 = edge - pos, edge + 1.0 - pos
            e = 0.5 * (erf(u1 * c) - erf(u0 * c))
            g0, g1 = np.exp(-(u0 * c) ** 2), np.exp(-(u1 * c) ** 2)
            d_pos = (g0 - g1) / (math.sqrt(2 * math.pi) * s)
            d_sig = (u0 * g0 - u1 * g1) / (math.sqrt(2 * math.pi) * s * s)
            return e, d_pos, d_sig

        ex, dex, dsx = axis(px, x)
        ey, dey, dsy = axis(py, y)
        g = ey[:, :, None] * ex[:, None, :]
        mu = n * g + b
        grads = [n * ey[:, :, None] * dex[:, None, :], n * dey[:, :, None] * ex[:, None, :],
                 g, np.ones_like(g)]
        if fit_sigma:
            grads.append(n * (ey[:, :, None] * dsx[:, None, :] + dsy[:, :, None] * ex[:, None, :]))
        gr = np.stack([gg.reshape(len(x), -1) for gg in grads], 1)  # (m, p, pixels)
        w = 1.0 / (mu.reshape(len(x), -1) + read_noise_e ** 2)
        fisher = np.einsum("mip,mjp,mp->mij", gr, gr, w)
        inv = np.linalg.inv(fisher)
        out_x[lo:lo + chunk] = np.sqrt(inv[:, 0, 0]) * pixel_nm
        out_y[lo:lo + chunk] = np.sqrt(inv[:, 1, 1]) * pixel_nm
    return out_x, out_y
