"""The camera's noise model: Poisson–Gaussian, var[x] = alpha·x + beta in ADU.

A camera with gain g (ADU per photoelectron), offset o (ADU) and read noise r
(electrons) gives raw values x whose variance is g·(E[x] − o) + g²r², i.e.
alpha = g and beta = g²r² − g·o (Foi et al., IEEE TIP 2008). Two numbers are all
a variance-stabilising transform needs, and they are what can be measured from
the data alone: `estimate_noise_model` fits them from local means and variances
of one frame, or — better, where the sample holds still — of differences
between consecutive frames.

The generalised Anscombe transform `gat` maps raw values to ones whose noise
has unit standard deviation whatever the brightness; `inverse_gat` is its
algebraic inverse (exact for a value that is the transform of an expectation,
which is what dimscope's networks are trained to output).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.ndimage import uniform_filter

from .base import CameraCalibration

NoiseSource = Literal["calibration", "estimated", "given"]


@dataclass(frozen=True, slots=True)
class NoiseModel:
    """var[x] = alpha·x + beta (ADU², x in ADU); `source` says where the numbers came from."""

    alpha: float
    beta: float
    source: NoiseSource = "given"

    @classmethod
    def from_calibration(cls, cal: CameraCalibration) -> NoiseModel:
        g = float(cal.gain_adu_per_e)
        return cls(alpha=g, beta=g * g * float(cal.read_noise_e) ** 2 - g * float(cal.offset_adu),
                   source="calibration")

    def variance(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(np.float32(self.alpha) * x + np.float32(self.beta), 0.0)

    def gat(self, x: np.ndarray) -> np.ndarray:
        """Generalised Anscombe transform: noise of unit standard deviation (float32)."""
        a = np.float32(self.alpha)
        inner = x.astype(np.float32) * a
        inner += np.float32(0.375 * self.alpha**2 + self.beta)
        np.maximum(inner, 0.0, out=inner)
        out = np.sqrt(inner)
        out *= np.float32(2.0) / a
        return out

    def inverse_gat(self, f: np.ndarray) -> np.ndarray:
        """Algebraic inverse of `gat` (float32, in ADU)."""
        a = float(self.alpha)
        half = np.maximum(f.astype(np.float32), 0.0) * np.float32(a / 2.0)
        out = half * half
        out -= np.float32(0.375 * a * a + self.beta)
        out *= np.float32(1.0 / a)
        return out

    def inverse_gat_unbiased(self, f: np.ndarray) -> np.ndarray:
        """Closed-form unbiased inverse (Mäkitalo & Foi 2011) for a *denoised* transform,
        which estimates E[gat(x)] rather than gat(E[x]) (BM3D's output). In the units
        e = x/alpha + beta/alpha², where the noise is Poisson-like, then back to ADU."""
        f = np.maximum(f.astype(np.float32), np.float32(1.0))
        s32 = np.float32(np.sqrt(1.5))
        e = 0.25 * f**2 + 0.25 * s32 / f - 1.375 / f**2 + 0.625 * s32 / f**3 - 0.125
        return (e * np.float32(self.alpha) - np.float32(self.beta / self.alpha)).astype(
            np.float32)

    def describe(self) -> str:
        return f"var = {self.alpha:.4g}·x {'+' if self.beta >= 0 else '−'} {abs(self.beta):.4g} " \
               f"ADU² ({self.source})"


# Laplacian-like detail filter with unit noise gain: for white noise of variance v the
# output has variance v, while smooth signal (constant or linear ramps) gives zero.
_DETAIL = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float32) / np.sqrt(20.0)


def _detail(image: np.ndarray) -> np.ndarray:
    from scipy.ndimage import convolve

    return convolve(image, _DETAIL, mode="reflect")


def _block_stats(mean_img: np.ndarray, noise_img: np.ndarray, valid: np.ndarray, block: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per block: mean level and sample variance of the noise image, for the blocks whose
    `valid` share (1 = good pixel, 0 = clipped at the floor, large negative = saturated)
    is at least 3/4: a dark background often sits partly at zero, a saturated pixel spoils
    its block."""
    h, w = (s - s % block for s in mean_img.shape)

    def blocks(a: np.ndarray) -> np.ndarray:
        return a[:h, :w].reshape(h // block, block, w // block, block).swapaxes(1, 2).reshape(
            -1, block * block)

    m, d, ok = blocks(mean_img), blocks(noise_img), blocks(valid).mean(axis=1) >= 0.75
    return m.mean(axis=1)[ok], d.var(axis=1, ddof=1)[ok]


@functools.lru_cache(maxsize=8)
def _pure_noise_quantile(mode: str, block: int, quantile: float) -> float:
    """The `quantile` of block variances for unit white noise through the same filter: what
    the estimate must be divided by to be unbiased for noise alone (the detail filter
    correlates neighbours, so the chi-square law of independent samples does not hold)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512)).astype(np.float32)
    noise = _detail(a) if mode == "detail" else (
        rng.standard_normal((512, 512)).astype(np.float32) - a) / np.float32(np.sqrt(2.0))
    _, variances = _block_stats(a, noise, np.ones(a.shape, bool), block)
    return float(np.quantile(variances, quantile))


def _fit(levels: np.ndarray, variances: np.ndarray, unbias: float, quantile: float,
         bins: int = 12) -> tuple[float, float]:
    """var = alpha·level + beta from block statistics: in bins of the level take a low
    quantile of the block variances (blocks with structure or motion only ever add variance),
    divided by that quantile for pure noise (`unbias`), then a weighted least-squares line
    through the bins."""
    edges = np.unique(np.quantile(levels, np.linspace(0, 1, bins + 1)))
    xs, ys, ws = [], [], []
    for lo, hi in itertools.pairwise(edges):
        sel = (levels >= lo) & (levels <= hi)
        if sel.sum() < 4:
            continue
        xs.append(float(np.median(levels[sel])))
        ys.append(float(np.quantile(variances[sel], quantile)) / unbias)
        ws.append(float(np.sqrt(sel.sum())))
    if len(xs) < 2 or np.ptp(xs) <= 0:
        return 0.0, float(np.median(variances))
    alpha, beta = np.polyfit(np.asarray(xs), np.asarray(ys), 1, w=np.asarray(ws))
    return float(alpha), float(beta)


def estimate_noise_model(frames: np.ndarray, block: int = 8) -> NoiseModel:
    """alpha, beta of var[x] = alpha·x + beta from the data itself (float ADU frames).

    `frames`: one 2-D frame or a stack (T, H, W) in acquisition order. With two or more
    frames the noise is read from differences of consecutive frames (structure cancels where
    the sample holds still; moving blocks are outliers the fit discards); with one frame from
    a Laplacian detail image. Blocks with saturated pixels or mostly clipped at the floor are
    left out; a frame with too few good blocks (flat, a closed shutter) gets constant noise at
    its measured level, so an engine never fails on it.
    """
    stack = np.asarray(frames, dtype=np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or min(stack.shape[1:]) < 2 * block:
        raise ValueError(f"noise estimation needs frames of at least {2 * block}² pixels, "
                         f"got shape {np.shape(frames)}")
    top, bottom = float(stack.max()), float(stack.min())

    def quality(*frames: np.ndarray) -> np.ndarray:
        q = np.ones(frames[0].shape, np.float32)
        for f in frames:
            q[f <= bottom] = 0.0
        for f in frames:
            q[f >= top] = -1e6
        return q

    levels_all, vars_all = [], []
    # Consecutive frames that are exact copies (a repeated image) carry no noise difference.
    pairs = [(stack[i], stack[i + 1]) for i in range(min(len(stack) - 1, 8))
             if not np.array_equal(stack[i], stack[i + 1])]
    if pairs:
        for a, b in pairs:
            mean_img = uniform_filter((a + b) * 0.5, 3)
            lv, var = _block_stats(mean_img, (b - a) / np.sqrt(2.0), quality(a, b), block)
            levels_all.append(lv)
            vars_all.append(var)
    else:
        a = stack[0]
        lv, var = _block_stats(uniform_filter(a, 3), _detail(a), quality(a), block)
        levels_all.append(lv)
        vars_all.append(var)
    levels, variances = np.concatenate(levels_all), np.concatenate(vars_all)
    if levels.size < 8:  # flat, saturated or clipped almost everywhere (a closed shutter)
        detail = _detail(stack[-1])
        level = float(np.median(stack[-1]))
        var0 = float((1.4826 * np.median(np.abs(detail - np.median(detail)))) ** 2) or 1.0
        alpha = 1e-3 * var0 / max(abs(level), 1.0)
        return NoiseModel(alpha=alpha, beta=var0 - alpha * level, source="estimated")
    # Moving structure (differences) and edges (detail image) only add variance: the median
    # of a level's blocks is robust to a minority of moving blocks; a single frame's detail
    # image has edges in most textured blocks, so a lower quantile there.
    quantile = 0.5 if pairs else 0.25
    unbias = _pure_noise_quantile("diff" if pairs else "detail", block, quantile)
    alpha, beta = _fit(levels, variances, unbias, quantile)
    # A non-positive slope means the data show no shot noise (or too little range to see it):
    # fall back to constant (Gaussian) noise at the measured level.
    if alpha <= 1e-6:
        alpha = 1e-3 * max(float(np.median(variances)), 1e-6) / max(float(np.median(levels)),
                                                                      1.0)
        beta = float(np.median(variances)) - alpha * float(np.median(levels))
    return NoiseModel(alpha=alpha, beta=beta, source="estimated")


class CameraNoise:
    """The noise model a noise-aware engine uses on a stream of frames.

    From the camera calibration when it was measured (config or source); else
    estimated from the data: from the first frame at once (so the first frame is
    already restored), then once more from the differences of the first
    `refine_after` frames, which is more accurate, and kept from then on.
    """

    def __init__(self, calibration: CameraCalibration, refine_after: int = 4) -> None:
        self.model: NoiseModel | None = (NoiseModel.from_calibration(calibration)
                                         if calibration.measured else None)
        self.refine_after = refine_after
        self._refined = calibration.measured

    def update(self, recent: list[np.ndarray]) -> NoiseModel:
        """The model to use for the newest of `recent` (oldest first, raw frames)."""
        if self.model is None:
            self.model = estimate_noise_model(recent[-1])
        if not self._refined and len(recent) >= self.refine_after:
            self.model = estimate_noise_model(np.stack(recent[-self.refine_after:]))
            self._refined = True
        return self.model
