"""`dimscope train denoise|sr2|interp|transfer`: make training pairs, train, export ONNX
with a card.

Training pairs are made on the fly: a random crop of a good image (a folder of
TIFFs, e.g. `../shared/data/singles/`, and/or the simulated microscope's
noiseless ground truth) is degraded by a crappifier into what a low-light
acquisition of it looks like. Input and target are both normalised with the
*input's* percentiles — exactly what the runtime does — so the network learns
to restore in the units the camera gives it. Checkpoints are written every
`checkpoint_every` steps and training resumes from one; `init` starts from an
existing model file (fine-tuning on one's own sample). `transfer` learns a second
modality from registered and simulated two-instrument pairs instead (`transfer.py`), with
an L1 + SSIM loss; its card records both modalities, the pairs and the forward model.
Guided models (`--guide`: `guided.py`, and for transfer `transfer.py`) train from a fixed
pool with squared error weighted to measure intensity (`intensity_weights`, what PSNR
measures): for a guided transfer model that replaces L1 + SSIM (`--ssim-weight` is not used),
and its card says so.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
import torch.nn.functional as F

from .. import normalize
from ..evaluation.quality import fit_to, normalize_truth, psnr
from ..model_file import DeconvolutionGuide, ModelCard, open_model_card, resolve_model
from ..nets import build_network, count_parameters, multiple_of
from ..normalize import PercentileNorm, VSTNorm
from ..pairs.simulate import TRAIN_CLASSES
from .clips import tif_files
from .crappify import make_crappifier
from .export import export_onnx
from .guided import (
    POOL_CAMERA,
    POOL_PERTURBED,
    Guide,
    GuidedBatches,
    build_pool,
    intensity_weights,
    load_pools,
    pool_source,
    save_pool,
)
from .transfer import (
    GUIDED_ESTIMATED,
    GUIDED_GAIN,
    GUIDED_OFFSET,
    GUIDED_READ_NOISE,
    TransferSampler,
    build_guided_pool,
    ssim_loss,
)

log = logging.getLogger(__name__)

DEFAULT_HPARAMS: dict[str, dict[str, Any]] = {
    "restore": {"channels": 16, "levels": 3},
    "care_unet": {"channels": 32, "levels": 3},
    "interp": {"channels": 32, "depth": 4},
}


@dataclass
class TrainSettings:
    task: str = "denoise"
    data: list[str] = field(default_factory=list)
    sim_fraction: float = 0.5
    crappifier: str = "physical"
    arch: str = "restore"
    hparams: dict[str, Any] = field(default_factory=dict)
    steps: int = 2000
    batch: int = 8
    patch: int = 128
    lr: float = 2e-3
    seed: int = 0
    val_low: str | None = None
    val_high: str | None = None
    val_every: int = 100
    checkpoint_every: int = 100
    init: str | None = None
    name: str | None = None
    version: str = "1"
    # The noise-aware temporal denoiser (see clips.py): a causal window of this many frames
    # and variance-stabilised inputs with a noise-level channel; `movies` are time-lapses.
    window: int = 1
    vst: bool = False
    movies: list[str] = field(default_factory=list)
    photons: tuple[float, float] = (2.0, 1000.0)
    # Noise-aware clips: each sample's MSE weighted by sigma**-noise_weight (sigma: its noise
    # level in the network's units). 0 = plain MSE, which the noisiest samples dominate;
    # 2 = every photon level counts alike in PSNR terms.
    noise_weight: float = 0.0
    # Cross-modality transfer (task "transfer", see transfer.py): `pairs register` output
    # folders and the stack planes to train on ("0:10,25:45"), simulated pairs mixed in,
    # the output scale (1, 2 or 4), the modalities' names and, for simulated pairs alone,
    # the pixel sizes (LOW, HIGH) in um.
    pairs: list[str] = field(default_factory=list)
    planes: str | None = None
    transfer_scale: int = 1
    sim_classes: list[str] = field(default_factory=lambda: list(TRAIN_CLASSES))
    low_modality: str = "widefield"
    high_modality: str = "confocal"
    pixel_um: tuple[float, float] | None = None
    #: loss = L1 + ssim_weight · (1 − SSIM) (transfer); 0 = L1 alone
    ssim_weight: float = 1.0
    # Guided denoisers (guided.py): the network refines this classical estimate ("bm3d" on
    # the newest frame, window 1; "bm4d" over the window), trained from a fixed pool of
    # `pool` samples made from the data (saved beside the model) or from `pool_files`.
    guide: Guide | None = None
    pool: int = 1200
    pool_files: list[str] = field(default_factory=list)
    #: guided transfer: the BM3D estimate deconvolved by Richardson–Lucy (Gaussian PSF of
    #: this sigma in LOW pixels, this many iterations) is the base the network refines
    rl_sigma_px: float = 2.0
    rl_iterations: int = 15

    @property
    def clips(self) -> bool:
        return self.task == "denoise" and (self.window > 1 or self.vst)

    @property
    def scale(self) -> int:
        if self.task == "transfer":
            return self.transfer_scale
        return 2 if self.task == "sr2" else 1

    @property
    def frames_in(self) -> int:
        return 2 if self.task == "interp" else 1


# -- data -----------------------------------------------------------------------------
def image_planes(path: Path) -> list[np.ndarray]:
    """Every 2-D plane of a TIFF (channels, z, t, RGB), each scaled to 0..1 by percentiles."""
    data = np.asarray(tifffile.imread(path))
    if data.ndim == 3 and data.shape[-1] in (3, 4) and data.shape[0] > 4:
        data = np.moveaxis(data, -1, 0)  # RGB(A) last -> planes first
    planes = data.reshape(-1, *data.shape[-2:]) if data.ndim > 2 else data[None]
    out = []
    for plane in planes:
        p = plane.astype(np.float32)
        lo, hi = np.percentile(p, [0.1, 99.9])
        if hi - lo > 1e-6:
            out.append(np.clip((p - lo) / (hi - lo), 0.0, 1.5))
    return out


def collect_images(sources: list[str]) -> list[np.ndarray]:
    planes: list[np.ndarray] = []
    for f in tif_files(sources):
        planes += image_planes(f)
    return planes


class PairSampler:
    """Random (low, target) training pairs, normalised the way the runtime normalises."""

    def __init__(self, settings: TrainSettings, rng: np.random.Generator) -> None:
        self.s, self.rng = settings, rng
        self.scale = settings.scale
        self.crappify = make_crappifier(settings.crappifier, downsample=self.scale)
        self.norm = PercentileNorm()
        need = settings.patch * self.scale
        self.images = [p for p in collect_images(settings.data) if min(p.shape) >= need]
        if settings.data and not self.images:
            raise ValueError(f"no image in {settings.data} is at least {need}x{need} pixels")
        self.sim_fraction = settings.sim_fraction if self.images else 1.0
        self._specimens: list[Any] = []

    def _sim_truth(self, size: int) -> np.ndarray:
        from dimscope.drivers.specimen import Specimen

        if not self._specimens:
            side = max(self.s.patch * 2, 192)
            self._specimens = [Specimen(side, side, seed=int(self.rng.integers(1 << 30)),
                                        n_tubules=int(self.rng.integers(15, 60)),
                                        n_puncta=int(self.rng.integers(5, 40)),
                                        psf_sigma_px=float(self.rng.uniform(0.8, 1.8)))
                               for _ in range(6)]
        spec = self._specimens[int(self.rng.integers(len(self._specimens)))]
        state = spec.state_at(float(self.rng.uniform(0, 60)), 1.0)
        full = spec.render(state, scale=self.scale)  # truth at the target sampling
        y0 = int(self.rng.integers(0, full.shape[0] - size + 1))
        x0 = int(self.rng.integers(0, full.shape[1] - size + 1))
        crop = full[y0:y0 + size, x0:x0 + size]
        return crop / max(float(crop.max()), 0.3)

    def _real_truth(self, size: int) -> np.ndarray:
        img = self.images[int(self.rng.integers(len(self.images)))]
        y0 = int(self.rng.integers(0, img.shape[0] - size + 1))
        x0 = int(self.rng.integers(0, img.shape[1] - size + 1))
        return img[y0:y0 + size, x0:x0 + size]

    def pair(self) -> tuple[np.ndarray, np.ndarray]:
        size = self.s.patch * self.scale
        use_sim = self.rng.random() < self.sim_fraction
        clean = self._sim_truth(size) if use_sim else self._real_truth(size)
        clean = np.rot90(clean, int(self.rng.integers(4)))
        if self.rng.random() < 0.5:
            clean = clean[:, ::-1]
        low, target = self.crappify(np.ascontiguousarray(clean), self.rng)
        lo, hi = self.norm.bounds(low)
        return normalize.apply(low, lo, hi), normalize.apply(target, lo, hi)

    def batch(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        pairs = [self.pair() for _ in range(self.s.batch)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None])
        y = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None])
        return (x,), y


class ClipBatches:
    """Torch batches from the clip sampler, plus fixed validation batches drawn once."""

    def __init__(self, settings: TrainSettings, rng: np.random.Generator) -> None:
        from .clips import CameraRanges, ClipSampler, movie_channels, tif_files

        movies = [m for f in tif_files(settings.movies) for m in movie_channels(f)]
        self.sampler = ClipSampler(settings.window, settings.patch, settings.batch,
                                   collect_images(settings.data), movies, rng,
                                   CameraRanges(photons=settings.photons),
                                   sim_fraction=settings.sim_fraction)
        held_out = ClipSampler(settings.window, settings.patch, 8, self.sampler.images,
                               self.sampler.movies, np.random.default_rng(2024),
                               CameraRanges(photons=settings.photons), perturb_fraction=0.0)
        self.validation = [held_out.batch_arrays() for _ in range(3)]

    def batch(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        x, y = self.sampler.batch_arrays()
        return (torch.from_numpy(x),), torch.from_numpy(y)


@torch.inference_mode()
def validate_clips(net: torch.nn.Module, batches: list[tuple[np.ndarray, np.ndarray]],
                   multiple: int) -> float:
    """Mean PSNR in the stabilised, normalised units (a training monitor, not a benchmark)."""
    net.eval()
    values = []
    for x, y in batches:
        out = net(torch.from_numpy(x)).numpy()
        mse = np.mean((out - y) ** 2, axis=(1, 2, 3))
        values += list(10 * np.log10(1.0 / np.maximum(mse, 1e-12)))
    net.train()
    return float(np.mean(values))


def pool_camera(settings: TrainSettings) -> dict[str, Any]:
    """The cameras a guided pool's samples were recorded with (for the card)."""
    if settings.task == "transfer":
        return {"gain_adu_per_e": GUIDED_GAIN, "offset_adu": GUIDED_OFFSET,
                "read_noise_e": GUIDED_READ_NOISE, "photons": list(settings.photons),
                "noise_model_estimated_share": GUIDED_ESTIMATED,
                "otherwise": "the calibration with its gain off by ~10 %"}
    return {**asdict(POOL_CAMERA), "perturbed": POOL_PERTURBED}


