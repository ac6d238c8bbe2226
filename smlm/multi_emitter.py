"""Multi-emitter refit: emitters that a single-emitter fit merged into one localization.

At tens of emitters per frame, two emitters within a couple of PSF widths of each other are
fitted by the library as one emitter, wider than the PSF and between them: on simulated
filaments at 30 per frame that left 14 % of matched localizations beyond 5× their Cramér–Rao
bound and the RMSE at 3.9× the bound, while isolated emitters sat at the bound
(`results/smlm.md`). This pass, run on each block after the library's fits, refits those
places with several emitters, as ThunderSTORM's multi-emitter analysis (Ovesný et al. 2014)
and DAOSTORM do:

1. **Groups.** Localizations of one frame closer than `group_nm` to each other (connected
   components). A group is refitted when any member's fitted PSF width is off the
   configured PSF width by more than `width_tolerance` (a merged pair fits wider; a single
   emitter fits the PSF), and it has at most `max_group` members.
2. **Joint fit.** The group's emitters, each a pixel-integrated Gaussian of the configured
   PSF width, plus one background, by Poisson maximum
   likelihood — Levenberg–Marquardt on the Fisher-scoring step — in a box around the group
   (± 3 PSF widths). The read-noise variance is added to data and model, as smappy does;
   pixels off the camera are left out of the likelihood.
3. **More emitters.** One emitter is added at the peak of the smoothed residual and kept when
   the deviance falls by more than `min_deviance_drop` and it has at least `min_photons`;
   repeated up to `max_added` times.
4. **The rim.** An emitter fitted within a pixel of the box's edge (where the edge is not the
   camera's) is modelling a neighbour outside the box, and is not reported; nor is one
   fitted beyond the camera's edge.

Every refitted localization gets its precision from the inverse Fisher information of the
joint fit, the PSF width it used as `sigma_nm`, and `emitters_in_fit` (the number of
emitters in the fit that placed it; 0 for the library's own fits, which keep their columns).
A block whose fitted widths say the PSF is not the configured one (their lower quartile
outside 0.92–1.04 of it) is left as the library fitted it (a wrong width would split lone
emitters), and counted. The fits are
vectorised with NumPy over all the groups of a block that have the same number of emitters;
a group's result does not depend on the groups batched with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi
from scipy.special import erf

from .block import LocBlock

F64 = npt.NDArray[np.float64]

_SQRT2 = math.sqrt(2.0)
_SQRTPI = math.sqrt(math.pi)


class MultiEmitterSettings(BaseModel):
    """When and how overlapping localizations are refitted together."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width_tolerance: float = Field(
        0.05, gt=0, description="refit a group when a member's fitted PSF width is off the "
                                "configured width by more than this fraction")
    group_nm: float = Field(700.0, gt=0, description="localizations of one frame this close "
                                                     "form a group")
    max_group: int = Field(8, ge=1, description="larger groups are left as the library fitted "
                                                "them")
    max_added: int = Field(3, ge=0, description="most emitters added to a group")
    min_deviance_drop: float = Field(
        25.0, gt=0, description="an added emitter must lower the deviance by this much (3 more "
                                "parameters: χ²₃ exceeds 25 with p ≈ 2·10⁻⁵; the search for "
                                "its place makes chance drops larger than that)")
    min_photons: float = Field(500.0, ge=0, description="an added emitter needs this many "
                                                        "photons")
    iterations: int = Field(20, ge=1, description="most Levenberg–Marquardt steps per fit")


