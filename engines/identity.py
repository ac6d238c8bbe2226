"""Passthrough engine: measures the pipeline itself, with no enhancement cost."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import CameraCalibration, EngineInfo


class IdentityEngine:
    scale = 1

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"engine 'identity' takes no options, got {sorted(options)}")
        self.info = EngineInfo(name="identity", version="1", runtime="numpy", precision="exact")

    def prepare(self, shape: tuple[int, ...], dtype: np.dtype[np.generic],
                calibration: CameraCalibration) -> None:
        pass

    def process(self, pixels: np.ndarray) -> np.ndarray:
        return pixels

    def close(self) -> None:
        pass
