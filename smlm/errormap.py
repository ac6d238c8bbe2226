"""Where a dense prediction disagrees with the widefield image (ANNA-PALM's error map, after
SQUIRREL, Culley et al. 2018).

The dense image (render grid) is taken to the camera grid through a forward model: a Gaussian
blur, its width **fitted to the data** (the widefield PSF is rarely the nominal one: the
simulator's is 15 % wider on purpose), summed into camera pixels, then an affine intensity fit
(scale and background) to the acquired widefield image. Two maps compare the two, on the
camera grid:

- `error_sigma`, the resolution-scaled error: the residual in units of the widefield image's
  own noise (Poisson–Gaussian from the camera calibration, divided by the frames averaged
  when the widefield image is the mean of raw frames), matched-filtered with the PSF and
  rescaled to unit variance for pure noise. A pixel is **flagged** when its |value| exceeds
  `flag_sigma` **and** the smoothed residual exceeds `relative_tolerance` of the local
  intensity (a widefield image averaged over many frames is so clean that, on noise alone,
  only a perfect model of the optics would pass). Flags are what `trust` reports;
- `dissimilarity`: 1 − local SSIM of the two, weighted by the widefield intensity
  (SQUIRREL's display map; it needs a high-SNR widefield image, which this is).

The limit, stated in every map's header: a widefield image cannot show errors finer than
the diffraction limit — two filaments 50 nm apart predicted as one, or a ring's radius off
by 20 nm, blur to the same widefield image. The map checks the prediction's coarse content
(a structure invented or missed), not its super-resolved detail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

LIMIT_NOTE = ("the widefield comparison cannot see errors below the diffraction limit: it "
              "checks what a structure blurs to, not its super-resolved detail")


@dataclass(frozen=True)
class ErrorMapSettings:
    #: the widefield PSF assumed before fitting (σ, nm), and the search range around it
    psf_sigma_nm: float = 130.0
    fit_range: tuple[float, float] = (0.6, 1.8)
    #: |resolution-scaled error| above this many noise σ flags a pixel
    flag_sigma: float = 5.0
    #: a residual below this share of the local (smoothed) widefield intensity never flags
    relative_tolerance: float = 0.25
    #: camera: ADU per photo-electron, offset ADU, read noise e⁻ (of one frame)
    gain_adu_per_e: float = 1.0
    offset_adu: float = 0.0
    read_noise_e: float = 0.0


@dataclass(frozen=True)
class ErrorMap:
    error_sigma: F32
    dissimilarity: F32
    flagged: npt.NDArray[np.bool_]
    #: the fitted forward model: PSF σ (nm), scale, background (ADU)
    psf_sigma_nm: float
    scale: float
    background: float
    predicted_widefield: F32

    @property
    def flagged_fraction(self) -> float:
        return float(self.flagged.mean())

    def summary(self) -> dict[str, float]:
        return {"flagged_fraction": round(self.flagged_fraction, 5),
                "max_error_sigma": round(float(np.abs(self.error_sigma).max()), 2),
                "mean_dissimilarity": round(float(self.dissimilarity.mean()), 4),
                "psf_sigma_nm": round(self.psf_sigma_nm, 1)}


def binned(image: npt.ArrayLike, render_pixel_nm: float, camera_pixel_nm: float,
           shape: tuple[int, int]) -> F64:
    """A render-grid image integrated over the pixels of a camera grid of `shape` (any ratio
    of pixel sizes: the render pixels are taken as constant patches and cut at the camera
    pixels' edges, through the image's integral)."""
    img = np.asarray(image, np.float64)
    integral = np.zeros((img.shape[0] + 1, img.shape[1] + 1))
    integral[1:, 1:] = img.cumsum(0).cumsum(1)
    step = camera_pixel_nm / render_pixel_nm
    rows = np.clip(np.arange(shape[0] + 1) * step, 0, img.shape[0])
    cols = np.clip(np.arange(shape[1] + 1) * step, 0, img.shape[1])

    def along(a: F64, edges: F64, axis: int) -> F64:
        """`a` (cumulative along `axis`) at fractional `edges`: linear between samples."""
        i = np.minimum(np.floor(edges).astype(np.int64), a.shape[axis] - 2)
        t = edges - i
        lo, hi = np.take(a, i, axis=axis), np.take(a, i + 1, axis=axis)
        shape_t = [1, 1]
        shape_t[axis] = len(t)
        return np.asarray(lo + (hi - lo) * t.reshape(shape_t), np.float64)

    at = along(along(integral, rows, 0), cols, 1)
    return np.asarray(at[1:, 1:] - at[:-1, 1:] - at[1:, :-1] + at[:-1, :-1], np.float64)


def forward(dense: npt.ArrayLike, render_pixel_nm: float, camera_pixel_nm: float,
            shape: tuple[int, int], sigma_nm: float) -> F64:
    """The dense image blurred by the PSF (on its fine grid), integrated over camera pixels."""
    blurred = gaussian_filter(np.asarray(dense, np.float64), sigma_nm / render_pixel_nm,
                              mode="constant")
    return binned(blurred, render_pixel_nm, camera_pixel_nm, shape)


def _affine(pred: F64, wf: F64, weight: F64) -> tuple[float, float, float]:
    """Weighted least squares wf ≈ a·pred + b; (a, b, weighted SSE)."""
    w = weight.ravel()
    x, y = pred.ravel(), wf.ravel()
    sw = w.sum()
    mx, my = (w @ x) / sw, (w @ y) / sw
    xc = x - mx
    var = float(w @ (xc * xc))
    a = float(w @ (xc * (y - my))) / var if var > 0 else 0.0
    b = float(my - a * mx)
    r = y - a * x - b
    return a, b, float(w @ (r * r))


def compute(dense: npt.ArrayLike, widefield: npt.ArrayLike, render_pixel_nm: float,
            camera_pixel_nm: float, settings: ErrorMapSettings, frames_averaged: int = 1
            ) -> ErrorMap:
    """The error map of a dense prediction against a widefield image (camera grid, ADU)."""
    wf = np.asarray(widefield, np.float64)
    if camera_pixel_nm < render_pixel_nm:
        raise ValueError(f"the render pixel ({render_pixel_nm} nm) is larger than the camera "
                         f"pixel ({camera_pixel_nm} nm)")
    g = settings.gain_adu_per_e
    var = (g * np.clip(wf - settings.offset_adu, 0, None) + (g * settings.read_noise_e) ** 2
           ) / max(frames_averaged, 1)
    var = np.maximum(var, 1e-6 * max(float(var.max()), 1e-12))
    weight = 1.0 / var
    lo, hi = settings.fit_range
    sigmas = settings.psf_sigma_nm * np.linspace(lo, hi, 13)
    # The width is searched on the camera grid (the dense image binned once, then blurred:
    # blur-then-bin equals bin-then-blur up to the pixel's own width, 1/12 px² of variance),
    # 100× cheaper than blurring the fine grid for every candidate; the map itself below
    # blurs the fine grid.
    coarse = binned(dense, render_pixel_nm, camera_pixel_nm, wf.shape)
    fits = [(s, *_affine(gaussian_filter(coarse, np.sqrt(max((s / camera_pixel_nm) ** 2
                                                             - 1 / 12, 0.01)),
                                         mode="constant"), wf, weight)) for s in sigmas]
    best = int(np.argmin([f[3] for f in fits]))
    sigma = float(fits[best][0])
    if 0 < best < len(fits) - 1:  # parabola through the neighbours
        e0, e1, e2 = (fits[i][3] for i in (best - 1, best, best + 1))
        denom = e0 - 2 * e1 + e2
        if denom > 0:
            sigma += 0.5 * float(sigmas[1] - sigmas[0]) * (e0 - e2) / denom
    pred_raw = forward(dense, render_pixel_nm, camera_pixel_nm, wf.shape, sigma)
    a, b, _ = _affine(pred_raw, wf, weight)
    pred = a * pred_raw + b
    residual = wf - pred
    # Matched filter with the PSF (camera pixels), normalised so white noise keeps unit σ.
    psf_px = sigma / camera_pixel_nm
    z = residual / np.sqrt(var)
    kernel_norm = np.sqrt(np.sum(_gaussian_kernel(psf_px) ** 2))
    error_sigma = gaussian_filter(z, psf_px, mode="nearest") / kernel_norm
    local = gaussian_filter(np.clip(pred - b, 0, None), psf_px, mode="nearest")
    resid_smooth = gaussian_filter(residual, psf_px, mode="nearest")
    top = float(np.percentile(local, 99.0)) or 1.0
    relative = np.abs(resid_smooth) > settings.relative_tolerance * np.maximum(local, 0.05 * top)
    flagged = (np.abs(error_sigma) > settings.flag_sigma) & relative
    return ErrorMap(error_sigma.astype(np.float32), _dissimilarity(wf - b, pred - b),
                    flagged, sigma, a, b, pred.astype(np.float32))


def _gaussian_kernel(sigma_px: float) -> F64:
    r = max(1, int(np.ceil(4 * sigma_px)))
    x = np.arange(-r, r + 1)
    g = np.exp(-(x**2) / (2 * sigma_px**2))
    g /= g.sum()
    return np.asarray(np.outer(g, g), np.float64)


def _dissimilarity(wf: F64, pred: F64) -> F32:
    """1 − local SSIM, weighted by the widefield intensity (0 where dark)."""
    from skimage.metrics import structural_similarity

    top = max(float(np.percentile(wf, 99.9)), 1e-12)
    a, b = np.clip(wf / top, 0, None), np.clip(pred / top, 0, None)
    _, local = structural_similarity(  # type: ignore[no-untyped-call]
        a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        full=True)
    weight = np.clip(a, 0, 1)
    return np.asarray((1.0 - local) * weight, np.float32)
