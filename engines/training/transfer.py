"""Training data for cross-modality transfer (`dimscope train transfer`).

Two sources, mixed per sample (`sim_fraction`):

- **Registered pairs**: folders written by `dimscope pairs register` (`low/`, `high/`,
  `mask/`, `report.json`). LOW was resampled onto HIGH's grid there; for a model at
  `scale` s the input is LOW binned s×s back to a camera of s-times-larger pixels. Crops
  lie wholly inside the overlap mask. Stacks give one sample per plane, restricted to the
  `planes` given (so held-out planes stay unseen). Each plane of LOW and HIGH is scaled to
  0..1 by its own percentiles inside the mask; a share of samples gets extra shot noise at
  a random photon level, so the model also serves dimmer acquisitions than the pairs.
- **Simulated pairs** (`engines/pairs/simulate.py`): a specimen from the training
  structure classes seen through both optical models, LOW at a random photon level.

Input and target are then normalised with the input's percentiles, as the runtime does.
The forward model the trust check uses (a Gaussian blur, binning, an affine intensity fit)
is fitted to samples of this same mix (`fit_forward_sigma`).

A **guided** transfer model (`--guide bm3d`, the offline `transfer_hq`) refines a classical
estimate instead: LOW through the camera's variance-stabilising transform, BM3D's estimate
of it, that estimate deconvolved by Richardson–Lucy (the base the residual is added to) and
the noise level — the inputs the engine's guided path makes (`model_engine`). BM3D costs
~0.3 s per sample, so a fixed pool is made once (`build_guided_pool`, in worker processes,
each sample from its own seed) and saved beside the model. Its simulated pairs are recorded
by a random camera (gain, offset, read noise); the noise model handed to the VST is, per
sample, estimated from LOW itself (as for an uncalibrated camera) or the calibration off by
~10 %. The target is HIGH in LOW's units: light conserved for simulated pairs; for
registered pairs HIGH fitted affinely to LOW after the simulated optics' relative blur
(LOW's background then stays in the fitted offset).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from .. import normalize
from ..bm3d_engine import classical_estimate, classical_library, deconvolved_estimate
from ..model_file import DeconvolutionGuide, TransferProvenance
from ..noise_model import NoiseModel, estimate_noise_model
from ..normalize import PercentileNorm, VSTNorm
from ..pairs.simulate import HELD_OUT_CLASSES, PairOptics, density, render_pair
from .crappify import bin_mean

if TYPE_CHECKING:
    from .train import TrainSettings


def parse_planes(spec: str | None) -> list[tuple[int, int]] | None:
    """"0:10,25:45" -> [(0, 10), (25, 45)] (half-open); None = every plane."""
    if not spec:
        return None
    ranges = []
    for part in spec.split(","):
        start, sep, stop = part.partition(":")
        try:
            ranges.append((int(start), int(stop)) if sep else (int(start), int(start) + 1))
        except ValueError:
            raise ValueError(f"planes: {part!r} is not START:STOP or a plane number") from None
    return ranges


def _in_ranges(z: int, ranges: list[tuple[int, int]] | None) -> bool:
    return ranges is None or any(a <= z < b for a, b in ranges)


def _unit(plane: np.ndarray, mask: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(plane[mask], [0.1, 99.9])
    return np.clip((plane - lo) / max(float(hi - lo), 1e-6), -0.2, 1.5).astype(np.float32)


class RegisteredPlanes:
    """The planes of `pairs register` output folders, each (LOW, HIGH, mask) on HIGH's grid."""

    def __init__(self, folders: list[str], planes: str | None) -> None:
        ranges = parse_planes(planes)
        self.planes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.used: list[dict[str, Any]] = []
        self.registration: list[dict[str, Any]] = []
        self.pixel_um: tuple[float, float] | None = None
        import tifffile

        for folder in (Path(f).expanduser() for f in folders):
            report_path = folder / "report.json"
            if not report_path.is_file():
                raise ValueError(f"{folder}: not a `dimscope pairs register` output (no "
                                 "report.json)")
            report = json.loads(report_path.read_text())
            for entry in report.get("pairs", []):
                if entry.get("status") != "registered":
                    continue
                name = entry["name"]
                low = np.asarray(tifffile.imread(folder / "low" / f"{name}.tif"), np.float32)
                high = np.asarray(tifffile.imread(folder / "high" / f"{name}.tif"), np.float32)
                mask = np.asarray(tifffile.imread(folder / "mask" / f"{name}.tif")) > 0
                low, high = low.reshape(-1, *low.shape[-2:]), high.reshape(-1, *high.shape[-2:])
                kept = [z for z in range(len(low)) if _in_ranges(z, ranges)]
                for z in kept:
                    self.planes.append((_unit(low[z], mask), _unit(high[z], mask), mask))
                self.used.append({"folder": str(folder), "name": name,
                                  "planes": kept if len(low) > 1 else None})
                self.registration.append({k: entry.get(k) for k in (
                    "name", "ncc_before", "ncc_after", "residual_shift_px", "low_pixel_um",
                    "high_pixel_um")})
                self.pixel_um = (float(entry["low_pixel_um"]), float(entry["high_pixel_um"]))
        if folders and not self.planes:
            raise ValueError(f"no registered pair (or no plane in {planes!r}) in "
                             f"{', '.join(folders)}")

    def crop(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """A (LOW, HIGH) crop of `size` HIGH pixels wholly inside a plane's overlap."""
        for _ in range(50):
            low, high, mask = self.planes[int(rng.integers(len(self.planes)))]
            if min(mask.shape) < size:
                continue
            y0 = int(rng.integers(0, mask.shape[0] - size + 1))
            x0 = int(rng.integers(0, mask.shape[1] - size + 1))
            if mask[y0:y0 + size, x0:x0 + size].all():
                return low[y0:y0 + size, x0:x0 + size], high[y0:y0 + size, x0:x0 + size]
        raise ValueError(f"no {size}x{size} crop lies inside a registered pair's overlap; use "
                         "a smaller --patch")


class TransferSampler:
    """(LOW, HIGH) training samples from registered and simulated pairs (module docstring)."""

    def __init__(self, settings: TrainSettings, rng: np.random.Generator) -> None:
        self.s, self.rng = settings, rng
        self.scale = settings.scale
        self.optics = PairOptics(scale=self.scale)
        self.real = RegisteredPlanes(settings.pairs, settings.planes) if settings.pairs else None
        self.sim_fraction = settings.sim_fraction if self.real else 1.0
        self.norm = PercentileNorm()
        self.images: list[np.ndarray] = []
        if "images" in settings.sim_classes and self.sim_fraction > 0:
            from .train import collect_images

            self.images = [p for p in collect_images(settings.data)
                           if min(p.shape) >= settings.patch * self.scale]
        self.classes = [c for c in settings.sim_classes if c != "images" or self.images]
        if self.sim_fraction > 0 and not self.classes:
            raise ValueError("simulated pairs need at least one structure class (the "
                             "`images` class needs --data images)")

    def _photons(self, rng: np.random.Generator | None = None) -> float:
        return float(np.exp((rng or self.rng).uniform(*np.log(self.s.photons))))

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """(LOW at LOW's sampling, HIGH) in LOW's units (not yet normalised)."""
        size = self.s.patch * self.scale
        if self.real is None or self.rng.random() < self.sim_fraction:
            kind = self.classes[int(self.rng.integers(len(self.classes)))]
            truth = density(kind, self.rng, (size, size), self.images)
            pair = render_pair(truth, self.optics, self.rng, self._photons())
            # HIGH in LOW's ADU, light conserved (no background: the confocal rejects it)
            target = pair.high_in_low_units * np.float32(pair.photons * pair.gain) + \
                np.float32(pair.offset)
            return pair.low, target
        low, high = self.real.crop(self.rng, size)
        low = bin_mean(low, self.scale)
        if self.rng.random() < 0.5:  # dimmer than the pair was acquired
            photons = self._photons()
            low = (self.rng.poisson(np.clip(low, 0, None) * photons) / photons).astype(
                np.float32)
        return low, high

    def guided_sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray,
                                                               NoiseModel]:
        """(LOW, HIGH in LOW's units, the noise model the VST gets) for a guided pool (module
        docstring), from `rng` alone."""
        size = self.s.patch * self.scale
        if self.real is None or rng.random() < self.sim_fraction:
            kind = self.classes[int(rng.integers(len(self.classes)))]
            truth = density(kind, rng, (size, size), self.images)
            gain = float(np.exp(rng.uniform(*np.log(GUIDED_GAIN))))
            offset, read_noise = float(rng.uniform(*GUIDED_OFFSET)), float(
                rng.uniform(*GUIDED_READ_NOISE))
            pair = render_pair(truth, self.optics, rng, self._photons(rng), gain=gain,
                               offset=offset, read_noise_e=read_noise)
            low = pair.low
            target = pair.high_in_low_units * np.float32(pair.photons * gain) + np.float32(
                offset)
            if rng.random() < GUIDED_ESTIMATED:
                return low, target, estimate_noise_model(low)
            g = gain * float(np.exp(rng.normal(0.0, 0.1)))
            return low, target, NoiseModel(alpha=g, beta=g * g * read_noise**2 - g * offset)
        low, high = self.real.crop(rng, size)
        low = bin_mean(low, self.scale)
        if rng.random() < 0.5:  # dimmer than the pair was acquired
            photons = self._photons(rng)
            low = (rng.poisson(np.clip(low, 0, None) * photons) / photons).astype(np.float32)
        # HIGH in LOW's units: the affine fit of HIGH, blurred and binned, to LOW
        pred = bin_mean(gaussian_filter(high, self.optics.relative_sigma_px), self.scale)
        a = np.stack([pred.ravel(), np.ones(pred.size, np.float32)], 1)
        (gain_fit, offset_fit), *_ = np.linalg.lstsq(a, low.ravel(), rcond=None)
        target = (high * np.float32(gain_fit) + np.float32(offset_fit)).astype(np.float32)
        return low, target, estimate_noise_model(low)

    def pair(self) -> tuple[np.ndarray, np.ndarray]:
        low, high = self.sample()
        k = int(self.rng.integers(4))
        low, high = np.rot90(low, k), np.rot90(high, k)
        if self.rng.random() < 0.5:
            low, high = low[:, ::-1], high[:, ::-1]
        lo, hi = self.norm.bounds(low)
        return (normalize.apply(np.ascontiguousarray(low), lo, hi),
                normalize.apply(np.ascontiguousarray(high), lo, hi))

    def batch(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        pairs = [self.pair() for _ in range(self.s.batch)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None])
        y = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None])
        return (x,), y

    def validation(self, n: int = 8, seed: int = 1234) -> list[tuple[np.ndarray, np.ndarray]]:
        """Held-out simulated pairs (structure classes never trained on) at 20 and 100
        photons: (LOW in ADU, HIGH's noise-free truth)."""
        rng = np.random.default_rng(seed)
        size = 128 * self.scale
        out = []
        for i in range(n):
            truth = density(HELD_OUT_CLASSES[i % len(HELD_OUT_CLASSES)], rng, (size, size))
            pair = render_pair(truth, self.optics, rng, (20.0, 100.0)[(i // 2) % 2])
            out.append((pair.low, pair.high_clean))
        return out

    def provenance(self, loss: str | None = None) -> TransferProvenance:
        """The card's transfer section; `loss` when it is not this sampler's L1 (+ SSIM)."""
        low_um, high_um = (self.real.pixel_um if self.real and self.real.pixel_um else
                           self.s.pixel_um or (0.1 * self.scale, 0.1))
        simulated: dict[str, Any] = {}
        if self.sim_fraction > 0:
            simulated = {"fraction": self.sim_fraction, "classes": self.classes,
                         "held_out_classes": list(HELD_OUT_CLASSES),
                         "low_psf_sigma_px": self.optics.low_psf_sigma_px,
                         "high_psf_sigma_px": self.optics.high_psf_sigma_px,
                         "low_background": self.optics.low_background,
                         "photons": list(self.s.photons),
                         "density_images": len(self.images)}
        return TransferProvenance(
            low_modality=self.s.low_modality, high_modality=self.s.high_modality,
            low_pixel_um=low_um, high_pixel_um=high_um,
            pairs=self.real.used if self.real else [],
            registration=self.real.registration if self.real else [],
            simulated=simulated, forward_psf_sigma_px=fit_forward_sigma(
                [self.sample() for _ in range(48)], self.scale),
            loss=loss or ("l1+ssim" if self.s.ssim_weight > 0 else "l1"),
            adversarial_loss=False)


#: the cameras a guided pool's simulated pairs are recorded with (drawn per sample)
GUIDED_GAIN = (0.6, 3.0)
GUIDED_OFFSET = (50.0, 400.0)
GUIDED_READ_NOISE = (1.0, 3.0)
#: share of guided samples whose noise model is estimated from LOW (the rest: calibration)
GUIDED_ESTIMATED = 0.5

_POOL_SAMPLER: TransferSampler | None = None


def _set_pool_sampler(sampler: TransferSampler) -> None:
    global _POOL_SAMPLER
    _POOL_SAMPLER = sampler


def guided_inputs(low: np.ndarray, noise: NoiseModel, deconvolution: DeconvolutionGuide,
                  library: object) -> tuple[np.ndarray, float, float]:
    """A guided transfer model's input for LOW, as the engine makes it: (channels: LOW, its
    BM3D estimate, that deconvolved, the noise level), lo, span (VST units)."""
    estimate = noise.inverse_gat_unbiased(classical_estimate(library, noise.gat(low[None])))
    return VSTNorm().inputs(low[None], noise, estimate,
                            deconvolved_estimate(estimate, deconvolution))


def _guided_pool_sample(job: tuple[int, int, DeconvolutionGuide]) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    seed, index, deconvolution = job
    assert _POOL_SAMPLER is not None
    low, target, noise = _POOL_SAMPLER.guided_sample(np.random.default_rng([seed, index]))
    x, lo, span = guided_inputs(low, noise, deconvolution, classical_library(1))
    return x, VSTNorm().target(target, noise, lo, span)[None]


def build_guided_pool(sampler: TransferSampler, n: int, deconvolution: DeconvolutionGuide,
                      seed: int, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` (inputs, targets) for a guided transfer model, made in `workers` processes (every
    core by default); sample i comes from seed (seed, i), so the pool does not depend on
    the number of workers."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    jobs = [(seed, i, deconvolution) for i in range(n)]
    if not workers:
        workers = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    if workers <= 1:
        _set_pool_sampler(sampler)
        samples = [_guided_pool_sample(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork"),
                                 initializer=_set_pool_sampler, initargs=(sampler,)) as ex:
            samples = list(ex.map(_guided_pool_sample, jobs, chunksize=8))
    return (np.stack([x for x, _ in samples]).astype(np.float32),
            np.stack([y for _, y in samples]).astype(np.float32))


def fit_forward_sigma(pairs: list[tuple[np.ndarray, np.ndarray]], scale: int,
                      sigmas: np.ndarray | None = None) -> float:
    """The Gaussian blur (sigma, HIGH pixels) that, followed by `scale`×`scale` binning and
    a per-pair affine intensity fit, best predicts each LOW from its HIGH (least squares
    over all pairs; noise in LOW averages out)."""
    grid = sigmas if sigmas is not None else np.arange(0.0, 4.01, 0.1)
    errors = []
    for sigma in grid:
        total = 0.0
        for low, high in pairs:
            pred = bin_mean(gaussian_filter(high, float(sigma)) if sigma > 0 else high, scale)
            a = np.stack([pred.ravel(), np.ones(pred.size, np.float32)], 1)
            coef, *_ = np.linalg.lstsq(a, low.ravel(), rcond=None)
            resid = low.ravel() - a @ coef
            total += float(resid @ resid) / max(float(np.var(low)) * low.size, 1e-12)
        errors.append(total)
    i = int(np.argmin(errors))
    if 0 < i < len(grid) - 1:  # parabolic refinement between grid points
        e0, e1, e2 = errors[i - 1:i + 2]
        denom = e0 - 2 * e1 + e2
        step = float(grid[1] - grid[0])
        if denom > 0:
            return round(float(grid[i]) + 0.5 * step * (e0 - e2) / denom, 3)
    return round(float(grid[i]), 3)


def ssim_loss(out: torch.Tensor, target: torch.Tensor, window: int = 11,
              sigma: float = 1.5) -> torch.Tensor:
    """1 − SSIM (Gaussian window; the constants for a 0..1 range, what normalisation gives)."""
    coords = torch.arange(window, dtype=out.dtype) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, 1, -1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, g), g.transpose(2, 3))

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(out), blur(target)
    var_x = blur(out * out) - mu_x**2
    var_y = blur(target * target) - mu_y**2
    cov = blur(out * target) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return 1.0 - ssim.mean()
