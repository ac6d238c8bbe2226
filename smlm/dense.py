"""Sparse-to-dense prediction: the dense super-resolution image from a few frames' localizations.

A re-implementation from the paper of ANNA-PALM (Ouyang et al., Nat. Biotechnol. 2018), not of
its code (whose licence is non-commercial). The method is covered by patent application
WO2019025298A1; re-implementing it does not avoid the patent — check before commercial use.

**Inputs** (`model_input`, two channels on the render grid, `render_pixel_nm` per pixel):
0. the widefield image — a widefield frame, or the mean of the raw frames when none was
   acquired — background-subtracted (its 1st percentile) and upsampled from the camera grid;
1. the sparse localizations, rendered as Gaussians of fixed width `input_sigma_px`.

Each channel is divided by ten times its mean over the whole field (not per tile, so tiles of
one field share one scale): a structure's pixels then have about the same value whatever
the number of frames, which is what lets one network serve 0.5 % to 15 % of the frames.

**Output**: the dense image in the units of the target — the localizations of all frames
rendered the same way (`target_image`), normalised the same way. The network is a
`RestoreNet` (window 2: widefield then sparse; its residual is added to the sparse channel).

**Output smoothing** (`output_smoothing_px`): an L1 loss makes the network predict each
pixel's conditional median, which from a very sparse input (~1 % of the frames) is spikier
than the structure: it scored below a plain Gaussian render in SSIM. The prediction is
therefore blurred by a Gaussian whose width depends on the input's localization density,
from a table on the model card calibrated on the training fields after training
(`engines.training.dense.calibrate_output_smoothing`); at dense inputs the width is 0.

**Training pairs** (`simulated_field`): the simulator's kinetics over a long acquisition
(no camera frames are rendered: `SMLMSimulator.truth_only`), turned into localizations as a
fitter would give them (`localizations_from_truth`): emitter-frames with fewer than
`min_photons` photons are missed, positions get Gaussian errors of the Cramér–Rao bound of
their photons and background. The sparse input is the first few hundred frames (as live),
the target all of them.

**Runtime** (`DensePredictor`): the exported ONNX model on dimscope's runtimes (OpenVINO on
CPU), whole-field when it fits in `tile`, else tiled with a halo (`engines.tiling`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .block import LocBlock
from .metrics import crlb_mortensen
from .psf import stamp
from .render import grid_shape
from .simulate import GroundTruth, SimSettings

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: each input channel and the target are divided by this times their mean over the field
NORM_MEAN_FACTOR = 10.0
#: notice for the README and every dense model card
PATENT_NOTICE = ("Sparse-to-dense prediction re-implements ANNA-PALM (Ouyang et al., Nat. "
                 "Biotechnol. 2018) from the paper: this avoids its code's non-commercial "
                 "licence but not its patent application WO2019025298A1.")


@dataclass(frozen=True)
class DenseGrid:
    """The render grid of a dense model and how its inputs are made."""

    render_pixel_nm: float = 20.0
    input_sigma_px: float = 1.0
    target_sigma_px: float = 1.0
    #: the channel the network's residual is added to (the last one): `sparse` or `widefield`
    base: str = "sparse"

    def shape(self, extent_nm: tuple[float, float]) -> tuple[int, int]:
        return grid_shape(extent_nm, self.render_pixel_nm)

    def as_dict(self) -> dict[str, Any]:
        return {"render_pixel_nm": self.render_pixel_nm, "input_sigma_px": self.input_sigma_px,
                "target_sigma_px": self.target_sigma_px, "base": self.base}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseGrid:
        return cls(float(d["render_pixel_nm"]), float(d["input_sigma_px"]),
                   float(d["target_sigma_px"]), str(d.get("base", "sparse")))


def _normalised(img: F32) -> F32:
    mean = float(img.mean())
    return (img / (NORM_MEAN_FACTOR * mean)).astype(np.float32) if mean > 0 else img


def render_fixed(x_nm: npt.ArrayLike, y_nm: npt.ArrayLike, shape: tuple[int, int],
                 pixel_nm: float, sigma_px: float) -> F32:
    """Localizations as Gaussians of integral 1 and width `sigma_px` render pixels."""
    x = np.asarray(x_nm, np.float64) / pixel_nm
    y = np.asarray(y_nm, np.float64) / pixel_nm
    return np.asarray(stamp(shape, x, y, 1.0, sigma_px), np.float32)


def sparse_channel(locs: LocBlock, extent_nm: tuple[float, float], grid: DenseGrid) -> F32:
    return _normalised(render_fixed(locs.x_nm, locs.y_nm, grid.shape(extent_nm),
                                    grid.render_pixel_nm, grid.input_sigma_px))


def target_image(locs: LocBlock, extent_nm: tuple[float, float], grid: DenseGrid) -> F32:
    """The full reconstruction the model learns: every localization, normalised."""
    return _normalised(render_fixed(locs.x_nm, locs.y_nm, grid.shape(extent_nm),
                                    grid.render_pixel_nm, grid.target_sigma_px))


def widefield_channel(widefield: npt.ArrayLike, shape: tuple[int, int]) -> F32:
    """The widefield image (camera grid) background-subtracted, upsampled to `shape`."""
    import cv2

    wf = np.asarray(widefield, np.float32)
    if wf.ndim != 2:
        raise ValueError(f"the widefield image must be 2-D, got shape {wf.shape}")
    wf = np.clip(wf - np.percentile(wf, 1.0), 0, None)
    up = cv2.resize(wf, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return _normalised(np.asarray(up, np.float32))


def check_widefield(widefield_shape: tuple[int, ...], camera_shape: tuple[int, int]) -> None:
    """The widefield image must be on the camera grid of the localizations."""
    if tuple(widefield_shape) != tuple(camera_shape):
        raise ValueError(f"the widefield image is {widefield_shape[-2:]} pixels but the "
                         f"localizations are on a {camera_shape} camera: register it to the "
                         f"camera grid first")


def model_input(locs: LocBlock, widefield: npt.ArrayLike, extent_nm: tuple[float, float],
                grid: DenseGrid) -> F32:
    """(2, H, W): widefield, sparse render — or the reverse with `grid.base` `widefield`
    (the network adds its residual to the last channel)."""
    shape = grid.shape(extent_nm)
    channels = [widefield_channel(widefield, shape), sparse_channel(locs, extent_nm, grid)]
    return np.stack(channels[::-1] if grid.base == "widefield" else channels)


# ----------------------------------------------------------------------------- training data
def localizations_from_truth(truth: GroundTruth, rng: np.random.Generator,
                             settings: SimSettings, min_photons: float = 200.0,
                             missed: float = 0.05) -> LocBlock:
    """What a fitter gives for these emitter-frames: dim ones (< `min_photons`) and a share
    `missed` of the rest are lost; positions get errors at the Cramér–Rao bound."""
    keep = (truth.photons >= min_photons) & (rng.random(len(truth.photons)) >= missed)
    photons = truth.photons[keep]
    sigma = crlb_mortensen(photons, settings.background_photons, settings.psf_sigma_nm,
                           settings.camera.pixel_nm)
    n = len(photons)
    return LocBlock(0, int(truth.frame.max()) + 1 if len(truth.frame) else 0, {
        "frame": truth.frame[keep], "x_nm": truth.x_nm[keep] + rng.normal(0, 1, n) * sigma,
        "y_nm": truth.y_nm[keep] + rng.normal(0, 1, n) * sigma,
        "photons": photons.astype(np.float32),
        "background": np.full(n, settings.background_photons, np.float32),
        "precision_nm": sigma.astype(np.float32)})


def raw_mean_from_truth(truth: GroundTruth, settings: SimSettings, n_frames: int,
                        rng: np.random.Generator) -> F32:
    """The mean of `n_frames` raw frames in photons (the widefield stand-in when no
    widefield frame is taken), from the emitters' photons, with its shot noise."""
    cam = settings.camera
    expected = stamp(settings.shape, truth.x_nm / cam.pixel_nm, truth.y_nm / cam.pixel_nm,
                     truth.photons, settings.psf_sigma_nm / cam.pixel_nm) / max(n_frames, 1)
    expected = expected + settings.background_photons
    noisy = rng.poisson(expected * n_frames) / max(n_frames, 1)
    return np.asarray(noisy, np.float32)


