"""Trust maps: does an enhanced frame agree with what the camera measured?

Computed from physics, not from the network's opinion of itself. The raw frame is
a noisy measurement of the truth through a known forward model (the camera's
Poisson–Gaussian noise, var = alpha·x + beta; for ×2 super-resolution also the
camera's 2×2 pixel binning). If the enhanced frame were the truth, the residual

    z = (raw − forward(enhanced)) / sqrt(var(forward(enhanced)))

would be white noise of unit variance. A structure the engine invented leaves a
negative blob in z, one it erased a positive one, however plausible the image looks.

Per frame (`TrustMeter.measure`):
- z is smoothed with Gaussians of 1, 2 and 4 camera pixels (matched filters for
  puncta and filaments of those sizes), each normalised to unit variance for white
  noise and then by its own robust spread over the frame (median absolute
  deviation), so a slightly wrong noise model or spatially correlated camera noise
  does not raise alarms everywhere — what stands out is a *local* disagreement;
- the **map** (published on topic `trust`) is, at half the camera's resolution, the
  signed local z-score of the scale where it is strongest: positive = the raw data
  are brighter than the enhanced frame says (something erased), negative = dimmer
  (something added);
- the **score**: mean |z| and the robust residual spread (both ≈ 0.8 and 1 for an
  honest restoration; 0 for the raw frame itself), the share of map pixels beyond
  3σ, the strongest local z, and `alert` — true when the strongest local z passes the
  threshold at which white noise alone would alert on `false_alarm_rate` of frames
  (random-field theory: the expected Euler characteristic of the smoothed fields,
  Worsley et al. 1996), or when the residual spread is far from 1 (a restoration
  inconsistent everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .base import CameraCalibration
from .noise_model import CameraNoise, NoiseModel

#: smoothing scales (sigma, camera pixels) of the local tests
SCALES = (1.0, 2.0, 4.0)


@dataclass(frozen=True, slots=True)
class TrustSettings:
    """How the frame score turns into an alert."""

    #: white noise alone alerts on this share of frames (sets the local z threshold)
    false_alarm_rate: float = 1e-3
    #: a map pixel beyond this local z counts as flagged (`flagged_fraction`)
    flag_sigma: float = 3.0
    #: alert when the robust residual spread is outside [1/this, this] (0 = never)
    max_spread_ratio: float = 2.0


@dataclass(frozen=True, slots=True)
class TrustScore:
    """One frame's consistency with its raw measurement (all unitless, in noise σ)."""

    #: mean |z| per camera pixel (0.80 for white unit noise)
    mean_abs_z: float
    #: robust standard deviation of z (1.0 for white unit noise; 0 if enhanced == raw)
    residual_sd: float
    #: share of map pixels whose local z is beyond `flag_sigma`
    flagged_fraction: float
    #: strongest local z (signed: > 0 raw brighter, < 0 enhanced brighter)
    max_z: float
    #: the local z threshold for this frame size (`false_alarm_rate`)
    threshold: float
    alert: bool
    #: the noise model the residual was normalised with
    noise: str

    def as_dict(self) -> dict[str, float | bool | str]:
        return {"mean_abs_z": round(self.mean_abs_z, 4), "residual_sd": round(self.residual_sd, 4),
                "flagged_fraction": round(self.flagged_fraction, 6),
                "max_z": round(self.max_z, 3), "threshold": round(self.threshold, 3),
                "alert": self.alert, "noise": self.noise}


@dataclass(frozen=True, slots=True)
class TrustReport:
    score: TrustScore
    #: float32 local z-scores at half the camera's resolution (ceil(H/2), ceil(W/2))
    map: np.ndarray


def alert_threshold(shape: tuple[int, int], false_alarm_rate: float,
                    scales: tuple[float, ...] = SCALES) -> float:
    """The local z at which unit white noise, smoothed at `scales`, exceeds it (either sign)
    anywhere in a frame of `shape` with probability `false_alarm_rate`.

    Expected Euler characteristic of a 2-D Gaussian field smoothed with a Gaussian of
    sigma s: area / (2 s²) · (2π)^(-3/2) · u · exp(−u²/2) per tail; summed over scales
    and both tails, solved for u by bisection.
    """
    area = float(shape[0] * shape[1])

    def rate(u: float) -> float:
        per_tail = sum(area / (2.0 * s * s) for s in scales) * (2 * math.pi) ** -1.5 * u \
            * math.exp(-u * u / 2.0)
        return 2.0 * per_tail

    lo, hi = 2.0, 12.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rate(mid) > false_alarm_rate else (lo, mid)
    return hi


def _smoothed(z: np.ndarray, sigma: float) -> np.ndarray:
    """z smoothed with a Gaussian of `sigma` px, scaled to unit variance for white z."""
    k = cv2.getGaussianKernel(2 * math.ceil(3 * sigma) + 1, sigma, cv2.CV_32F)
    gain = float(np.sum(k**2))  # separable: the 2-D kernel's sum of squares is gain²
    out = np.asarray(cv2.sepFilter2D(z, cv2.CV_32F, k, k, borderType=cv2.BORDER_REFLECT))
    return out * np.float32(1.0 / gain)


