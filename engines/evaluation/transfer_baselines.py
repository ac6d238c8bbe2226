"""The strongest classical baselines for cross-modality transfer (widefield → confocal-like).

Widefield → confocal is, to first order, what deconvolution does, so these are the methods a
transfer model has to beat (issue 16, section 3). Each is a function `low -> estimate` at
HIGH's size; LOW is already on a grid where HIGH is `scale` (1, 2 or 4) times larger in Y, X:

- `bicubic` — `cv2.resize` INTER_CUBIC by `scale` (pixel areas aligned at the corner, as
  `pairs register` resamples); at scale 1 the raw LOW itself;
- `rl2d` — Richardson–Lucy with a Gaussian PSF of σ `psf_sigma` LOW pixels, after subtracting
  a background (a low percentile, then clipped at 0; reflect-padded), then bicubic up to HIGH's
  size; a stack is deconvolved plane by plane. The RL is scikit-image's algorithm
  (`richardson_lucy(..., clip=False)`, equal to float rounding, tested) with the PSF's FFT kept
  and every requested iteration count taken from one run: tuning 2-D RL is ~5× faster;
- `rl3d` — the same on a (Z, Y, X) stack with a 3-D Gaussian PSF (σ `sigma_xy` pixels,
  `sigma_z` planes);
- `bm3d_rl` — BM3D after a generalised Anscombe transform (gain and read-noise variance
  estimated from the image itself, so it works in photons, ADU or normalised units; BM3D's σ is
  `sigma_factor` × the σ estimated after the transform), then `rl2d`.

The comparison is kept fair as the issue asks:

- `tune(method, train_pairs, grid)` picks the parameters (PSF σ, iterations, BM3D σ factor)
  that maximise the mean PSNR over the *training* pairs only; it never sees a test pair.
  BM3D is run once per (pair, σ factor) and every RL setting is tried on top of it;
  `max_pixels` tunes on a central crop of each pair to bound the cost.
- Every output is fitted affinely (least-squares scale and offset) to the normalised target
  before PSNR and SSIM, exactly as `quality.py` does (CSBDeep convention), so that no method is
  penalised for a global intensity scale or offset it cannot know.
- `compare(test_pairs, tuned)` reports per-image PSNR / SSIM, the mean and the worst image of
  every method; `best_baseline(report)` is the one with the highest mean PSNR.

Cost (two busy cores, 8 pairs of 128²): `rl2d` tunes in ~3 s (one RL run per PSF serves every
iteration count), `bm3d_rl` in ~45 s (BM3D ~1 s per image and σ factor); `rl3d` on 4 stacks of
16×128² in ~100 s. `max_pixels` bounds all of these.

For a stack, PSNR is over the whole volume after one affine fit; SSIM is the mean of the
planes' 2-D SSIM (a 3-D window would need at least 7 planes).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import fft as sp_fft
from scipy import ndimage as ndi

from ..vst_gaussian import inverse_anscombe
from .quality import fit_to, normalize_truth, nrmse, psnr, ssim

log = logging.getLogger(__name__)

Array = NDArray[np.float32]
Pair = tuple[NDArray[Any], NDArray[Any]]
Params = dict[str, float]

METHODS: tuple[str, ...] = ("bicubic", "rl2d", "rl3d", "bm3d_rl")
SCALES: tuple[int, ...] = (1, 2, 4)

_SIGMAS = (0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.5, 2.8, 3.0)
_ITERATIONS = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0)  # one RL run to 160 serves them all
_BACKGROUND = (1.0,)  # percentile of LOW subtracted before RL; one value: recorded, not tuned

#: The grids `tune` searches by default (every combination). σ in LOW pixels, σ_z in planes.
DEFAULT_GRIDS: Mapping[str, Mapping[str, tuple[float, ...]]] = {
    "bicubic": {},
    "rl2d": {"psf_sigma": _SIGMAS, "iterations": _ITERATIONS,
             "background_percentile": _BACKGROUND},
    # 3-D is ~10× the cost per pixel: a coarser grid, and RL only to 80 (then `at_grid_edge`)
    "rl3d": {"sigma_xy": (1.0, 1.5, 2.0, 2.5, 3.0), "sigma_z": (0.5, 1.0, 2.0),
             "iterations": _ITERATIONS[:-1], "background_percentile": _BACKGROUND},
    "bm3d_rl": {"sigma_factor": (0.5, 1.0, 1.5, 2.0), "psf_sigma": _SIGMAS,
                "iterations": _ITERATIONS, "background_percentile": _BACKGROUND},
}


# --- the methods ------------------------------------------------------------------------------


def pair_scale(low: NDArray[Any], high: NDArray[Any]) -> int:
    """HIGH's size over LOW's (1, 2 or 4); ValueError for a pair that is not on such grids."""
    if low.ndim not in (2, 3) or high.ndim != low.ndim:
        raise ValueError(f"a pair is two 2-D images or two (Z, Y, X) stacks, got LOW "
                         f"{low.shape} and HIGH {high.shape}")
    if high.shape[:-2] != low.shape[:-2]:
        raise ValueError(f"LOW {low.shape} and HIGH {high.shape} have different plane counts")
    for s in SCALES:
        if high.shape[-2:] == (low.shape[-2] * s, low.shape[-1] * s):
            return s
    raise ValueError(f"HIGH {high.shape} is not LOW {low.shape} times 1, 2 or 4 in Y, X")


def _check_scale(scale: int) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale}")


def _per_plane(fn: Callable[[Array], Array], image: Array) -> Array:
    return np.stack([fn(p) for p in image]) if image.ndim == 3 else fn(image)


def bicubic(low: NDArray[Any], scale: int = 1) -> Array:
    """LOW resized by `scale` (cv2 INTER_CUBIC, per plane for a stack); scale 1: LOW itself."""
    _check_scale(scale)
    x = np.asarray(low, dtype=np.float32)
    if scale == 1:
        return x.copy()

    def up(p: Array) -> Array:
        h, w = p.shape
        return np.asarray(cv2.resize(p, (w * scale, h * scale),
                                     interpolation=cv2.INTER_CUBIC), dtype=np.float32)

    return _per_plane(up, x)


def gaussian_psf(sigmas: Sequence[float]) -> Array:
    """A normalised Gaussian PSF, one σ per axis, truncated at 3.5 σ (at least 3 taps)."""
    kernel = np.ones((1,) * len(sigmas), dtype=np.float64)
    for axis, s in enumerate(sigmas):
        r = max(1, math.ceil(3.5 * s))
        g = np.exp(-0.5 * (np.arange(-r, r + 1) / max(s, 1e-6)) ** 2)
        shape = [1] * len(sigmas)
        shape[axis] = g.size
        kernel = kernel * g.reshape(shape)
    return np.asarray(kernel / kernel.sum(), dtype=np.float32)


def richardson_lucy_steps(image: NDArray[Any], psf: NDArray[Any], iterations: Sequence[int]
                          ) -> Iterator[tuple[int, Array]]:
    """Richardson–Lucy estimates of `image` after each of `iterations` (ascending), from one run.

    The algorithm of `skimage.restoration.richardson_lucy(image, psf, n, clip=False)` — start
    at 0.5, `'same'` convolutions with zeros outside, the same ε — to float rounding (tested),
    with the PSF's transforms computed once, so a grid of iteration counts costs only its
    largest. The PSF acts on the last `psf.ndim` axes; any leading axis is a batch (a stack
    deconvolved plane by plane in one go).
    """
    x = np.asarray(image, dtype=np.float32)
    k = np.asarray(psf, dtype=np.float32)
    axes = tuple(range(x.ndim - k.ndim, x.ndim))
    sizes = [x.shape[a] for a in axes]
    fshape = [sp_fft.next_fast_len(n + m - 1, real=True) for n, m in zip(sizes, k.shape,
                                                                          strict=True)]
    otf = sp_fft.rfftn(k, fshape)
    otf_mirror = sp_fft.rfftn(np.flip(k), fshape)
    same = (Ellipsis, *(slice((m - 1) // 2, (m - 1) // 2 + n)
                        for n, m in zip(sizes, k.shape, strict=True)))

    def convolve(a: Array, transfer: NDArray[Any]) -> Array:
        full = sp_fft.irfftn(sp_fft.rfftn(a, fshape, axes=axes) * transfer, fshape, axes=axes)
        return np.asarray(full[same], dtype=np.float32)

    est = np.full(x.shape, 0.5, dtype=np.float32)
    done = 0
    for target in sorted({int(n) for n in iterations}):
        if target < 0:
            raise ValueError(f"iterations must be >= 0, got {target}")
        while done < target:
            est *= convolve(x / (convolve(est, otf) + np.float32(1e-12)), otf_mirror)
            done += 1
        yield target, est.copy()


def richardson_lucy(image: NDArray[Any], psf: NDArray[Any], iterations: int) -> Array:
    """`iterations` Richardson–Lucy steps (see `richardson_lucy_steps`)."""
    return next(richardson_lucy_steps(image, psf, [iterations]))[1]


@dataclass(frozen=True)
class _Prepared:
    """LOW with its background removed, on a unit scale, reflect-padded for one PSF; a stack
    under a 2-D PSF is prepared plane by plane (its background and span per plane)."""

    padded: Array
    crop: tuple[slice, ...]
    background: Array
    span: Array

    def restore(self, est: Array) -> Array:
        return np.asarray(est[self.crop] * self.span + self.background, dtype=np.float32)


def _prepare(low: Array, background_percentile: float, psf: Array) -> _Prepared:
    axes = tuple(range(low.ndim - psf.ndim, low.ndim))
    bg = np.percentile(low, background_percentile, axis=axes, keepdims=True)
    x = np.maximum(low - bg, 0.0)
    span = np.percentile(x, 99.9, axis=axes, keepdims=True)
    span = np.where(span > 0, span, np.maximum(x.max(axis=axes, keepdims=True), 1e-30))
    pads = [(0, 0)] * (low.ndim - psf.ndim) + [(m // 2, m // 2) for m in psf.shape]
    padded = np.pad((x / span).astype(np.float32), pads, mode="reflect")
    crop = tuple(slice(p, p + n) for (p, _), n in zip(pads, low.shape, strict=True))
    return _Prepared(padded, crop, bg.astype(np.float32), span.astype(np.float32))


def _rl_restored(low: Array, psf: Array, background_percentile: float,
                 iterations: Sequence[int]) -> Iterator[tuple[int, Array]]:
    prep = _prepare(low, background_percentile, psf)
    for n, est in richardson_lucy_steps(prep.padded, psf, iterations):
        yield n, prep.restore(est)


def rl2d(low: NDArray[Any], scale: int = 1, psf_sigma: float = 2.0, iterations: int = 20,
         background_percentile: float = 1.0) -> Array:
    """2-D Richardson–Lucy (Gaussian PSF of σ `psf_sigma` LOW pixels) after subtracting the
    `background_percentile` percentile and clipping at 0, then bicubic up by `scale`; a stack
    is deconvolved plane by plane (each with its own background)."""
    _check_scale(scale)
    psf = gaussian_psf((psf_sigma, psf_sigma))
    x = np.asarray(low, dtype=np.float32)
    _, est = next(_rl_restored(x, psf, background_percentile, [int(iterations)]))
    return bicubic(est, scale)


def rl3d(low: NDArray[Any], scale: int = 1, sigma_xy: float = 2.0, sigma_z: float = 1.0,
         iterations: int = 20, background_percentile: float = 1.0) -> Array:
    """3-D Richardson–Lucy of a (Z, Y, X) stack (Gaussian PSF: σ `sigma_xy` pixels, `sigma_z`
    planes) after background subtraction, then bicubic up by `scale` in Y, X."""
    _check_scale(scale)
    x = np.asarray(low, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"rl3d needs a (Z, Y, X) stack, got shape {x.shape}")
    psf = gaussian_psf((sigma_z, sigma_xy, sigma_xy))
    _, est = next(_rl_restored(x, psf, background_percentile, [int(iterations)]))
    return bicubic(est, scale)


def estimate_noise(image: NDArray[Any]) -> tuple[float, float]:
    """(a, b) of the Poisson–Gaussian noise model var(x) ≈ a·x + b of a 2-D image.

    The noise is read from the residual of a 3×3 mean (a white-noise variance σ² leaves 8σ²/9
    there), robustly (MAD) in 16 equally populated bins of the local level, and a line is fitted
    through the bins. `a` is the gain (units per photon), `b` absorbs read noise and offset.
    """
    x = np.asarray(image, dtype=np.float64)
    level = ndi.uniform_filter(x, 3, mode="reflect")
    resid = (x - level)[1:-1, 1:-1].ravel()
    level = level[1:-1, 1:-1].ravel()
    edges = np.quantile(level, np.linspace(0.0, 1.0, 17))
    idx = np.clip(np.searchsorted(edges, level, side="right") - 1, 0, 15)
    levels, variances = [], []
    for k in range(16):
        r = resid[idx == k]
        if r.size < 32:
            continue
        mad = float(np.median(np.abs(r - np.median(r))))
        levels.append(float(np.median(level[idx == k])))
        variances.append((1.4826 * mad) ** 2 * 9.0 / 8.0)
    if len(levels) < 2 or np.ptp(levels) <= 0:
        return 0.0, float(np.mean(variances)) if variances else 0.0
    a, b = np.polyfit(np.asarray(levels), np.asarray(variances), 1)
    return float(a), float(b)


def _estimate_sigma(image: Array) -> float:
    from skimage.restoration import estimate_sigma

    est: Callable[..., Any] = estimate_sigma
    return max(float(est(image)), 1e-6)


def bm3d_denoise(low: NDArray[Any], sigma_factor: float = 1.0) -> Array:
    """BM3D on the generalised-Anscombe-stabilised image (per plane for a stack).

    The gain `a` and variance offset `b` come from `estimate_noise`; x/a then has variance
    ≈ x/a + c (c = b/a²), which 2·√(x/a + 3/8 + c) makes ≈ 1. BM3D's σ is `sigma_factor` × the
    σ then measured (`skimage.restoration.estimate_sigma`). Where no signal-dependent noise is
    found, BM3D runs on the image itself with the same rule for σ.
    """
    import bm3d

    denoise: Callable[..., Any] = bm3d.bm3d

    def one(p: Array) -> Array:
        a, b = estimate_noise(p)
        spread = float(np.percentile(p, 99.9) - np.percentile(p, 0.1)) or 1.0
        if a > 1e-9 * spread:
            c = b / (a * a)
            stable = 2.0 * np.sqrt(np.maximum(p / a + 0.375 + c, 0.0)).astype(np.float32)
            out = np.asarray(denoise(stable, sigma_psd=sigma_factor * _estimate_sigma(stable)),
                             dtype=np.float32)
            return ((inverse_anscombe(out, 0.0) - c) * a).astype(np.float32)
        lo = float(np.percentile(p, 0.1))
        unit = ((p - lo) / spread).astype(np.float32)
        out = np.asarray(denoise(unit, sigma_psd=sigma_factor * _estimate_sigma(unit)),
                         dtype=np.float32)
        return (out * spread + lo).astype(np.float32)

    return _per_plane(one, np.asarray(low, dtype=np.float32))


def bm3d_rl(low: NDArray[Any], scale: int = 1, sigma_factor: float = 1.0,
            psf_sigma: float = 2.0, iterations: int = 20,
            background_percentile: float = 1.0) -> Array:
    """`bm3d_denoise`, then `rl2d` (Richardson–Lucy, then bicubic up by `scale`)."""
    _check_scale(scale)
    return rl2d(bm3d_denoise(low, sigma_factor), scale, psf_sigma, iterations,
                background_percentile)


def run_method(method: str, low: NDArray[Any], scale: int, params: Mapping[str, float]) -> Array:
    """`method` (one of METHODS) applied to LOW with `params` (a grid point)."""
    p = dict(params)
    bg = p.pop("background_percentile", 1.0)
    if method == "bicubic":
        out = bicubic(low, scale)
    elif method == "rl2d":
        out = rl2d(low, scale, p.pop("psf_sigma"), int(p.pop("iterations")), bg)
    elif method == "rl3d":
        out = rl3d(low, scale, p.pop("sigma_xy"), p.pop("sigma_z"), int(p.pop("iterations")),
                   bg)
    elif method == "bm3d_rl":
        out = bm3d_rl(low, scale, p.pop("sigma_factor"), p.pop("psf_sigma"),
                      int(p.pop("iterations")), bg)
    else:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    if p:
        raise ValueError(f"{method}: unknown parameters {sorted(p)}")
    return out


def fitted_psnr(truth_n: NDArray[Any], image: NDArray[Any]) -> float:
    """`psnr(truth_n, fit_to(truth_n, image))` of quality.py — the same least-squares affine
    fit and the same float32 rounding — with plain sums instead of BLAS dot products: tuning
    calls it once per grid point and pair, and a multi-threaded BLAS dot on a busy machine
    can cost milliseconds."""
    x = np.asarray(image, dtype=np.float64).ravel()
    y = np.asarray(truth_n, dtype=np.float64).ravel()
    xc = x - x.mean()
    var = float(np.sum(xc * xc))
    a = float(np.sum(xc * (y - y.mean()))) / var if var > 0 else 0.0
    b = y.mean() - a * x.mean()
    return psnr(truth_n, (a * x + b).astype(np.float32).reshape(np.shape(truth_n)))


# --- tuning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunedBaseline:
    """One method with the parameters tuned on the training pairs.

    `train_psnr` is the mean PSNR (after the affine fit) over those pairs; `at_grid_edge` names
    the parameters whose chosen value is the largest or smallest of a grid of several values
    (the optimum may lie outside: widen that grid).
    """

    name: str
    params: Params
    train_psnr: float
    n_train: int = 0
    at_grid_edge: tuple[str, ...] = ()

    def apply(self, low: NDArray[Any], scale: int = 1) -> Array:
        """This baseline's estimate of HIGH (HIGH's size: LOW's times `scale` in Y, X)."""
        return run_method(self.name, low, scale, self.params)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params), "train_psnr": self.train_psnr,
                "n_train": self.n_train, "at_grid_edge": list(self.at_grid_edge)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TunedBaseline:
        return cls(name=str(data["name"]),
                   params={str(k): float(v) for k, v in dict(data["params"]).items()},
                   train_psnr=float(data["train_psnr"]), n_train=int(data.get("n_train", 0)),
                   at_grid_edge=tuple(str(k) for k in data.get("at_grid_edge", ())))


