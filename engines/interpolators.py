"""Frame interpolators: the frame at fraction t between two frames. One protocol, three methods.

- `repeat`: the earlier frame again (what a viewer shows without interpolation),
- `linear`: (1-t)·a + t·b (cross-fade; ghosts moving structures),
- `model`: a trained flow-based network (`dimscope train interp`), run by the
  same runtimes as the enhancement models; both frames are normalised with
  their joint percentiles, the result mapped back.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import normalize
from .base import EngineError, EngineInfo
from .model_file import file_digest, read_card, resolve_model
from .runtime import Runtime, open_runtime
from .tiling import round_up


@runtime_checkable
class Interpolator(Protocol):
    info: EngineInfo

    def prepare(self, shape: tuple[int, ...]) -> None: ...

    def between(self, a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray: ...

    def close(self) -> None: ...


class RepeatInterpolator:
    info = EngineInfo(name="repeat", version="1")

    def prepare(self, shape: tuple[int, ...]) -> None:
        pass

    def between(self, a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
        return a.astype(np.float32)

    def close(self) -> None:
        pass


class LinearInterpolator(RepeatInterpolator):
    info = EngineInfo(name="linear", version="1")

    def between(self, a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
        out = a.astype(np.float32) * np.float32(1.0 - t)
        out += b.astype(np.float32) * np.float32(t)
        return out


class ModelInterpolator:
    def __init__(self, model: str = "interp", runtime: str = "auto",
                 precision: str = "auto") -> None:
        self.path = resolve_model(model)
        self.card = read_card(self.path)
        if self.card.task != "interp":
            raise EngineError(f"model {self.path.name} is a {self.card.task} model, "
                              "not an interpolation model")
        self.digest = file_digest(self.path)
        self.norm = self.card.norm()
        self.runtime_kind, self.precision = runtime, precision
        self.runtime: Runtime | None = None
        self.info = EngineInfo(name=self.card.name, version=f"{self.card.version}+{self.digest}",
                               runtime="not loaded", precision=precision)

    def prepare(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise EngineError(f"interpolation model takes 2-D frames, got {shape}")
        m = self.card.multiple
        self._padded = (round_up(shape[0], m), round_up(shape[1], m))
        if self.runtime is not None:
            self.runtime.close()
        self.runtime = open_runtime(self.runtime_kind, self.path, self.card, self.precision,
                                    shape=(1, 1, *self._padded))
        self.info = EngineInfo(name=self.card.name, version=f"{self.card.version}+{self.digest}",
                               runtime=self.runtime.name, precision=self.runtime.precision)

    def between(self, a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
        if self.runtime is None:
            raise EngineError("prepare() must run before between()")
        lo, hi = self.norm.joint_bounds(a, b)  # joint, as in training
        h, w = a.shape
        pad = ((0, self._padded[0] - h), (0, self._padded[1] - w))
        xa = np.pad(normalize.apply(a, lo, hi), pad, mode="reflect")[None, None]
        xb = np.pad(normalize.apply(b, lo, hi), pad, mode="reflect")[None, None]
        out = self.runtime.run(xa, xb, np.full((1, 1, 1, 1), t, dtype=np.float32))
        return normalize.invert(np.ascontiguousarray(out[0, 0, :h, :w]), lo, hi)

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None


def make_interpolator(method: str, **options: Any) -> Interpolator:
    if method == "repeat":
        return RepeatInterpolator()
    if method == "linear":
        return LinearInterpolator()
    if method == "model":
        try:
            return ModelInterpolator(**options)
        except TypeError as exc:
            raise EngineError(f"interpolation options: {exc}") from None
    raise EngineError(f"unknown interpolation method {method!r}; choose model, linear or repeat")
