"""Classical baselines that dimscope's models must beat: BM3D and BM4D with a VST.

Both stabilise the camera's Poisson–Gaussian noise with the generalised
Anscombe transform of its noise model (calibration, or estimated from the
frames: `CameraNoise`), filter at unit noise level and map back with the
closed-form unbiased inverse (Mäkitalo & Foi) — the standard "BM3D+VST".

- `bm3d`: one frame at a time (the `bm3d` package; ~1 s per 256² frame here).
- `bm4d`: the newest frame restored from a causal window of the last `window`
  frames treated as a volume (the `bm4d` package) — the same temporal context
  the temporal network sees, so the comparison is fair.

Far too slow to be live tiers on a CPU; they are the references of
`dimscope eval`, `dimscope enhance` and `bench/generalization.py`, and
`classical_estimate` is the guide the offline quality models refine
(`ModelCard.guide`); `deconvolved_estimate` deconvolves it for a guided transfer model
(`ModelCard.deconvolution`). Both need the `eval` extra.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import CameraCalibration, EngineError, EngineInfo
from .noise_model import CameraNoise

if TYPE_CHECKING:
    from .model_file import DeconvolutionGuide


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EngineError(f"engine {module!r} needs the {module} package: "
                          "pip install 'dimscope[eval]'") from None


def classical_estimate(library: Any, stable: np.ndarray) -> np.ndarray:
    """The newest frame of a (K, H, W) window of variance-stabilised frames (unit noise),
    denoised by BM3D (K = 1) or by BM4D over the window as a volume; an estimate of
    E[gat(x)] (map back with `NoiseModel.inverse_gat_unbiased`)."""
    if len(stable) == 1:
        return np.asarray(library.bm3d(stable[0], sigma_psd=1.0), dtype=np.float32)
    volume = np.moveaxis(stable, 0, -1)
    return np.asarray(library.bm4d(volume, sigma_psd=1.0)[..., -1], dtype=np.float32)


def deconvolved_estimate(estimate: np.ndarray, guide: DeconvolutionGuide) -> np.ndarray:
    """The classical estimate (ADU) deconvolved as `guide` says: Richardson–Lucy with a
    Gaussian PSF after subtracting a low percentile, which is added back (still ADU)."""
    from .evaluation.transfer_baselines import rl2d

    return rl2d(estimate, 1, guide.psf_sigma_px, guide.iterations, guide.background_percentile)


def classical_library(window: int) -> Any:
    """The `bm3d` (window 1) or `bm4d` package; EngineError naming the extra if absent."""
    return _require("bm3d" if window == 1 else "bm4d")


class BM3DEngine:
    """BM3D+VST, frame by frame (`window` = 1) or BM4D+VST over a causal window."""

    scale = 1

    def __init__(self, window: int = 1, **options: Any) -> None:
        if options:
            raise TypeError(f"engine options: window; got unknown {sorted(options)}")
        if window < 1:
            raise EngineError(f"window must be >= 1, got {window}")
        self.window = window
        self.library = classical_library(window)
        self.recent: deque[np.ndarray] = deque(maxlen=max(window, 4))
        self.noise = CameraNoise(CameraCalibration(measured=False))
        self.info = self._info()

    def _info(self) -> EngineInfo:
        name = "bm3d" if self.window == 1 else "bm4d"
        version = getattr(self.library, "__version__", "") or "installed"
        noise = self.noise.model.describe() if self.noise.model else ""
        return EngineInfo(name=name, version=f"{version}-vst" + (
            f"-w{self.window}" if self.window > 1 else ""), runtime="numpy", precision="fp32",
            noise=noise)

    def prepare(self, shape: tuple[int, ...], dtype: np.dtype[np.generic],
                calibration: CameraCalibration) -> None:
        if len(shape) != 2:
            raise EngineError(f"engine {self.info.name!r} needs 2-D grey frames, got {shape}")
        self.noise = CameraNoise(calibration)
        self.recent.clear()

    def reset(self) -> None:
        self.recent.clear()

    def process(self, pixels: np.ndarray) -> np.ndarray:
        if self.recent and self.recent[-1].shape != pixels.shape:
            self.recent.clear()
        self.recent.append(pixels.astype(np.float32))
        noise = self.noise.update(list(self.recent))
        self.info = self._info()
        frames = list(self.recent)[-self.window:]
        frames = [frames[0]] * (self.window - len(frames)) + frames
        stable = noise.gat(np.stack(frames))
        return noise.inverse_gat_unbiased(classical_estimate(self.library, stable))

    def close(self) -> None:
        pass