def _crop(low: Array, high: Array, scale: int, max_pixels: int | None) -> tuple[Array, Array]:
    """The central part of a pair with at most `max_pixels` LOW pixels per plane."""
    h, w = low.shape[-2:]
    if max_pixels is None or h * w <= max_pixels:
        return low, high
    if max_pixels < 64:
        raise ValueError(f"max_pixels {max_pixels} is too small to tune on (< 64)")
    ch = min(h, math.isqrt(max_pixels))
    cw = min(w, max_pixels // ch)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return (low[..., y0:y0 + ch, x0:x0 + cw],
            high[..., y0 * scale:(y0 + ch) * scale, x0 * scale:(x0 + cw) * scale])


def _resolve_grid(method: str, grid: Mapping[str, Sequence[float]] | None
                  ) -> dict[str, tuple[float, ...]]:
    if method not in DEFAULT_GRIDS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    out = {k: tuple(v) for k, v in DEFAULT_GRIDS[method].items()}
    for key, values in (grid or {}).items():
        if key not in out:
            raise ValueError(f"{method} has no parameter {key!r} (its parameters: {sorted(out)})")
        if not values:
            raise ValueError(f"{method}: the grid of {key!r} is empty")
        out[key] = tuple(float(v) for v in values)
    return out


def _rl_candidates(low: Array, scale: int, grid: Mapping[str, tuple[float, ...]],
                   psf_keys: tuple[str, ...], three_d: bool
                   ) -> Iterator[tuple[Params, Array]]:
    """Every RL grid point's estimate for one LOW: one RL run per (background, PSF) serves
    every iteration count."""
    counts = [int(n) for n in grid["iterations"]]
    for bgp in grid["background_percentile"]:
        for sig in itertools.product(*(grid[k] for k in psf_keys)):
            psf = gaussian_psf((sig[1], sig[0], sig[0]) if three_d else (sig[0], sig[0]))
            for n, est in _rl_restored(low, psf, bgp, counts):
                params: Params = dict(zip(psf_keys, sig, strict=True))
                params.update(iterations=n, background_percentile=bgp)
                yield params, bicubic(est, scale)


