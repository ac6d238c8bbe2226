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
  frame's median background, so emitters near the edge are detected and fitted;
  localizations off the real field are dropped. Padding says "background only" where the
  camera saw nothing, which pulls an edge fit inwards (median error 4–17× the CRLB within
  200 nm of the edge); so the fits whose box reaches into the padding are refined by EM for
  missing data (`edge_em_iterations`): the padded pixels of the box are replaced by the current
  fit's prediction (its PSF tail + background) and the box is fitted again with smappy's own
  fitter, until the fit stops moving (< 0.02 px) or `edge_em_iterations` — the padded pixels
  then stop pulling the fit (measured on simulated filaments with the default 10 refits:
  median error/CRLB ≈ 1.0 at 100–200 nm from the edge, ≈ 2 at 50–100 nm, ≈ 3.5 within 50 nm;
  it costs about a fifth of the live rate, see results/smlm.md). Set it to 0 (or `pad_px=0`)
  for smappy's own behaviour at edges.
- **coordinates**: smappy puts pixel centres at integers; `dimscope.smlm` puts pixel j's centre
  at (j + ½)·pixel (see `psf`), so ½ pixel is added.
- **frame ranges and a flush clock for live use**: smappy fits when ~9,000 ROIs are buffered
  (minutes of a sparse acquisition); here a block is also closed every `flush_frames` frames.
- **overlapping emitters**: smappy fits one emitter per candidate, so two emitters within a
  couple of PSF widths come out as one localization between them. Each block's such places
  are refitted with several emitters (`multi_emitter`, on by default here and in `dimscope
  smlm localize`; `multi_emitter=None` for the library's fits alone; off by default in the
  live `localize` node, for speed). It takes the localizer from ~1,300 to ~350 frames/s at 30
  emitters per 128² frame on 2 cores, and the RMSE from 3.9× to 1.4× the bound
  (results/smlm.md). The refit uses `psf_sigma_nm` as the PSF's width; a block whose fits say
  otherwise (lower quartile of the fitted widths outside 0.92–1.04 of it) is left
  unrefitted, with a warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from .block import LocBlock, concat
from .multi_emitter import MultiEmitterSettings, refit_overlaps
from .simulate import ScmosMaps

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]


