"""Per-frame percentile normalisation, shared by training and every runtime.

A model sees `(x - lo) / (hi - lo)` where `lo`/`hi` are low/high percentiles of
the *input* frame, and its output is mapped back with the same affine map. So
one model file works for any camera offset, gain and exposure: all three only
change `lo` and `hi`. The percentiles are taken on a strided subsample (every
`stride`-th pixel in each direction) so that normalising a 2048² frame costs
about a millisecond rather than tens.

`VSTNorm` is the noise-aware variant for models that know the camera's noise
model (see its docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .noise_model import NoiseModel


@dataclass(frozen=True, slots=True)
class PercentileNorm:
    low: float = 1.0
    high: float = 99.8
    stride: int = 4

    def bounds(self, image: np.ndarray) -> tuple[float, float]:
        return self._bounds_of(image[..., :: self.stride, :: self.stride])

    def _bounds_of(self, sample: np.ndarray) -> tuple[float, float]:
        sample = sample.astype(np.float32, copy=False)
        lo, hi = np.percentile(sample, [self.low, self.high])
        lo, hi = float(lo), float(hi)
        if hi - lo < 1e-6:  # flat frame (shutter closed): avoid dividing by zero
            hi = lo + 1.0
        return lo, hi

    def joint_bounds(self, *images: np.ndarray) -> tuple[float, float]:
        """Bounds of several frames together (interpolation), from their subsamples only:
        the same values as `bounds(np.stack(images))` without copying whole frames."""
        return self._bounds_of(np.stack([im[::self.stride, ::self.stride] for im in images]))

    def as_dict(self) -> dict[str, float | int | str]:
        return {"kind": "percentile", "low": self.low, "high": self.high, "stride": self.stride}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> PercentileNorm:
        if d.get("kind") != "percentile":
            raise ValueError(f"unsupported normalisation {d.get('kind')!r} (known: percentile)")
        return cls(float(str(d["low"])), float(str(d["high"])), int(str(d["stride"])))


def apply(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = image.astype(np.float32)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def invert(normalised: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = normalised * np.float32(hi - lo)
    out += np.float32(lo)
    return out


@dataclass(frozen=True, slots=True)
class VSTNorm:
    """Noise-aware normalisation for models conditioned on the noise level.

    The frames of a window (oldest first, raw ADU) go through the camera's
    generalised Anscombe transform, so their noise has unit standard deviation;
    they are then scaled by the newest frame's low/high percentiles of the
    transformed values. The noise level in those units, 1/span, is passed as one
    more constant input channel: at 5 photons it is about 0.3, at 1000 about
    0.02. The network outputs the transformed clean newest frame in the same
    units; `invert` maps it back through the algebraic inverse to ADU. A guided
    model also gets a classical estimate of the newest frame (`guide`, in ADU) in
    the target's units, as one more channel between the frames and the noise map (a
    guided transfer model also its deconvolution, after it).
    """

    low: float = 1.0
    high: float = 99.8
    stride: int = 4

    def inputs(self, window: np.ndarray, noise: NoiseModel, guide: np.ndarray | None = None,
               deconvolved: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
        """(K+1, H, W) network input for a (K, H, W) window (K+2 with a guide, K+3 with the
        guide's deconvolution too, in ADU like the guide); with its (lo, span)."""
        return self.inputs_transformed(list(noise.gat(window)), noise, guide, deconvolved)

    def inputs_transformed(self, transformed: Sequence[np.ndarray], noise: NoiseModel,
                           guide: np.ndarray | None = None,
                           deconvolved: np.ndarray | None = None
                           ) -> tuple[np.ndarray, float, float]:
        """`inputs` for a window already through `noise.gat`, frame by frame (a live engine
        transforms each frame once, not once per window it is in)."""
        if deconvolved is not None and guide is None:
            raise ValueError("a deconvolved channel comes with a guide")
        newest = transformed[-1]
        lo, hi = np.percentile(newest[:: self.stride, :: self.stride], [self.low, self.high])
        lo, span = float(lo), max(float(hi - lo), 1.0)  # at least one noise s.d. of range
        k = len(transformed)
        extra = [a for a in (guide, deconvolved) if a is not None]
        out = np.empty((k + 1 + len(extra), *newest.shape), np.float32)
        scale = np.float32(1.0 / span)
        for i, frame in enumerate(transformed):
            np.subtract(frame, np.float32(lo), out=out[i])
            out[i] *= scale
        for i, image in enumerate(extra):
            out[k + i] = self.target(image, noise, lo, span)
        out[-1] = np.float32(1.0 / span)
        return out, lo, span

    def target(self, clean: np.ndarray, noise: NoiseModel, lo: float, span: float
               ) -> np.ndarray:
        return (noise.gat(clean) - np.float32(lo)) * np.float32(1.0 / span)

    def invert(self, output: np.ndarray, noise: NoiseModel, lo: float, span: float
               ) -> np.ndarray:
        return noise.inverse_gat(output * np.float32(span) + np.float32(lo))

    def as_dict(self) -> dict[str, float | int | str]:
        return {"kind": "vst", "low": self.low, "high": self.high, "stride": self.stride}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> VSTNorm:
        return cls(float(str(d["low"])), float(str(d["high"])), int(str(d["stride"])))


def from_dict(d: dict[str, object]) -> PercentileNorm | VSTNorm:
    """The normalisation a model card names."""
    if d.get("kind") == "vst":
        return VSTNorm.from_dict(d)
    return PercentileNorm.from_dict(d)
