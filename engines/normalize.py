"""Per-frame percentile normalisation, shared by training and every runtime.

A model sees `(x - lo) / (hi - lo)` where `lo`/`hi` are low/high percentiles of
the *input* frame, and its output is mapped back with the same affine map. So
one model file works for any camera offset, gain and exposure: all three only
change `lo` and `hi`. The percentiles are taken on a strided subsample (every
`stride`-th pixel in each direction) so that normalising a 2048² frame costs
about a millisecond rather than tens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