class LocalizerSettings(BaseModel):
    """Camera, PSF and fit settings of a localizer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pixel_nm: float = Field(100.0, gt=0, description="camera pixel in the sample, nm")
    psf_sigma_nm: float = Field(130.0, gt=0, description="width of the Gaussian PSF: the fit's "
                                "start, and the multi-emitter refit's fixed width")
    gain_adu_per_e: float = Field(1.0, gt=0, description="ADU per e⁻ (no sCMOS maps)")
    offset_adu: float = Field(0.0, description="camera offset, ADU (no sCMOS maps)")
    read_noise_e: float = Field(1.0, ge=0, description="rms read noise, e⁻ (no sCMOS maps)")
    roisize: int = Field(7, ge=5, description="fit box, pixels (odd); 7 measured best at σ 1.3 px")
    cutoff: float = Field(1.7, gt=0, description="detection: dynamic cutoff factor")
    pad_px: int | None = Field(None, ge=0, description="edge padding; None: roisize // 2")
    max_fit_distance_px: float | None = Field(
        2.0, gt=0, description="drop fits that ran this far from their candidate")
    flush_frames: int = Field(100, ge=1, description="close a block at least every N frames")
    edge_em_iterations: int = Field(
        10, ge=0, description="most EM refits of a fit whose box reaches into the padding "
                              "(a box that stopped moving, < 0.02 px, is done)")
    threads: int = Field(0, ge=0, description="fit threads; 0: one per core")
    multi_emitter: MultiEmitterSettings | None = Field(
        default_factory=MultiEmitterSettings,
        description="refit merged emitters as several (`multi_emitter`); None: the library's "
                    "single-emitter fits only")


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
    #: the optional columns (`block.OPTIONAL`) the library's fits fill
    library_columns = ("x_err_nm", "y_err_nm", "photons_err", "background_err", "sigma_nm",
                       "log_likelihood", "log_likelihood_per_pixel", "iterations")

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
        #: the optional columns (`block.OPTIONAL`) its blocks carry
        self.columns: tuple[str, ...] = self.library_columns + (
            ("emitters_in_fit",) if s.multi_emitter is not None else ())
        #: what the multi-emitter refit did so far (`multi_emitter.refit_overlaps`)
        self.multi_emitter_counts = {"groups_refitted": 0, "emitters_added": 0,
                                     "dropped_at_rim": 0, "dropped_off_field": 0,
                                     "blocks_with_other_psf_width": 0}
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
        self._held: list[F32] = []  # the open block's padded photons, for the refits
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
        # The frame's background level, from every 16th pixel: the full median cost ~15 % of
        # the localizer's time per frame here, and the padding needs only a level.
        out[:] = np.median(photons.reshape(n, -1)[:, ::16], axis=1)[:, None, None]
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
            padded = self._padded(self.to_photons(part))
            if (self.pad and s.edge_em_iterations) or s.multi_emitter is not None:
                self._held.append(padded)
            locs = self._engine.push(padded, self._next)
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
    def open_block_frames(self) -> int:
        """Frames pushed into the block not yet closed (a block closes at `flush_frames`)."""
        return self._next - self._start

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
        held, self._held = self._held, []
        if locs is None or len(locs) == 0:
            # with the optional columns, or a concat of blocks would drop them
            return LocBlock.empty(start, stop, extra=self.columns)
        s = self.settings
        c = dict(locs.columns)
        frames = np.concatenate(held) if held else None
        if frames is not None and self.pad and s.edge_em_iterations:
            self._refit_edges(c, frames, start)
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
        block = block.select(np.argsort(block.frame, kind="stable"))
        if s.multi_emitter is not None and frames is not None:
            p = self.pad
            block, counts = refit_overlaps(block, frames[:, p:p + h, p:p + w], s.pixel_nm,
                                           s.psf_sigma_nm, self.read_noise_e, s.multi_emitter)
            if counts["blocks_with_other_psf_width"] and not self.multi_emitter_counts[
                    "blocks_with_other_psf_width"]:
                log.warning("the fitted PSF widths (lower quartile %.0f nm) disagree with the "
                            "configured psf_sigma_nm %.0f nm: the multi-emitter refit is "
                            "skipped for such blocks; set psf_sigma_nm to the PSF's width",
                            float(np.nanpercentile(np.asarray(block["sigma_nm"], np.float64), 25)),
                            s.psf_sigma_nm)
            for name, value in counts.items():
                self.multi_emitter_counts[name] += value
        return block


    def _refit_edges(self, c: dict[str, Any], photons: F32, start: int) -> None:
        """EM for the padded pixels of fit boxes at the edge (see the module docstring).

        In place on smappy's columns `c` (positions in nm, pixel centres at integers, padded
        frame); `photons` are the padded frames `start…` the block covers.
        """
        from smappy.pipeline import with_readout, without_readout

        s = self.settings
        half, pad, px = s.roisize // 2, self.pad, s.pixel_nm
        _, h, w = photons.shape
        cx = np.asarray(c["peak_x_pix"]).astype(np.int64)
        cy = np.asarray(c["peak_y_pix"]).astype(np.int64)
        edge = ((cx - half < pad) | (cx + half >= w - pad) | (cy - half < pad)
                | (cy + half >= h - pad))
        idx = np.flatnonzero(edge & np.isfinite(np.asarray(c["x_nm"])))
        if len(idx) == 0:
            return
        span = np.arange(-half, half + 1)
        rows = cy[idx, None] + span  # (n, roisize) pixel rows of each box
        cols = cx[idx, None] + span
        fi = np.asarray(c["frame"])[idx].astype(np.int64) - start
        boxes = photons[fi[:, None, None], rows[:, :, None], cols[:, None, :]].copy()
        missing = (((rows < pad) | (rows >= h - pad))[:, :, None]
                   | ((cols < pad) | (cols >= w - pad))[:, None, :])
        model = self._engine.model
        variance = self._engine.camera.readout_variance
        x = np.asarray(c["x_nm"], np.float64)[idx] / px  # padded pixels, centres at integers
        y = np.asarray(c["y_nm"], np.float64)[idx] / px
        n = np.asarray(c["photons"], np.float64)[idx]
        bg = np.asarray(c["background"], np.float64)[idx]
        sig = np.asarray(c["sigma_nm"], np.float64)[idx] / px
        m = len(idx)
        out = {k: np.full(m, np.nan) for k in ("x_err", "y_err", "photons_err",
                                                "background_err", "logl")}
        its = np.zeros(m, np.int32)
        active = np.arange(m)
        for _ in range(s.edge_em_iterations):
            a = active
            # E-step: the padded pixels get the current fit's expected counts
            sg = np.clip(sig[a], 0.3, 3 * s.psf_sigma_nm / px)[:, None]
            ex = _pixel_integrals(cols[a] - 0.5, x[a, None], sg)
            ey = _pixel_integrals(rows[a] - 0.5, y[a, None], sg)
            expect = (n[a, None, None] * ey[:, :, None] * ex[:, None, :]
                      + bg[a, None, None])
            sub = boxes[a]
            sub[missing[a]] = expect[missing[a]]
            boxes[a] = sub
            # M-step: smappy's fitter on the completed boxes
            result = model.fit(with_readout(np.ascontiguousarray(sub, np.float32), variance),
                               iterations=self._engine.settings.iterations,
                               n_threads=s.threads)
            without_readout(result, model, variance)
            p = model.unpack(result)
            nx = np.asarray(p["x_roi"], np.float64) - half + cx[idx[a]]
            ny = np.asarray(p["y_roi"], np.float64) - half + cy[idx[a]]
            # a box whose fit stopped moving has converged: later iterations skip it
            moved = ~(np.abs(nx - x[a]) + np.abs(ny - y[a]) < 0.02)
            x[a], y[a] = nx, ny
            n[a] = p["photons"]
            bg[a] = p["background"]
            sig[a] = p["sigma_pix"]
            out["x_err"][a], out["y_err"][a] = p["x_err_pix"], p["y_err_pix"]
            out["photons_err"][a] = p["photons_err"]
            out["background_err"][a] = p["background_err"]
            out["logl"][a] = result.logl
            its[a] = result.iterations
            active = a[moved & np.isfinite(nx) & np.isfinite(ny)]
            if len(active) == 0:
                break
        ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(n) & np.isfinite(out["x_err"])
        if s.max_fit_distance_px is not None:
            ok &= (np.abs(x - cx[idx]) < s.max_fit_distance_px) & (
                np.abs(y - cy[idx]) < s.max_fit_distance_px)
        j = idx[ok]
        updates = {"x_nm": x * px, "y_nm": y * px, "photons": n, "background": bg,
                   "x_err_nm": out["x_err"] * px, "y_err_nm": out["y_err"] * px,
                   "photons_err": out["photons_err"], "background_err": out["background_err"],
                   "sigma_nm": sig * px, "logl": out["logl"],
                   "logl_rel": out["logl"] / s.roisize ** 2, "iterations": its}
        for name, values in updates.items():
            col = np.array(c[name], copy=True)
            col[j] = np.asarray(values)[ok]
            c[name] = col
        c["xy_err_nm"] = np.sqrt((np.asarray(c["x_err_nm"], np.float64) ** 2
                                  + np.asarray(c["y_err_nm"], np.float64) ** 2) / 2)


def _pixel_integrals(left: npt.NDArray[Any], centre: npt.NDArray[Any],
                     sigma: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """∫ of a unit Gaussian over pixels [left, left + 1) (erf differences)."""
    from scipy.special import erf

    k = 1.0 / (np.sqrt(2.0) * sigma)
    return np.asarray(0.5 * (erf((left + 1.0 - centre) * k) - erf((left - centre) * k)),
                      np.float64)


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
