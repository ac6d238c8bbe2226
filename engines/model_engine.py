"""The engine for trained models (`denoise`, `sr2`, `transfer`, or any exported model file).

Per frame: normalise with the model card's settings, run the network through
the chosen runtime (in overlapping tiles when the frame is larger than
`tile`), and map the result back to the camera's intensity units. Output is
float32, `scale` times the input size.

Two kinds of model cards:
- percentile normalisation, one frame in (the first shipped models);
- noise-aware (`vst`): the camera's noise model (calibration, or estimated
  from the frames: `CameraNoise`) stabilises the noise and its level is an
  input; with `window` K > 1 the engine keeps the last K frames it was given
  and restores the newest from all of them — causal, so no frame of latency is
  added. Until K frames have arrived (and for a single image) the window is
  padded with the oldest frame present, as in training.

Hot swap (live adaptation): `load_replacement(path)` compiles another file of the
same architecture for the shape and runtime in service, touching nothing in service
(any thread); `install()` then swaps it in between two frames, keeping the temporal
window and the noise model; `info.version` becomes the new card's, so every later
frame's header names it.

A guided model (the offline quality models: `card.guide`) refines a classical
estimate: the engine runs BM3D+VST on the newest frame (or BM4D+VST over the same
causal window) with the same noise model and passes it as one more input channel;
`guide_window` K > 1 gives a BM3D-guided model BM4D's estimate over the causal window of
the last K frames instead (time-lapses: `denoise_hq_t5`). A guided transfer model
(`card.deconvolution`, `transfer_hq`) also gets that estimate deconvolved by
Richardson–Lucy, the base its residual is added to. Seconds per frame, so for
`enhance` and evaluation, not a live tier.

A transfer model's card carries its forward model (the blur fitted to its training
pairs); `info` passes it on, with the note that its output is in another modality's
intensity units, so the trust check compares like with like.

Integrity: the model file's network is checked against the SHA-256 its card records
(`model_file.open_model_card`) when the engine is made, so a changed or damaged file is
refused before any frame (`ModelIntegrityError`, naming the file) unless
`allow_unverified` (`--allow-unverified-model`); `info.model_sha256` is the hash of the
network in service and `info.verified` says whether it matched its card. A replacement
is always checked (adapted files are written with their own hash); an engine that once
served an unverified model stays `verified=False` after swaps, since adapted weights
derive from it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import normalize
from .base import CameraCalibration, EngineError, EngineInfo
from .bm3d_engine import classical_estimate, classical_library, deconvolved_estimate
from .model_file import ModelCard, open_model_card, resolve_model
from .noise_model import CameraNoise, NoiseModel
from .normalize import VSTNorm
from .runtime import RUNTIME_CHOICES, Runtime, open_runtime
from .tiling import input_shape, run_tiled


def fixed_input_dims(path: Path) -> tuple[int | None, int | None]:
    """(height, width) of the model's first input where they are fixed numbers, else None."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    values = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return (values[2], values[3]) if len(values) == 4 else (None, None)


@dataclass(frozen=True)
class ModelReplacement:
    """A model file compiled for the engine's shape and runtime, ready to `install`."""

    path: Path
    card: ModelCard
    digest: str
    runtime: Runtime
    #: the runtime input shape it was compiled for
    shape: tuple[int, int, int, int]
    #: SHA-256 of its network (checked against its card)
    sha256: str


