"""Training clips for the noise-aware, causal temporal denoiser.

A sample is a window of K clean frames (oldest first) ending at the frame to
restore, degraded by one camera (Poisson shot noise at a photon budget drawn
log-uniformly, Gaussian read noise, gain, offset, ADC rounding), normalised
with `VSTNorm` under the camera's noise model, and the clean newest frame as
the target. Clean windows come from three places:

- real time-lapses (every channel of every movie given), consecutive frames:
  real motion, division, bleaching;
- good still images moved by a random drift (sub-pixel, constant velocity plus
  jitter) with bleaching across the window: motion of any speed and direction;
- the simulated microscope's movies (drifting tubules, moving puncta).

To serve single images and the start of a stream with the same network, some
windows have fewer real frames: the missing older ones repeat the oldest one
present (a single image repeats itself K times), exactly as the engine pads.
The noise model is the camera's own, or, in some samples, a perturbed one, so
the network tolerates a noise model estimated from the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from scipy.ndimage import map_coordinates

from ..base import CameraCalibration
from ..noise_model import NoiseModel
from ..normalize import VSTNorm


def movie_channels(path: Path) -> list[np.ndarray]:
    """Each channel of a time-lapse file as a (T, Y, X) float32 movie scaled to ≈0..1."""
    data = np.asarray(tifffile.imread(path), dtype=np.float32)
    if data.ndim == 3:
        movies = [data]
    elif data.ndim == 4:  # (T, C, Y, X)
        movies = [data[:, c] for c in range(data.shape[1])]
    else:
        return []
    out = []
    for m in movies:
        lo, hi = np.percentile(m, [0.1, 99.9])
        if hi - lo > 1e-6 and len(m) >= 2:
            out.append(np.clip((m - lo) / (hi - lo), 0.0, 1.5))
    return out


def tif_files(sources: list[str]) -> list[Path]:
    files: list[Path] = []
    for s in sources:
        p = Path(s).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in (".tif", ".tiff"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"training data not found: {p}")
    return files


@dataclass(frozen=True, slots=True)
class CameraRanges:
    photons: tuple[float, float] = (2.0, 1000.0)
    read_noise_e: tuple[float, float] = (0.5, 3.0)
    gain_adu_per_e: tuple[float, float] = (0.5, 4.0)
    offset_adu: tuple[float, float] = (0.0, 400.0)
    background: tuple[float, float] = (0.0, 0.05)


@dataclass(frozen=True, slots=True)
class Exposure:
    """A clean clip through one random camera: what it recorded (ADU), the clean newest
    frame in the same units, and the calibration a model is given."""

    noisy: np.ndarray
    target: np.ndarray
    calibration: CameraCalibration


def expose(clip: np.ndarray, camera: CameraRanges, rng: np.random.Generator,
           perturb_fraction: float, target_frame: np.ndarray | None = None) -> Exposure:
    """Draw a camera from `camera` (photons log-uniform) and record `clip` with it: Poisson
    shot noise, Gaussian read noise, gain, offset, rounding. With probability
    `perturb_fraction` the calibration given is off by up to ~20 %, as if estimated. The
    target is the clip's newest frame, or `target_frame` (the same field at another
    sampling: super-resolution), in the recorded units."""
    photons = float(np.exp(rng.uniform(*np.log(camera.photons))))
    read = rng.uniform(*camera.read_noise_e)
    gain = rng.uniform(*camera.gain_adu_per_e)
    offset = rng.uniform(*camera.offset_adu)
    background = np.float32(rng.uniform(*camera.background))
    relative = clip + background
    electrons = rng.poisson(relative * photons).astype(np.float32)
    electrons += rng.normal(0.0, read, electrons.shape).astype(np.float32)
    noisy = np.round(electrons * np.float32(gain) + np.float32(offset))
    seen = relative[-1] if target_frame is None else target_frame + background
    target = seen * np.float32(photons * gain) + np.float32(offset)
    cal = CameraCalibration(gain, offset, read)
    if rng.random() < perturb_fraction:
        cal = CameraCalibration(gain * rng.uniform(0.85, 1.18), offset,
                                read * rng.uniform(0.6, 1.6))
    return Exposure(noisy, target, cal)


class ClipSampler:
    """(inputs (B, K+1, P, P), target (B, 1, P, P)) batches; see the module docstring."""

    def __init__(self, window: int, patch: int, batch: int, images: list[np.ndarray],
                 movies: list[np.ndarray], rng: np.random.Generator,
                 camera: CameraRanges = CameraRanges(), sim_fraction: float = 0.3,
                 single_fraction: float = 0.15, perturb_fraction: float = 0.3) -> None:
        self.window, self.patch, self.batch_size, self.rng = window, patch, batch, rng
        self.images = [im for im in images if min(im.shape) >= patch + 16]
        self.movies = [m for m in movies if min(m.shape[1:]) >= patch and len(m) >= 2]
        self.camera, self.norm = camera, VSTNorm()
        self.sim_fraction = sim_fraction if (self.images or self.movies) else 1.0
        self.single_fraction, self.perturb_fraction = single_fraction, perturb_fraction
        self._specimens: list[Any] = []

    # -- clean windows -------------------------------------------------------------
    def _sim_clip(self) -> np.ndarray:
        from dimscope.drivers.specimen import Specimen

        if not self._specimens:
            side = max(self.patch + 32, 160)
            self._specimens = [Specimen(side, side, seed=int(self.rng.integers(1 << 30)),
                                        n_tubules=int(self.rng.integers(10, 60)),
                                        n_puncta=int(self.rng.integers(5, 50)),
                                        psf_sigma_px=float(self.rng.uniform(0.8, 2.0)),
                                        drift_px_per_s=float(self.rng.uniform(0.0, 4.0)),
                                        punctum_speed_px_per_s=float(self.rng.uniform(0, 10)))
                               for _ in range(6)]
        spec = self._specimens[int(self.rng.integers(len(self._specimens)))]
        t0, dt = float(self.rng.uniform(0, 100)), float(self.rng.uniform(0.05, 1.0))
        frames = np.stack([spec.render(spec.state_at(t0 + dt * k, 1.0))
                           for k in range(self.window)])
        y0 = int(self.rng.integers(0, frames.shape[1] - self.patch + 1))
        x0 = int(self.rng.integers(0, frames.shape[2] - self.patch + 1))
        clip = frames[:, y0:y0 + self.patch, x0:x0 + self.patch]
        return clip / max(float(clip.max()), 0.3)

    def _moved_image_clip(self) -> np.ndarray:
        img = self.images[int(self.rng.integers(len(self.images)))]
        p, k = self.patch, self.window
        speed = 0.0 if self.rng.random() < 0.35 else float(np.exp(self.rng.uniform(-2.5, 1.2)))
        angle = self.rng.uniform(0, 2 * np.pi)
        v = speed * np.array([np.sin(angle), np.cos(angle)])
        path = np.arange(k)[:, None] * v[None] + self.rng.normal(0, 0.15 * min(speed, 1.0),
                                                                 (k, 2))
        path -= path[-1]  # the newest frame sits on the pixel grid
        margin = int(np.ceil(np.abs(path).max())) + 2
        if min(img.shape) < p + 2 * margin:
            path *= 0.0
            margin = 2
        y0 = int(self.rng.integers(margin, img.shape[0] - p - margin + 1))
        x0 = int(self.rng.integers(margin, img.shape[1] - p - margin + 1))
        yy, xx = np.mgrid[0:p, 0:p].astype(np.float32)
        frames = [map_coordinates(img, [yy + y0 + dy, xx + x0 + dx], order=1, mode="reflect")
                  for dy, dx in path]
        clip = np.stack(frames).astype(np.float32)
        bleach = float(self.rng.uniform(0.0, 0.03))
        clip *= (1.0 + bleach * np.arange(k)[::-1, None, None]).astype(np.float32)
        return clip

    def _movie_clip(self) -> np.ndarray:
        movie = self.movies[int(self.rng.integers(len(self.movies)))]
        k, p = self.window, self.patch
        end = int(self.rng.integers(0, len(movie)))
        idx = np.clip(np.arange(end - k + 1, end + 1), 0, None)  # early frames: pad with frame 0
        y0 = int(self.rng.integers(0, movie.shape[1] - p + 1))
        x0 = int(self.rng.integers(0, movie.shape[2] - p + 1))
        return movie[idx, y0:y0 + p, x0:x0 + p]

    def clean_clip(self) -> np.ndarray:
        r = self.rng.random()
        if r < self.sim_fraction:
            clip = self._sim_clip()
        elif self.movies and (not self.images or self.rng.random() < 0.5):
            clip = self._movie_clip()
        else:
            clip = self._moved_image_clip()
        clip = np.rot90(clip, int(self.rng.integers(4)), axes=(1, 2))
        if self.rng.random() < 0.5:
            clip = clip[:, :, ::-1]
        return np.ascontiguousarray(np.clip(clip, 0.0, None), dtype=np.float32)

    # -- one camera ------------------------------------------------------------------
    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        c, rng = self.camera, self.rng
        clip = self.clean_clip()
        present = self.window
        r = rng.random()
        if r < self.single_fraction:
            present = 1
        elif r < self.single_fraction + 0.1 and self.window > 2:
            present = int(rng.integers(2, self.window + 1))
        shot = expose(clip, c, rng, self.perturb_fraction)
        noisy = shot.noisy
        if present < self.window:
            noisy[: self.window - present] = noisy[self.window - present]
        noise = NoiseModel.from_calibration(shot.calibration)
        x, lo, span = self.norm.inputs(noisy, noise)
        return x, self.norm.target(shot.target, noise, lo, span)

    def batch_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.sample() for _ in range(self.batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])[:, None]
