"""Training data for guided models: a network that refines BM3D/BM4D+VST.

A guided model (`ModelCard.guide`) gets the noisy causal window, the classical
estimate of the newest frame and the noise level, and adds a learned residual
to the classical estimate. Its floor is the classical method it refines; what it
learns is where that method fails on fluorescence images. Classical estimates
cost 0.3 s (BM3D, 96²) to 2 s (BM4D, 5×96²) each, far too slow to make per
training step, so a fixed pool of samples is made once (`build_pool`, saved as
.npz and reused: by source file in `bench/generalization.py`, so every fold's
pool is a union of files) and training draws augmented batches from it
(`GuidedBatches`: the 8 rotations/flips, which BM3D/BM4D respect). A guided ×2
super-resolver (`sr2_hq`) gets the binned noisy frame, its BM3D+VST estimate and the noise
level at the camera's sampling, and adds its residual to the estimate upsampled.

Loss: squared error weighted so that it measures the error in intensity units,
per image relative to its range — what PSNR against the clean image measures.
The network works in variance-stabilised units, where a unit of error on a bright
pixel is worth more intensity than on a dark one (`intensity_weights`); plain MSE
in those units under-weights the bright structures that decide PSNR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..bm3d_engine import classical_estimate, classical_library
from ..noise_model import NoiseModel
from ..normalize import VSTNorm
from .clips import CameraRanges, ClipSampler, expose
from .crappify import bin_mean

Guide = Literal["bm3d", "bm4d"]


#: the cameras pool samples are degraded with (one drawn per sample): the clip sampler's,
#: at 3-400 photons (the classical guide is too slow for the live range's extremes)
POOL_CAMERA = CameraRanges(photons=(3.0, 400.0))
#: fraction of pool samples whose noise model is off by up to ~20 % (as if estimated)
POOL_PERTURBED = 0.3


def guide_window(guide: Guide, window: int) -> int:
    return 1 if guide == "bm3d" else window


def build_pool(sampler: ClipSampler, n: int, guide: Guide, rng: np.random.Generator,
               camera: CameraRanges = POOL_CAMERA, scale: int = 1
               ) -> tuple[np.ndarray, np.ndarray]:
    """`n` samples (inputs (n, C, P, P), targets (n, 1, sP, sP)) of clean clips from
    `sampler`, degraded by a random camera, with the classical guide computed as the engine
    does. `scale` 2 (super-resolution, one frame): the clip is recorded binned s×s (a camera
    with pixels s times larger), the target is the clean frame at the clip's sampling."""
    library = classical_library(guide_window(guide, sampler.window))
    norm = VSTNorm()
    inputs, targets = [], []
    for _ in range(n):
        clip = sampler.clean_clip()
        if scale == 1:
            shot = expose(clip, camera, rng, POOL_PERTURBED)
        else:
            shot = expose(np.stack([bin_mean(f, scale) for f in clip]), camera, rng,
                          POOL_PERTURBED, target_frame=clip[-1])
        noise = NoiseModel.from_calibration(shot.calibration)
        stable = noise.gat(shot.noisy[-guide_window(guide, sampler.window):])
        estimate = noise.inverse_gat_unbiased(classical_estimate(library, stable))
        x, lo, span = norm.inputs(shot.noisy, noise, estimate)
        inputs.append(x)
        targets.append(norm.target(shot.target, noise, lo, span)[None])
    return np.stack(inputs), np.stack(targets)


def save_pool(path: Path, inputs: np.ndarray, targets: np.ndarray, guide: Guide, window: int,
              source: str, scale: int = 1, deconvolution: str = "") -> None:
    """`deconvolution`: a guided transfer pool's Richardson–Lucy settings (JSON), or ""."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, inputs=inputs.astype(np.float32), targets=targets.astype(np.float32),
             guide=guide, window=window, source=source, scale=scale,
             deconvolution=deconvolution)
    tmp.replace(path)


def pool_source(path: Path) -> tuple[str, int]:
    """(what a saved pool was made from, how many samples it holds)."""
    with np.load(path) as data:
        return str(data["source"]), len(data["targets"])


def load_pools(paths: list[Path], guide: Guide, window: int, scale: int = 1,
               deconvolution: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Concatenated pools; ValueError naming the file if one was made for another model
    (another guide, window, scale, input channels or deconvolution)."""
    channels = window + 2 + int(bool(deconvolution))  # frames, guide, [deconvolved], noise
    xs, ys = [], []
    for path in paths:
        with np.load(path) as data:
            made = (str(data["guide"]), int(data["window"]),
                    int(data["scale"]) if "scale" in data else 1)
            if made != (guide, window, scale):
                raise ValueError(f"pool {path} holds {made[0]} samples with window {made[1]} "
                                 f"at scale {made[2]}, not {guide} with window {window} at "
                                 f"scale {scale}")
            if data["inputs"].shape[1] != channels:
                raise ValueError(f"pool {path} holds {data['inputs'].shape[1]}-channel "
                                 f"inputs, not {channels} (a guided transfer pool has the "
                                 "deconvolved guide as one more)")
            saved = str(data["deconvolution"]) if "deconvolution" in data else None
            if saved is not None and saved != deconvolution:
                raise ValueError(f"pool {path} was made with deconvolution "
                                 f"{saved or 'none'}, not {deconvolution or 'none'}")
            xs.append(data["inputs"])
            ys.append(data["targets"])
    if not xs:
        raise ValueError("no guided training pool given")
    return np.concatenate(xs), np.concatenate(ys)


def intensity_weights(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights turning squared error in the network's units into squared error in
    intensity relative to each image's range (mean 1 over the batch).

    With f the stabilised value (unit noise), intensity x ≈ (αf/2)² so dx ∝ f·df, and a
    sample's range is ∝ f_max². Targets are (f − lo)/span with span = 1/noise-map; the
    offset lo (the dark level, ≈ 2·sqrt(read² + 3/8) ≈ 2-6) is taken as 4.
    """
    span = 1.0 / inputs[:, -1:, :1, :1]
    f = torch.clamp(targets * span + 4.0, min=1.0)
    f_max = f.amax(dim=(2, 3), keepdim=True)
    w = (f * span / f_max**2) ** 2
    return w / w.mean()


class GuidedBatches:
    """Augmented batches from a fixed pool; the last 5 % are held out for validation."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, batch: int,
                 rng: np.random.Generator) -> None:
        held = max(1, len(inputs) // 20)
        self.inputs, self.targets = inputs[:-held], targets[:-held]
        self.validation = [(inputs[-held:], targets[-held:])]
        self.batch_size, self.rng = batch, rng

    def batch(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        idx = self.rng.integers(0, len(self.inputs), self.batch_size)
        x, y = self.inputs[idx], self.targets[idx]
        k = int(self.rng.integers(4))
        x, y = np.rot90(x, k, axes=(2, 3)), np.rot90(y, k, axes=(2, 3))
        if self.rng.random() < 0.5:
            x, y = x[..., ::-1], y[..., ::-1]
        return (torch.from_numpy(np.ascontiguousarray(x)),), \
            torch.from_numpy(np.ascontiguousarray(y))
