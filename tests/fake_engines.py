"""Engines that misbehave on purpose, for tests of the trust maps (registered by the tests)."""

from __future__ import annotations

import numpy as np

from dimscope.engines import CameraCalibration, EngineInfo, make_engine
from dimscope.engines.noise_model import NoiseModel


class HallucinatingEngine:
    """The shipped denoiser, then a fake punctum `sigmas` noise σ bright (PSF sigma 2 px)
    painted at the frame's centre: what a hallucinating network would publish."""

    def __init__(self, sigmas: float = 8.0) -> None:
        self.inner = make_engine("denoise")
        self.sigmas = sigmas
        self.scale = 1
        self.info = EngineInfo(name="hallucinating", version="1")
        self._noise: NoiseModel | None = None

    def prepare(self, shape: tuple[int, ...], dtype: np.dtype[np.generic],
                calibration: CameraCalibration) -> None:
        self.inner.prepare(shape, dtype, calibration)
        self._noise = NoiseModel.from_calibration(calibration)

    def process(self, pixels: np.ndarray) -> np.ndarray:
        assert self._noise is not None
        out = self.inner.process(pixels).astype(np.float32)
        cy, cx = out.shape[0] // 2, out.shape[1] // 2
        yy, xx = np.mgrid[: out.shape[0], : out.shape[1]]
        sd = float(np.sqrt(self._noise.variance(np.float32(out[cy, cx]))))
        out += np.float32(self.sigmas * sd) * np.exp(
            -((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0).astype(np.float32)
        return out

    def close(self) -> None:
        self.inner.close()