def guided_batches(settings: TrainSettings, out: Path, rng: np.random.Generator,
                   transfer: TransferSampler | None = None,
                   deconvolution: DeconvolutionGuide | None = None) -> GuidedBatches:
    """The guided pool: loaded from `pool_files`, or made from the data (`transfer`: from
    its pairs, with `deconvolution`) and saved beside the model (`<out>.pool.npz`) so a
    rerun or a fold of the same data reuses it."""
    from .clips import ClipSampler, movie_channels

    guide = settings.guide
    assert guide is not None
    rl = deconvolution.model_dump_json() if deconvolution is not None else ""
    if settings.pool_files:
        inputs, targets = load_pools([Path(p) for p in settings.pool_files], guide,
                                     settings.window, settings.scale, rl)
    else:
        saved = out.with_suffix(".pool.npz")
        source = " ".join(settings.data + settings.movies) or "simulated"
        if transfer is not None:
            assert deconvolution is not None
            # everything the samples depend on, so a pool made otherwise is made again
            source = json.dumps({"task": "transfer", "classes": transfer.classes,
                                 "pairs": settings.pairs, "planes": settings.planes,
                                 "data": settings.data, "patch": settings.patch,
                                 "photons": list(settings.photons), "seed": settings.seed,
                                 "sim_fraction": transfer.sim_fraction,
                                 "deconvolution": deconvolution.model_dump()})
        reuse = saved.is_file() and pool_source(saved) == (source, settings.pool)
        if reuse:
            try:
                inputs, targets = load_pools([saved], guide, settings.window, settings.scale,
                                             rl)
            except ValueError:  # made for another guide, window or scale
                reuse = False
        if not reuse and transfer is not None:
            saved.unlink(missing_ok=True)
            assert deconvolution is not None
            log.info("making %d bm3d-guided transfer samples (seconds each)", settings.pool)
            inputs, targets = build_guided_pool(transfer, settings.pool, deconvolution,
                                                settings.seed)
            save_pool(saved, inputs, targets, guide, settings.window, source, settings.scale,
                      rl)
        elif not reuse:
            saved.unlink(missing_ok=True)  # made from other data: make it again
            movies = [m for f in tif_files(settings.movies) for m in movie_channels(f)]
            clips = ClipSampler(settings.window, settings.patch * settings.scale, 1,
                                collect_images(settings.data), movies, rng,
                                sim_fraction=settings.sim_fraction)
            log.info("making %d %s-guided samples (seconds each)", settings.pool, guide)
            inputs, targets = build_pool(clips, settings.pool, guide, rng,
                                         scale=settings.scale)
            save_pool(saved, inputs, targets, guide, settings.window, source, settings.scale)
    # A fixed order (not the training rng's): the same samples are held out on a resume.
    order = np.random.default_rng(len(inputs)).permutation(len(inputs))
    return GuidedBatches(inputs[order], targets[order], settings.batch, rng)