def _candidates(method: str, low: Array, scale: int, grid: Mapping[str, tuple[float, ...]]
                ) -> Iterator[tuple[Params, Array]]:
    if method == "bicubic":
        yield {}, bicubic(low, scale)
    elif method == "rl2d":
        yield from _rl_candidates(low, scale, grid, ("psf_sigma",), three_d=False)
    elif method == "rl3d":
        if low.ndim != 3:
            raise ValueError(f"rl3d is tuned on (Z, Y, X) stacks, got LOW of shape {low.shape}")
        yield from _rl_candidates(low, scale, grid, ("sigma_xy", "sigma_z"), three_d=True)
    else:  # bm3d_rl: BM3D once per σ factor, every RL setting on top of it
        for factor in grid["sigma_factor"]:
            denoised = bm3d_denoise(low, factor)
            for params, est in _rl_candidates(denoised, scale, grid, ("psf_sigma",),
                                              three_d=False):
                yield {"sigma_factor": factor, **params}, est


def tune(method: str, train_pairs: Sequence[Pair],
         grid: Mapping[str, Sequence[float]] | None = None, *,
         max_pixels: int | None = None) -> TunedBaseline:
    """The grid point of `method` with the highest mean PSNR over `train_pairs`.

    `grid` overrides some or all of `DEFAULT_GRIDS[method]` (every combination is tried);
    `max_pixels` tunes on the central part of each pair with at most that many LOW pixels per
    plane. Ties go to the first grid point. Only `train_pairs` are read.
    """
    full = _resolve_grid(method, grid)
    if not train_pairs:
        raise ValueError("tune needs at least one training pair")
    t0 = time.perf_counter()
    totals: dict[tuple[tuple[str, float], ...], float] = {}
    for low_in, high_in in train_pairs:
        scale = pair_scale(low_in, high_in)
        low, high = _crop(np.asarray(low_in, dtype=np.float32),
                          np.asarray(high_in, dtype=np.float32), scale, max_pixels)
        truth = normalize_truth(high)
        for params, est in _candidates(method, low, scale, full):
            key = tuple(params.items())
            totals[key] = totals.get(key, 0.0) + fitted_psnr(truth, est)
    best_key = max(totals, key=lambda k: totals[k])  # the first of equals: grid order
    best = dict(best_key)
    edges = tuple(k for k, v in best.items()
                  if len(full[k]) > 1 and v in (min(full[k]), max(full[k])))
    tuned = TunedBaseline(method, best, totals[best_key] / len(train_pairs), len(train_pairs),
                          edges)
    log.info("tuned %s on %d pairs in %.1f s: %s (train PSNR %.2f dB)%s", method,
             len(train_pairs), time.perf_counter() - t0, best, tuned.train_psnr,
             f"; at the grid's edge: {', '.join(edges)}" if edges else "")
    return tuned