def first_frames(locs: LocBlock, n_frames: int) -> LocBlock:
    """The localizations of the first `n_frames` frames (as a live run has them)."""
    return locs.select(np.asarray(locs.frame) < n_frames)


def shuffled(locs: LocBlock, extent_nm: tuple[float, float], rng: np.random.Generator
             ) -> LocBlock:
    """The same localizations at uniform random places in the field (no structure left)."""
    n = len(locs)
    return locs.with_columns(x_nm=rng.uniform(0, extent_nm[0], n).astype(np.float32),
                             y_nm=rng.uniform(0, extent_nm[1], n).astype(np.float32))


# ----------------------------------------------------------------------------- the runtime
class DensePredictor:
    """A dense model (ONNX, task `dense`) on dimscope's runtimes, for fields of any size."""

    def __init__(self, model: str | Path, runtime: str = "cpu", tile: int = 1024,
                 halo: int = 32, allow_unverified: bool = False,
                 threads: int | None = None) -> None:
        """`threads`: CPU inference threads (default: every core this process may use)."""
        from dimscope.engines.base import EngineError
        from dimscope.engines.model_file import open_model_card, resolve_model

        self.path = resolve_model(model)
        opened = open_model_card(self.path, allow_unverified=allow_unverified)
        self.card = opened.card
        if self.card.task != "dense" or self.card.dense is None:
            raise EngineError(f"{self.path.name} is a {self.card.task!r} model, not a dense "
                              f"(sparse-to-dense) model")
        self.digest = opened.digest
        self.grid = DenseGrid.from_dict(self.card.dense.grid)
        self.runtime_kind, self.tile, self.halo = runtime, tile, halo
        self.threads = threads
        self._runtimes: dict[tuple[int, int, int, int], Any] = {}

    @property
    def label(self) -> str:
        return f"{self.card.name}@{self.digest}"

    def _run(self, batch: F32) -> F32:
        from dimscope.engines.runtime import open_runtime

        shape = tuple(int(v) for v in batch.shape)
        key = (shape[0], shape[1], shape[2], shape[3])
        runtime = self._runtimes.get(key)
        if runtime is None:
            runtime = open_runtime(self.runtime_kind, self.path, self.card, shape=key,
                                   threads=self.threads)
            self._runtimes[key] = runtime
        return np.asarray(runtime.run(np.ascontiguousarray(batch, np.float32)), np.float32)

    def predict_input(self, inputs: F32, localizations_per_um2: float | None = None) -> F32:
        """The dense image for a (2, H, W) `model_input`; smoothed as the card says for
        this input density when it is given (`predict` always gives it)."""
        from dimscope.engines.tiling import run_tiled

        out = run_tiled(inputs, self._run, tile=self.tile, halo=self.halo, scale=1,
                        multiple=self.card.multiple)
        dense: F32 = np.clip(out, 0, None).astype(np.float32)
        if localizations_per_um2 is not None:
            dense = smooth_output(dense, self.smoothing_px(localizations_per_um2))
        return dense

    def smoothing_px(self, localizations_per_um2: float) -> float:
        assert self.card.dense is not None
        return output_smoothing_px(self.card.dense.output_smoothing, localizations_per_um2)

    def predict(self, locs: LocBlock, widefield: npt.ArrayLike,
                extent_nm: tuple[float, float]) -> F32:
        return self.predict_input(model_input(locs, widefield, extent_nm, self.grid),
                                  localization_density(locs, extent_nm))

    def close(self) -> None:
        for runtime in self._runtimes.values():
            runtime.close()
        self._runtimes.clear()


