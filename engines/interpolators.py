"""Frame interpolators: the frame at fraction t between two frames. One protocol, four methods.

- `repeat`: the earlier frame again (what a viewer shows without interpolation),
- `linear`: (1-t)·a + t·b (cross-fade; ghosts moving structures),
- `flow`: classical optical flow (OpenCV DIS) in both directions, both frames
  warped to time t and blended where their flows agree — the baseline a learned
  interpolator must beat, and a cheap live tier (no model file),
- `model`: a trained flow-based network (`dimscope train interp`), run by the
  same runtimes as the enhancement models; both frames are normalised with
  their joint percentiles, the result mapped back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import ValidationError

from . import normalize
from .base import EngineError, EngineInfo
from .model_file import open_model_card, resolve_model
from .options import FlowInterpolatorOptions
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
    """`model`: a trained interpolation model. Its file's network is checked against the
    SHA-256 its card records on construction (`model_file.open_model_card`): refused when
    they differ unless `allow_unverified`, and then `info.verified` is False."""

    def __init__(self, model: str = "interp", runtime: str = "auto",
                 precision: str = "auto", allow_unverified: bool = False) -> None:
        self.path = resolve_model(model)
        opened = open_model_card(self.path, allow_unverified=allow_unverified)
        self.card, self.digest = opened.card, opened.digest
        self.model_sha256, self.verified = opened.sha256, opened.verified
        if self.card.task != "interp":
            raise EngineError(f"model {self.path.name} is a {self.card.task} model, "
                              "not an interpolation model")
        norm = self.card.norm()
        if not isinstance(norm, normalize.PercentileNorm):
            raise EngineError(f"model {self.path.name}: interpolation models use percentile "
                              f"normalisation, not {self.card.normalization.get('kind')!r}")
        self.norm = norm
        self.runtime_kind, self.precision = runtime, precision
        self.runtime: Runtime | None = None
        self.info = EngineInfo(name=self.card.name, version=f"{self.card.version}+{self.digest}",
                               runtime="not loaded", precision=precision,
                               model_sha256=self.model_sha256, verified=self.verified)

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
                               runtime=self.runtime.name, precision=self.runtime.precision,
                               model_sha256=self.model_sha256, verified=self.verified)

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


@dataclass(frozen=True, slots=True)
class _FlowPair:
    """What `flow` computes once per pair of frames, for every t between them."""

    a: np.ndarray  # the frames as given: with `b`, the key of the cache (identity)
    b: np.ndarray
    f01: np.ndarray  # (H, W, 2) float32 flow a -> b, (dx, dy) per pixel
    f10: np.ndarray  # b -> a
    a32: np.ndarray  # the frames in float32, in their own units
    b32: np.ndarray
    r0: np.ndarray  # reliability of each pixel of a: exp(-(fw-bw error / tau)²)
    r1: np.ndarray


class FlowInterpolator:
    """`flow`: DIS optical flow both ways, backward warping to t, occlusion-aware blend.

    Flow is estimated on uint8 copies (joint 1st–99.8th percentiles of both frames,
    after optional Gaussian presmoothing); the frames warped are the originals.
    Intermediate flows (Super SloMo's approximation, motion linear over the pair):
    F_t0 = −(1−t)·t·F01 + t²·F10 and F_t1 = (1−t)²·F01 − t·(1−t)·F10. A pixel of a
    whose flow the other direction does not send back, e0 = |F01(x) + F10(x + F01(x))|,
    is occluded in b or mis-tracked: its reliability exp(−(e0/τ)²) is sampled with the
    same map as a (b likewise), and weights (1−t)·r0, t·r1 blend the two warped frames,
    with a small share of the plain (1−t, t) blend that takes over where both are
    unreliable. Flows are computed once per pair for all its t when both frames are
    read-only (the stage's frames are; the pair is recognised by identity).
    """

    #: DIS refuses frames under 12 px on both sides
    MIN_SIDE = 16
    #: share of the (1−t, t) blend in the weights: decides only where both flows fail
    EPS = 1e-3

    def __init__(self, options: FlowInterpolatorOptions | None = None) -> None:
        try:
            import cv2
        except ImportError:
            raise EngineError("interpolation method 'flow' needs OpenCV: "
                              "pip install opencv-python-headless") from None
        self.options = options if options is not None else FlowInterpolatorOptions()
        o = self.options
        self.info = EngineInfo(
            name="flow", runtime="opencv",
            version=f"dis-{o.preset}+presmooth{o.presmooth:g}+tau{o.tau:g}+cv{cv2.__version__}")
        self._preset = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
                        "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                        "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[o.preset]
        self._norm = normalize.PercentileNorm(low=1.0, high=99.8, stride=4)
        self._dis: cv2.DISOpticalFlow | None = None
        self._shape: tuple[int, ...] = ()
        self._grid = np.zeros((0, 0, 2), np.float32)
        self._pair: _FlowPair | None = None

    def prepare(self, shape: tuple[int, ...]) -> None:
        import cv2

        if len(shape) != 2 or min(shape) < self.MIN_SIDE:
            raise EngineError(f"flow interpolation takes 2-D frames of at least "
                              f"{self.MIN_SIDE}×{self.MIN_SIDE} pixels, got {shape}")
        if self._dis is None:
            self._dis = cv2.DISOpticalFlow.create(self._preset)
        self._shape = tuple(shape)
        ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
        self._grid = np.dstack([xs, ys])  # remap maps are (x, y), like the flow
        self._pair = None

    def backward_maps(self, a: np.ndarray, b: np.ndarray, t: float
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Where each pixel at time t takes its value in a and in b: two (H, W, 2) float32
        `cv2.remap` maps in (x, y) (also used by the trust maps of interpolated frames)."""
        import cv2

        pair = self._flows(a, b)
        s = 1.0 - t
        map0 = np.asarray(cv2.addWeighted(pair.f01, -s * t, pair.f10, t * t, 0.0), np.float32)
        map0 += self._grid
        map1 = np.asarray(cv2.addWeighted(pair.f01, s * s, pair.f10, -t * s, 0.0), np.float32)
        map1 += self._grid
        return map0, map1

    def reliabilities(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per pixel of a and of b, exp(−(forward–backward flow error / τ)²): near 0 where
        the flow does not come back (occlusion, mis-tracking)."""
        pair = self._flows(a, b)
        return pair.r0, pair.r1

    def between(self, a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
        pair = self._flows(a, b)
        s = 1.0 - t
        # Backward maps: where each pixel at time t takes its value in a (map0) and in b.
        map0, map1 = self.backward_maps(a, b, t)
        wa, ra = self._warp(map0, pair.a32, pair.r0)
        wb, rb = self._warp(map1, pair.b32, pair.r1)
        ra *= np.float32(s)
        ra += np.float32(self.EPS * s)
        rb *= np.float32(t)
        rb += np.float32(self.EPS * t)
        wa *= ra
        wa += wb * rb
        ra += rb  # >= EPS: never divides by zero
        wa /= ra
        return wa

    def close(self) -> None:
        self._dis = None
        self._pair = None

    @staticmethod
    def warp(map_xy: np.ndarray, *images: np.ndarray) -> list[np.ndarray]:
        """Each image sampled at `map_xy` (bilinear, edges replicated)."""
        return FlowInterpolator._warp(map_xy, *images)

    @staticmethod
    def _warp(map_xy: np.ndarray, *images: np.ndarray) -> list[np.ndarray]:
        import cv2

        # Float maps as they are: faster here than one convertMaps for several images.
        # (None: no second map; the stubs do not say it may be omitted.)
        return [np.asarray(cv2.remap(im, map_xy, None,  # type: ignore[call-overload]
                                     cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
                for im in images]

    def _flows(self, a: np.ndarray, b: np.ndarray) -> _FlowPair:
        if self._dis is None:
            raise EngineError("prepare() must run before between()")
        if a.shape != self._shape or b.shape != self._shape:
            raise EngineError(f"flow interpolator prepared for {self._shape}, "
                              f"got frames {a.shape} and {b.shape}")
        p = self._pair
        # Read-only frames cannot have changed since they were seen: same objects, same flows.
        if (p is not None and p.a is a and p.b is b
                and not (a.flags.writeable or b.flags.writeable)):
            return p
        a32 = np.ascontiguousarray(a, dtype=np.float32)
        b32 = np.ascontiguousarray(b, dtype=np.float32)
        a8, b8 = self._to_uint8(a32, b32)
        # None: no initial flow (the stubs do not say it may be omitted).
        f01 = np.asarray(self._dis.calc(a8, b8, None))  # type: ignore[call-overload]
        f10 = np.asarray(self._dis.calc(b8, a8, None))  # type: ignore[call-overload]
        self._pair = _FlowPair(a, b, f01, f10, a32, b32,
                               self._reliability(f01, f10), self._reliability(f10, f01))
        return self._pair

    def _to_uint8(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        sigma = self.options.presmooth
        if sigma > 0:
            a = cv2.GaussianBlur(a, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
            b = cv2.GaussianBlur(b, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
        # Joint bounds: one intensity scale for both, so brightness constancy holds.
        lo, hi = self._norm.joint_bounds(a, b)
        scale = 255.0 / (hi - lo)
        # dtype=CV_8U rounds and saturates (below lo -> 0, above hi -> 255) in one pass.
        a8 = cv2.addWeighted(a, scale, a, 0.0, -lo * scale, dtype=cv2.CV_8U)
        b8 = cv2.addWeighted(b, scale, b, 0.0, -lo * scale, dtype=cv2.CV_8U)
        return a8, b8

    def _reliability(self, fwd: np.ndarray, bwd: np.ndarray) -> np.ndarray:
        import cv2

        # Where x's flow lands in the other frame, that frame's flow should lead back to x.
        back = np.asarray(cv2.remap(bwd, fwd + self._grid, None,  # type: ignore[call-overload]
                                    cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
        back += fwd
        err2 = back[..., 0] ** 2  # (einsum or a channel sum: ~10x slower)
        err2 += back[..., 1] ** 2
        err2 *= np.float32(-1.0 / self.options.tau**2)
        return cv2.exp(err2)


def make_interpolator(method: str, **options: Any) -> Interpolator:
    if method == "repeat":
        return RepeatInterpolator()
    if method == "linear":
        return LinearInterpolator()
    if method == "flow":
        try:
            return FlowInterpolator(FlowInterpolatorOptions.model_validate(options))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'options'}: "
                                 + ("unknown option" if e["type"] == "extra_forbidden"
                                    else e["msg"]) for e in exc.errors())
            raise EngineError(f"interpolation options: {problems}") from None
    if method == "model":
        try:
            return ModelInterpolator(**options)
        except TypeError as exc:
            raise EngineError(f"interpolation options: {exc}") from None
    raise EngineError(f"unknown interpolation method {method!r}; choose model, flow, linear "
                      "or repeat")