def tune_all(train_pairs: Sequence[Pair], methods: Sequence[str] | None = None,
             grids: Mapping[str, Mapping[str, Sequence[float]]] | None = None, *,
             max_pixels: int | None = None) -> dict[str, TunedBaseline]:
    """`tune` for each of `methods` (default: all of METHODS that fit the pairs — `rl3d` only
    for stacks)."""
    if methods is None:
        stacks = bool(train_pairs) and all(np.ndim(lo) == 3 for lo, _ in train_pairs)
        methods = [m for m in METHODS if m != "rl3d" or stacks]
    return {m: tune(m, train_pairs, (grids or {}).get(m), max_pixels=max_pixels)
            for m in methods}


# --- scoring ----------------------------------------------------------------------------------


def score_outputs(high: NDArray[Any], outputs: Mapping[str, NDArray[Any]]
                  ) -> dict[str, dict[str, float]]:
    """PSNR, SSIM and NRMSE of each output against HIGH, each output fitted affinely to the
    normalised HIGH first (quality.py's convention); a stack's SSIM is its planes' mean."""
    truth = normalize_truth(np.asarray(high, dtype=np.float32))
    out: dict[str, dict[str, float]] = {}
    for name, image in outputs.items():
        if image.shape != truth.shape:
            raise ValueError(f"{name}: output {image.shape} is not HIGH's shape {truth.shape}")
        x = fit_to(truth, image)
        s = (float(np.mean([ssim(t, p) for t, p in zip(truth, x, strict=True)]))
             if truth.ndim == 3 else ssim(truth, x))
        out[name] = {"psnr": psnr(truth, x), "ssim": s, "nrmse": nrmse(truth, x)}
    return out


