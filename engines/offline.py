"""Enhancing a finished stack exactly as the live pipeline would (`dimscope enhance`).

Frames go through the engine one at a time in acquisition order, so a
temporal engine sees the same causal window it sees live (each frame restored
from itself and the frames before it, never after), and a noise model
estimated from the data is estimated the same way — unless the caller passes
one. With interpolation, N−1 frames are synthesised between each pair of
consecutive output frames, from the enhanced frames, as the live
`interpolate` stage does: T frames give (T−1)·N+1.

Stacks of several channels (T, C, Y, X) are processed as C independent
time series, each with its own engine state.

`adapt_stack` first adapts a noise-aware model to the stack itself (self-supervised,
as live adaptation does — `engines/adaptation.py` — for a fixed time and/or number of
rounds, on every frame of the stack, in this process); the stack is then enhanced with
the adapted model, as it would be live once adaptation had run that long.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .base import CameraCalibration, Engine, EngineError, EngineInfo
from .interpolators import Interpolator
from .noise_model import NoiseModel

if TYPE_CHECKING:
    from .adaptation import AdaptSettings, RoundReport


def calibration_for(model: NoiseModel) -> CameraCalibration:
    """A calibration with the same noise model (var = alpha·x + beta): gain alpha, no read
    noise, offset −beta/alpha. Everything dimscope does with the camera's noise depends only
    on alpha and beta, so this stands for an estimated model exactly."""
    return CameraCalibration(gain_adu_per_e=model.alpha, offset_adu=-model.beta / model.alpha,
                             read_noise_e=0.0, measured=True)


def as_series(stack: np.ndarray) -> tuple[np.ndarray, str]:
    """(S, T, Y, X) time series and the input's axes: 'YX', 'TYX' or 'TCYX'."""
    if stack.ndim == 2:
        return stack[None, None], "YX"
    if stack.ndim == 3:
        return stack[None], "TYX"
    if stack.ndim == 4:
        return np.moveaxis(stack, 1, 0), "TCYX"
    raise EngineError(f"expected a 2-D image, a (T, Y, X) time-lapse or a (T, C, Y, X) stack; "
                      f"got shape {stack.shape}")


def from_series(series: np.ndarray, axes: str) -> np.ndarray:
    if axes == "YX":
        return series[0, 0]
    if axes == "TYX":
        return series[0]
    return np.moveaxis(series, 0, 1)


@dataclass
class OfflineResult:
    output: np.ndarray
    engine: EngineInfo | None
    interpolator: EngineInfo | None
    frames_in: int
    frames_out: int
    notes: list[str] = field(default_factory=list)


def enhance_series(frames: np.ndarray, engine: Engine | None, interpolator: Interpolator | None,
                   factor: int, tick: Callable[[], None] = lambda: None) -> Iterator[np.ndarray]:
    """Output frames of one (T, Y, X) series, in time order (see the module docstring)."""
    previous: np.ndarray | None = None
    for frame in frames:
        out = engine.process(frame) if engine is not None else frame.astype(np.float32)
        if previous is not None and interpolator is not None and factor > 1:
            for k in range(1, factor):
                yield interpolator.between(previous, out, k / factor).astype(np.float32)
        yield out.astype(np.float32, copy=False)
        previous = out
        tick()


def enhance_stack(stack: np.ndarray, make_engine: Callable[[], Engine] | None,
                  interpolator: Interpolator | None, factor: int,
                  calibration: CameraCalibration,
                  tick: Callable[[], None] = lambda: None) -> OfflineResult:
    """The whole stack (any layout `as_series` takes) enhanced and/or interpolated."""
    series, axes = as_series(stack)
    outputs, info = [], None
    for one in series:
        engine = make_engine() if make_engine is not None else None
        if engine is not None:
            engine.prepare(one.shape[1:], one.dtype, calibration)
        if interpolator is not None:
            interpolator.prepare(one.shape[1:] if engine is None
                                 else tuple(s * engine.scale for s in one.shape[1:]))
        try:
            outputs.append(np.stack(list(enhance_series(one, engine, interpolator, factor,
                                                        tick))))
        finally:
            if engine is not None:
                info = engine.info
                engine.close()
    result = from_series(np.stack(outputs), axes)
    return OfflineResult(result, info, interpolator.info if interpolator else None,
                         frames_in=series.shape[1], frames_out=np.stack(outputs).shape[1])


@dataclass(frozen=True, slots=True)
class OfflineAdaptation:
    """What `adapt_stack` did: the model file to use now, and every round."""

    path: Path
    version: str
    reports: list[RoundReport]
    seconds: float

    @property
    def adapted(self) -> bool:
        return any(r.improved for r in self.reports)

    @property
    def rounds(self) -> int:
        """Training rounds (the last report is the final evaluation and export)."""
        return sum(r.steps > 0 for r in self.reports)

    @property
    def steps(self) -> int:
        return self.reports[-1].total_steps if self.reports else 0

    @property
    def loss_before(self) -> float:
        """Held-back loss of the model given (the held-back set is fixed offline)."""
        return self.reports[0].loss_served if self.reports else math.nan

    @property
    def loss_after(self) -> float:
        """Held-back loss of the model returned."""
        if not self.reports:
            return math.nan
        last = self.reports[-1]
        return last.loss_adapted if last.improved else last.loss_served


def adapt_stack(series: list[np.ndarray], model_path: Path, out_dir: Path, noise: NoiseModel,
                seconds: float, settings: AdaptSettings | None = None,
                max_rounds: int | None = None,
                on_round: Callable[[RoundReport], None] | None = None,
                max_mb: float = 2048.0) -> OfflineAdaptation:
    """Adapt the model at `model_path` to time-lapses (each (T, Y, X), acquisition order)
    for about `seconds` and at most `max_rounds` rounds; adapted files go to `out_dir`.
    At most `max_mb` of frames (float32) are used, in blocks spread evenly over each."""
    from dataclasses import replace

    from .adaptation import AdaptSettings, AdaptTrainer
    from .model_file import read_card

    # Offline every block of the stack is kept (live only the newest: memory), and the model
    # is exported once, at the end, if it beats the one given.
    settings = replace(settings or AdaptSettings(), max_train_blocks=1 << 20,
                       max_val_blocks=1 << 20)
    trainer = AdaptTrainer(model_path, out_dir, settings, noise)
    total = sum(one.size for one in series) * 4 / 2**20
    for one in series:
        share = max_mb / total if total > max_mb else 1.0
        trainer.add_stack(one, max_frames=int(len(one) * share) if share < 1.0 else None)
    started = time.monotonic()
    deadline = started + seconds
    reports: list[RoundReport] = []
    while time.monotonic() < deadline and (max_rounds is None or len(reports) < max_rounds):
        report = trainer.run_round(deadline=deadline, export=False)
        if report.steps == 0:
            break
        reports.append(report)
        if on_round is not None:
            on_round(report)
    if reports:
        final = trainer.run_round(steps=0, export=True)
        reports.append(final)
        if on_round is not None:
            on_round(final)
    path = trainer.last_path or model_path
    return OfflineAdaptation(path, read_card(path).version, reports,
                             time.monotonic() - started)
