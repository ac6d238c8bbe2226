"""Localizers: raw frames in, `LocBlock`s out.

`Localizer` is the protocol a pipeline stage drives: `push` frames as they arrive (in order,
none skipped), receive the blocks that are finished; `flush` at the end; `localize` a whole
stack at once. Blocks tile the frame axis: their `[frame_start, frame_stop)` ranges follow
one another without gap, a block with no rows meaning frames with nothing found.

`SmappyLocalizer` wraps `smappy-smlm`'s `LocalizationEngine` (BSD-3; detection by
difference-of-Gaussians and a per-frame dynamic cutoff, MLE fit of a Gaussian PSF with free
width on multithreaded C++, CRLB per fit). What this module adds around the library:

- **camera → photons** here, not in smappy, so that a per-pixel sCMOS calibration (offset,
  gain maps) can be applied: smappy takes one offset and one conversion. The read-noise
  variance map is reduced to its median in e⁻² and given to smappy as its (scalar) read-noise
  term, which it adds to data and model (Huang et al. 2013's uniform part); the per-pixel
  variance weighting of a full sCMOS likelihood is not available in smappy.
- **edge padding**: smappy drops a candidate whose fit box crosses the image edge (13 % of
  candidates at 128×128 with its default 13 px box). Frames are padded by `pad_px` with each
  frame's median background (noise-free pixels consistent with the background), so emitters
  near the edge are fitted; localizations off the real field are dropped.
- **coordinates**: smappy puts pixel centres at integers; `dimscope.smlm` puts pixel j's centre
  at (j + ½)·pixel (see `psf`), so ½ pixel is added.
- **frame ranges and a flush clock for live use**: smappy fits when ~9,000 ROIs are buffered
  (minutes of a sparse acquisition); here a block is also closed every `flush_frames` frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from .block import LocBlock, concat
from .simulate import ScmosMaps

F32 = npt.NDArray[np.float32]


class LocalizerSettings(BaseModel):
    """Camera, PSF and fit settings of a localizer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pixel_nm: float = Field(100.0, gt=0, description="camera pixel in the sample, nm")
    psf_sigma_nm: float = Field(130.0, gt=0, description="start width of the Gaussian PSF")
    gain_adu_per_e: float = Field(1.0, gt=0, description="ADU per e⁻ (no sCMOS maps)")
    offset_adu: float = Field(0.0, description="camera offset, ADU (no sCMOS maps)")
    read_noise_e: float = Field(1.0, ge=0, description="rms read noise, e⁻ (no sCMOS maps)")
    roisize: int = Field(9, ge=5, description="fit box, pixels (odd)")
    cutoff: float = Field(1.7, gt=0, description="detection: dynamic cutoff factor")
    pad_px: int | None = Field(None, ge=0, description="edge padding; None: roisize // 2")
    max_fit_distance_px: float | None = Field(
        2.0, gt=0, description="drop fits that ran this far from their candidate")
    flush_frames: int = Field(100, ge=1, description="close a block at least every N frames")
    threads: int = Field(0, ge=0, description="fit threads; 0: one per core")


@runtime_checkable
class Localizer(Protocol):
    """Frames in order → blocks of localizations that tile the frame axis."""

    name: str

    def push(self, frames: npt.ArrayLike, first_frame: int | None = None) -> list[LocBlock]:
        """Add frames (H×W or n×H×W, ADU); the blocks finished by them (maybe none)."""
        ...

    def flush(self) -> list[LocBlock]:
        """Fit everything pushed so far; the last block(s)."""
        ...

    def localize(self, stack: npt.ArrayLike, first_frame: int = 0) -> LocBlock:
        """A whole stack at once (batch): one block over its frames."""
        ...

    def metadata(self) -> dict[str, Any]:
        """What made the localizations: library, version, settings, calibration."""
        ...