@dataclass(frozen=True)
class MethodScores:
    """One baseline on the test pairs: per-image values, in the order of `names`."""

    label: str
    baseline: TunedBaseline
    names: tuple[str, ...]
    psnr: tuple[float, ...]
    ssim: tuple[float, ...]
    seconds: tuple[float, ...]

    @property
    def mean_psnr(self) -> float:
        return float(np.mean(self.psnr))

    @property
    def mean_ssim(self) -> float:
        return float(np.mean(self.ssim))

    @property
    def worst(self) -> int:
        """Index of the image with the lowest PSNR."""
        return int(np.argmin(self.psnr))

    def as_dict(self) -> dict[str, Any]:
        w = self.worst
        return {
            "label": self.label, "baseline": self.baseline.as_dict(),
            "per_image": [{"name": n, "psnr": p, "ssim": s, "seconds": t} for n, p, s, t in
                          zip(self.names, self.psnr, self.ssim, self.seconds, strict=True)],
            "mean": {"psnr": self.mean_psnr, "ssim": self.mean_ssim,
                     "seconds": float(np.mean(self.seconds))},
            "worst": {"index": w, "name": self.names[w], "psnr": self.psnr[w],
                      "ssim": self.ssim[w]},
        }


@dataclass(frozen=True)
class TransferReport:
    """Every baseline on the same test pairs (`methods` in the order they were given)."""

    names: tuple[str, ...]
    methods: dict[str, MethodScores]

    def as_dict(self) -> dict[str, Any]:
        return {"images": list(self.names),
                "methods": {k: v.as_dict() for k, v in self.methods.items()},
                "best": best_baseline(self) if self.methods else None}


