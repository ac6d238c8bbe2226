"""Registration of one LOW/HIGH pair of the same field (Wang et al., Nature Methods 2019).

Four steps, on arrays (`register`):

1. **Scale.** LOW is resampled to HIGH's pixel size (Gaussian prefilter first when LOW's
   pixels are finer, so that it is not aliased).
2. **Coarse.** The field of view: the translation with the highest normalised
   cross-correlation over all placements that overlap by at least `search_overlap`,
   computed in the Fourier domain (masked NCC, Padfield 2012) on smoothed, reduced images.
3. **Global.** An affine transform fitted by Mattes mutual information with SimpleITK
   (multi-resolution regular-step gradient descent), started from the coarse translation.
   Mutual information, not correlation, because the two modalities' contrast differs.
4. **Local.** Block-wise shift maps on a pyramid of block sizes, as Wang et al. did. First
   the two images are made alike: the sharper one is blurred to the other's resolution and
   LOW's histogram is matched to HIGH's (otherwise the blocks' correlation peaks sit off their
   true positions). HIGH's blocks are matched against the warped LOW by normalised
   cross-correlation; a quadratic through each peak gives its sub-pixel position and how
   sharply it is pinned in each direction (along a fibre, not at all). A correction field on
   a 16 px grid is fitted to all blocks, each weighted by that curvature, with a bending-energy
   penalty; the map is then p -> A·(p + u(p)) + b. Repeated, finer blocks each level, until
   the shifts stop changing.

The result is a map on HIGH's grid: for each HIGH pixel the (row, column) in LOW's own pixel
coordinates (`Registration.transform`), with the overlap mask, LOW resampled onto HIGH's grid,
the NCC before and after, and the residual shifts that block-wise matching still finds after
registration (median and 95th percentile). A pair is **rejected** when the registered NCC
is below `min_ncc`, too few blocks match, or the residual is too large: two unrelated fields
fail there, whatever their file names. So does a LOW that covers less than `min_coverage` of
HIGH's field: a pair is the same field imaged twice, and a part-overlap is most likely a
mix-up (it would also register, correctly, on the part the two share).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = ["BlockMatches", "Registration", "RegistrationOptions", "block_shifts", "ncc",
           "project_planes", "register", "resample_low", "scale_map", "to_high_pixels"]


@dataclass(frozen=True)
class RegistrationOptions:
    """Thresholds and pyramid of `register` (the defaults are those the CLI uses)."""

    min_ncc: float = 0.5            # registered NCC below this: the fields do not match
    max_residual_p95: float = 1.0   # px: block-wise residual shift (95th percentile) above this
    min_block_fraction: float = 0.25  # of the textured blocks, at least this many must match
    min_coverage: float = 0.8       # LOW must cover this much of HIGH's field, registered
    search_overlap: float = 0.25    # coarse placements must overlap this much of the smaller
    # Local pyramid: (block size px, search radius px), coarse to fine; the step between
    # blocks is half a block.
    pyramid: tuple[tuple[int, int], ...] = ((64, 6), (48, 3), (32, 2))
    iterations: int = 3             # passes per pyramid level
    smoothness: float = 0.3         # weight of the correction field's bending energy
    tether: float = 1e-4            # pull of the correction field towards 0 (the affine)
    min_block_ncc: float = 0.5      # a block's peak NCC below this: it does not count
    seed: int = 1                   # SimpleITK's metric sampling (reproducible results)


@dataclass
class Registration:
    """One pair's result. `transform`, `mask` and `low_on_high` are on HIGH's grid."""

    transform: np.ndarray           # float32 (2, H, W): LOW (row, col) for each HIGH pixel
    mask: np.ndarray                # bool (H, W): HIGH pixels whose LOW position is inside LOW
    low_on_high: np.ndarray         # float32 (..., H, W): LOW resampled, 0 outside the mask
    status: str                     # "registered" | "rejected"
    reason: str
    ncc_before: float
    ncc_after: float
    residual_median_px: float
    residual_p95_px: float
    support: np.ndarray             # bool (H, W): covered by blocks that matched (measured)
    stats: dict[str, Any] = field(default_factory=dict)


def _normalise(img: np.ndarray) -> np.ndarray:
    """Robust [0, 1] scale (0.5 / 99.5 percentiles): both modalities on one footing for the
    optimisers' step sizes, and a few hot pixels cannot squash the rest."""
    lo, hi = np.percentile(img, [0.5, 99.5])
    return ((img - lo) / max(float(hi - lo), 1e-12)).astype(np.float32)


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation of `a` and `b` over `mask` (all pixels when None);
    nan where fewer than 16 pixels or either is flat there."""
    if mask is not None:
        a, b = a[mask], b[mask]
    if a.size < 16:
        return float("nan")
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def scale_map(u: np.ndarray, low_um: float, high_um: float) -> np.ndarray:
    """LOW pixel coordinate of coordinate `u` on the LOW-resampled-to-HIGH-pixels grid: pixel
    areas are aligned at the image corner, so the centre of pixel 0 maps to (0.5·r − 0.5)."""
    r = high_um / low_um
    return (u + 0.5) * r - 0.5


def _prefilter(low: np.ndarray, low_um: float, high_um: float) -> np.ndarray:
    """LOW smoothed before it is sampled on a coarser grid (anti-aliasing); unchanged when
    HIGH's pixels are not larger than LOW's."""
    r = high_um / low_um
    if r <= 1.0 + 1e-6:
        return low
    sigma = [0.0] * (low.ndim - 2) + [0.5 * math.sqrt(r * r - 1.0)] * 2
    return ndi.gaussian_filter(low.astype(np.float32), sigma)


def resample_low(low: np.ndarray, transform: np.ndarray, low_um: float, high_um: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """LOW (…, Y, X) sampled at `transform` (2, H, W) — cubic spline, 0 outside LOW — and the
    mask of HIGH pixels whose LOW position lies inside LOW. Used by `register` and by
    `pairs apply`, so that applying a saved transform to the same LOW reproduces `low/`."""
    h, w = low.shape[-2:]
    ty, tx = transform[0], transform[1]
    mask = (ty >= -0.5) & (ty <= h - 0.5) & (tx >= -0.5) & (tx <= w - 0.5)
    src = _prefilter(low.astype(np.float32), low_um, high_um)
    planes = src.reshape(-1, h, w)
    out = np.empty((planes.shape[0], *transform.shape[1:]), np.float32)
    for i, plane in enumerate(planes):
        # mode "nearest" and then the mask: no dark seam from the spline's zero padding
        # along the overlap's edge.
        out[i] = ndi.map_coordinates(plane, transform, order=3, mode="nearest")
    out[:, ~mask] = 0.0
    return out.reshape(*low.shape[:-2], *transform.shape[1:]), mask


def to_high_pixels(low: np.ndarray, low_um: float, high_um: float) -> np.ndarray:
    """Step 1: LOW (2-D) resampled to HIGH's pixel size, covering LOW's whole field."""
    r = low_um / high_um
    h, w = low.shape
    if abs(r - 1.0) < 1e-6:
        return low.astype(np.float32)
    hs, ws = max(round(h * r), 1), max(round(w * r), 1)
    uy, ux = np.mgrid[0:hs, 0:ws].astype(np.float64)
    coords = np.stack([scale_map(uy, low_um, high_um), scale_map(ux, low_um, high_um)])
    src = _prefilter(low.astype(np.float32), low_um, high_um)
    return ndi.map_coordinates(src, coords, order=3, mode="nearest").astype(np.float32)


# ---- step 2: coarse field of view ---------------------------------------------------------

def _coarse_shift(fixed: np.ndarray, moving: np.ndarray, min_overlap: float
                  ) -> tuple[tuple[float, float], float]:
    """Translation s with fixed(p) ≈ moving(p + s), maximising the NCC over the overlap
    (masked NCC, Padfield 2012), and that NCC. Smoothed and reduced to ≤ 256 px a side
    first: the field of view needs a pixel or two of precision, and the affine step
    refines it."""
    k = max(1, math.ceil(max(*fixed.shape, *moving.shape) / 256))
    def reduce(img: np.ndarray) -> np.ndarray:
        return ndi.gaussian_filter(img.astype(np.float64), 2.0 * k)[::k, ::k]
    f, m = reduce(fixed), reduce(moving)
    shape = (f.shape[0] + m.shape[0] - 1, f.shape[1] + m.shape[1] - 1)

    def fft(a: np.ndarray) -> np.ndarray:
        return np.fft.rfft2(a, shape)

    # corr(a, b)(s) = Σ_p a(p)·b(p + s), for every s at once: conj(A)·B.
    f1, f2, ones_f = np.conj(fft(f)), np.conj(fft(f * f)), np.conj(fft(np.ones_like(f)))
    m1, m2, ones_m = fft(m), fft(m * m), fft(np.ones_like(m))

    def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.fft.irfft2(a * b, shape)

    n = np.round(corr(ones_f, ones_m))
    sf, sm = corr(f1, ones_m), corr(ones_f, m1)
    sff, smm, sfm = corr(f2, ones_m), corr(ones_f, m2), corr(f1, m1)
    with np.errstate(invalid="ignore", divide="ignore"):
        num = sfm - sf * sm / n
        den = np.sqrt(np.clip(sff - sf * sf / n, 0, None) * np.clip(smm - sm * sm / n, 0, None))
        score = num / den
    need = min_overlap * min(f.size, m.size)
    score[(n < need) | ~np.isfinite(score) | (den <= 1e-9 * max(float(den.max()), 1e-30))] = -2
    iy, ix = np.unravel_index(int(np.argmax(score)), score.shape)
    # index i of the circular correlation is the shift s = i, negative shifts wrapped
    sy = iy if iy < m.shape[0] else iy - shape[0]
    sx = ix if ix < m.shape[1] else ix - shape[1]
    return (float(sy * k), float(sx * k)), float(score[iy, ix])


# ---- step 3: global affine by mutual information -------------------------------------------

def _affine_mi(fixed: np.ndarray, moving: np.ndarray, shift: tuple[float, float], seed: int
               ) -> tuple[np.ndarray, np.ndarray, float]:
    """Affine (A, b) with moving(A·p + b) ≈ fixed(p), p = (row, col), fitted by Mattes mutual
    information with SimpleITK; and the final metric value (negative MI)."""
    import SimpleITK as sitk

    f_img = sitk.GetImageFromArray(fixed.astype(np.float32))
    m_img = sitk.GetImageFromArray(moving.astype(np.float32))
    tx = sitk.AffineTransform(2)
    # SimpleITK's points are (x, y) = (col, row); rotate about HIGH's centre so that the
    # translation and the linear part are not coupled in the optimiser.
    h, w = fixed.shape
    tx.SetCenter(((w - 1) / 2.0, (h - 1) / 2.0))
    tx.SetTranslation((shift[1], shift[0]))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.3, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=300,
        gradientMagnitudeTolerance=1e-8)
    # One pixel of shift and a 1/radius change of the matrix move the image equally far.
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.5])
    reg.SetInitialTransform(tx, inPlace=True)
    # One thread: ITK adds up the metric over threads in an order that varies from run to
    # run, and the same pair must give the same transform (measured: the fit differs in the
    # 7th digit otherwise; the method's own SetNumberOfThreads does not reach the metric).
    # The default is process-wide, so it is put back.
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        reg.Execute(f_img, m_img)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    mxy = np.array(tx.GetMatrix(), dtype=np.float64).reshape(2, 2)
    cxy = np.array(tx.GetCenter(), dtype=np.float64)
    txy = np.array(tx.GetTranslation(), dtype=np.float64)
    bxy = cxy + txy - mxy @ cxy               # x' = M x + (c + t − M c)
    # (x, y) -> (row, col): swap both axes of the matrix and the vector.
    a = mxy[::-1, ::-1].copy()
    b = bxy[::-1].copy()
    return a, b, float(reg.GetMetricValue())


def _affine_map(a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    return np.stack([a[0, 0] * yy + a[0, 1] * xx + b[0], a[1, 0] * yy + a[1, 1] * xx + b[1]])


# ---- step 4: local block-wise shift maps -----------------------------------------------------

@dataclass
class BlockMatches:
    """Block-wise NCC matches: for block k at `centres[k]` the correlation surface around its
    peak is the quadratic c − ½ (d − m)ᵀ H (d − m) + gᵀ(d − m), d the shift with
    moving(p + d) ≈ fixed(p), m = `offsets[k]` the integer peak. The curvature H says how
    well each direction is pinned down: along a fibre it is ~0 (the aperture problem), so
    shifts are combined weighted by H, never as bare vectors."""

    centres: np.ndarray   # (K, 2) block centres (row, col)
    offsets: np.ndarray   # (K, 2) integer peak
    grads: np.ndarray     # (K, 2) g
    hessians: np.ndarray  # (K, 2, 2) H, positive semi-definite
    peaks: np.ndarray     # (K,) peak NCC
    tried: int            # blocks with structure that were matched

    def shifts(self) -> np.ndarray:
        """Sub-pixel peak m + H⁻¹ g of each block (only meaningful where H is well
        conditioned: see `well_defined`)."""
        out = self.offsets.astype(np.float64).copy()
        for k in range(len(out)):
            h = self.hessians[k]
            if np.linalg.det(h) > 1e-12:
                out[k] += np.clip(np.linalg.solve(h, self.grads[k]), -1.0, 1.0)
        return out

    def well_defined(self, ratio: float = 0.1) -> np.ndarray:
        """Blocks whose peak is pinned in both directions: smaller curvature at least
        `ratio` of the larger."""
        ev = np.linalg.eigvalsh(self.hessians) if len(self.hessians) else np.zeros((0, 2))
        return ev[:, 0] >= ratio * np.maximum(ev[:, 1], 1e-12)

    def select(self, keep: np.ndarray) -> BlockMatches:
        return BlockMatches(self.centres[keep], self.offsets[keep], self.grads[keep],
                            self.hessians[keep], self.peaks[keep], self.tried)


# Least-squares quadratic through the 3×3 neighbourhood of the peak: rows are
# [1, y, x, y², xy, x²] at the 9 offsets; the pseudo-inverse maps the 9 values to coefficients.
_YY, _XX = (a.ravel().astype(np.float64) for a in np.mgrid[-1:2, -1:2])
_QUAD = np.linalg.pinv(np.stack([np.ones(9), _YY, _XX, _YY ** 2, _YY * _XX, _XX ** 2], axis=1))


def block_shifts(fixed: np.ndarray, moving: np.ndarray, valid: np.ndarray, block: int,
                 radius: int, step: int | None = None) -> BlockMatches:
    """Match `fixed`'s blocks (every `step` px) in `moving` by normalised cross-correlation
    within ±`radius` px; a quadratic through the 3×3 around each peak gives its sub-pixel
    position and curvature (`BlockMatches`).

    Only blocks whose search window lies inside `valid` and whose peak is inside the search
    range are kept. Flat blocks (background) are not tried: their peak is noise.
    """
    import cv2

    step = step or max(block // 2, 1)
    h, w = fixed.shape
    fixed32, moving32 = fixed.astype(np.float32), moving.astype(np.float32)
    # A block has structure when its spread is a fair part of the image's: the threshold is
    # relative, so the test does not depend on the intensity scale.
    spread = float(np.percentile(fixed32, 99) - np.percentile(fixed32, 1)) or 1.0
    centres, offsets, grads, hessians, peaks = [], [], [], [], []
    tried = 0
    for y0 in range(radius, h - block - radius + 1, step):
        for x0 in range(radius, w - block - radius + 1, step):
            ys = slice(y0 - radius, y0 + block + radius)
            xs = slice(x0 - radius, x0 + block + radius)
            if not valid[ys, xs].all():
                continue
            tpl = fixed32[y0:y0 + block, x0:x0 + block]
            if float(tpl.std()) < 0.05 * spread:
                continue
            tried += 1
            win = moving32[ys, xs]
            if float(win.std()) <= 0:
                continue
            res = cv2.matchTemplate(win, tpl, cv2.TM_CCOEFF_NORMED)
            iy, ix = np.unravel_index(int(np.argmax(res)), res.shape)
            if not (0 < iy < res.shape[0] - 1 and 0 < ix < res.shape[1] - 1):
                continue  # at the edge of the search range: the true peak may lie beyond
            _, by, bx, cyy, cxy, cxx = _QUAD @ res[iy - 1:iy + 2, ix - 1:ix + 2].ravel()
            hess = -np.array([[2 * cyy, cxy], [cxy, 2 * cxx]])
            ev, vec = np.linalg.eigh(hess)
            hess = (vec * np.clip(ev, 0.0, None)) @ vec.T  # a saddle pins nothing there
            centres.append((y0 + (block - 1) / 2.0, x0 + (block - 1) / 2.0))
            offsets.append((iy - radius, ix - radius))
            grads.append((by, bx))
            hessians.append(hess)
            peaks.append(float(res[iy, ix]))
    return BlockMatches(np.array(centres, np.float64).reshape(-1, 2),
                        np.array(offsets, np.float64).reshape(-1, 2),
                        np.array(grads, np.float64).reshape(-1, 2),
                        np.array(hessians, np.float64).reshape(-1, 2, 2),
                        np.array(peaks, np.float64), tried)


GRID_PX = 16  # spacing of the shift field's nodes


def _bilinear(points: np.ndarray, gy: int, gx: int, spacing: float) -> Any:
    """Sparse (K, gy·gx) matrix: bilinear interpolation of node values at `points` (row, col)."""
    from scipy import sparse

    fy = np.clip(points[:, 0] / spacing, 0, gy - 1 - 1e-9)
    fx = np.clip(points[:, 1] / spacing, 0, gx - 1 - 1e-9)
    iy, ix = np.floor(fy).astype(int), np.floor(fx).astype(int)
    ty, tx = fy - iy, fx - ix
    rows = np.repeat(np.arange(len(points)), 4)
    cols = np.stack([iy * gx + ix, (iy + 1) * gx + ix, iy * gx + ix + 1,
                     (iy + 1) * gx + ix + 1], 1).ravel()
    vals = np.stack([(1 - ty) * (1 - tx), ty * (1 - tx), (1 - ty) * tx, ty * tx], 1).ravel()
    return sparse.csr_matrix((vals, (rows, cols)), shape=(len(points), gy * gx))


def _bending(gy: int, gx: int) -> Any:
    """Sparse operator whose squared norm is the discrete bending energy of a node field
    (second differences along rows, columns and the mixed one)."""
    from scipy import sparse

    def second(n: int) -> Any:
        return sparse.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(max(n - 2, 0), n))

    def first(n: int) -> Any:
        return sparse.diags([-1.0, 1.0], [0, 1], shape=(max(n - 1, 0), n))

    iy, ix = sparse.identity(gy), sparse.identity(gx)
    return sparse.vstack([sparse.kron(second(gy), ix), sparse.kron(iy, second(gx)),
                          np.sqrt(2.0) * sparse.kron(first(gy), first(gx))]).tocsr()


def _fit_field(m: BlockMatches, prior: np.ndarray, shape: tuple[int, int],
               smoothness: float, tether: float) -> np.ndarray:
    """The correction field u (2, H, W) on top of the affine map, from block matches that
    were measured with `prior` (the current u) applied: block k says u(c_k) ≈ prior(c_k) + d_k.

    u has nodes every `GRID_PX` px (bilinear between them) and minimises
    Σ_k (u(c_k) − t_k)ᵀ H_k (u(c_k) − t_k) + λ·bending energy + τ·|u|², then two Cauchy
    reweighting rounds so that a block matched on the wrong structure cannot pull the field.

    The curvature weighting lets a fibre pin only the shift across it. Where there is no
    structure the field is a guess: the bending energy continues the measured field smoothly
    near it, and the small tether τ lets it fall back, over ~(λ/τ)^¼ nodes, onto the global
    affine fit — which all the structure in the image voted for — rather than extrapolating a
    local gradient across a blank region.
    """
    from scipy import sparse
    from scipy.sparse.linalg import spsolve

    gy = math.ceil((shape[0] - 1) / GRID_PX) + 1
    gx = math.ceil((shape[1] - 1) / GRID_PX) + 1
    a = _bilinear(m.centres, gy, gx, GRID_PX)
    # Block curvatures on a common scale: λ and τ then mean the same for any image contrast.
    scale = float(np.median(np.trace(m.hessians, axis1=1, axis2=2))) / 2.0 or 1.0
    hess = m.hessians / scale
    u0 = np.stack([ndi.map_coordinates(prior[c], m.centres.T, order=1, mode="nearest")
                   for c in range(2)], 1)
    # H t_k = H (u0 + m_k) + g: formed without inverting a single block's (maybe singular) H.
    ht = np.einsum("kij,kj->ki", hess, u0 + m.offsets) + m.grads / scale
    t_k = np.einsum("kij,kj->ki", np.linalg.pinv(hess, hermitian=True), ht)
    b = _bending(gy, gx)
    reg = (smoothness * sparse.block_diag([b.T @ b, b.T @ b])
           + max(tether, 1e-9) * sparse.identity(2 * gy * gx))
    w = np.ones(len(m.peaks))
    nodes = np.zeros((2, gy * gx))
    for _ in range(3):
        def blk(i: int, j: int, w: np.ndarray = w) -> Any:
            return a.T @ sparse.diags(w * hess[:, i, j]) @ a
        q = sparse.bmat([[blk(0, 0), blk(0, 1)], [blk(1, 0), blk(1, 1)]])
        rhs = np.concatenate([a.T @ (w * ht[:, 0]), a.T @ (w * ht[:, 1])])
        nodes = spsolve((q + reg).tocsc(), rhs).reshape(2, gy * gx)
        r = np.stack([a @ nodes[0], a @ nodes[1]], 1) - t_k
        r2 = np.einsum("ki,kij,kj->k", r, hess, r)
        c2 = max(9.0 * float(np.median(r2)), 0.05)  # Cauchy scale: 3× the typical misfit
        w = 1.0 / (1.0 + r2 / c2)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    coords = np.stack([yy / GRID_PX, xx / GRID_PX])
    return np.stack([ndi.map_coordinates(nodes[c].reshape(gy, gx), coords, order=1,
                                         mode="nearest") for c in range(2)])


def _sample(img: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndi.map_coordinates(img, coords, order=3, mode="nearest").astype(np.float32)


def _valid(coords: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return ((coords[0] >= 0) & (coords[0] <= shape[0] - 1)
            & (coords[1] >= 0) & (coords[1] <= shape[1] - 1))


def _match_histogram(src: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """`src` mapped monotonically onto `ref`'s intensity distribution over `valid` (quantile
    matching): a monotonic contrast difference between the modalities (a gamma, an offset)
    is undone, so it cannot bias the correlation peaks."""
    qs = np.linspace(0.0, 100.0, 257)
    xp = np.maximum.accumulate(np.percentile(src[valid], qs))
    fp = np.percentile(ref[valid], qs)
    return np.interp(src, xp, fp).astype(np.float32)


_BLURS = np.arange(-4.0, 4.01, 0.5)  # px; > 0 blurs HIGH, < 0 blurs LOW


def _relative_blur(fixed: np.ndarray, warped: np.ndarray, valid: np.ndarray) -> float:
    """The Gaussian blur (px) that makes the sharper image look like the other: > 0 blurs
    HIGH, < 0 blurs LOW. The one that maximises the NCC after histogram matching, on a grid
    and then a parabola through the best three.

    Why: a sharp block correlated with a blurred, contrast-compressed one peaks off its true
    position wherever the structure in it is lopsided (measured on the acceptance check's
    pairs at the true map: the fitted shift field scatters by 0.3 px without this, by
    0.02–0.05 px with it)."""
    def score(s: float) -> float:
        f = ndi.gaussian_filter(fixed, s) if s > 0 else fixed
        w = ndi.gaussian_filter(warped, -s) if s < 0 else warped
        v = ncc(f, _match_histogram(w, f, valid), valid)
        return -1.0 if math.isnan(v) else v

    scores = np.array([score(float(s)) for s in _BLURS])
    i = int(np.argmax(scores))
    if 0 < i < len(_BLURS) - 1:
        step = float(_BLURS[1] - _BLURS[0])
        return float(_BLURS[i]) + step * _parabola(scores[i - 1], scores[i], scores[i + 1])
    return float(_BLURS[i])


def _parabola(lo: float, mid: float, hi: float) -> float:
    """Offset (in samples, within ±0.5) of the vertex of the parabola through three points."""
    den = lo - 2.0 * mid + hi
    return float(np.clip(0.5 * (lo - hi) / den, -0.5, 0.5)) if den < 0 else 0.0


@dataclass
class _Equalised:
    """HIGH and LOW brought to one resolution (the blurrier one's); LOW's contrast is matched
    to HIGH's after each warp (`warp`)."""

    fixed: np.ndarray
    moving: np.ndarray
    blur: float

    @classmethod
    def of(cls, fixed: np.ndarray, moving: np.ndarray, phi: np.ndarray) -> _Equalised:
        blur = _relative_blur(fixed, _sample(moving, phi), _valid(phi, moving.shape))
        return cls(ndi.gaussian_filter(fixed, blur) if blur > 0 else fixed,
                   ndi.gaussian_filter(moving, -blur) if blur < 0 else moving, blur)

    def warp(self, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        valid = _valid(phi, self.moving.shape)
        return _match_histogram(_sample(self.moving, phi), self.fixed, valid), valid


def _refine(fixed: np.ndarray, moving: np.ndarray, a: np.ndarray, b: np.ndarray,
            opts: RegistrationOptions) -> tuple[np.ndarray, _Equalised, int]:
    """Step 4: the map p -> A·(p + u(p)) + b, u the correction field fitted to block-wise
    shift maps, coarse blocks to fine, on the equalised pair (re-estimated at each level, as
    the alignment that estimate depends on improves). Each pass warps LOW by the current map,
    so the shifts it measures shrink towards zero, where the quadratic peak fit's sub-pixel
    bias vanishes as well."""
    shape = (fixed.shape[0], fixed.shape[1])
    grid = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)

    def mapping(u: np.ndarray) -> np.ndarray:
        q = grid + u
        return np.einsum("ij,jyx->iyx", a, q) + b[:, None, None]

    u = np.zeros((2, *shape))
    phi = mapping(u)
    passes = 0
    eq = _Equalised.of(fixed, moving, phi)
    for level, (block, radius) in enumerate(opts.pyramid):
        step = max(block // 2, 1)
        if min(shape) < block + 2 * radius + 1:
            continue
        if level:
            eq = _Equalised.of(fixed, moving, phi)
        for _ in range(opts.iterations):
            warped, valid = eq.warp(phi)
            m = block_shifts(eq.fixed, warped, valid, block, radius, step)
            m = m.select(m.peaks >= opts.min_block_ncc)
            if len(m.peaks) < 4:
                break
            new_u = _fit_field(m, u, shape, opts.smoothness, opts.tether)
            change = float(np.abs(new_u - u).max())
            u, phi = new_u, mapping(new_u)
            passes += 1
            if change < 0.01:
                break
    return phi, eq, passes


# ---- the whole pair ----------------------------------------------------------------------

def project_planes(img: np.ndarray) -> np.ndarray:
    """The 2-D image registration works on: the image itself, or the mean over the planes of
    a stack (…, Y, X) — one transform for every plane."""
    img = np.asarray(img, dtype=np.float32)
    return img if img.ndim == 2 else img.reshape(-1, *img.shape[-2:]).mean(axis=0)


def register(low: np.ndarray, high: np.ndarray, low_um: float, high_um: float,
             options: RegistrationOptions | None = None) -> Registration:
    """Register LOW onto HIGH (both (…, Y, X); stacks registered on their mean over planes).

    `low_um` and `high_um` are the pixel sizes. Raises ValueError on images too small to
    register; a pair that does not match is returned with status "rejected" and its reason.
    """
    opts = options or RegistrationOptions()
    if low_um <= 0 or high_um <= 0 or not (math.isfinite(low_um) and math.isfinite(high_um)):
        raise ValueError(f"pixel sizes must be positive, got LOW {low_um} µm, HIGH {high_um} µm")
    low2, high2 = project_planes(low), project_planes(high)
    if min(high2.shape) < 32 or min(low2.shape) * low_um / high_um < 32:
        raise ValueError(f"images too small to register (LOW {low2.shape} at {low_um} µm, "
                         f"HIGH {high2.shape} at {high_um} µm; at least 32 px a side on HIGH's "
                         "pixel size)")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    fixed = _normalise(high2)
    moving = _normalise(to_high_pixels(low2, low_um, high_um))
    shape = (fixed.shape[0], fixed.shape[1])
    ident = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    inside = _valid(ident, moving.shape)
    ncc_before = ncc(fixed, _sample(moving, ident), inside)
    times["scale_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    shift, ncc_coarse = _coarse_shift(fixed, moving, opts.search_overlap)
    times["coarse_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    a, b, mi = _affine_mi(fixed, moving, shift, opts.seed)
    phi_affine = _affine_map(a, b, shape)
    phi_shift = ident + np.array(shift)[:, None, None]

    def score(phi: np.ndarray) -> float:
        v = ncc(fixed, _sample(moving, phi), _valid(phi, moving.shape))
        return -1.0 if math.isnan(v) else v

    # Mutual information can run off on a pair that does not match (or a flat one): keep the
    # coarse placement when the affine fit correlates worse than it.
    affine_ok = score(phi_affine) >= score(phi_shift) - 0.02
    if not affine_ok:
        a, b = np.eye(2), np.array(shift, dtype=np.float64)
    times["affine_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    phi, eq, passes = _refine(fixed, moving, a, b, opts)
    times["local_s"] = time.perf_counter() - t0

    warped = _sample(moving, phi)
    valid = _valid(phi, moving.shape)
    ncc_after = ncc(fixed, warped, valid)
    # Residual: what block-wise matching on the finest blocks still finds after registration.
    block, radius = opts.pyramid[-1]
    # on the equalised pair: the residual should measure misalignment, not the modalities.
    m = block_shifts(eq.fixed, eq.warp(phi)[0], valid, block, radius, max(block // 2, 1))
    tried = m.tried
    matched = m.peaks >= opts.min_block_ncc
    # Only blocks whose peak is pinned in both directions measure a residual: along a fibre
    # any shift correlates equally well.
    pinned = m.select(matched & m.well_defined())
    # Where the transform was measured: the blocks that matched. Elsewhere (blank regions)
    # it is the smooth continuation of the measured field.
    support = np.zeros(shape, bool)
    for cy, cx in m.centres[matched]:
        y0, x0 = round(cy - (block - 1) / 2.0), round(cx - (block - 1) / 2.0)
        support[y0:y0 + block, x0:x0 + block] = True
    mag = np.hypot(*pinned.shifts().T) if len(pinned.peaks) else np.array([])
    res_med = float(np.median(mag)) if mag.size else float("nan")
    res_p95 = float(np.percentile(mag, 95)) if mag.size else float("nan")
    n_matched = int(matched.sum())
    frac = n_matched / tried if tried else 0.0

    transform = np.stack([scale_map(phi[0], low_um, high_um),
                          scale_map(phi[1], low_um, high_um)]).astype(np.float32)
    low_on_high, mask = resample_low(np.asarray(low, np.float32), transform, low_um, high_um)

    status, reason = "registered", "ok"
    if not mask.any():
        status, reason = "rejected", "no overlap between the fields"
    elif not ncc_after >= opts.min_ncc:  # also nan
        status, reason = "rejected", (f"NCC too low: {ncc_after:.3f} after registration "
                                      f"(< {opts.min_ncc:g}); the fields do not match")
    elif tried == 0:
        status, reason = "rejected", ("nothing to register on: no block of HIGH inside the "
                                      "overlap has contrast")
    elif frac < opts.min_block_fraction:
        status, reason = "rejected", (
            f"NCC too low: only {n_matched} of {tried} blocks with structure correlate ≥ "
            f"{opts.min_block_ncc:g} after registration (< {opts.min_block_fraction:.0%}); "
            "the fields do not match")
    elif float(mask.mean()) < opts.min_coverage:
        status, reason = "rejected", (
            f"LOW covers only {mask.mean():.0%} of HIGH's field after registration "
            f"(< {opts.min_coverage:.0%}): not the same field of view")
    elif res_p95 > opts.max_residual_p95:  # nan (no block pinned both ways) is no verdict
        status, reason = "rejected", (f"residual shift p95 {res_p95:.2f} px > "
                                      f"{opts.max_residual_p95:g} px after registration")
    stats: dict[str, Any] = {
        "ncc_coarse": ncc_coarse, "coarse_shift_px": list(shift),
        # HIGH (row, col) -> LOW-at-HIGH-pixel-size (row, col): p' = A p + b
        "affine": {"A": a.tolist(), "b": b.tolist(), "mutual_information": -mi,
                   "used": bool(affine_ok)},
        "local_passes": passes, "relative_blur_px": eq.blur,
        "blocks_matched": n_matched, "blocks_tried": int(tried),
        "blocks_for_residual": len(pinned.peaks),
        "overlap_fraction": float(mask.mean()),
        "measured_fraction": float(support.mean()), "seconds": times,
    }
    return Registration(transform=transform, mask=mask, low_on_high=low_on_high, status=status,
                        reason=reason, ncc_before=ncc_before, ncc_after=ncc_after,
                        residual_median_px=res_med, residual_p95_px=res_p95, support=support,
                        stats=stats)
