"""Live self-supervised adaptation of the noise-aware denoiser to the sample (no clean data).

**What it learns from.** The input is the model's own causal window, raw frames
t−K+1..t through `VSTNorm.inputs` exactly as the engine feeds it; the target must carry
noise independent of that input. Two targets (`AdaptSettings.target`):
- `blind_spot` (default, Noise2Void-style): frame t itself, at ~2% of its pixels whose
  input values were replaced by a random neighbour's; the loss sees only those pixels.
  The past frames still show them, with their own noise.
- `next` (temporal Noise2Noise, as DeepCAD-RT): frame t+1, all pixels. Measured on the
  held-out movies it learns the motion to t+1 and lowers PSNR on moving samples (30 s
  offline, fold models, 20 photons: −1.2 to −5.1 dB; blind spot −0.7 to +0.04 dB).
Random crops (64–96 px) with the same flip/rot90 for window and target, MSE, Adam at a
small learning rate, a bounded number of steps per round.
Tried and not kept (fold 2 model, mitosis_2ch/c0, 20 photons, 60 s offline): Monte-Carlo
SURE on frame t in the transform's units, −3.5 dB (−2.0 with the exact per-pixel variance:
after the transform the noise variance is 1.1–1.2, not 1, at a few photo-electrons, and
SURE's error from a wrong variance, (σ'² − σ²)(1 − 2 div f), exceeds the model's own MSE,
which is ~2% of σ² here); frame t+1 warped onto t by DIS flow (Frame2Frame) with
unreliable pixels left out, −0.46 dB.

**Held-back validation.** Frames are kept in blocks of consecutive frames (16); every
5th block is held back, and a training window never leaves its block, so no held-back
frame is ever a training input or target. (Holding back every 5th *window* would not
do that: neighbouring windows share all but one of their frames.) After each round the
self-supervised loss on the held-back windows (fixed crops) is computed for the adapted
weights and for the weights in service; only when it fell by `margin` are the adapted
weights exported — a new ONNX file whose card `version` is e.g. "3@adapted-1", with a
`training` note (frames used, steps, loss before/after) — and reported ready (live at
most every 5 s, an interval that grows with each export up to 10 min). Adapted weights
that fall behind the ones in service by more than `margin` are reset to them.
The loss includes the target's own noise (about 1/span² per window, reported as
`noise_floor`), so a fall of 0.5% of it is a larger share of the model's real error.

**Where it runs: a child process, not a thread.** `Adapter` (the daemon's side) starts
one fresh interpreter at the lowest CPU priority (SCHED_IDLE, else nice 19) with one
torch thread, and hands it frames through a shared-memory ring: `offer()` is one copy
into the ring and never waits for the child (each slot is a seqlock; the child discards
a block overwritten while it copied it). A thread would not do: torch's training loop
runs Python between its kernels and would hold the GIL that the acquisition loop (a
Python pop loop; the simulated camera renders in Python) and the engine's numpy code
need; a thread cannot be given a lower CPU priority than the threads waiting for its
GIL without priority inversion; and `torch.set_num_threads` is per process, so a
training thread limited to one thread would limit the engine's torch runtime too. A
process at idle priority runs only on CPU time the daemon leaves unused, and its GIL is
its own. The costs: a copy per frame (~0.1 ms at 512²), ~300 MB and a few seconds to
start (importing torch). The child trains on a sample of the stream: it takes the
blocks that are complete in the ring whenever it looks (every few steps); frames that
pass meanwhile are counted as dropped — by adaptation only, never by the archive or the
engine.

`AdaptTrainer` is the training itself (in the child, or in-process for
`dimscope enhance --adapt` and `dimscope adapt`); it needs torch, imported lazily, so the
daemon runs without torch when adaptation is off.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import mmap
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .base import EngineError
from .model_file import ModelCard, file_digest, read_card
from .noise_model import NoiseModel
from .normalize import VSTNorm

log = logging.getLogger(__name__)

#: what an adapted model's card version carries after its base version: "3@adapted-2"
ADAPTED_TAG = "@adapted-"


@dataclass(frozen=True, slots=True)
class AdaptSettings:
    """How adaptation trains, validates and bounds its memory (defaults: live use)."""

    #: optimiser steps per round (then validation and, if the loss fell, an export)
    steps_per_round: int = 40
    batch: int = 4
    #: training crop sides (rounded up to the model's input multiple, capped by the data)
    crops: tuple[int, ...] = (64, 80, 96)
    lr: float = 1e-4
    #: the held-back loss must fall by this share of the loss in service to export
    margin: float = 0.005
    #: consecutive frames per block (the unit of the train/held-back split)
    block: int = 16
    #: every `holdout_every`-th block is held back
    holdout_every: int = 5
    #: a block keeps one region of its frames of at most this side, at a position that changes
    #: from block to block (live: all offer() copies, so its cost is the same for any frame)
    store_side: int = 192
    max_train_blocks: int = 24
    #: held-back blocks kept (the newest), and windows validated (the newest)
    max_val_blocks: int = 6
    max_val_windows: int = 96
    val_crop: int = 64
    #: frames (regions of) the shared ring holds
    ring_frames: int = 64
    #: live: at least this long between two exports (each is compiled, swapped in and kept
    #: with the run); the interval grows by `export_backoff` after each, up to the maximum,
    #: so a long run keeps tens of files, not thousands
    min_export_interval_s: float = 5.0
    export_backoff: float = 1.5
    max_export_interval_s: float = 600.0
    #: at most this share of one core: the child sleeps after each step for the rest (idle
    #: priority already yields to the daemon; this also bounds what it takes from shared
    #: caches and memory bandwidth)
    cpu_share: float = 1.0
    #: run the child at idle CPU priority (live); tests that must see a swap on a machine
    #: busy with other work turn it off, since an idle-priority process may get no CPU there
    idle_priority: bool = True
    #: what the window learns to predict, with noise independent of the input: "next" — frame
    #: t+1 (temporal Noise2Noise; measured: it learns the motion to t+1 and lowers PSNR on
    #: moving samples), or "blind_spot" — frame t itself at pixels of t hidden from the input
    #: (Noise2Void-style; the past frames still show those pixels with their own noise)
    target: Literal["blind_spot", "next"] = "blind_spot"
    #: share of frame t's pixels hidden per window (blind_spot)
    blind_fraction: float = 0.02
    #: training steps between collections of new frames from the ring
    collect_every: int = 10
    seed: int = 0


#: what the daemon's live adaptation uses (module-level, so tests and benchmarks can set it)
LIVE_SETTINGS = AdaptSettings()


@dataclass(frozen=True, slots=True)
class RoundReport:
    """One round: its training, the held-back loss in service and adapted, any export."""

    round: int
    steps: int
    total_steps: int
    frames_used: int
    train_windows: int
    val_windows: int
    train_loss: float
    loss_served: float
    loss_adapted: float
    noise_floor: float
    seconds: float
    #: the exported file and its card version when the held-back loss fell by the margin
    path: str | None = None
    version: str | None = None
    #: the adapted weights fell behind the ones in service and were reset to them
    reset: bool = False

    @property
    def improved(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        return (f"round {self.round}: held-back loss {self.loss_served:.5f} in service -> "
                f"{self.loss_adapted:.5f} adapted ({self.change:+.2%}; noise floor "
                f"{self.noise_floor:.5f}), {self.total_steps} steps, {self.frames_used} frames")

    @property
    def change(self) -> float:
        return self.loss_adapted / self.loss_served - 1.0 if self.loss_served > 0 else 0.0


def check_adaptable(card: ModelCard, path: Path) -> None:
    """EngineError unless the model is a noise-aware (VST) denoiser adaptation can train."""
    kind = card.normalization.get("kind")
    if card.task != "denoise" or card.scale != 1 or card.inputs != 1 or kind != "vst":
        raise EngineError(
            f"adaptation needs a noise-aware denoiser (a `denoise` model whose card has "
            f"normalization 'vst'); model {path.name} ({card.name} {card.version}) is a "
            f"{card.task} model with {kind!r} normalisation")


def split_version(version: str) -> tuple[str, int]:
    """("3", 2) for "3@adapted-2"; (version, 0) for a model never adapted."""
    base, tag, n = version.rpartition(ADAPTED_TAG)
    return (base, int(n)) if tag and n.isdigit() else (version, 0)


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


@dataclass(frozen=True, slots=True)
class _Block:
    frames: np.ndarray  # (n, h, w) float32 raw ADU, consecutive frames
    index: int  # block number in the stream
    held_back: bool


class AdaptTrainer:
    """Fine-tunes a copy of a model's network on the frames given (see the module docstring).

    Feed it blocks of consecutive raw frames (`add_block`, or a whole stack with
    `add_stack`), give it the noise model, and call `run_round` while `ready()`.
    """

    def __init__(self, model_path: Path, out_dir: Path, settings: AdaptSettings = AdaptSettings(),
                 noise: NoiseModel | None = None) -> None:
        import torch

        from .runtime.pytorch import network_from_file

        self.card = read_card(model_path)
        check_adaptable(self.card, model_path)
        self.settings, self.out_dir, self.noise = settings, out_dir, noise
        self.source = f"{model_path.name} ({self.card.version}+{file_digest(model_path)})"
        self.base_version, self.exported = split_version(self.card.version)
        self.window, self.multiple = self.card.window, self.card.multiple
        self.block_len = max(settings.block, self.window + 2)
        norm = self.card.norm()
        assert isinstance(norm, VSTNorm)
        self.norm = norm
        torch.manual_seed(settings.seed)
        self.rng = np.random.default_rng(settings.seed)
        self.net = network_from_file(model_path, self.card).train()
        self.served = copy.deepcopy(self.net).eval()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=settings.lr)
        self.train_blocks: deque[_Block] = deque(maxlen=settings.max_train_blocks)
        self.val_blocks: deque[_Block] = deque(maxlen=settings.max_val_blocks)
        self._val: tuple[Any, Any, float] | None = None  # inputs, targets, noise floor
        self._served_loss: float | None = None
        self.rounds = self.total_steps = self.frames_used = 0
        self.last_path: Path | None = None
        self._exported_at = -math.inf

    # -- data -----------------------------------------------------------------------
    def set_noise(self, noise: NoiseModel) -> None:
        if noise != self.noise:
            self.noise, self._val, self._served_loss = noise, None, None

    def add_block(self, frames: np.ndarray, index: int, held_back: bool | None = None) -> None:
        """`frames`: (n, h, w) consecutive raw frames; block number `index` in the stream
        decides whether it is held back (every `holdout_every`-th), unless told."""
        if len(frames) < self.window + 1 or min(frames.shape[1:]) < self.multiple:
            return
        s = self.settings
        if held_back is None:
            held_back = index % s.holdout_every == s.holdout_every // 2
        block = _Block(np.ascontiguousarray(frames, dtype=np.float32), index, held_back)
        self.frames_used += len(frames)
        if held_back:
            self.val_blocks.append(block)
            self._val = self._served_loss = None
        else:
            self.train_blocks.append(block)

    def add_stack(self, stack: np.ndarray, max_frames: int | None = None) -> None:
        """A (T, Y, X) time-lapse (any array type, a memory map too), split into blocks of
        consecutive frames; with `max_frames`, only that many, in blocks spread evenly over
        it. A stack too short for five blocks gets shorter blocks, and at least one is held
        back."""
        k = self.window + 2
        length = min(self.block_len, max(k, len(stack) // self.settings.holdout_every))
        n = len(stack) // length
        if n < 2:
            raise EngineError(f"adaptation needs at least {2 * k} frames of a time-lapse "
                              f"(two blocks of {k}: one to train on, one held back); got "
                              f"{len(stack)}")
        mid = self.settings.holdout_every // 2
        keep = n if max_frames is None else max(2, min(n, max_frames // length))
        for i in np.unique(np.linspace(0, n - 1, keep).round().astype(int)):
            held = i % self.settings.holdout_every == mid if n > mid else i == n - 1
            self.add_block(np.asarray(stack[i * length:(i + 1) * length]), int(i),
                           held_back=bool(held))

    def ready(self) -> bool:
        return self.noise is not None and bool(self.train_blocks) and bool(self.val_blocks)

    # -- samples ----------------------------------------------------------------------
    def _sample(self, frames: np.ndarray, t: int, y0: int, x0: int, side: int,
                rng: np.random.Generator | None = None
                ) -> tuple[np.ndarray, np.ndarray, float]:
        """(inputs, target, noise floor) of the window ending at t. Target "next": frame t+1,
        all pixels. "blind_spot": frame t, NaN except at the hidden pixels, whose input values
        were replaced by a random neighbour's (so the loss sees only pixels the network could
        not copy)."""
        assert self.noise is not None
        if self.settings.target == "next":
            crop = frames[t - self.window + 1:t + 2, y0:y0 + side, x0:x0 + side]
            x, lo, span = self.norm.inputs(crop[:-1], self.noise)
            y = self.norm.target(crop[-1], self.noise, lo, span)
            return x, y, 1.0 / (span * span)
        rng = rng if rng is not None else self.rng
        crop = frames[t - self.window + 1:t + 1, y0:y0 + side, x0:x0 + side]
        x, lo, span = self.norm.inputs(crop, self.noise)
        newest = x[self.window - 1]
        y = np.full_like(newest, np.nan)
        n = max(1, int(self.settings.blind_fraction * newest.size))
        ys, xs = rng.integers(0, side, n), rng.integers(0, side, n)
        y[ys, xs] = newest[ys, xs]
        dy, dx = rng.integers(-2, 3, n), rng.integers(-2, 3, n)
        dx[(dy == 0) & (dx == 0)] = 1  # never the pixel itself
        newest[ys, xs] = newest[np.clip(ys + dy, 0, side - 1), np.clip(xs + dx, 0, side - 1)]
        return x, y, 1.0 / (span * span)

    def _crop_side(self, want: int, blocks: list[_Block] | deque[_Block]) -> int:
        fits = min(min(b.frames.shape[1:]) for b in blocks)
        side = min(_round_up(want, self.multiple), fits - fits % self.multiple)
        return max(side, self.multiple)

    def _batch(self) -> tuple[Any, Any]:
        import torch

        rng, s = self.rng, self.settings
        side = self._crop_side(int(rng.choice(s.crops)), self.train_blocks)
        weights = np.array([len(b.frames) - self.window for b in self.train_blocks], float)
        xs, ys = [], []
        for _ in range(s.batch):
            block = self.train_blocks[int(rng.choice(len(weights), p=weights / weights.sum()))]
            n, h, w = block.frames.shape
            t = int(rng.integers(self.window - 1, n - 1))
            y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            x, y, _ = self._sample(block.frames, t, y0, x0, side)
            k = int(rng.integers(4))
            x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
            if rng.random() < 0.5:
                x, y = x[:, :, ::-1], y[:, ::-1]
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y)[None])
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    @staticmethod
    def _loss(out: Any, target: Any, reduction: str = "mean") -> Any:
        """MSE over the target's defined pixels (all, or the blind spots)."""
        known = ~target.isnan()
        diff = (out - target.nan_to_num())[known]
        return (diff * diff).sum() if reduction == "sum" else (diff * diff).mean()

    @staticmethod
    def _corners(block: _Block, side: int) -> list[tuple[int, int]]:
        """Fixed crops of a held-back window: two opposite corners of the block's region."""
        h, w = block.frames.shape[1:]
        return sorted({(0, 0), (h - side, w - side)})

    def _val_set(self) -> tuple[Any, Any, float]:
        import torch

        if self._val is None:
            side = self._crop_side(self.settings.val_crop, self.val_blocks)
            xs, ys, floors = [], [], []
            for block in self.val_blocks:
                for t in range(self.window - 1, len(block.frames) - 1):
                    for y0, x0 in self._corners(block, side):
                        # fixed blind spots per window: the same held-back loss every round
                        x, y, floor = self._sample(block.frames, t, y0, x0, side,
                                                   np.random.default_rng([t, y0, x0]))
                        xs.append(x)
                        ys.append(y[None])
                        floors.append(floor)
            keep = self.settings.max_val_windows
            self._val = (torch.from_numpy(np.stack(xs[-keep:])),
                         torch.from_numpy(np.stack(ys[-keep:])), float(np.mean(floors[-keep:])))
        return self._val

    def held_back_loss(self, net: Any) -> float:
        """Mean self-supervised loss of `net` on the held-back windows."""
        import torch

        x, y, _ = self._val_set()
        was_training = net.training
        net.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(x), 16):
                total += float(self._loss(net(x[i:i + 16]), y[i:i + 16], reduction="sum"))
        net.train(was_training)
        return total / float((~y.isnan()).sum())

    # -- rounds ---------------------------------------------------------------------------
    def run_round(self, steps: int | None = None, deadline: float | None = None,
                  between_steps: Callable[[int], None] | None = None,
                  stop: Callable[[], bool] | None = None, export: bool | None = None
                  ) -> RoundReport:
        """Train `steps` steps (or until `deadline`, time.monotonic()), then validate and
        export if the held-back loss fell (and `min_export_interval_s` has passed since the
        last export, unless `export` says). `between_steps(step)` runs after each step."""

        if not self.ready():
            raise EngineError("adaptation has no data yet: it needs frames to train on, "
                              "held-back frames and a noise model")
        started = time.monotonic()
        steps = self.settings.steps_per_round if steps is None else steps
        self.net.train()
        losses: list[float] = []
        for step in range(steps):
            if (deadline is not None and time.monotonic() >= deadline) or (stop and stop()):
                break
            step_started = time.monotonic()
            x, y = self._batch()
            loss = self._loss(self.net(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.item()))
            self.total_steps += 1
            if between_steps is not None:
                between_steps(step)
            if self.settings.cpu_share < 1.0:
                busy = time.monotonic() - step_started
                time.sleep(busy * (1.0 / max(self.settings.cpu_share, 0.01) - 1.0))
        self.rounds += 1
        if self._served_loss is None:
            self._served_loss = self.held_back_loss(self.served)
        served, adapted = self._served_loss, self.held_back_loss(self.net)
        inputs, _, floor = self._val_set()
        margin = self.settings.margin
        path: Path | None = None
        reset = False
        if export is None:
            export = time.monotonic() - self._exported_at >= self._export_interval()
        if adapted < served * (1.0 - margin) and export:
            path = self._export(served, adapted)
            self._exported_at = time.monotonic()
            self.served.load_state_dict(self.net.state_dict())
            self._served_loss = adapted
        elif adapted > served * (1.0 + margin):
            # Worse than what is in service: start again from it (fresh optimiser state).
            self.net.load_state_dict(self.served.state_dict())
            self.optimizer.state.clear()
            reset = True
        return RoundReport(
            round=self.rounds, steps=len(losses), total_steps=self.total_steps,
            frames_used=self.frames_used,
            train_windows=sum(len(b.frames) - self.window for b in self.train_blocks),
            val_windows=len(inputs), train_loss=float(np.mean(losses)) if losses else math.nan,
            loss_served=served, loss_adapted=adapted, noise_floor=floor,
            seconds=time.monotonic() - started, path=str(path) if path else None,
            version=f"{self.base_version}{ADAPTED_TAG}{self.exported}" if path else None,
            reset=reset)

    def _export_interval(self) -> float:
        s, n = self.settings, self.exported - split_version(self.card.version)[1]
        return float(min(s.min_export_interval_s * s.export_backoff ** max(n - 1, 0),
                         max(s.max_export_interval_s, s.min_export_interval_s)))

    def _export(self, served: float, adapted: float) -> Path:
        import torch

        from .training.export import export_onnx

        self.exported += 1
        version = f"{self.base_version}{ADAPTED_TAG}{self.exported}"
        s = self.settings
        update: dict[str, Any] = {}
        if getattr(self.card, "evaluation", None):  # measured for the base model, not this one
            update["evaluation"] = {}
        card = self.card.model_copy(update={**update, "version": version, "training": {
            "adapted_from": self.source,
            "method": "live self-supervised adaptation: " + (
                "temporal Noise2Noise (window t-K+1..t -> frame t+1 in the same VST units)"
                if s.target == "next" else "blind spot (window t-K+1..t with ~"
                f"{s.blind_fraction:.0%} of frame t hidden -> those pixels of frame t)")
            + ", held-back blocks of frames",
            "frames_used": self.frames_used, "steps": self.total_steps, "rounds": self.rounds,
            "lr": s.lr, "batch": s.batch, "crops": list(s.crops),
            "held_back_windows": len(self._val_set()[0]),
            "loss_before": served, "loss_after": adapted,
            "noise_model": self.noise.describe() if self.noise else "",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "base_training": self.card.training,
            **({"base_evaluation": getattr(self.card, "evaluation", {})} if update else {})}})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.card.name}{ADAPTED_TAG}{self.exported}.onnx"
        export_onnx(copy.deepcopy(self.net), card, path)
        self.last_path = path
        return path