@dataclass
class _Fits:
    """One batch of joint fits: B groups of k emitters each."""

    boxes: F64        # (B, S, S) photo-electrons (0 off the camera)
    weights: F64      # (B, S, S) 1 on the camera and inside the group's box, else 0
    rows: F64         # (B, S) camera row of each box row
    cols: F64         # (B, S)
    theta: F64        # (B, 3k + 1): y, x, photons per emitter (camera pixels), background
    deviance: F64     # (B,)
    fisher: F64       # (B, 3k + 1, 3k + 1) at theta
    improved: npt.NDArray[np.bool_]  # (B,) at least one step was taken

    def select(self, keep: npt.NDArray[np.bool_]) -> _Fits:
        return _Fits(self.boxes[keep], self.weights[keep], self.rows[keep], self.cols[keep],
                     self.theta[keep], self.deviance[keep], self.fisher[keep],
                     self.improved[keep])


def _model(theta: F64, rows: F64, cols: F64, sigma: float, with_jacobian: bool
           ) -> tuple[F64, F64 | None]:
    """Expected counts (B, S, S) and, when asked, their Jacobian (B, P, S, S)."""
    k = (theta.shape[1] - 1) // 3
    y, x, n, bg = theta[:, 0:3 * k:3], theta[:, 1:3 * k:3], theta[:, 2:3 * k:3], theta[:, -1]
    c = 1.0 / (_SQRT2 * sigma)
    # pixel j covers [j - ½, j + ½]; the Gaussian's integral over it, per axis: (B, k, S)
    ay_hi, ay_lo = (rows[:, None, :] + 0.5 - y[:, :, None]) * c, (
        rows[:, None, :] - 0.5 - y[:, :, None]) * c
    ax_hi, ax_lo = (cols[:, None, :] + 0.5 - x[:, :, None]) * c, (
        cols[:, None, :] - 0.5 - x[:, :, None]) * c
    ey = 0.5 * (erf(ay_hi) - erf(ay_lo))
    ex = 0.5 * (erf(ax_hi) - erf(ax_lo))
    spots = ey[:, :, :, None] * ex[:, :, None, :]  # (B, k, S, S)
    mu = bg[:, None, None] + (n[:, :, None, None] * spots).sum(axis=1)
    if not with_jacobian:
        return mu, None
    dey = -(c / _SQRTPI) * (np.exp(-ay_hi ** 2) - np.exp(-ay_lo ** 2))
    dex = -(c / _SQRTPI) * (np.exp(-ax_hi ** 2) - np.exp(-ax_lo ** 2))
    b, s = rows.shape
    jac = np.empty((b, 3 * k + 1, s, s))
    jac[:, 0:3 * k:3] = n[:, :, None, None] * dey[:, :, :, None] * ex[:, :, None, :]
    jac[:, 1:3 * k:3] = n[:, :, None, None] * ey[:, :, :, None] * dex[:, :, None, :]
    jac[:, 2:3 * k:3] = spots
    jac[:, -1] = 1.0
    return mu, jac


