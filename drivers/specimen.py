"""A procedural, moving fluorescent specimen with known ground truth.

Tubular, mitochondria-like structures are drawn once onto a field at 2x the
camera sampling, blurred by a Gaussian PSF, and then *drift* (integer steps on
the 2x grid, i.e. half camera pixels); bright puncta move independently along
smooth, deterministic trajectories. The camera-grid image for any drift phase
is a view into one of four pre-binned copies, so rendering a frame costs a
slice plus a few small stamps: this is what lets the simulator exceed 200
frames/s at 512x512.

Intensities are relative: 1.0 is the brightest tubule after blurring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter


@dataclass(frozen=True, slots=True)
class SpecimenState:
    """Everything needed to re-render one frame's ground truth exactly."""

    time_s: float
    shift_y2: int  # drift in 2x-grid pixels
    shift_x2: int
    puncta_yx: np.ndarray  # (K, 2) camera-pixel coordinates
    brightness: float  # bleaching and defocus factor applied to the whole specimen


class Specimen:
    def __init__(self, height: int, width: int, *, seed: int = 0, n_tubules: int = 40,
                 n_puncta: int = 30, psf_sigma_px: float = 1.2, drift_px_per_s: float = 2.0,
                 punctum_speed_px_per_s: float = 6.0) -> None:
        self.height, self.width = height, width
        self.psf_sigma_px = psf_sigma_px
        self.drift_px_per_s = drift_px_per_s
        rng = np.random.default_rng(seed)
        # Margin covers the drift of a long run before it wraps around.
        self.margin = 64
        field_h, field_w = 2 * (height + 2 * self.margin), 2 * (width + 2 * self.margin)
        self.field2 = self._draw_tubules(rng, field_h, field_w, n_tubules, psf_sigma_px * 2)
        # phases[py][px]: camera-grid binning of the 2x field offset by (py, px) fine pixels.
        self.phases = [[self._bin2(self.field2[py:, px:]) for px in (0, 1)] for py in (0, 1)]
        self.drift_dir = rng.normal(size=2)
        self.drift_dir /= np.linalg.norm(self.drift_dir)
        self.puncta_home = rng.uniform([8, 8], [height - 8, width - 8], size=(n_puncta, 2))
        # Sum of sinusoids: smooth, bounded, deterministic in time, looks diffusive.
        self.puncta_amp = rng.uniform(3, 12, size=(n_puncta, 3, 2))
        self.puncta_freq = rng.uniform(0.2, 1.0, size=(n_puncta, 3, 1)) * (
            punctum_speed_px_per_s / 8.0)
        self.puncta_phase = rng.uniform(0, 2 * np.pi, size=(n_puncta, 3, 2))
        self.puncta_brightness = rng.uniform(0.6, 1.5, size=n_puncta).astype(np.float32)

    @staticmethod
    def _bin2(fine: np.ndarray) -> np.ndarray:
        h, w = (fine.shape[0] // 2) * 2, (fine.shape[1] // 2) * 2
        f = fine[:h, :w]
        return (0.25 * (f[0::2, 0::2] + f[1::2, 0::2] + f[0::2, 1::2] + f[1::2, 1::2])).astype(
            np.float32)

    @staticmethod
    def _draw_tubules(rng: np.random.Generator, h: int, w: int, n: int,
                      sigma: float) -> np.ndarray:
        canvas = np.zeros((h, w), dtype=np.float32)
        for _ in range(n):
            # A smooth random walk: a mitochondrion-like filament.
            n_steps = int(rng.integers(40, 160))
            heading = rng.uniform(0, 2 * np.pi)
            turn = np.cumsum(rng.normal(0, 0.12, n_steps))
            step = 2.0
            ys = rng.uniform(0, h) + np.cumsum(step * np.sin(heading + turn))
            xs = rng.uniform(0, w) + np.cumsum(step * np.cos(heading + turn))
            ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
            weight = rng.uniform(0.4, 1.0)
            np.add.at(canvas, (ys[ok].astype(int), xs[ok].astype(int)), weight)
        # Tubule width (~250 nm) plus the optical PSF.
        canvas = gaussian_filter(canvas, sigma=np.hypot(sigma, 2.0))
        canvas /= max(float(np.percentile(canvas, 99.95)), 1e-6)
        np.clip(canvas, 0, 1.2, out=canvas)
        return canvas

    # -- state -------------------------------------------------------------
    def state_at(self, time_s: float, brightness: float) -> SpecimenState:
        drift2 = 2.0 * self.drift_px_per_s * time_s * self.drift_dir
        # Wrap inside the margin so arbitrarily long runs keep a valid view.
        span = 2 * self.margin
        sy, sx = (round(d) % (2 * span) for d in drift2)
        sy = sy if sy < span else 2 * span - sy  # bounce back and forth: no jump
        sx = sx if sx < span else 2 * span - sx
        wobble = np.sin(self.puncta_freq * 2 * np.pi * time_s + self.puncta_phase)
        puncta = self.puncta_home + (self.puncta_amp * wobble).sum(axis=1)
        np.clip(puncta, 3, [self.height - 4, self.width - 4], out=puncta)
        return SpecimenState(time_s, sy, sx, puncta, brightness)

    # -- rendering -------------------------------------------------------------
    def render(self, state: SpecimenState, scale: int = 1) -> np.ndarray:
        """Noiseless relative intensity at the camera grid (scale 1) or 2x finer (scale 2)."""
        if scale == 1:
            base = self.phases[state.shift_y2 & 1][state.shift_x2 & 1]
            y0, x0 = state.shift_y2 >> 1, state.shift_x2 >> 1
            img = base[y0:y0 + self.height, x0:x0 + self.width].copy()
        elif scale == 2:
            y0, x0 = state.shift_y2, state.shift_x2
            img = self.field2[y0:y0 + 2 * self.height, x0:x0 + 2 * self.width].copy()
        else:
            raise ValueError(f"ground truth is available at scale 1 or 2, not {scale}")
        self._stamp_puncta(img, state.puncta_yx * scale, self.psf_sigma_px * scale)
        if state.brightness != 1.0:
            img *= np.float32(state.brightness)
        return img

    def _stamp_puncta(self, img: np.ndarray, centres: np.ndarray, sigma: float) -> None:
        r = int(np.ceil(3 * sigma))
        offsets = np.arange(-r, r + 1, dtype=np.float32)
        h, w = img.shape
        for (cy, cx), b in zip(centres, self.puncta_brightness, strict=True):
            iy, ix = int(cy), int(cx)
            gy = np.exp(-((offsets + iy - cy) ** 2) / (2 * sigma**2))
            gx = np.exp(-((offsets + ix - cx) ** 2) / (2 * sigma**2))
            y0, y1, x0, x1 = max(iy - r, 0), min(iy + r + 1, h), max(ix - r, 0), min(ix + r + 1, w)
            stamp = b * np.outer(gy, gx)
            img[y0:y1, x0:x1] += stamp[y0 - (iy - r):y1 - (iy - r), x0 - (ix - r):x1 - (ix - r)]