# -- the daemon's side: a child process fed through a shared ring ------------------------------
#
# The ring is one file mapped by both processes (created and unlinked at once, its
# descriptor inherited by the child, so nothing is left behind whatever happens):
# int64 counters, int64 frame numbers per slot, then the float32 frames. Each slot is a
# seqlock: the writer sets its number to -1, copies the frame, then sets the frame's
# number; the child copies a block and keeps it only if the numbers are unchanged after
# the copy. offer() never waits for the child. (Written for x86's store order; where stores
# may be reordered, a torn copy would cost one bad training block, never a raw frame.)
_WRITTEN, _TAKEN, _LOST = range(3)
_COUNTERS = 8


class _Ring:
    def __init__(self, fd: int, capacity: int, shape: tuple[int, int]) -> None:
        h, w = shape
        self.size = 8 * (_COUNTERS + capacity) + 4 * capacity * h * w
        self.map = mmap.mmap(fd, self.size)
        self.counters = np.frombuffer(self.map, np.int64, _COUNTERS)
        self.stamps = np.frombuffer(self.map, np.int64, capacity, 8 * _COUNTERS)
        self.frames = np.frombuffer(self.map, np.float32, capacity * h * w,
                                    8 * (_COUNTERS + capacity)).reshape(capacity, h, w)

    @staticmethod
    def create(capacity: int, shape: tuple[int, int]) -> tuple[int, _Ring]:
        """A new ring in an already-unlinked file (in memory where /dev/shm exists)."""
        folder = "/dev/shm" if Path("/dev/shm").is_dir() else None
        fd, name = tempfile.mkstemp(prefix="dimscope-adapt-", dir=folder)
        Path(name).unlink()
        h, w = shape
        os.ftruncate(fd, 8 * (_COUNTERS + capacity) + 4 * capacity * h * w)
        ring = _Ring(fd, capacity, shape)
        ring.stamps[:] = -1
        return fd, ring



