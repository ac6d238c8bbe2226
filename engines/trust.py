"""Trust maps: does an enhanced frame agree with what the camera measured?

Computed from physics, not from the network's opinion of itself. The raw frame is
a noisy measurement of the truth through a known forward model (the camera's
Poisson–Gaussian noise, var = alpha·x + beta; for ×2 super-resolution also the
camera's 2×2 pixel binning; for a cross-modality transfer model first a Gaussian blur
fitted to its training pairs — the raw optics are blurrier than the output — and a
per-frame least-squares gain and offset, since the output is in the other modality's
units, named in the score's `forward`). If the enhanced frame were the truth, the residual

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
  threshold at which white noise alone would alert on about `false_alarm_rate` of
  frames (`alert_threshold`: random-field theory and the union bound), or when the
  residual spread is well above 1 (a restoration inconsistent everywhere; a spread below 1
  only means the engine left noise in).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

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
    #: alert when the robust residual spread is above this (0 = never): the enhanced frame
    #: disagrees with the raw frame everywhere
    max_residual_sd: float = 2.0


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
    #: interpolated frames: share of pixels where the motion between the neighbours is not
    #: consistent (no measurement to check against there)
    flow_inconsistent: float | None = None
    #: the forward model when it is more than identity or binning (transfer models: the
    #: fitted blur and the intensity fit), so the header names the metric used
    forward: str = ""

    def as_dict(self) -> dict[str, float | bool | str]:
        out: dict[str, float | bool | str] = {
            "mean_abs_z": round(self.mean_abs_z, 4), "residual_sd": round(self.residual_sd, 4),
            "flagged_fraction": round(self.flagged_fraction, 6), "max_z": round(self.max_z, 3),
            "threshold": round(self.threshold, 3), "alert": self.alert, "noise": self.noise}
        if self.flow_inconsistent is not None:
            out["flow_inconsistent"] = round(self.flow_inconsistent, 4)
        if self.forward:
            out["forward"] = self.forward
        return out


@dataclass(frozen=True, slots=True)
class TrustReport:
    score: TrustScore
    #: float32 local z-scores at half the camera's resolution (ceil(H/2), ceil(W/2))
    map: np.ndarray


def alert_threshold(shape: tuple[int, int], false_alarm_rate: float,
                    scales: tuple[float, ...] = SCALES) -> float:
    """The local z at which unit white noise, smoothed at `scales` (camera pixels; the
    smallest on the camera's grid, the others on the 2×2-binned one), exceeds it (either
    sign) anywhere in a frame of `shape` with probability about `false_alarm_rate` (an
    upper bound: it errs towards fewer alerts).

    Per scale, the smaller of two tail estimates of the maximum: the expected Euler
    characteristic of a smooth 2-D Gaussian field (area / (2 s²) · (2π)^(-3/2) · u ·
    exp(−u²/2) per tail; Worsley et al. 1996), and the union bound over the field's
    samples (exact in the limit of white fields).
    """
    full = float(shape[0] * shape[1])
    half = float(((shape[0] + 1) // 2) * ((shape[1] + 1) // 2))

    def rate(u: float) -> float:
        tail = 0.5 * math.erfc(u / math.sqrt(2.0))
        total = 0.0
        for i, s in enumerate(scales):
            samples, s_grid = (full, s) if i == 0 else (half, s / 2.0)
            euler = samples / (2.0 * s_grid**2) * (2 * math.pi) ** -1.5 * u * math.exp(
                -u * u / 2.0)
            total += 2.0 * min(euler, samples * tail)
        return total

    lo, hi = 2.0, 12.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rate(mid) > false_alarm_rate else (lo, mid)
    return hi


def _kernel(sigma: float) -> np.ndarray:
    return np.asarray(cv2.getGaussianKernel(2 * math.ceil(3 * sigma) + 1, sigma, cv2.CV_32F))


@functools.lru_cache(maxsize=32)
def _unit_gain(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """1 / the standard deviation of white unit noise smoothed at `sigma` with zeros outside
    the frame, per pixel: the smoothed residual times this has unit variance everywhere,
    also at the borders (where fewer pixels contribute)."""
    k2 = _kernel(sigma) ** 2
    inside = np.ones(shape, np.float32)
    var = cv2.sepFilter2D(inside, cv2.CV_32F, k2, k2, borderType=cv2.BORDER_CONSTANT)
    gain = np.asarray(1.0 / np.sqrt(var), np.float32)
    gain.flags.writeable = False
    return gain


def _smoothed(z: np.ndarray, sigma: float) -> np.ndarray:
    """z smoothed with a Gaussian of `sigma` px, scaled to unit variance for white z."""
    k = _kernel(sigma)
    out = np.asarray(cv2.sepFilter2D(z, cv2.CV_32F, k, k, borderType=cv2.BORDER_CONSTANT))
    return out * _unit_gain((z.shape[0], z.shape[1]), sigma)


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


@functools.lru_cache(maxsize=16)
def _sample_index(size: int, n: int = 4096) -> np.ndarray:
    """A fixed spread-out sample of n flat indices (not a stride: a stride that divides the
    frame's width would see a few columns only, and one bad sensor column would decide)."""
    rng = np.random.default_rng(size)
    index = np.sort(rng.choice(size, size=min(n, size), replace=False))
    index.flags.writeable = False
    return index


def _sample(values: np.ndarray) -> np.ndarray:
    flat = values.ravel()
    return flat[_sample_index(flat.size)]


def _robust_sd(values: np.ndarray) -> float:
    """Standard deviation from the median absolute deviation (a subsample: it is a level)."""
    flat = values.ravel()
    sample = _sample(flat)
    med = float(np.median(sample))
    return 1.4826 * float(np.median(np.abs(sample - med)))


def _pool_abs_max(image: np.ndarray) -> np.ndarray:
    """2×2 pooling that keeps the value of largest magnitude (signed)."""
    image = _even(image)
    views = (image[0::2, 0::2], image[0::2, 1::2], image[1::2, 0::2], image[1::2, 1::2])
    high = np.maximum(np.maximum(views[0], views[1]), np.maximum(views[2], views[3]))
    low = np.minimum(np.minimum(views[0], views[1]), np.minimum(views[2], views[3]))
    return np.where(high >= -low, high, low)


def forward_model(enhanced: np.ndarray, scale: int, psf_sigma_px: float = 0.0) -> np.ndarray:
    """What the camera would record (its expectation) if `enhanced` were the truth: the same
    frame for denoising, the `scale`×`scale` pixel binning for super-resolution, after a
    Gaussian blur of `psf_sigma_px` (output pixels) for a transfer model, whose output is
    sharper than the optics that recorded the raw frame."""
    out: np.ndarray = enhanced.astype(np.float32, copy=False)
    if psf_sigma_px > 0:
        out = np.asarray(cv2.GaussianBlur(out, (0, 0), psf_sigma_px,
                                          borderType=cv2.BORDER_REFLECT))
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
        self._zeros: dict[tuple[int, int], np.ndarray] = {}

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

    def unchanged(self, raw: np.ndarray) -> TrustReport:
        """The report of an "enhanced" frame that is the raw frame itself (a passthrough
        engine such as `identity`): consistent by construction, z = 0, nothing to compute."""
        shape = ((raw.shape[0] + 1) // 2, (raw.shape[1] + 1) // 2)
        zeros = self._zeros.get(shape)
        if zeros is None:
            zeros = self._zeros[shape] = np.zeros(shape, np.float32)
            zeros.flags.writeable = False
        score = TrustScore(mean_abs_z=0.0, residual_sd=0.0, flagged_fraction=0.0, max_z=0.0,
                           threshold=self.threshold((raw.shape[0], raw.shape[1])),
                           alert=False, noise="none (the enhanced frame is the raw frame)")
        return TrustReport(score=score, map=zeros)

    def measure(self, raw: np.ndarray, enhanced: np.ndarray, scale: int = 1,
                noise: NoiseModel | None = None, psf_sigma_px: float = 0.0,
                fit_intensity: bool = False) -> TrustReport:
        """The trust report of `enhanced` (`scale` times the size of `raw`). A transfer
        model's output is first blurred by `psf_sigma_px` and, with `fit_intensity`, mapped
        onto the raw frame's intensity units by a least-squares gain and offset."""
        if enhanced is raw:
            return self.unchanged(raw)
        if raw.ndim != 2:
            raise ValueError(f"trust maps need 2-D frames, got {raw.shape}")
        model = noise or self._noise_for(raw)
        expected = forward_model(enhanced, scale, psf_sigma_px)
        if expected.shape != raw.shape:
            raise ValueError(f"enhanced frame {enhanced.shape} at scale {scale} does not "
                             f"match raw frame {raw.shape}")
        finite = bool(np.isfinite(expected).all())
        if not finite:  # an engine that emits NaN/Inf: never consistent, and no NaN in JSON
            expected = np.nan_to_num(expected, nan=0.0, posinf=0.0, neginf=0.0)
        forward = ""
        if psf_sigma_px > 0 or fit_intensity:
            forward = f"gaussian blur sigma {psf_sigma_px:.2f} px, {scale}x{scale} binning"
        if fit_intensity:
            gain, offset = _intensity_fit(expected, raw)
            expected = np.asarray(cv2.addWeighted(expected, gain, expected, 0.0, offset))
            forward += f", intensity fitted (gain {gain:.4g}, offset {offset:.4g})"
        variance = _floored_variance(model, expected)
        z = np.asarray(cv2.subtract(raw.astype(np.float32, copy=False), expected))
        z = np.asarray(cv2.divide(z, np.asarray(cv2.sqrt(variance))))
        report = self._report(z, model, finite=finite)
        if not forward:
            return report
        return TrustReport(score=replace(report.score, forward=forward), map=report.map)

    def _report(self, z: np.ndarray, model: NoiseModel, flow_inconsistent: float | None = None,
                z_fields: np.ndarray | None = None, finite: bool = True) -> TrustReport:
        """Score a residual z (unit white noise per pixel where the frame is honest);
        `z_fields`, when given, is what the local tests smooth (the same residual normalised
        for its variance after smoothing, where sampling correlated neighbouring pixels)."""
        residual_sd = _robust_sd(z)
        mean_abs_z = float(cv2.norm(z, cv2.NORM_L1)) / z.size
        z = z if z_fields is None else z_fields
        # The smallest scale on the camera's grid (puncta of about the PSF's size), pooled
        # to half resolution; the larger ones on the 2×2-binned residual (a quarter of the
        # pixels to filter).
        half = _bin2(z)
        fields = [_smoothed(z, SCALES[0]), *(_smoothed(half, s / 2.0) for s in SCALES[1:])]
        best: np.ndarray | None = None
        for i, field in enumerate(fields):
            # Normalise by the field's own spread, but never below the white-noise level:
            # a frame whose residual is small (enhanced ≈ raw) must not look noisy.
            field *= np.float32(1.0 / max(_robust_sd(field), 1.0))
            if i == 0:
                field = _pool_abs_max(field)
            best = field if best is None else np.where(np.abs(field) > np.abs(best), field,
                                                       best)
        assert best is not None
        k = int(np.argmax(np.abs(best)))
        max_z = float(best.flat[k])
        threshold = self.threshold((z.shape[0], z.shape[1]))
        s = self.settings
        # Too large a residual everywhere is inconsistent; too small one only means the
        # engine left noise in (consistent with the data, so no alert).
        spread_bad = s.max_residual_sd > 0 and residual_sd > s.max_residual_sd
        score = TrustScore(
            mean_abs_z=mean_abs_z, residual_sd=residual_sd,
            flagged_fraction=float(np.mean(np.abs(best) > s.flag_sigma)), max_z=max_z,
            threshold=threshold,
            alert=bool(abs(max_z) > threshold or spread_bad or not finite),
            noise=model.describe(), flow_inconsistent=flow_inconsistent)
        return TrustReport(score=score, map=np.ascontiguousarray(best, dtype=np.float32))


def _intensity_fit(expected: np.ndarray, raw: np.ndarray) -> tuple[float, float]:
    """Least-squares gain and offset taking `expected` onto `raw` (on a fixed sample of
    pixels: the fit needs thousands, not millions)."""
    x = _sample(expected).astype(np.float64)
    y = _sample(raw.astype(np.float32, copy=False)).astype(np.float64)
    var = float(np.var(x))
    if var <= 0:
        return 1.0, float(np.mean(y) - np.mean(x))
    gain = float(np.mean((x - x.mean()) * (y - y.mean()))) / var
    return gain, float(y.mean() - gain * x.mean())


def _floored_variance(model: NoiseModel, expected: np.ndarray) -> np.ndarray:
    """The camera's variance at `expected`, floored: below the camera's offset the model's
    variance falls to 0, but read noise never does — floor it at the variance of the frame's
    dark areas (the 5th percentile of the expected level: background in fluorescence; a
    higher, safer level otherwise)."""
    variance = model.variance(expected)
    levels = _sample(expected)
    dark = float(np.percentile(levels, 5))
    floor = max(model.alpha * dark + model.beta,
                1e-3 * (model.alpha * float(np.median(levels)) + model.beta), 1e-6)
    np.maximum(variance, np.float32(floor), out=variance)
    return variance


def _inside(map_xy: np.ndarray) -> np.ndarray:
    """1 where `map_xy` samples inside the frame, else 0 (float32)."""
    h, w = map_xy.shape[:2]
    x, y = map_xy[..., 0], map_xy[..., 1]
    return ((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)).astype(np.float32)


def _bilinear_gain(map_xy: np.ndarray) -> np.ndarray:
    """Per pixel, the sum of the squared bilinear weights `cv2.remap` uses at `map_xy`: the
    factor by which sampling shrinks the variance of white noise (1 on the grid, 1/4 midway)."""
    frac = map_xy - np.floor(map_xy)
    w = (1.0 - frac) ** 2 + frac**2
    return np.asarray(w[..., 0] * w[..., 1], np.float32)


class InterpolatedTrust(TrustMeter):
    """Trust maps of synthesised frames, which have no raw frame of their own.

    The two acquired neighbours are measurements of the scene at their times; moved to
    time t by the motion between them (DIS optical flow on the enhanced neighbours, as
    the `flow` interpolator estimates it), their raw frames are a noisy measurement of the
    frame at t. Where the motion is consistent (forward–backward flow check), the
    interpolated frame must agree with that blend within the camera noise of the warped
    raw frames (variance scaled by the blend and bilinear weights); where it is not
    (occlusions, mis-tracking) there is no measurement: z = 0 there, and the share of such
    pixels is the score's `flow_inconsistent`. The same local tests then give the map and
    the alert. It checks the synthesised frame against the measurements under the
    estimated motion: a structure the interpolator invented, or a moving one it left
    behind, stands out; an error that the flow itself shares cannot.
    """

    def __init__(self, calibration: CameraCalibration,
                 settings: TrustSettings | None = None) -> None:
        super().__init__(calibration, settings)
        from .interpolators import FlowInterpolator
        from .options import FlowInterpolatorOptions

        self._flow = FlowInterpolator(FlowInterpolatorOptions(preset="ultrafast"))
        self._flow_shape: tuple[int, int] | None = None

    def measure_interpolated(self, raw_a: np.ndarray, raw_b: np.ndarray,
                             enhanced_a: np.ndarray, enhanced_b: np.ndarray,
                             interpolated: np.ndarray, t: float, scale: int = 1,
                             noise: NoiseModel | None = None) -> TrustReport:
        """The trust report of `interpolated` at `t` between a (0) and b (1); the enhanced
        and interpolated frames at `scale` times the raw frames' size."""
        model = noise or self._noise_for(raw_b)
        a, b, frame = (forward_model(x, scale) for x in (enhanced_a, enhanced_b, interpolated))
        shape = (raw_a.shape[0], raw_a.shape[1])
        if a.shape != shape or raw_b.shape != shape:
            raise ValueError(f"interpolated trust: frames {a.shape} at scale {scale} do not "
                             f"match raw frames {raw_a.shape}, {raw_b.shape}")
        if self._flow_shape != shape:
            self._flow.prepare(shape)
            self._flow_shape = shape
        # Read-only neighbours (the pipeline's frames are) let the flows be computed once per
        # pair for all its t; writable ones are copied so the caller's arrays stay theirs.
        a, b = (x if not x.flags.writeable else x.copy() for x in (a, b))
        a.flags.writeable = b.flags.writeable = False
        map0, map1 = self._flow.backward_maps(a, b, t)
        rel_a, rel_b = self._flow.reliabilities(a, b)
        warped_a, r0 = self._flow.warp(map0, raw_a.astype(np.float32), rel_a)
        warped_b, r1 = self._flow.warp(map1, raw_b.astype(np.float32), rel_b)
        # A sample from outside the frame is a replicated edge pixel, not a measurement.
        w0 = np.float32(1.0 - t) * r0 * _inside(map0)
        w1 = np.float32(t) * r1 * _inside(map1)
        total = w0 + w1
        valid = total > np.float32(0.5 * min(t, 1.0 - t))
        total = np.maximum(total, np.float32(1e-6))
        w0 /= total
        w1 /= total
        measured = w0 * warped_a + w1 * warped_b
        variance = _floored_variance(model, frame)
        blend = w0 * w0 + w1 * w1
        # Per pixel, bilinear sampling averages neighbours and shrinks the noise variance;
        # smoothed over a few pixels that correlation gives it back, so the local tests use
        # the variance of the blend alone.
        pixel_var = variance * (w0 * w0 * _bilinear_gain(map0) + w1 * w1 * _bilinear_gain(map1))
        residual = measured - frame
        z = residual / np.sqrt(np.maximum(pixel_var, np.float32(1e-6)))
        z_fields = residual / np.sqrt(np.maximum(variance * blend, np.float32(1e-6)))
        z[~valid] = 0.0
        z_fields[~valid] = 0.0
        return self._report(np.asarray(z, np.float32), model,
                            flow_inconsistent=float(1.0 - valid.mean()),
                            z_fields=np.asarray(z_fields, np.float32))
