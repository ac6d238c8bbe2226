"""The engine protocol: what the engine stage needs from any enhancement method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


class EngineError(RuntimeError):
    """An engine cannot load, cannot handle the camera's frames, or failed on one."""


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What produced an enhanced frame: enough to reproduce it."""

    name: str
    version: str
    runtime: str = "numpy"
    precision: str = "fp32"
    scale: int = 1
    #: the noise model the engine uses (noise-aware engines), e.g. "var = 2·x − 190 ADU²
    #: (calibration)"; empty for engines that do not use one
    noise: str = ""
    #: SHA-256 (hex) of the network (graph + weights) that made the frame — the card's
    #: recorded hash when verified, else the hash of what was actually loaded; empty for
    #: engines without a model file
    model_sha256: str = ""
    #: False only when a model whose weights do not match its card was loaded anyway
    #: (`--allow-unverified-model`); every frame it makes says so
    verified: bool = True
    #: the trust check's forward model beyond binning by `scale`: a Gaussian blur (sigma,
    #: output pixels) applied first — a transfer model's output is sharper than the optics
    #: that recorded the raw frame (fitted to its training pairs); 0 = none
    forward_psf_sigma_px: float = 0.0
    #: the output is in another modality's intensity units: the trust check fits a gain
    #: and offset onto the raw frame per frame before comparing
    forward_fits_intensity: bool = False


@dataclass(frozen=True, slots=True)
class CameraCalibration:
    """Camera noise parameters, in the units of the raw frames.

    `measured` is False when nothing told dimscope the camera's numbers (the
    defaults stand in): noise-aware engines then estimate them from the frames.
    """

    gain_adu_per_e: float = 1.0
    offset_adu: float = 0.0
    read_noise_e: float = 0.0
    measured: bool = True


@runtime_checkable
class Engine(Protocol):
    """Transforms one raw frame into one enhanced frame.

    `prepare` runs once with the camera's frame shape before any frame; it
    must raise `EngineError` (naming the problem) if the engine cannot handle
    that shape, so the daemon can say so up front. `scale` is the output
    sampling relative to the input (2 for x2 super-resolution).
    """

    info: EngineInfo
    scale: int

    def prepare(self, shape: tuple[int, ...], dtype: np.dtype[np.generic],
                calibration: CameraCalibration) -> None: ...

    def process(self, pixels: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...