def _lower_priority() -> str:
    """Run only on CPU time others leave: SCHED_IDLE where the OS has it, else nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)
        return "nice 19"


class _RingReader:
    """The child's view of the ring: takes every complete block of consecutive frames."""

    def __init__(self, ring: _Ring, trainer: AdaptTrainer) -> None:
        self.ring, self.trainer = ring, trainer
        self.next = 0  # first frame number not yet taken or counted lost

    def collect(self) -> None:
        ring, length = self.ring, self.trainer.block_len
        cap = len(ring.stamps)
        written = int(ring.counters[_WRITTEN])
        start = _round_up(max(self.next, written - cap), length)
        lost = start - self.next
        taken = 0
        while start + length <= written:
            numbers = np.arange(start, start + length)
            slots = numbers % cap
            data = None
            if np.array_equal(ring.stamps[slots], numbers):
                data = ring.frames[slots].copy()
                if not np.array_equal(ring.stamps[slots], numbers):
                    data = None  # overwritten while being copied
            if data is None:
                lost += length
            else:
                self.trainer.add_block(data, start // length)
                taken += length
            start += length
        self.next = max(self.next, start)
        ring.counters[_TAKEN] += taken
        ring.counters[_LOST] += lost


def _child_entry() -> None:
    """The adaptation process (started by `Adapter.start`): argv = ring fd, command fd,
    report fd; its settings come as the first command."""
    from multiprocessing.connection import Connection

    ring_fd, command_fd, report_fd = (int(a) for a in sys.argv[1:4])
    commands, reports = Connection(command_fd, writable=False), Connection(report_fd,
                                                                           readable=False)
    try:
        _, init = commands.recv()
        priority = _lower_priority() if init["settings"].idle_priority else "normal priority"
        import torch

        torch.set_num_threads(1)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        trainer = AdaptTrainer(Path(init["model"]), Path(init["out_dir"]), init["settings"])
        ring = _Ring(ring_fd, init["capacity"], init["shape"])
        reader = _RingReader(ring, trainer)
        stop = False
        reports.send(("started", f"pid {os.getpid()}, {priority}, 1 torch thread"))

        def take_commands() -> None:
            nonlocal stop
            try:
                while commands.poll():
                    kind, value = commands.recv()
                    if kind == "noise":
                        trainer.set_noise(value)
                    elif kind == "stop":
                        stop = True
            except (EOFError, OSError):  # the daemon is gone
                stop = True

        def between(step: int) -> None:
            if (step + 1) % trainer.settings.collect_every == 0:
                take_commands()
                reader.collect()

        while not stop:
            take_commands()
            reader.collect()
            if not trainer.ready():
                commands.poll(0.2)
                continue
            report = trainer.run_round(between_steps=between, stop=lambda: stop)
            reports.send(("round", report))
    except (EOFError, BrokenPipeError):
        pass
    except BaseException as exc:  # the daemon must hear why adaptation stopped
        with contextlib.suppress(Exception):
            reports.send(("error", f"{type(exc).__name__}: {exc}"))


class Adapter:
    """The daemon's side of live adaptation (see the module docstring).

    `offer(frame)` from the thread that receives frames (one copy, never waits);
    `poll()` for finished rounds; `set_noise()` when the engine's noise model is known or
    changes; `close()` at the end. The child is a fresh interpreter (not a fork of the
    daemon and its threads, and it does not re-import the caller's main script).
    """

    def __init__(self, model_path: Path, out_dir: Path, frame_shape: tuple[int, int],
                 settings: AdaptSettings | None = None) -> None:
        """`settings`: `LIVE_SETTINGS` unless given. EngineError if torch is missing or the
        model is not a noise-aware denoiser."""
        settings = settings or LIVE_SETTINGS
        if importlib.util.find_spec("torch") is None:
            raise EngineError("adaptation needs torch (pip install 'dimscope[train]')")
        card = read_card(model_path)
        check_adaptable(card, model_path)  # in the daemon already, before a child starts
        h, w = (int(v) for v in frame_shape)
        self.shape = (h, w)
        #: the part of each frame kept: this size, at a position chosen per block
        self.region = (min(h, settings.store_side), min(w, settings.store_side))
        self.block_len = max(settings.block, card.window + 2)  # as AdaptTrainer's
        self.capacity = max(settings.ring_frames, 2 * self.block_len)
        self._ring_fd, self._ring = _Ring.create(self.capacity, self.region)
        self._block, self._corner = -1, (0, 0)
        self.model_path, self.out_dir, self.settings = model_path, out_dir, settings
        self._process: subprocess.Popen[bytes] | None = None
        self._commands: Any = None
        self._reports: Any = None
        #: frames stored in the ring (each gets the next frame number)
        self.offered = 0
        #: frames offer() could not store (another shape, adaptation closed)
        self.refused = 0
        self.rounds = 0
        self.last: RoundReport | None = None
        self.error: str | None = None
        self.started_note = ""
        self._noise: NoiseModel | None = None
        self._closed = False

    def start(self) -> None:
        from multiprocessing.connection import Connection

        cmd_r, cmd_w = os.pipe()
        rep_r, rep_w = os.pipe()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        code = "from dimscope.engines.adaptation import _child_entry; _child_entry()"
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", code, str(self._ring_fd), str(cmd_r), str(rep_w)],
                pass_fds=(self._ring_fd, cmd_r, rep_w), env=env, stdin=subprocess.DEVNULL)
        finally:
            for fd in (cmd_r, rep_w):  # the child's ends
                os.close(fd)
        self._commands = Connection(cmd_w, readable=False)
        self._reports = Connection(rep_r, writable=False)
        self._commands.send(("init", {"model": str(self.model_path),
                                      "out_dir": str(self.out_dir), "settings": self.settings,
                                      "capacity": self.capacity, "shape": self.region}))

    def offer(self, frame: np.ndarray) -> None:
        """Store a float32 copy of the frame's region for its block in the ring; never
        waits, and costs the same for any frame size."""
        if self._closed or frame.shape != self.shape:
            self.refused += 1
            return
        number = self.offered
        self.offered += 1
        block = number // self.block_len
        if block != self._block:  # a new block looks at another part of the field
            rng = np.random.default_rng(block)
            self._block, self._corner = block, (
                int(rng.integers(0, self.shape[0] - self.region[0] + 1)),
                int(rng.integers(0, self.shape[1] - self.region[1] + 1)))
        (y0, x0), (rh, rw) = self._corner, self.region
        ring = self._ring
        slot = number % self.capacity
        ring.stamps[slot] = -1
        np.copyto(ring.frames[slot], frame[y0:y0 + rh, x0:x0 + rw], casting="unsafe")
        ring.stamps[slot] = number
        ring.counters[_WRITTEN] = number + 1

    def set_noise(self, noise: NoiseModel) -> None:
        if noise != self._noise and not self._closed and self._commands is not None:
            self._noise = noise
            with contextlib.suppress(OSError):
                self._commands.send(("noise", noise))

    def poll(self) -> list[RoundReport]:
        """Rounds finished since the last call (never waits)."""
        out: list[RoundReport] = []
        try:
            while self._reports is not None and self._reports.poll():
                kind, value = self._reports.recv()
                if kind == "round":
                    self.rounds += 1
                    self.last = value
                    out.append(value)
                elif kind == "started":
                    self.started_note = value
                    log.info("adaptation running in a child process (%s)", value)
                else:
                    self.error = value
        except (EOFError, OSError):
            pass
        if (self.error is None and not self._closed and self._process is not None
                and self._process.poll() is not None):
            self.error = f"the adaptation process exited (code {self._process.returncode})"
        return out

    @property
    def frames_used(self) -> int:
        return int(self._ring.counters[_TAKEN])

    @property
    def frames_dropped(self) -> int:
        """Frames offered that never reached training: refused by offer(), or overwritten in
        the ring before the child took them (it samples the stream while it trains)."""
        return self.refused + int(self._ring.counters[_LOST])

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._commands is not None:
            with contextlib.suppress(OSError):
                self._commands.send(("stop", None))
        if self._process is not None:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.terminate()
                try:
                    self._process.wait(2.0)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
        for conn in (self._commands, self._reports):
            if conn is not None:
                conn.close()
        with contextlib.suppress(OSError):
            os.close(self._ring_fd)
