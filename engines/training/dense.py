"""Training sparse-to-dense models (localization microscopy; see `dimscope.smlm.dense`).

Pairs come from simulated long acquisitions (`simulate_fields`): a structure — `filaments`,
`rings`, `random` (a smooth random density: blurred noise above a random level), or a real
image used as a density map (`image:PATH[::CHANNEL]`) — blinks through
`frames_full` frames of the simulator's kinetics; its localizations as a fitter would give
them are the target (all frames) and the input (the first 0.5–15 % of the frames, drawn
log-uniformly per sample), with a widefield channel that is, per sample, either the
simulator's widefield frame (PSF 15 % wider than the localization PSF) or the mean of the raw
frames so far (what a live run has when no widefield frame is taken). No real localization
tables exist in `../shared/data` yet; the pipeline takes them when they do.

Loss L1 + (1 − SSIM), no adversarial loss. Batches are random crops of whole-field inputs
(normalised over the whole field, as at inference) with the 8 rotations/flips.

After training, `calibrate_output_smoothing` sets the card's output blur per input density
(see `smlm.dense`) on the training fields — never on evaluation fields.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dimscope.smlm.block import LocBlock
from dimscope.smlm.dense import (
    NORM_MEAN_FACTOR,
    PATENT_NOTICE,
    DenseGrid,
    DensePredictor,
    first_frames,
    frames_for_fraction,
    gaussian_baseline,
    localization_density,
    localizations_from_truth,
    model_input,
    raw_mean_from_truth,
    smooth_output,
    target_image,
)
from dimscope.smlm.simulate import (
    GroundTruth,
    SimSettings,
    SMLMSimulator,
    density_image,
    filaments,
    load_plane,
    rings,
)

from ..evaluation.quality import score
from ..model_file import DenseProvenance, ModelCard, read_card, write_card_metadata
from ..nets import build_network, multiple_of
from .export import export_onnx
from .transfer import ssim_loss

log = logging.getLogger(__name__)

#: emitting labels per frame in the simulated acquisitions (the issue's ~30)
EMITTERS_PER_FRAME = 30.0
#: input fractions the output blur is calibrated at, and the blurs tried (render pixels:
#: at most 120 nm, below the PSF, so the error map can still fit the optics to the output)
CALIBRATION_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.10, 0.15)
SMOOTHING_PX = (0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: training fields per structure class the calibration uses
CALIBRATION_FIELDS_PER_STRUCTURE = 3
#: the Gaussian-render baseline's widths (nm), tuned per fraction on training fields
GAUSSIAN_SIGMAS_NM = (10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 80.0, 120.0, 160.0, 240.0)
#: the SSIM worth one dB of PSNR when the two margins over the Gaussian render are balanced
SSIM_PER_DB = 0.1


@dataclass(frozen=True)
class SimField:
    """One simulated acquisition: its truth, localizations, widefield frame and target."""

    structure: str
    truth: GroundTruth
    locs: LocBlock
    widefield: np.ndarray
    target: np.ndarray
    extent_nm: tuple[float, float]
    frames: int
    settings: SimSettings

    def sparse(self, n_frames: int) -> LocBlock:
        return first_frames(self.locs, n_frames)

    def raw_mean(self, n_frames: int, rng: np.random.Generator) -> np.ndarray:
        keep = self.truth.frame < n_frames
        part = GroundTruth(self.truth.frame[keep], self.truth.ids[keep], self.truth.x_nm[keep],
                           self.truth.y_nm[keep], self.truth.photons[keep],
                           self.truth.drift_nm[:n_frames])
        return raw_mean_from_truth(part, self.settings, n_frames, rng)


def structure_for(spec: str, settings: SimSettings, rng: np.random.Generator) -> Any:
    """`filaments`, `rings`, `random` or `image:PATH[::CHANNEL]` on the simulator's field; a real
    image is scaled so the field holds it (≥ 20 nm per image pixel) at a random place."""
    extent = settings.extent_nm
    if spec == "filaments":
        return filaments(extent, rng, n=int(rng.integers(4, 12)))
    if spec == "rings":
        return rings(extent, rng, n=int(rng.integers(100, 300)))
    if spec == "random":
        # A smooth random density (blurred noise, its peaks kept): cell-like patches of
        # every size, neither filaments, rings nor any real image.
        from scipy.ndimage import gaussian_filter

        shape = (math.ceil(extent[1] / 20.0), math.ceil(extent[0] / 20.0))
        smooth = gaussian_filter(rng.standard_normal(shape), rng.uniform(3.0, 40.0))
        plane = np.clip(smooth - np.percentile(smooth, rng.uniform(40, 85)), 0, None)
        return density_image(plane ** rng.uniform(0.5, 2.0), extent, rng, image_pixel_nm=20.0,
                             n_labels=int(rng.integers(8000, 25000)),
                             background_percentile=0.0, name="random")
    if spec.startswith("image:"):
        path, _, channel = spec[len("image:"):].partition("::")
        plane = load_plane(path, int(channel or 0))
        pixel_nm = max(20.0, max(extent) / min(plane.shape) * 1.01)
        need = (math.ceil(extent[1] / pixel_nm), math.ceil(extent[0] / pixel_nm))
        origin = (int(rng.integers(0, plane.shape[0] - need[0] + 1)),
                  int(rng.integers(0, plane.shape[1] - need[1] + 1)))
        return density_image(plane, extent, rng, image_pixel_nm=pixel_nm,
                             n_labels=int(rng.integers(8000, 25000)), origin_px=origin,
                             name=Path(path).stem)
    raise ValueError(f"unknown structure {spec!r}: filaments, rings, random or "
                     f"image:PATH[::CHANNEL]")


def simulate_field(spec: str, seed: int, frames_full: int, grid: DenseGrid,
                   settings: SimSettings | None = None) -> SimField:
    settings = settings or SimSettings()
    rng = np.random.default_rng(seed)
    structure = structure_for(spec, settings, rng)
    sim = SMLMSimulator(structure, settings, seed=seed + 1)
    sim.activation_power = settings.kinetics.power_for(len(structure.labels_nm),
                                                       EMITTERS_PER_FRAME)
    widefield = sim.widefield().astype(np.float32)  # before the first frame, as acquired
    truth = sim.truth_only(frames_full)
    locs = localizations_from_truth(truth, rng, settings)
    extent = settings.extent_nm
    return SimField(structure.name, truth, locs, widefield,
                    target_image(locs, extent, grid), extent, frames_full, settings)


def simulate_fields(specs: list[str], per_structure: int, frames_full: int, grid: DenseGrid,
                    seed: int = 0) -> list[SimField]:
    fields = []
    for i, spec in enumerate(specs):
        for j in range(per_structure):
            fields.append(simulate_field(spec, seed * 100_003 + i * 1009 + j, frames_full,
                                         grid))
    return fields


def sample_input(f: SimField, fraction: float, use_widefield_frame: bool, grid: DenseGrid,
                 rng: np.random.Generator) -> np.ndarray:
    """The (2, H, W) model input of field `f` from its first `fraction` of the frames."""
    n = frames_for_fraction(f.frames, fraction)
    wf = f.widefield if use_widefield_frame else f.raw_mean(n, rng)
    return model_input(f.sparse(n), wf, f.extent_nm, grid)


@dataclass
class DenseTrainSettings:
    structures: list[str] = field(default_factory=lambda: ["filaments", "rings"])
    fields_per_structure: int = 8
    frames_full: int = 10_000
    fractions: tuple[float, float] = (0.005, 0.15)
    steps: int = 2000
    batch: int = 8
    patch: int = 128
    lr: float = 2e-3
    channels: int = 32
    levels: int = 3
    seed: int = 0
    ssim_weight: float = 1.0
    name: str = "dense"
    grid: DenseGrid = field(default_factory=DenseGrid)


class DenseBatches:
    """Random crops of freshly drawn sparse inputs, with their targets (8 symmetries)."""

    def __init__(self, fields: list[SimField], settings: DenseTrainSettings,
                 rng: np.random.Generator, samples_per_draw: int = 4) -> None:
        self.fields, self.s, self.rng = fields, settings, rng
        self.samples_per_draw = samples_per_draw

    def _draw(self) -> tuple[np.ndarray, np.ndarray]:
        f = self.fields[int(self.rng.integers(len(self.fields)))]
        lo, hi = self.s.fractions
        fraction = math.exp(self.rng.uniform(math.log(lo), math.log(hi)))
        x = sample_input(f, fraction, bool(self.rng.random() < 0.5), self.s.grid, self.rng)
        return x, f.target

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.s.patch
        xs, ys = [], []
        draws = [self._draw() for _ in range(max(1, self.s.batch // self.samples_per_draw))]
        for i in range(self.s.batch):
            x, y = draws[i % len(draws)]
            r = int(self.rng.integers(0, x.shape[1] - p + 1))
            c = int(self.rng.integers(0, x.shape[2] - p + 1))
            xc, yc = x[:, r:r + p, c:c + p], y[None, r:r + p, c:c + p]
            k = int(self.rng.integers(4))
            xc, yc = np.rot90(xc, k, (1, 2)), np.rot90(yc, k, (1, 2))
            if self.rng.random() < 0.5:
                xc, yc = xc[:, :, ::-1], yc[:, :, ::-1]
            xs.append(np.ascontiguousarray(xc))
            ys.append(np.ascontiguousarray(yc))
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def loss_fn(out: torch.Tensor, target: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    loss = (out - target).abs().mean()
    if ssim_weight:
        loss = loss + ssim_weight * ssim_loss(out, target)
    return loss


def train_dense(settings: DenseTrainSettings, out: Path, fields: list[SimField] | None = None,
                progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Train and export `out` (.onnx with its card); a checkpoint beside it resumes."""
    from .train import _progress, cosine_schedule, restore_checkpoint, save_checkpoint

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    started = time.monotonic()
    if fields is None:
        fields = simulate_fields(settings.structures, settings.fields_per_structure,
                                 settings.frames_full, settings.grid, settings.seed)
    log.info("%d simulated fields in %.0f s", len(fields), time.monotonic() - started)
    hparams = {"scale": 1, "channels": settings.channels, "levels": settings.levels,
               "window": 2}
    net = build_network("restore", **hparams)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    checkpoint = out.with_suffix(".ckpt")
    step, running = 0, 0.0
    history: list[dict[str, Any]] = []
    if resume and checkpoint.is_file():
        step, history, running = restore_checkpoint(checkpoint, net, optimizer, rng)
    schedule = cosine_schedule(optimizer, settings.steps, step)
    batches = DenseBatches(fields, settings, rng)
    bar = _progress(settings.steps, step) if progress else None
    net.train()
    while step < settings.steps:
        x, y = batches.batch()
        loss = loss_fn(net(x), y, settings.ssim_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        value = loss.item()
        running = 0.98 * running + 0.02 * value if running else value
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
        if step % 200 == 0 or step == settings.steps:
            history.append({"step": step, "loss": round(running, 5)})
            save_checkpoint(checkpoint, net, optimizer, step, history, running, rng)
    if bar is not None:
        bar.close()
    card = ModelCard(
        name=settings.name, task="dense", arch="restore", hparams=hparams,
        multiple=multiple_of("restore", hparams), inputs=1, window=1,
        normalization={"kind": "dense", "mean_factor": NORM_MEAN_FACTOR},
        training={"steps": settings.steps, "batch": settings.batch, "patch": settings.patch,
                  "lr": settings.lr, "seed": settings.seed, "history": history[-5:],
                  "fields_per_structure": settings.fields_per_structure,
                  "seconds": round(time.monotonic() - started)},
        dense=DenseProvenance(
            grid=settings.grid.as_dict(),
            structures=sorted({f.structure for f in fields}),
            frames_full=settings.frames_full, fractions=settings.fractions,
            loss="l1" + ("+ssim" if settings.ssim_weight else ""), adversarial_loss=False,
            notice=PATENT_NOTICE))
    export_onnx(net, card, out)
    table = write_output_smoothing(out, fields)
    return {"model": str(out), "steps": step, "loss": running, "output_smoothing": table}


def tune_gaussian_sigma(fields: list[SimField], fraction: float, grid: DenseGrid) -> float:
    """The Gaussian render's σ (nm) with the best mean PSNR on these (training) fields, for
    inputs of the first `fraction` of the frames: the tuned baseline."""
    best, best_psnr = GAUSSIAN_SIGMAS_NM[0], -np.inf
    for sigma in GAUSSIAN_SIGMAS_NM:
        values = [score(f.target, gaussian_baseline(f.sparse(frames_for_fraction(
            f.frames, fraction)), f.extent_nm, grid, sigma), with_ssim=False)["psnr"]
            for f in fields]
        if float(np.mean(values)) > best_psnr:
            best, best_psnr = sigma, float(np.mean(values))
    return best


def calibration_fields(fields: list[SimField]) -> list[SimField]:
    """At most `CALIBRATION_FIELDS_PER_STRUCTURE` fields of each structure class."""
    kept: list[SimField] = []
    for f in fields:
        if sum(k.structure == f.structure for k in kept) < CALIBRATION_FIELDS_PER_STRUCTURE:
            kept.append(f)
    return kept


def calibrate_output_smoothing(model: Path, fields: list[SimField]
                               ) -> list[tuple[float, float]]:
    """The card's (localizations per µm², blur in render pixels) table, measured on these
    training fields: at each calibration fraction, the blur of the network's output that
    maximises the smaller of its two mean margins over the tuned Gaussian render — PSNR in
    dB, and SSIM in units of `SSIM_PER_DB` — so neither is bought with the other."""
    predictor = DensePredictor(model)
    grid = predictor.grid
    table: list[tuple[float, float]] = []
    try:
        for fraction in CALIBRATION_FRACTIONS:
            sigma_nm = tune_gaussian_sigma(fields, fraction, grid)
            margins = np.zeros((len(SMOOTHING_PX), 2))
            densities = []
            for f in fields:
                sparse = f.sparse(frames_for_fraction(f.frames, fraction))
                densities.append(localization_density(sparse, f.extent_nm))
                base = score(f.target, gaussian_baseline(sparse, f.extent_nm, grid, sigma_nm))
                raw = predictor.predict_input(model_input(sparse, f.widefield, f.extent_nm,
                                                          grid))
                for i, blur in enumerate(SMOOTHING_PX):
                    s = score(f.target, smooth_output(raw, blur))
                    margins[i] += (s["psnr"] - base["psnr"], s["ssim"] - base["ssim"])
            margins /= len(fields)
            balanced = np.minimum(margins[:, 0], margins[:, 1] / SSIM_PER_DB)
            best = int(np.argmax(balanced))
            log.info("fraction %.3f: Gaussian σ %.0f nm; blur %.1f px (margins %+.2f dB, "
                     "%+.3f SSIM)", fraction, sigma_nm, SMOOTHING_PX[best], *margins[best])
            table.append((round(float(np.mean(densities)), 2), SMOOTHING_PX[best]))
    finally:
        predictor.close()
    return sorted(table)


def write_output_smoothing(model: Path, fields: list[SimField]) -> list[tuple[float, float]]:
    """Calibrate (`calibrate_output_smoothing`) and store the table on the model's card."""
    table = calibrate_output_smoothing(model, calibration_fields(fields))
    card = read_card(model)
    assert card.dense is not None
    write_card_metadata(model, card.model_copy(update={
        "dense": card.dense.model_copy(update={"output_smoothing": table})}))
    return table