def compare(test_pairs: Sequence[Pair], tuned: Mapping[str, TunedBaseline],
            names: Sequence[str] | None = None) -> TransferReport:
    """Each tuned baseline applied to every test LOW and scored against its HIGH."""
    if not test_pairs:
        raise ValueError("compare needs at least one test pair")
    labels = tuple(names) if names is not None else tuple(str(i) for i in range(len(test_pairs)))
    if len(labels) != len(test_pairs):
        raise ValueError(f"{len(labels)} names for {len(test_pairs)} pairs")
    rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in tuned}
    for low, high in test_pairs:
        scale = pair_scale(low, high)
        outputs, seconds = {}, {}
        for label, baseline in tuned.items():
            t0 = time.perf_counter()
            outputs[label] = baseline.apply(low, scale)
            seconds[label] = time.perf_counter() - t0
        for label, sc in score_outputs(high, outputs).items():
            rows[label].append((sc["psnr"], sc["ssim"], seconds[label]))
    methods = {label: MethodScores(label, tuned[label], labels,
                                   tuple(r[0] for r in rs), tuple(r[1] for r in rs),
                                   tuple(r[2] for r in rs))
               for label, rs in rows.items()}
    return TransferReport(labels, methods)


def best_baseline(report: TransferReport) -> str:
    """The label of the baseline with the highest mean PSNR (the first of equals)."""
    if not report.methods:
        raise ValueError("the report has no methods")
    return max(report.methods, key=lambda k: report.methods[k].mean_psnr)


def format_report(report: TransferReport) -> str:
    """A plain-text table: per method its parameters, train / mean / worst PSNR, mean SSIM."""
    lines = [f"{'method':<12} {'train dB':>8} {'PSNR':>7} {'SSIM':>6} {'worst':>19} "
             f"{'s/img':>6}  params"]
    for label, m in report.methods.items():
        w = m.worst
        params = ", ".join(f"{k}={v:g}" for k, v in m.baseline.params.items())
        lines.append(f"{label:<12} {m.baseline.train_psnr:8.2f} {m.mean_psnr:7.2f} "
                     f"{m.mean_ssim:6.3f} {m.names[w][:10]:>10} {m.psnr[w]:6.2f}dB "
                     f"{float(np.mean(m.seconds)):6.2f}  {params}")
    return "\n".join(lines)