class SmappyLocalizer:
    """`smappy-smlm`'s engine behind the `Localizer` protocol."""

    name = "smappy"

    def __init__(self, settings: LocalizerSettings | None = None,
                 scmos: ScmosMaps | None = None) -> None:
        from smappy.detect import DoGFilter, DynamicCutoff, PeakFinder
        from smappy.metadata import CameraMetadata
        from smappy.pipeline import FitSettings, LocalizationEngine
        from smappy.psf import GaussianPSF

        self.settings = s = settings or LocalizerSettings()
        if s.roisize % 2 == 0:
            raise ValueError(f"roisize must be odd, got {s.roisize}")
        self.scmos = scmos
        self.pad = s.roisize // 2 if s.pad_px is None else s.pad_px
        if scmos is not None:
            # the median read-noise variance in e⁻²: smappy's (scalar) readout term
            read_noise = float(np.sqrt(np.median(scmos.variance / scmos.gain ** 2)))
        else:
            read_noise = s.read_noise_e
        self.read_noise_e = read_noise
        sigma_px = s.psf_sigma_nm / s.pixel_nm
        # photons are computed here (sCMOS maps), so smappy's camera is the identity
        camera = CameraMetadata(conversion=1.0, offset=0.0, pixelsize_um=s.pixel_nm / 1000.0,
                                em_on=False, read_noise_e=read_noise)
        self._engine = LocalizationEngine(
            camera, PeakFinder(DoGFilter(sigma_px), DynamicCutoff(s.cutoff)),
            GaussianPSF(sigma=sigma_px),
            FitSettings(roisize=s.roisize, n_threads=s.threads,
                        max_fit_distance=s.max_fit_distance_px))
        self._shape: tuple[int, int] | None = None
        self._next = 0  # next frame expected
        self._start = 0  # first frame of the open block
        self.seconds = 0.0  # time spent in push/flush

    # ------------------------------------------------------------------ the camera
    def to_photons(self, frames: npt.NDArray[Any]) -> F32:
        """ADU → photo-electrons, per pixel with sCMOS maps, else with one gain and offset."""
        f = np.asarray(frames, np.float32)
        if self.scmos is not None:
            if f.shape[-2:] != self.scmos.offset.shape:
                raise ValueError(f"frames {f.shape[-2:]} do not match the sCMOS calibration "
                                 f"{self.scmos.offset.shape} (crop it with ScmosMaps.crop)")
            return np.asarray((f - self.scmos.offset.astype(np.float32))
                              / self.scmos.gain.astype(np.float32), np.float32)
        s = self.settings
        return np.asarray((f - np.float32(s.offset_adu)) / np.float32(s.gain_adu_per_e),
                          np.float32)

    def _padded(self, photons: F32) -> F32:
        p = self.pad
        if p == 0:
            return photons
        n, h, w = photons.shape
        out = np.empty((n, h + 2 * p, w + 2 * p), np.float32)
        out[:] = np.median(photons.reshape(n, -1), axis=1)[:, None, None]
        out[:, p:p + h, p:p + w] = photons
        return out

    # ------------------------------------------------------------------ driving it
    def push(self, frames: npt.ArrayLike, first_frame: int | None = None) -> list[LocBlock]:
        t0 = time.perf_counter()
        arr = np.asarray(frames)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(f"frames must be H×W or n×H×W, got shape {arr.shape}")
        if first_frame is not None and self._shape is None:
            self._next = self._start = first_frame  # a fresh localizer starts anywhere
        if first_frame is not None and first_frame != self._next:
            raise ValueError(f"frames must come in order without gaps: expected frame "
                             f"{self._next}, got {first_frame}")
        if self._shape is None:
            self._shape = (arr.shape[1], arr.shape[2])
        elif arr.shape[1:] != self._shape:
            raise ValueError(f"frame shape changed from {self._shape} to {arr.shape[1:]}")
        out: list[LocBlock] = []
        s = self.settings
        # push in slices that end on the flush clock, so a block closes every flush_frames
        i = 0
        while i < len(arr):
            room = s.flush_frames - (self._next - self._start)
            part = arr[i:i + room]
            locs = self._engine.push(self._padded(self.to_photons(part)), self._next)
            self._next += len(part)
            i += len(part)
            if locs is not None:
                out.append(self._block(locs))
            elif self._next - self._start >= s.flush_frames:
                out.append(self._block(self._engine.flush()))
        self.seconds += time.perf_counter() - t0
        return out

    def flush(self) -> list[LocBlock]:
        t0 = time.perf_counter()
        locs = self._engine.flush()
        out = [self._block(locs)] if (locs is not None or self._next > self._start) else []
        self.seconds += time.perf_counter() - t0
        return out

    def localize(self, stack: npt.ArrayLike, first_frame: int = 0) -> LocBlock:
        return concat([*self.push(stack, first_frame), *self.flush()])

    @property
    def frames_pushed(self) -> int:
        return self._next

    @property
    def stats(self) -> dict[str, Any]:
        """smappy's counters (frames, candidates, rois, localizations, seconds)."""
        return dict(self._engine.stats)

    def metadata(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"library": "smappy-smlm", "library_version": version("smappy-smlm"),
                "model": "Gaussian PSF, free sigma, MLE (smappy fit_gauss_free)",
                "settings": self.settings.model_dump(mode="json"),
                "scmos_calibration": self.scmos is not None,
                "read_noise_e": self.read_noise_e, "pad_px": self.pad}

    # ------------------------------------------------------------------ conversion
    def _block(self, locs: Any) -> LocBlock:
        """smappy's table (nm, pixel centres at integers, padded) → a `LocBlock`."""
        start, stop = self._start, self._next
        self._start = stop
        if locs is None or len(locs) == 0:
            return LocBlock.empty(start, stop)
        s = self.settings
        c = locs.columns
        shift = (0.5 - self.pad) * s.pixel_nm
        x = np.asarray(c["x_nm"], np.float32) + np.float32(shift)
        y = np.asarray(c["y_nm"], np.float32) + np.float32(shift)
        assert self._shape is not None
        h, w = self._shape
        on_field = ((x >= 0) & (x < w * s.pixel_nm) & (y >= 0) & (y < h * s.pixel_nm)
                    & np.isfinite(x) & np.isfinite(y))
        cols: dict[str, npt.NDArray[Any]] = {
            "frame": np.asarray(c["frame"], np.int64),
            "x_nm": x, "y_nm": y,
            "photons": c["photons"], "background": c["background"],
            "precision_nm": c["xy_err_nm"],
            "x_err_nm": c["x_err_nm"], "y_err_nm": c["y_err_nm"],
            "photons_err": c["photons_err"], "background_err": c["background_err"],
            "sigma_nm": c["sigma_nm"],
            "log_likelihood": c["logl"], "log_likelihood_per_pixel": c["logl_rel"],
            "iterations": c["iterations"],
        }
        block = LocBlock(start, stop, {k: np.asarray(v)[on_field] for k, v in cols.items()})
        order = np.argsort(block.frame, kind="stable")
        return block.select(order)


def iter_tiff(path: str | Path, chunk: int = 200) -> Iterator[tuple[int, npt.NDArray[Any]]]:
    """(first_frame, block) of a TIFF stack, `chunk` frames at a time (not all in memory)."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tf:
        series = tf.series[0]
        shape = series.shape
        if len(shape) == 2:
            yield 0, series.asarray()[None]
            return
        if len(shape) != 3:
            raise ValueError(f"{path}: expected a T×Y×X stack, got shape {shape}")
        pages = series.pages
        for i in range(0, len(pages), chunk):
            block = np.stack([p.asarray() for p in pages[i:i + chunk] if p is not None])
            yield i, block


def localize_frames(blocks: Iterator[tuple[int, npt.NDArray[Any]]], localizer: Localizer,
                    sink: Callable[[LocBlock], None]) -> int:
    """Push every `(first_frame, frames)` through `localizer`, every finished block to `sink`.

    The same path a live stage takes, with a file as the source. Returns the frames pushed.
    """
    n = 0
    for first, frames in blocks:
        for b in localizer.push(frames, first):
            sink(b)
        n = first + len(frames)
    for b in localizer.flush():
        sink(b)
    return n
