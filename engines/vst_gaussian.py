"""Classical low-light baseline: variance-stabilising transform + Gaussian smoothing.

The generalised Anscombe transform (Poisson shot noise plus Gaussian read
noise) makes the noise approximately unit-variance Gaussian whatever the
brightness; a Gaussian filter then removes it evenly, and the closed-form
unbiased inverse (Makitalo & Foi, 2011/2013) maps back to photoelectrons and
then to the camera's ADU. Output is float32 in ADU, so it is directly
comparable with the raw frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from .base import CameraCalibration, EngineError, EngineInfo


def anscombe(electrons: np.ndarray, read_noise_e: float) -> np.ndarray:
    """Generalised Anscombe transform of counts in photoelectrons."""
    return 2.0 * np.sqrt(np.maximum(electrons + 0.375 + read_noise_e**2, 0.0))


def inverse_anscombe(f: np.ndarray, read_noise_e: float) -> np.ndarray:
    """Closed-form approximation of the exact unbiased inverse (valid down to ~1 photon)."""
    f = np.maximum(f, 1.0)
    s32 = np.sqrt(1.5)
    inv = 0.25 * f**2 + 0.25 * s32 / f - 1.375 / f**2 + 0.625 * s32 / f**3 - 0.125
    return inv - read_noise_e**2


class VSTGaussianEngine:
    scale = 1

    def __init__(self, sigma: float = 1.5, **options: Any) -> None:
        if options:
            raise TypeError(f"engine 'vst_gaussian' options: sigma; got unknown {sorted(options)}")
        if sigma <= 0:
            raise EngineError(f"engine 'vst_gaussian': sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)
        self.calibration = CameraCalibration()
        self.info = EngineInfo(name="vst_gaussian", version=f"1-sigma{self.sigma:g}",
                               runtime="numpy", precision="fp32")

    def prepare(self, shape: tuple[int, ...], dtype: np.dtype[np.generic],
                calibration: CameraCalibration) -> None:
        if len(shape) != 2:
            raise EngineError(f"engine 'vst_gaussian' needs 2-D grey frames, got shape {shape}")
        self.calibration = calibration

    def process(self, pixels: np.ndarray) -> np.ndarray:
        cal = self.calibration
        electrons = (pixels.astype(np.float32) - np.float32(cal.offset_adu)) / np.float32(
            cal.gain_adu_per_e)
        stable = anscombe(electrons, cal.read_noise_e)
        smooth = gaussian_filter(stable, self.sigma, mode="reflect")
        restored = inverse_anscombe(smooth, cal.read_noise_e)
        restored *= np.float32(cal.gain_adu_per_e)
        restored += np.float32(cal.offset_adu)
        return restored.astype(np.float32, copy=False)

    def close(self) -> None:
        pass