def gaussian_baseline(locs: LocBlock, extent_nm: tuple[float, float], grid: DenseGrid,
                      sigma_nm: float) -> F32:
    """The Gaussian render of the sparse localizations with one fixed σ (a baseline)."""
    sigma_px = max(sigma_nm / grid.render_pixel_nm, 0.3)
    shape = grid.shape(extent_nm)
    if sigma_px <= 2.0:
        return render_fixed(locs.x_nm, locs.y_nm, shape, grid.render_pixel_nm, sigma_px)
    # Wide: the histogram blurred (the same image to a fraction of a pixel, far faster).
    from scipy.ndimage import gaussian_filter

    from .render import histogram_xy

    hist = histogram_xy(locs.x_nm, locs.y_nm, grid.render_pixel_nm, extent_nm)
    return np.asarray(gaussian_filter(hist, sigma_px, mode="constant"), np.float32)


def localization_density(locs: LocBlock, extent_nm: tuple[float, float]) -> float:
    """Localizations per µm² of the field."""
    return len(locs) / max(extent_nm[0] * extent_nm[1] / 1e6, 1e-12)


def output_smoothing_px(table: list[tuple[float, float]], density_per_um2: float) -> float:
    """The output blur (render pixels) for an input of this density: the card's table
    (densities increasing) interpolated in log density, held constant beyond its ends (an
    empty input gets the sparsest row's); 0 without a table."""
    if not table:
        return 0.0
    if density_per_um2 <= table[0][0]:
        return float(table[0][1])
    d = np.log([row[0] for row in table])
    return float(np.interp(math.log(density_per_um2), d, [row[1] for row in table]))


def smooth_output(dense: F32, sigma_px: float) -> F32:
    if sigma_px <= 0.05:
        return dense
    from scipy.ndimage import gaussian_filter

    return np.asarray(gaussian_filter(dense, sigma_px, mode="nearest"), np.float32)


def frames_for_fraction(total_frames: int, fraction: float) -> int:
    return max(1, math.floor(total_frames * fraction + 0.5))