def _lm_fit(boxes: F64, weights: F64, rows: F64, cols: F64, theta0: F64, sigma: float,
            read_var: float, iterations: int) -> _Fits:
    """Poisson maximum likelihood of k emitters + background in each box, all boxes at once.

    The read-noise variance is added to data and model (the Gaussian read noise becomes a
    Poisson term of the same variance, as smappy does). A fit stops when a step raises its
    log-likelihood by less than 10⁻³."""
    b, s, _ = boxes.shape
    data = np.maximum(boxes + read_var, 0.0).reshape(b, s * s)
    wts = weights.reshape(b, s * s)
    theta = theta0.copy()
    k = (theta.shape[1] - 1) // 3
    p = 3 * k + 1
    lo = np.empty_like(theta)
    hi = np.empty_like(theta)
    # positions stay within a pixel of the box (its own extent, not the batch's padding)
    last_row = rows[np.arange(b), np.maximum(weights.any(axis=2).sum(axis=1) - 1, 0)]
    last_col = cols[np.arange(b), np.maximum(weights.any(axis=1).sum(axis=1) - 1, 0)]
    lo[:, 0:3 * k:3], hi[:, 0:3 * k:3] = rows[:, :1] - 1.0, last_row[:, None] + 1.0
    lo[:, 1:3 * k:3], hi[:, 1:3 * k:3] = cols[:, :1] - 1.0, last_col[:, None] + 1.0
    lo[:, 2:3 * k:3], hi[:, 2:3 * k:3] = 1.0, np.inf
    lo[:, -1], hi[:, -1] = 1e-3, np.inf
    theta = np.clip(theta, lo, hi)

    def evaluate(t: F64, r: F64, c: F64) -> tuple[F64, F64]:
        mu, jac = _model(t, r, c, sigma, True)
        assert jac is not None
        return mu.reshape(len(t), s * s) + read_var, jac.reshape(len(t), p, s * s)

    mu, jac = evaluate(theta, rows, cols)
    ll = np.sum(wts * (data * np.log(mu) - mu), axis=1)
    lam = np.full(b, 1e-3)
    improved = np.zeros(b, bool)
    active = np.arange(b)
    eye = np.eye(p)[None]
    for _ in range(iterations):
        if len(active) == 0:
            break
        a = active
        mu_a, jac_a, w_a = mu[a], jac[a], wts[a]
        grad = (jac_a @ (w_a * (data[a] / mu_a - 1.0))[:, :, None])[:, :, 0]
        scaled = jac_a * np.sqrt(w_a / mu_a)[:, None, :]
        fisher = scaled @ scaled.transpose(0, 2, 1)
        diag = np.diagonal(fisher, axis1=1, axis2=2)[:, :, None]
        damped = fisher + lam[a, None, None] * (eye * diag + 1e-9 * eye)
        try:
            step = np.linalg.solve(damped, grad[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:  # one singular system must not fail the batch
            step = (np.linalg.pinv(damped) @ grad[:, :, None])[:, :, 0]
        trial = np.clip(theta[a] + step, lo[a], hi[a])
        mu_t = _model(trial, rows[a], cols[a], sigma, False)[0].reshape(len(a), s * s) + read_var
        ll_t = np.sum(w_a * (data[a] * np.log(mu_t) - mu_t), axis=1)
        gain = ll_t - ll[a]
        better = gain > 0
        idx = a[better]
        if len(idx):
            improved[idx] = True
            # the Jacobian only where the step was taken
            mu[idx], jac[idx] = evaluate(trial[better], rows[idx], cols[idx])
            theta[idx], ll[idx] = trial[better], ll_t[better]
        lam[a] = np.where(better, np.maximum(lam[a] / 10.0, 1e-7),
                          np.minimum(lam[a] * 10.0, 1e7))
        # done: an accepted step that gained almost nothing, or no step found at any damping
        done = (better & (gain < 1e-3)) | (lam[a] >= 1e5)
        active = a[~done]
    scaled = jac * np.sqrt(wts / mu)[:, None, :]
    fisher = scaled @ scaled.transpose(0, 2, 1)
    term = np.where(data > 0, data * np.log(np.maximum(data, 1e-12) / mu), 0.0) - (data - mu)
    deviance = 2.0 * np.sum(wts * term, axis=1)
    return _Fits(boxes, weights, rows, cols, theta, deviance, fisher, improved)


@dataclass
class _Group:
    frame: int
    members: npt.NDArray[np.intp]   # rows of the block
    r0: int                         # box on the camera: rows [r0, r1), cols [c0, c1)
    r1: int
    c0: int
    c1: int
    theta: F64 | None = None        # the accepted fit
    fisher: F64 | None = None


def _groups(block: LocBlock, radius_nm: float) -> list[npt.NDArray[np.intp]]:
    """Connected components of localizations of one frame within `radius_nm`."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    frame = block.frame
    x, y = block.x_nm.astype(np.float64), block.y_nm.astype(np.float64)
    order = np.argsort(frame, kind="stable")
    _, start = np.unique(frame[order], return_index=True)
    stop = np.append(start[1:], len(order))
    a: list[npt.NDArray[np.intp]] = []
    b: list[npt.NDArray[np.intp]] = []
    for s, e in zip(start, stop, strict=True):
        idx = order[s:e]
        if len(idx) > 1:
            pairs = cKDTree(np.c_[x[idx], y[idx]]).query_pairs(radius_nm, output_type="ndarray")
            a.append(idx[pairs[:, 0]])
            b.append(idx[pairs[:, 1]])
    n = len(frame)
    ia = np.concatenate(a) if a else np.zeros(0, np.intp)
    ib = np.concatenate(b) if b else np.zeros(0, np.intp)
    graph = coo_matrix((np.ones(len(ia)), (ia, ib)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    order = np.argsort(label, kind="stable")
    _, first = np.unique(label[order], return_index=True)
    return [np.asarray(g, np.intp) for g in np.split(order, first[1:])]


def refit_overlaps(block: LocBlock, photons: npt.NDArray[np.float32], pixel_nm: float,
                   psf_sigma_nm: float, read_noise_e: float,
                   settings: MultiEmitterSettings) -> tuple[LocBlock, dict[str, int]]:
    """`block` with its merged localizations refitted as several emitters.

    `photons` are the block's frames (frame_start… on axis 0) in photo-electrons, on the
    camera's grid; positions follow `dimscope.smlm` (pixel j's centre at (j + ½)·pixel).
    Returns the new block (rows sorted by frame) and counters: groups refitted, emitters
    added, emitters dropped at a box's rim or off the field, and whether the block's fitted
    widths disagree with `psf_sigma_nm` (then it is returned unrefitted).
    """
    counts = {"groups_refitted": 0, "emitters_added": 0, "dropped_at_rim": 0,
              "dropped_off_field": 0, "blocks_with_other_psf_width": 0}
    n = len(block)
    if n == 0:
        return block.with_columns(emitters_in_fit=np.zeros(0, np.int32)), counts
    width = np.asarray(block.columns.get("sigma_nm", np.full(n, psf_sigma_nm)), np.float64)
    good = np.isfinite(width) & (width > 0)
    # The configured PSF width, not this block's median fitted width: a block's result must
    # not depend on where blocks start (live pushes and a batch call give the same table).
    sigma_nm = psf_sigma_nm
    sigma = sigma_nm / pixel_nm
    off = ~good | (np.abs(width / sigma_nm - 1.0) > settings.width_tolerance)
    # The lower quartile of the fitted widths is the PSF's width as lone emitters show it
    # (merged ones only fit wider): 0.98 of the true width with smappy's fits here. Outside
    # [0.92, 1.04] of the configured width the PSF is not the configured one, and a refit
    # with the wrong width would split lone emitters (72 invented per 150 at a 12 % wider
    # PSF): the block is left as the library fitted it.
    quartile = float(np.percentile(width[good], 25)) / sigma_nm if good.sum() >= 20 else 1.0
    if not 0.92 <= quartile <= 1.04:
        counts["blocks_with_other_psf_width"] = 1
        return block.with_columns(emitters_in_fit=np.zeros(n, np.int32)), counts
    margin = math.ceil(3.0 * sigma)
    _, h, w = photons.shape
    yc = block.y_nm.astype(np.float64) / pixel_nm - 0.5  # pixel-centre coordinates
    xc = block.x_nm.astype(np.float64) / pixel_nm - 0.5
    groups: list[_Group] = []
    for members in _groups(block, settings.group_nm):
        if not off[members].any() or len(members) > settings.max_group:
            continue
        r0 = max(int(np.floor(yc[members].min())) - margin, 0)
        r1 = min(int(np.ceil(yc[members].max())) + margin + 1, h)
        c0 = max(int(np.floor(xc[members].min())) - margin, 0)
        c1 = min(int(np.ceil(xc[members].max())) + margin + 1, w)
        if r1 - r0 < 3 or c1 - c0 < 3:
            continue
        groups.append(_Group(int(block.frame[members[0]]) - block.frame_start, members,
                             r0, r1, c0, c1))
    if not groups:
        return block.with_columns(emitters_in_fit=np.zeros(n, np.int32)), counts
    counts["groups_refitted"] = len(groups)
    read_var = read_noise_e ** 2
    photons_col = np.asarray(block.columns["photons"], np.float64)
    bg_col = np.asarray(block.columns["background"], np.float64)

    # the group's own emitters, then up to max_added more; batched by emitter count
    start: dict[int, list[tuple[_Group, F64]]] = {}
    for g in groups:
        m = g.members
        ph = np.nan_to_num(photons_col[m], nan=100.0)
        bg = bg_col[m][np.isfinite(bg_col[m])]
        theta = np.concatenate([np.c_[yc[m], xc[m], np.maximum(ph, 10.0)].ravel(),
                                [max(float(np.median(bg)), 0.1) if bg.size else 1.0]])
        start.setdefault(len(m), []).append((g, theta))
    for items in start.values():
        pending = [g for g, _ in items]
        fits = _fit_batch(pending, np.stack([t for _, t in items]), photons, sigma, read_var,
                          settings.iterations)
        # a fit that never took a step or ended non-finite leaves the library's rows
        ok = fits.improved & np.isfinite(fits.theta).all(axis=1) & np.isfinite(fits.deviance)
        _accept(pending, fits, ok)
        counts["groups_refitted"] -= int((~ok).sum())
        pending = [g for g, keep in zip(pending, ok, strict=True) if keep]
        fits = fits.select(ok)
        for _ in range(settings.max_added):
            if not pending:
                break
            trial = _lm_fit(fits.boxes, fits.weights, fits.rows, fits.cols,
                            _add_at_residual_peak(fits, sigma), sigma, read_var,
                            settings.iterations)
            better = ((fits.deviance - trial.deviance > settings.min_deviance_drop)
                      & (trial.theta[:, -2] >= settings.min_photons)
                      & np.isfinite(trial.theta).all(axis=1))
            _accept(pending, trial, better)
            counts["emitters_added"] += int(better.sum())
            if not better.any():
                break
            # the next round tries one more emitter where this one was kept
            pending = [g for g, ok in zip(pending, better, strict=True) if ok]
            fits = trial.select(better)
    groups = [g for g in groups if g.theta is not None]
    return _assemble(block, groups, h, w, pixel_nm, sigma_nm, counts), counts


def _box(g: _Group, photons: npt.NDArray[np.float32], size: int) -> tuple[F64, F64, F64, F64]:
    """The group's box padded to `size`² (weights 0 where padded), rows and cols."""
    box = np.zeros((size, size))
    weights = np.zeros((size, size))
    hh, ww = g.r1 - g.r0, g.c1 - g.c0
    box[:hh, :ww] = photons[g.frame, g.r0:g.r1, g.c0:g.c1]
    weights[:hh, :ww] = 1.0
    rows = g.r0 + np.arange(size, dtype=np.float64)
    cols = g.c0 + np.arange(size, dtype=np.float64)
    return box, weights, rows, cols


def _fit_batch(groups: list[_Group], theta0: F64, photons: npt.NDArray[np.float32],
               sigma: float, read_var: float, iterations: int) -> _Fits:
    size = max(max(g.r1 - g.r0, g.c1 - g.c0) for g in groups)
    parts = [_box(g, photons, size) for g in groups]
    boxes, weights, rows, cols = (np.stack(p) for p in zip(*parts, strict=True))
    return _lm_fit(boxes, weights, rows, cols, theta0, sigma, read_var, iterations)


def _accept(groups: list[_Group], fits: _Fits, mask: npt.NDArray[np.bool_]) -> None:
    for g, theta, fisher, ok in zip(groups, fits.theta, fits.fisher, mask, strict=True):
        if ok:
            g.theta, g.fisher = theta, fisher


def _add_at_residual_peak(fits: _Fits, sigma: float) -> F64:
    """Each fit's parameters plus one emitter at the peak of its smoothed residual, started
    with the positive residual around that peak (5×5 px) as its photons."""
    mu, _ = _model(fits.theta, fits.rows, fits.cols, sigma, False)
    resid = (fits.boxes - mu) * fits.weights
    # zeros beyond each box (not reflection at the batch's padded edge): a group's result
    # must not depend on the other groups batched with it
    smooth = ndi.gaussian_filter(resid, (0.0, 1.0, 1.0), mode="constant")
    smooth = np.where(fits.weights > 0, smooth, -np.inf)
    b, size, _ = resid.shape
    peak = np.argmax(smooth.reshape(b, -1), axis=1)
    iy, ix = np.divmod(peak, size)
    near = ndi.uniform_filter(np.clip(resid, 0.0, None), (1, 5, 5), mode="constant") * 25.0
    start = np.maximum(near[np.arange(b), iy, ix], 100.0)
    added = np.c_[fits.rows[np.arange(b), iy], fits.cols[np.arange(b), ix], start]
    return np.concatenate([fits.theta[:, :-1], added, fits.theta[:, -1:]], axis=1)


def _assemble(block: LocBlock, groups: list[_Group], h: int, w: int, pixel_nm: float,
              sigma_nm: float, counts: dict[str, int]) -> LocBlock:
    """The block with each refitted group's rows replaced by its emitters."""
    n = len(block)
    keep = np.ones(n, bool)
    new: dict[str, list[Any]] = {name: [] for name in block.columns}
    new["emitters_in_fit"] = []
    for g in groups:
        assert g.theta is not None and g.fisher is not None
        keep[g.members] = False
        k = (len(g.theta) - 1) // 3
        try:
            cov = np.linalg.inv(g.fisher)
            var = np.diagonal(cov)
            err = np.sqrt(np.where(var > 0, var, np.nan))  # ill-conditioned: no precision
        except np.linalg.LinAlgError:
            err = np.full(len(g.theta), np.nan)
        for e in range(k):
            y, x, nph = g.theta[3 * e:3 * e + 3]
            at_rim = ((y < g.r0 + 0.5 and g.r0 > 0) or (y > g.r1 - 1.5 and g.r1 < h)
                      or (x < g.c0 + 0.5 and g.c0 > 0) or (x > g.c1 - 1.5 and g.c1 < w))
            if at_rim:
                counts["dropped_at_rim"] += 1
                continue
            if not (-0.5 <= y < h - 0.5 and -0.5 <= x < w - 0.5):
                counts["dropped_off_field"] += 1  # fitted beyond the camera's edge
                continue
            ey_, ex_ = err[3 * e] * pixel_nm, err[3 * e + 1] * pixel_nm
            values = {
                "frame": block.frame_start + g.frame,
                "x_nm": (x + 0.5) * pixel_nm, "y_nm": (y + 0.5) * pixel_nm,
                "photons": nph, "background": g.theta[-1],
                "precision_nm": math.sqrt((ey_ ** 2 + ex_ ** 2) / 2.0),
                "x_err_nm": ex_, "y_err_nm": ey_, "photons_err": err[3 * e + 2],
                "background_err": err[-1], "sigma_nm": sigma_nm,
                "log_likelihood": np.nan, "log_likelihood_per_pixel": np.nan,
                "iterations": 0, "emitters_in_fit": k,
            }
            for name in new:
                new[name].append(values.get(name, np.nan))
    kept = block.select(keep)
    columns = {name: np.concatenate([np.asarray(kept.columns[name]) if name in kept.columns
                                     else np.zeros(len(kept), np.int32),
                                     np.asarray(new[name], dtype=np.asarray(
                                         kept.columns[name]).dtype if name in kept.columns
                                         else np.int32)])
               for name in new}
    out = LocBlock(block.frame_start, block.frame_stop, columns)
    return out.select(np.argsort(out.frame, kind="stable"))