def collect_stacks(sources: list[str]) -> list[np.ndarray]:
    """Time-lapses (T, Y, X) from TIFF files/folders, each frame in 0..1 (training takes the
    first two thirds of each movie, evaluation the rest)."""
    files: list[Path] = []
    for s in sources:
        p = Path(s).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"training data not found: {p}")
        files += sorted(f for f in p.rglob("*.tif*")) if p.is_dir() else [p]
    stacks = []
    for f in files:
        data = np.asarray(tifffile.imread(f), dtype=np.float32)
        if data.ndim != 3 or data.shape[0] < 5:
            continue
        lo, hi = np.percentile(data, [0.1, 99.9])
        stacks.append(np.clip((data - lo) / max(float(hi - lo), 1e-6), 0, 1.5))
    return stacks


class TripletSampler:
    """(frame0, frame1, t) -> frame at t: frames dropped from real and simulated movies (CAFI)."""

    def __init__(self, settings: TrainSettings, rng: np.random.Generator) -> None:
        self.s, self.rng = settings, rng
        self.stacks = [st[: (2 * len(st)) // 3] for st in collect_stacks(settings.data)]
        self.stacks = [st for st in self.stacks if min(st.shape[1:]) >= settings.patch]
        self.sim_fraction = settings.sim_fraction if self.stacks else 1.0
        self._specimens: list[Any] = []

    def _sim_movie(self, gap: int) -> np.ndarray:
        from dimscope.drivers.specimen import Specimen

        if not self._specimens:
            side = max(self.s.patch + 32, 160)
            self._specimens = [Specimen(side, side, seed=int(self.rng.integers(1 << 30)),
                                        n_tubules=int(self.rng.integers(10, 40)),
                                        n_puncta=int(self.rng.integers(10, 50)),
                                        drift_px_per_s=float(self.rng.uniform(0.5, 4.0)),
                                        punctum_speed_px_per_s=float(self.rng.uniform(2, 12)))
                               for _ in range(6)]
        spec = self._specimens[int(self.rng.integers(len(self._specimens)))]
        t0, dt = float(self.rng.uniform(0, 100)), float(self.rng.uniform(0.2, 1.5))
        frames = np.stack([spec.render(spec.state_at(t0 + dt * k / gap, 1.0))
                           for k in range(gap + 1)])
        return frames / max(float(frames.max()), 0.3)

    def sample(self) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        gap = 2 if self.rng.random() < 0.6 else 4
        k = int(self.rng.integers(1, gap))
        size = self.s.patch
        if self.rng.random() < self.sim_fraction:
            movie = self._sim_movie(gap)
        else:
            stack = self.stacks[int(self.rng.integers(len(self.stacks)))]
            gap = min(gap, len(stack) - 1)
            k = min(k, gap - 1) if gap > 1 else 1
            i = int(self.rng.integers(0, len(stack) - gap))
            movie = stack[i:i + gap + 1]
        y0 = int(self.rng.integers(0, movie.shape[1] - size + 1))
        x0 = int(self.rng.integers(0, movie.shape[2] - size + 1))
        movie = movie[:, y0:y0 + size, x0:x0 + size]
        if self.rng.random() < 0.5:  # time reversal: t -> 1 - t
            movie, k = movie[::-1], gap - k
        movie = np.rot90(movie, int(self.rng.integers(4)), axes=(1, 2))
        return movie[0], movie[-1], k / gap, movie[k]

    def batch(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        f0s, f1s, ts, ys = [], [], [], []
        norm = PercentileNorm()
        for _ in range(self.s.batch):
            f0, f1, t, y = self.sample()
            lo, hi = norm.joint_bounds(f0, f1)
            f0s.append(normalize.apply(f0, lo, hi))
            f1s.append(normalize.apply(f1, lo, hi))
            ys.append(normalize.apply(y, lo, hi))
            ts.append(t)
        t_tensor = torch.tensor(ts, dtype=torch.float32).view(-1, 1, 1, 1)
        first = torch.from_numpy(np.stack(f0s))[:, None]
        second = torch.from_numpy(np.stack(f1s))[:, None]
        return (first, second, t_tensor), torch.from_numpy(np.stack(ys))[:, None]


def load_validation(settings: TrainSettings, rng_seed: int = 1234, n: int = 6
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(low, high) validation pairs: real pairs when given, else held-out simulated ones."""
    if settings.val_low and settings.val_high and settings.scale == 1:
        low = np.asarray(tifffile.imread(settings.val_low), dtype=np.float32)
        high = np.asarray(tifffile.imread(settings.val_high), dtype=np.float32)
        low, high = low.reshape(-1, *low.shape[-2:]), high.reshape(-1, *high.shape[-2:])
        out = []
        for i in range(min(n, len(low))):
            h, w = low[i].shape
            c = min(256, h, w)
            y0, x0 = (h - c) // 2, (w - c) // 2
            out.append((low[i, y0:y0 + c, x0:x0 + c], high[i, y0:y0 + c, x0:x0 + c]))
        return out
    held_out = TrainSettings(**{**asdict(settings), "data": [], "patch": 128})
    sampler = PairSampler(held_out, np.random.default_rng(rng_seed))
    pairs = []
    for _ in range(n):
        size = 128 * settings.scale
        clean = sampler._sim_truth(size)
        low, target = sampler.crappify(clean, sampler.rng)
        pairs.append((low, target))
    return pairs


@torch.inference_mode()
def validate(net: torch.nn.Module, pairs: list[tuple[np.ndarray, np.ndarray]],
             multiple: int) -> float:
    """Mean PSNR (dB, quality.py convention) of the network on the validation pairs."""
    net.eval()
    norm = PercentileNorm()
    values = []
    for low, high in pairs:
        h, w = (s - s % multiple for s in low.shape)
        low_c = low[:h, :w]
        lo, hi = norm.bounds(low_c)
        out = net(torch.from_numpy(normalize.apply(low_c, lo, hi))[None, None])[0, 0].numpy()
        truth = high[:out.shape[0], :out.shape[1]]
        t = normalize_truth(truth)
        values.append(psnr(t, fit_to(t, out)))
    net.train()
    return float(np.mean(values))


def interp_validation(settings: TrainSettings, n: int = 8
                      ) -> list[tuple[np.ndarray, np.ndarray, float, np.ndarray]]:
    """Held-out triplets: the last third of each real movie (else simulated movies)."""
    out = []
    stacks = [st[(2 * len(st)) // 3:] for st in collect_stacks(settings.data)]
    for st in stacks:
        for i in range(0, len(st) - 2, 2)[: max(1, n // max(len(stacks), 1))]:
            h, w = (s - s % 4 for s in st.shape[1:])
            out.append((st[i, :h, :w], st[i + 2, :h, :w], 0.5, st[i + 1, :h, :w]))
    if not out:
        sampler = TripletSampler(TrainSettings(**{**asdict(settings), "data": []}),
                                 np.random.default_rng(4321))
        out = [sampler.sample() for _ in range(n)]
    return out


@torch.inference_mode()
def validate_interp(net: torch.nn.Module,
                    triplets: list[tuple[np.ndarray, np.ndarray, float, np.ndarray]]) -> float:
    net.eval()
    norm = PercentileNorm()
    values = []
    for f0, f1, t, y in triplets:
        lo, hi = norm.joint_bounds(f0, f1)
        out = net(torch.from_numpy(normalize.apply(f0, lo, hi))[None, None],
                  torch.from_numpy(normalize.apply(f1, lo, hi))[None, None],
                  torch.full((1, 1, 1, 1), t))[0, 0].numpy()
        truth = normalize_truth(y)
        values.append(psnr(truth, fit_to(truth, out)))
    net.train()
    return float(np.mean(values))


# -- training ---------------------------------------------------------------------------
def _progress(total: int, initial: int) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                    file=sys.stderr)
    except ImportError:  # tqdm is in the `train` extra; work without it
        return None


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, step: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay to 1 % of the learning rate over `steps`, resumed at `step`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)) * 0.99 + 0.01,
        last_epoch=step - 1 if step else -1)


def save_checkpoint(path: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, history: list[dict[str, Any]], running: float,
                    rng: np.random.Generator, **extra: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "history": history, "running_loss": running, "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(), **extra}, path)


def restore_checkpoint(path: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       rng: np.random.Generator) -> tuple[int, list[dict[str, Any]], float]:
    """Network, optimiser and random states from `save_checkpoint`; (step, history, running
    loss)."""
    state = torch.load(path, weights_only=False)
    net.load_state_dict(state["net"])
    optimizer.load_state_dict(state["optimizer"])
    rng.bit_generator.state = state["rng"]
    torch.set_rng_state(state["torch_rng"])
    log.info("resumed from %s at step %d", path, int(state["step"]))
    return int(state["step"]), list(state["history"]), float(state["running_loss"])


def train(settings: TrainSettings, out: Path, checkpoint: Path | None = None,
          resume: bool = False, progress: bool = True, pause_at: int | None = None
          ) -> dict[str, Any]:
    """Train (or resume, or fine-tune) and export `out` (.onnx + .json card).

    `pause_at` stops early at that step (checkpointed and exported) without
    changing the schedule, so a later `resume=True` continues the same run.
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    checkpoint = checkpoint or out.with_suffix(".ckpt")
    if settings.init:
        init_path = resolve_model(settings.init)
        # Checked against its card: fine-tuning changed weights would give them a fresh hash.
        init_card = open_model_card(init_path).card
        if init_card.task != settings.task:
            raise ValueError(f"cannot fine-tune a {init_card.task} model for {settings.task}")
        settings.arch, settings.hparams = init_card.arch, dict(init_card.hparams)
    if settings.task == "interp":
        settings.arch = "interp"
    hparams = {**DEFAULT_HPARAMS.get(settings.arch, {}), **settings.hparams}
    if settings.arch != "interp":
        hparams["scale"] = settings.scale
    deconvolution = None
    if settings.guide is not None:
        if settings.guide not in ("bm3d", "bm4d") or settings.task not in ("denoise", "sr2",
                                                                           "transfer"):
            raise ValueError(f"--guide takes bm3d or bm4d for denoise, sr2 or transfer, got "
                             f"{settings.guide!r} for {settings.task}")
        if (settings.guide == "bm3d") != (settings.window == 1):
            raise ValueError("a bm3d guide takes --window 1; a bm4d guide a window of 2+")
        if settings.task in ("sr2", "transfer") and settings.guide != "bm3d":
            raise ValueError(f"a guided {settings.task} model takes --guide bm3d (one frame)")
        if settings.task == "transfer":
            if settings.scale != 1:
                raise ValueError("a guided transfer model works at --scale 1")
            deconvolution = DeconvolutionGuide(psf_sigma_px=settings.rl_sigma_px,
                                               iterations=settings.rl_iterations)
            if settings.init and init_card.deconvolution is not None:
                deconvolution = init_card.deconvolution  # fine-tuning keeps its base
            hparams["deconvolved"] = True
        settings.vst = True
        hparams["guided"] = True
        hparams.update(window=settings.window, noise_map=True)
    if settings.clips:
        hparams.update(window=settings.window, noise_map=settings.vst)
    settings.hparams = hparams
    net = build_network(settings.arch, **hparams)
    if settings.init:
        from ..runtime.pytorch import network_from_file

        net.load_state_dict(network_from_file(init_path, init_card).state_dict())
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    step, running = 0, 0.0
    history: list[dict[str, Any]] = []
    if resume and checkpoint.is_file():
        step, history, running = restore_checkpoint(checkpoint, net, optimizer, rng)
    sampler: PairSampler | TripletSampler | ClipBatches | TransferSampler | GuidedBatches
    transfer_sampler = None
    if settings.task == "transfer":
        transfer_sampler = TransferSampler(settings, rng)
    if settings.guide is not None:
        sampler = guided_batches(settings, out, rng, transfer_sampler, deconvolution)
    elif transfer_sampler is not None:
        sampler = transfer_sampler
        val_pairs = sampler.validation()
    elif settings.clips:
        sampler = ClipBatches(settings, rng)
    elif settings.task == "interp":
        sampler = TripletSampler(settings, rng)
        val_triplets = interp_validation(settings)
    else:
        sampler = PairSampler(settings, rng)
        val_pairs = load_validation(settings)
    multiple = multiple_of(settings.arch, hparams)
    schedule = cosine_schedule(optimizer, settings.steps, step)
    bar = _progress(settings.steps, step) if progress else None
    started = time.monotonic()
    val_psnr = history[-1]["val_psnr"] if history else float("nan")
    net.train()
    last = min(settings.steps, pause_at) if pause_at is not None else settings.steps
    while step < last:
        inputs, y = sampler.batch()
        # Noise-aware clips: MSE (what PSNR measures; L1 learned the low-light cases far more
        # slowly in a 300-step comparison here: 24.3 vs 26.4 dB on held-out clips).
        if isinstance(sampler, GuidedBatches):
            weight = intensity_weights(inputs[0], y)
            loss = (weight * (net(*inputs) - y) ** 2).mean()
        elif isinstance(sampler, ClipBatches):
            per_sample = ((net(*inputs) - y) ** 2).mean(dim=(1, 2, 3))
            weight = inputs[0][:, -1, 0, 0] ** -settings.noise_weight
            loss = (per_sample * weight).sum() / weight.sum()
        elif isinstance(sampler, TransferSampler):
            restored = net(*inputs)
            loss = F.l1_loss(restored, y)
            if settings.ssim_weight > 0:
                loss = loss + settings.ssim_weight * ssim_loss(restored, y)
        else:
            loss = F.l1_loss(net(*inputs), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        value = loss.item()
        running = 0.9 * running + 0.1 * value if step > 1 else value
        if step % settings.val_every == 0 or step == last:
            if isinstance(sampler, (ClipBatches, GuidedBatches)):
                val_psnr = validate_clips(net, sampler.validation, multiple)
            elif settings.task == "interp":
                val_psnr = validate_interp(net, val_triplets)
            else:
                val_psnr = validate(net, val_pairs, multiple)
            history.append({"step": step, "loss": running, "val_psnr": val_psnr})
        if step % settings.checkpoint_every == 0 or step == last:
            save_checkpoint(checkpoint, net, optimizer, step, history, running, rng,
                            settings=asdict(settings))
        if bar is not None:
            bar.set_postfix(loss=f"{running:.4f}", val_psnr=f"{val_psnr:.2f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    card = ModelCard(
        name=settings.name or settings.task, task=settings.task,
        version=settings.version, arch=settings.arch, hparams=hparams, scale=settings.scale,
        multiple=multiple, inputs=settings.frames_in, window=settings.window,
        normalization=(VSTNorm() if settings.vst else PercentileNorm()).as_dict(),
        transfer=(transfer_sampler.provenance(loss=None if settings.guide is None else
                                              "intensity-weighted mse")
                  if transfer_sampler is not None else None),
        guide=settings.guide, deconvolution=deconvolution,
        training={"command": " ".join(["dimscope", *sys.argv[1:]]) if sys.argv else "",
                  "settings": asdict(settings), "parameters": count_parameters(net),
                  "steps": step, "final_loss": running, "val_psnr": val_psnr,
                  "seconds_this_session": round(time.monotonic() - started, 1),
                  "torch": torch.__version__,
                  # guided pools: the cameras their samples were degraded with
                  **({"pool_camera": pool_camera(settings)} if settings.guide else {}),
                  "date": time.strftime("%Y-%m-%d"),
                  # how the starting point was made, so the card tells the whole recipe
                  **({"fine_tuned_from": {"version": init_card.version,
                                          "weights_sha256": init_card.weights_sha256,
                                          "training": init_card.training}}
                     if settings.init else {})})
    export_onnx(net, card, out)
    return {"model": str(out), "steps": step, "loss": running, "val_psnr": val_psnr,
            "history": history, "card": json.loads(card.model_dump_json())}