def _even(image: np.ndarray) -> np.ndarray:
    h, w = image.shape
    if h % 2 or w % 2:
        return np.pad(image, ((0, h % 2), (0, w % 2)), mode="reflect")
    return image


def _bin2(image: np.ndarray) -> np.ndarray:
    """2×2 sums / 2 (unit variance stays unit), padding an odd edge by reflection."""
    image = _even(image)
    half = np.asarray(cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2),
                                 interpolation=cv2.INTER_AREA))
    return half * np.float32(2.0)  # the mean of 4 times 2 = their sum / 2


def _robust_sd(values: np.ndarray) -> float:
    """Standard deviation from the median absolute deviation (a subsample: it is a level)."""
    flat = values.ravel()
    sample = flat[:: max(1, flat.size // 4096)]
    med = float(np.median(sample))
    return 1.4826 * float(np.median(np.abs(sample - med)))


def forward_model(enhanced: np.ndarray, scale: int) -> np.ndarray:
    """What the camera would record (its expectation) if `enhanced` were the truth: the same
    frame for denoising, the `scale`×`scale` pixel binning for super-resolution."""
    out = enhanced.astype(np.float32, copy=False)
    if scale == 1:
        return out
    h, w = out.shape[0] // scale, out.shape[1] // scale
    return out[: h * scale, : w * scale].reshape(h, scale, w, scale).mean(
        axis=(1, 3), dtype=np.float32)


class TrustMeter:
    """Scores enhanced frames against their raw frames for one stream.

    Uses the noise model it is given per frame (the engine's own, so both agree), else the
    camera calibration when measured, else one estimated from the raw frames (`CameraNoise`).
    """

    def __init__(self, calibration: CameraCalibration,
                 settings: TrustSettings | None = None) -> None:
        self.settings = settings or TrustSettings()
        self._noise = CameraNoise(calibration)
        self._recent: list[np.ndarray] = []
        self._thresholds: dict[tuple[int, int], float] = {}

    def threshold(self, shape: tuple[int, int]) -> float:
        if shape not in self._thresholds:
            self._thresholds[shape] = alert_threshold(shape, self.settings.false_alarm_rate)
        return self._thresholds[shape]

    def _noise_for(self, raw: np.ndarray) -> NoiseModel:
        if not self._noise._refined:  # estimating: keep the frames refinement needs
            if self._recent and self._recent[-1].shape != raw.shape:
                self._recent.clear()
            self._recent.append(raw.astype(np.float32))
            del self._recent[: -self._noise.refine_after]
        model = self._noise.update(self._recent or [raw.astype(np.float32)])
        if self._noise._refined:
            self._recent.clear()
        return model

    def measure(self, raw: np.ndarray, enhanced: np.ndarray, scale: int = 1,
                noise: NoiseModel | None = None) -> TrustReport:
        """The trust report of `enhanced` (`scale` times the size of `raw`)."""
        if raw.ndim != 2:
            raise ValueError(f"trust maps need 2-D frames, got {raw.shape}")
        model = noise or self._noise_for(raw)
        expected = forward_model(enhanced, scale)
        if expected.shape != raw.shape:
            raise ValueError(f"enhanced frame {enhanced.shape} at scale {scale} does not "
                             f"match raw frame {raw.shape}")
        variance = model.variance(expected)
        # Below the camera's offset the model's variance falls to 0, but read noise never
        # does: floor it at the variance of the frame's dark areas (the 5th percentile of
        # the expected level — background in fluorescence; a higher, safer level otherwise).
        dark = float(np.percentile(expected.ravel()[:: max(1, expected.size // 4096)], 5))
        floor = max(model.alpha * dark + model.beta, 1e-3 * float(np.median(variance)), 1e-6)
        np.maximum(variance, np.float32(floor), out=variance)
        z = raw.astype(np.float32) - expected
        z /= np.sqrt(variance)
        residual_sd = _robust_sd(z)
        mean_abs_z = float(np.mean(np.abs(z)))
        half = _bin2(z)
        # All scales on the 2×2-binned residual (half the pixels to filter; the smallest
        # scale then acts like ~1.1 camera pixels).
        fields = [_smoothed(half, s / 2.0) for s in SCALES]
        best: np.ndarray | None = None
        for field in fields:
            # Normalise by the field's own spread, but never below the white-noise level:
            # a frame whose residual is small (enhanced ≈ raw) must not look noisy.
            field *= np.float32(1.0 / max(_robust_sd(field), 1.0))
            if best is None:
                best = field
            else:
                take = np.abs(field) > np.abs(best)
                best = np.where(take, field, best)
        assert best is not None
        k = int(np.argmax(np.abs(best)))
        max_z = float(best.flat[k])
        threshold = self.threshold(raw.shape[:2])
        s = self.settings
        spread_bad = s.max_spread_ratio > 0 and residual_sd > 0 and not (
            1.0 / s.max_spread_ratio <= residual_sd <= s.max_spread_ratio)
        score = TrustScore(
            mean_abs_z=mean_abs_z, residual_sd=residual_sd,
            flagged_fraction=float(np.mean(np.abs(best) > s.flag_sigma)), max_z=max_z,
            threshold=threshold, alert=bool(abs(max_z) > threshold or spread_bad),
            noise=model.describe())
        return TrustReport(score=score, map=np.ascontiguousarray(best, dtype=np.float32))