class ModelEngine:
    def __init__(self, model: str | None = None, runtime: str = "auto", precision: str = "auto",
                 tile: int = 2048, halo: int = 32, allow_unverified: bool = False,
                 ensemble: bool = False, guide_window: int | None = None,
                 **options: Any) -> None:
        if model is None:
            raise EngineError("engine 'model' needs a model: set engine.options.model to a "
                              "shipped model name or an .onnx path (or pass --model)")
        if options:
            raise TypeError(f"model engine options: model, runtime, precision, tile, halo, "
                            f"allow_unverified, ensemble, guide_window; got unknown "
                            f"{sorted(options)}")
        if runtime not in RUNTIME_CHOICES:
            raise EngineError(f"unknown runtime {runtime!r}; choose from "
                              f"{', '.join(RUNTIME_CHOICES)}")
        self.path = resolve_model(model)
        opened = open_model_card(self.path, allow_unverified=allow_unverified)
        self.card, self.digest = opened.card, opened.digest
        #: SHA-256 of the network in service, and whether every model served matched its card
        self.model_sha256, self.verified = opened.sha256, opened.verified
        if self.card.task == "dense":
            raise EngineError(f"model {self.path.name} is a sparse-to-dense (localization "
                              "microscopy) model: it runs in a `dense` node, not as an engine")
        self.norm = self.card.norm()
        if self.card.guide is not None and not isinstance(self.norm, VSTNorm):
            raise EngineError(f"model {self.path.name}: a guided model needs the 'vst' "
                              "normalisation (its guide is a BM3D/BM4D+VST estimate)")
        self.guide_library: Any = None
        if self.card.inputs != 1:
            raise EngineError(f"model {self.path.name} is a {self.card.inputs}-frame "
                              f"{self.card.task} model, not a frame-by-frame enhancer")
        self.scale = self.card.scale
        self.runtime_kind, self.precision_request = runtime, precision
        self.tile, self.halo = tile, halo
        #: average the network over the 8 rotations/flips of its input (8x its time: the
        #: offline quality models, whose classical guide is computed once regardless)
        self.ensemble = ensemble
        if tile % self.card.multiple or halo % self.card.multiple or tile <= 2 * halo:
            raise EngineError(f"tile ({tile}) and halo ({halo}) must be multiples of "
                              f"{self.card.multiple} with tile > 2*halo")
        self.runtime: Runtime | None = None
        self._runtime_shape: tuple[int, int, int, int] | None = None
        #: the camera frame shape `prepare` was given
        self.frame_shape: tuple[int, ...] | None = None
        self.window = self.card.window
        if guide_window is not None and (self.card.guide is None or guide_window < 1):
            raise EngineError(f"guide_window applies to guided models (>= 1); model "
                              f"{self.path.name} has guide {self.card.guide}")
        #: frames the classical guide sees: BM3D on the newest (1), or BM4D over a causal
        #: window — the card's, or `guide_window` (a BM3D-guided network given BM4D's
        #: better estimate of a time-lapse frame)
        self.guide_window = guide_window or (1 if self.card.guide in (None, "bm3d")
                                             else self.window)
        self.recent: deque[np.ndarray] = deque(maxlen=max(self.window, self.guide_window))
        #: each frame of `recent` through the noise model's transform, once per frame (by
        #: the frame's id, with the frame to check it); valid for `_transformed_by` only
        self._transformed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._transformed_by: NoiseModel | None = None
        self.noise: CameraNoise | None = None
        self.info = EngineInfo(name=self.card.name, version=f"{self.card.version}+{self.digest}",
                               runtime="not loaded", precision=precision,
                               scale=self.scale, model_sha256=self.model_sha256,
                               verified=self.verified, **self._forward())

    def prepare(self, shape: tuple[int, ...], dtype: np.dtype[np.generic],
                calibration: CameraCalibration) -> None:
        if len(shape) != 2:
            raise EngineError(f"model {self.card.name!r} takes 2-D grey frames, got {shape}")
        h, w = input_shape(shape[0], shape[1], self.tile, self.card.multiple, self.halo)
        fixed = fixed_input_dims(self.path)
        if any(f is not None and f != n for f, n in zip(fixed, (h, w), strict=True)):
            raise EngineError(
                f"model {self.path.name} takes fixed {fixed[0]}x{fixed[1]} inputs, but camera "
                f"frames of {shape[0]}x{shape[1]} need {h}x{w}; export the model with dynamic "
                f"height/width (`dimscope train` does) or set tile to match")
        if self.runtime is not None:
            self.runtime.close()
        self._runtime_shape = (1, self.card.channels, h, w)
        self.frame_shape = tuple(shape)
        self.runtime = open_runtime(self.runtime_kind, self.path, self.card,
                                    self.precision_request, shape=self._runtime_shape)
        self.recent.clear()
        self.noise = CameraNoise(calibration) if isinstance(self.norm, VSTNorm) else None
        if self.card.guide is not None:
            self.guide_library = classical_library(self.guide_window)
        self._set_info()

    def _set_info(self) -> None:
        noise = self.noise.model.describe() if self.noise and self.noise.model else ""
        self.info = EngineInfo(name=self.card.name, version=f"{self.card.version}+{self.digest}",
                               runtime=self.runtime.name if self.runtime else "not loaded",
                               precision=self.runtime.precision if self.runtime else "",
                               scale=self.scale, noise=noise, model_sha256=self.model_sha256,
                               verified=self.verified, **self._forward())

    def _forward(self) -> dict[str, Any]:
        """The trust check's forward model from the card (transfer models only)."""
        transfer = self.card.transfer
        if transfer is None:
            return {}
        return {"forward_psf_sigma_px": transfer.forward_psf_sigma_px,
                "forward_fits_intensity": True}

    def load_replacement(self, path: Path) -> ModelReplacement:
        """`path` compiled for the shape and runtime in service; nothing in service changes,
        so this may run on another thread while frames are processed. EngineError if the
        file cannot take this model's place (another architecture, window or normalisation);
        ModelIntegrityError if its network does not match its card (never allowed here:
        replacements are files dimscope wrote, with their hash)."""
        if self.runtime is None or self._runtime_shape is None:
            raise EngineError("prepare() must run before a model can be swapped in")
        opened = open_model_card(path)
        card = opened.card
        same = ("task", "arch", "hparams", "scale", "multiple", "inputs", "window",
                "normalization", "guide")
        differ = [k for k in same if getattr(card, k) != getattr(self.card, k)]
        if differ:
            raise EngineError(f"model {path.name} cannot replace {self.path.name}: its "
                              f"{', '.join(differ)} differ")
        # The runtime actually in service (what `auto` chose), at the same precision request.
        kind = self.runtime.name if self.runtime.name in RUNTIME_CHOICES else self.runtime_kind
        runtime = open_runtime(kind, path, card, self.precision_request,
                               shape=self._runtime_shape)
        return ModelReplacement(path, card, opened.digest, runtime, self._runtime_shape,
                                opened.sha256)

    def install(self, new: ModelReplacement) -> None:
        """Put a compiled replacement in service (call between frames, on the thread that
        calls `process`); the temporal window and the noise model are kept."""
        if new.shape != self._runtime_shape:  # the camera's shape changed meanwhile
            new.runtime.close()
            raise EngineError(f"model {new.path.name} was compiled for {new.shape}, the "
                              f"engine now runs {self._runtime_shape}")
        old = self.runtime
        self.path, self.card, self.digest, self.runtime = new.path, new.card, new.digest, \
            new.runtime
        self.model_sha256 = new.sha256  # `verified` stays: the new weights derive from the old
        self._set_info()
        if old is not None and old is not new.runtime:
            old.close()

    def swap_model(self, path: Path) -> None:
        """Compile `path` (see `load_replacement`), then swap it in: one step, for callers
        that own the engine's thread."""
        self.install(self.load_replacement(path))

    def reset(self) -> None:
        """Forget the temporal context (a new position, a new sample)."""
        self.recent.clear()

    def observe(self, pixels: np.ndarray) -> None:
        """Add a frame to the temporal context without restoring it (a frame whose output
        nobody needs, e.g. the frames before the first one evaluated)."""
        if self.recent and self.recent[-1].shape != pixels.shape:
            self.recent.clear()
        self.recent.append(pixels.astype(np.float32))

    def process(self, pixels: np.ndarray) -> np.ndarray:
        if self.runtime is None:
            raise EngineError("prepare() must run before process()")
        if isinstance(self.norm, VSTNorm):
            return self._process_vst(self.norm, pixels)
        lo, hi = self.norm.bounds(pixels)
        x = normalize.apply(pixels, lo, hi)
        y = self._run(x)
        return normalize.invert(y, lo, hi)

    def _process_vst(self, norm: VSTNorm, pixels: np.ndarray) -> np.ndarray:
        assert self.runtime is not None and self.noise is not None
        self.observe(pixels)
        before = self.noise.model
        noise = self.noise.update(list(self.recent))
        if noise is not before:
            self._set_info()
        transformed = self._transform_recent(noise)
        span_needed = max(self.window, self.guide_window)
        transformed = [transformed[0]] * (span_needed - len(transformed)) + transformed
        guide = None
        if self.guide_library is not None:
            stable = np.stack(transformed[-self.guide_window:])
            guide = noise.inverse_gat_unbiased(classical_estimate(self.guide_library, stable))
        deconvolved = (deconvolved_estimate(guide, self.card.deconvolution)
                       if guide is not None and self.card.deconvolution is not None else None)
        x, lo, span = norm.inputs_transformed(transformed[-self.window:], noise, guide,
                                              deconvolved)
        y = self._run(x)
        return norm.invert(y, noise, lo, span)

    def _transform_recent(self, noise: NoiseModel) -> list[np.ndarray]:
        """`recent` through `noise.gat`, oldest first, transforming only frames not done
        before with this noise model (one frame per call once the window is full: the
        transform of a 5-frame window was ~2.5 ms of a 512² frame's ~20 ms here)."""
        done = self._transformed if noise is self._transformed_by else {}
        now: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for frame in self.recent:
            hit = done.get(id(frame))
            now[id(frame)] = hit if hit is not None and hit[0] is frame else (
                frame, noise.gat(frame))
        self._transformed, self._transformed_by = now, noise
        return [now[id(frame)][1] for frame in self.recent]

    def _run(self, x: np.ndarray) -> np.ndarray:
        """The network on `x` (channels first, or one 2-D plane), tiled; with `ensemble`,
        the mean over the 8 rotations and flips (each output turned back) — over the 4 that
        keep the shape when the frame is not square, as the runtime is compiled for it."""
        assert self.runtime is not None
        run = self.runtime.run

        def once(a: np.ndarray) -> np.ndarray:
            return run_tiled(np.ascontiguousarray(a), run, tile=self.tile, halo=self.halo,
                             scale=self.scale, multiple=self.card.multiple)

        if not self.ensemble:
            return once(x)
        total: np.ndarray | None = None
        square = x.shape[-1] == x.shape[-2]
        for turns in range(4) if square else (0, 2):
            for flip in (False, True):
                a = np.rot90(x, turns, axes=(-2, -1))
                a = a[..., ::-1] if flip else a
                y = once(a)
                y = y[..., ::-1] if flip else y
                y = np.rot90(y, -turns, axes=(-2, -1))
                total = y.copy() if total is None else total + y
        assert total is not None
        return total / np.float32(8.0 if square else 4.0)

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None
