"""Live localization microscopy: localize every raw frame while it is acquired, render.

`LocalizeStage` (node kind `localize`, upstream: raw frames) pushes each frame into a
`dimscope.smlm` localizer (smappy-smlm) in acquisition order. Every finished block — all
localizations of a frame range, `[localize] block_frames` frames at most — is

- appended to the crash-safe table in the run folder (`localizations.arrows`: an Arrow IPC
  stream, one fsynced batch per block; after a crash `dimscope recover RUN` writes a valid
  copy up to the last complete block, `dimscope smlm recover` repairs the file in place), and
- passed downstream as a frame of kind `localizations` whose payload is that block as a
  self-contained Arrow IPC stream (`smlm.table.block_from_ipc` reads it; docs/wire-format.md).

The localizer needs frames in order without gaps. Frames are pushed in stacks of
`push_frames` (100; fewer to end on a block boundary, and fewer once the oldest has waited
`push_wait_s`, 0.5 s — checked as frames arrive and, while none do, every quarter of it):
the library then fits in batches as it does offline. Measured on 2 cores with
frames paced at 200 frames/s and nothing else running: 1,470 frames/s in stacks of 8, 1,620
in stacks of 64, 1,830 in stacks of 100 — the batch rate (1,770–1,810) — because each call
wakes idle cores and cold caches, and a block closes only every `block_frames` frames anyway.
The queue is large (a queued frame costs only its pixels, which the archive shares), so
localization falls behind a burst and catches up. If it overflows, the oldest frames are
dropped from localization only — never from the raw archive: the open block is closed before
the gap, a new block starts after it, and the dropped frame ids are counted
(`not_localized`) and listed in the run summary, so the table says exactly which frames it
lacks (the raw archive has them all, for an offline `dimscope smlm localize`). The lag
(frames waiting) is a metric.

`RenderStage` (node kind `render`, upstream: a localize node) accumulates the positions and
emits a super-resolution image (histogram or Gaussian, `pixel_nm` per pixel) every
`every_frames` frames and at the end of the run: frames of kind `render`. With
`drift_correction` (default) each render first estimates the drift so far by redundant
cross-correlation of `drift_segment_frames`-frame sub-renders (`smlm.drift.rcc`, once there
are two segments; at most 16, longer runs get longer segments) and renders the corrected
positions; every estimate applied is appended to `drift.jsonl` in the run folder (frames,
per-segment drift, the drift at the last frame, RCC's residual), and the render's header
says what was subtracted. The table keeps the
uncorrected positions.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dimscope.engines import CameraCalibration

from .config import LocalizeNodeConfig, RenderNodeConfig
from .frame import Frame, freeze
from .stage import OverflowPolicy, Stage

log = logging.getLogger(__name__)

#: at most this many ids of frames not localized are kept for the summary (all are counted)
_MAX_LISTED = 10_000
#: RCC drift segments at most (every pair is cross-correlated at each render)
_MAX_SEGMENTS = 16
#: drift estimates applied, one JSON object per line, in the run folder
DRIFT_LOG = "drift.jsonl"


class LocalizeStage(Stage):
    #: at stop, localizing what is queued may take a while (thousands of frames/s)
    drain_timeout_s = 120.0

    def __init__(self, node: LocalizeNodeConfig, run_dir: Path, pixel_size_um: float,
                 calibration: CameraCalibration) -> None:
        super().__init__(node.name, node.queue_frames, OverflowPolicy.DROP_OLDEST)
        # Imported and built here, so a missing smlm extra or a bad setting is an EngineError
        # at graph building ("node not running"), never a crash when the run starts.
        from dimscope.smlm.localize import LocalizerSettings, SmappyLocalizer
        from dimscope.smlm.multi_emitter import MultiEmitterSettings
        from dimscope.smlm.table import LocTableWriter

        self.node = node
        self.path = run_dir / node.table
        self.pixel_nm = pixel_size_um * 1000.0
        #: photons are only photons when the camera is calibrated (`[camera]` or the source's)
        self.calibrated = calibration.measured
        self.settings = LocalizerSettings(
            pixel_nm=self.pixel_nm, psf_sigma_nm=node.psf_sigma_nm,
            gain_adu_per_e=calibration.gain_adu_per_e, offset_adu=calibration.offset_adu,
            read_noise_e=calibration.read_noise_e, roisize=node.roisize, cutoff=node.cutoff,
            flush_frames=node.block_frames, edge_em_iterations=node.edge_em_iterations,
            threads=node.threads,
            multi_emitter=MultiEmitterSettings() if node.multi_emitter else None)
        self._localizer: Any = SmappyLocalizer(self.settings)
        self._writer_class = LocTableWriter
        self._writer: Any = None
        self._schema: Any = None
        self._last: Frame | None = None
        self._pending: list[Frame] = []  # taken from the queue, not yet pushed
        self._oldest_pending = 0.0  # when the first of them was taken
        self.wait_poll_s = min(0.5, node.push_wait_s / 4)
        self._lock = threading.Lock()
        #: rows written, frames localized, frames the queue dropped (ids: `not_localized_ids`)
        self.localizations = 0
        self.frames_localized = 0
        self.not_localized = 0
        self.not_localized_ids: list[int] = []
        #: seconds spent inside the localizer (so its live rate compares with a batch run)
        self._seconds_done = 0.0
        self._added_done = 0  # emitters the multi-emitter refit added, by earlier localizers

    def setup(self) -> None:
        from dimscope.smlm.block import OPTIONAL

        columns = [c for c in OPTIONAL if c in self._localizer.columns]
        meta = {**self._localizer.metadata(), "source": "live", "pixel_nm": self.pixel_nm,
                "camera_calibrated": self.calibrated}
        if not self.calibrated:
            log.warning("%s: the camera is not calibrated (no [camera] gain/offset and none "
                        "from the source): photons, background and precision assume gain 1, "
                        "offset 0", self.name)
        if self.pixel_nm > 400:  # SMLM cameras sample at ~65-160 nm
            log.warning("%s: the camera pixel is %.0f nm in the sample — is the core's pixel "
                        "size (or [source] pixel_size_um) set? Positions and the PSF width "
                        "(%.0f nm) assume it", self.name, self.pixel_nm, self.node.psf_sigma_nm)
        self._writer = self._writer_class(self.path, columns, meta)
        self._schema = self._writer.schema

    def process(self, frame: Frame) -> None:
        # Frames go to the localizer in stacks (module docstring): this one with what else is
        # queued, up to the stack's size.
        if not self._pending:
            self._oldest_pending = time.monotonic()
        self._pending.append(frame)
        target = self._stack_size()
        self._pending += self.take_queued(target - len(self._pending))
        if len(self._pending) >= target:
            self._push_pending()
        else:
            self._push_if_waited()

    def waiting(self) -> None:
        self._push_if_waited()

    def _push_if_waited(self) -> None:
        if self._pending and (time.monotonic() - self._oldest_pending
                              >= self.node.push_wait_s):
            self._push_pending()

    def _stack_size(self) -> int:
        """`push_frames`, fewer to end on the open block's boundary (so the library gets
        whole stacks, never a stack split by a block's end); never more than the queue
        holds (frames held here cost their pixels too)."""
        left = self.node.block_frames - self._localizer.open_block_frames
        return max(1, min(self.node.push_frames, self.capacity,
                          left if left > 0 else self.node.block_frames))

    def _push_pending(self) -> None:
        frames, self._pending = self._pending, []
        self._record_skipped(self.take_skipped())
        start = 0
        for i in range(1, len(frames) + 1):
            if i == len(frames) or frames[i].frame_id != frames[i - 1].frame_id + 1:
                try:
                    self._push(frames[start:i])
                except BaseException:
                    self._pending = frames[start:]  # not localized: teardown counts them
                    raise
                start = i

    def _push(self, run: list[Frame]) -> None:
        """Consecutive frames, pushed as one stack; after a gap, a fresh localizer."""
        if self._last is not None and run[0].frame_id != self._last.frame_id + 1:
            self._restart()
        self._last = run[-1]
        pixels = run[0].pixels[None] if len(run) == 1 else np.stack([f.pixels for f in run])
        blocks = self._localizer.push(pixels, first_frame=run[0].frame_id)
        self.frames_localized += len(run)
        for block in blocks:  # each published as of the frame that closed it
            closing = block.frame_stop - 1 - run[0].frame_id
            self._publish(block, run[closing] if 0 <= closing < len(run) else run[-1])

    def _record_skipped(self, skipped: list[int]) -> None:
        if not skipped:
            return
        with self._lock:
            self.not_localized += len(skipped)
            room = _MAX_LISTED - len(self.not_localized_ids)
            self.not_localized_ids += skipped[:max(room, 0)]
        log.error("%s: %d frame(s) dropped from live localization (the raw archive has "
                  "them; the table leaves their gap): ids %s", self.name, len(skipped),
                  skipped[:10])

    def _restart(self) -> None:
        """A gap in the frames: close the open block before it, start a fresh localizer
        (one that starts at any frame) after it."""
        from dimscope.smlm.localize import SmappyLocalizer

        if self._last is not None:
            for block in self._localizer.flush():
                self._publish(block, self._last)
        fresh = SmappyLocalizer(self.settings)
        with self._lock:  # a snapshot sees the counts before or after, never both
            self._seconds_done += self._localizer.seconds
            self._added_done += self._localizer.multi_emitter_counts["emitters_added"]
            self._localizer = fresh

    def _publish(self, block: Any, frame: Frame) -> None:
        from dimscope.smlm.table import block_to_ipc

        self._writer.append(block)
        self.localizations += len(block)
        payload = np.frombuffer(block_to_ipc(block, self._schema), dtype=np.uint8)
        self.emit(frame.replace(
            pixels=freeze(payload), kind="localizations",
            source_ids=tuple(range(block.frame_start, block.frame_stop)),
            metadata={"frame_start": str(block.frame_start),
                      "frame_stop": str(block.frame_stop), "count": str(len(block)),
                      "format": "arrow-ipc-stream", "pixel_nm": f"{self.pixel_nm:g}",
                      "camera_shape": "x".join(map(str, frame.shape[-2:]))}).marked(self.name))

    def teardown(self) -> None:
        # Dropped after the last frame localized, and abandoned by a drain that timed out.
        self._record_skipped(self.take_skipped() + list(self.abandoned_ids))
        if self.error is not None and self._pending:  # held for a stack when the stage failed
            self.counters.dropped += len(self._pending)  # as the queue's frames (Stage._fail)
            self._record_skipped([f.frame_id for f in self._pending])
            self._pending = []
        try:
            if self.error is None and self._pending:
                self._push_pending()
            if self.error is None and self._last is not None:
                for block in self._localizer.flush():
                    self._publish(block, self._last)
        except Exception as exc:  # the run's shutdown goes on; the table keeps its blocks
            log.error("%s: the last block could not be written: %s", self.name, exc)
        finally:
            if self._writer is not None:
                try:
                    self._writer.close()
                except OSError as exc:
                    log.error("%s: closing %s failed: %s (`dimscope recover` copies its "
                              "complete blocks)", self.name, self.path, exc)

    def snapshot(self) -> dict[str, object]:
        snap = super().snapshot()
        with self._lock:
            ids = list(self.not_localized_ids)
            busy = self._seconds_done + self._localizer.seconds
            added = self._added_done + self._localizer.multi_emitter_counts["emitters_added"]
        # Every frame the queue dropped or a timed-out drain abandoned is in counters.dropped
        # (the id list may be shorter: the first ids only).
        snap.update(lag_frames=self.depth + len(self._pending),
                    localizations=self.localizations,
                    frames_localized=self.frames_localized,
                    not_localized=max(self.not_localized, self.counters.dropped),
                    not_localized_ids=ids, table=str(self.path), localize_seconds=busy,
                    emitters_added=added)
        return snap


class LocAccumulator:
    """The localizations received so far (frames of kind `localizations`), and their
    drift-corrected table: what a render or a dense prediction is made of."""

    def __init__(self, node_name: str, drift_log: Path, drift_correction: bool,
                 segment_frames: int) -> None:
        self.node_name = node_name
        self.drift_log = drift_log
        self.drift_correction = drift_correction
        self.segment_frames = segment_frames
        self._columns: dict[str, list[np.ndarray]] = {
            "frame": [], "x_nm": [], "y_nm": [], "precision_nm": []}
        #: frames covered by the blocks received
        self.frames = 0
        self.field_nm: tuple[float, float] | None = None
        self.camera_pixel_nm = 0.0
        self.camera_shape: tuple[int, int] = (0, 0)
        self.drift_estimates = 0
        #: the newest drift estimate applied (`smlm.drift.DriftEstimate`), None before one
        self.drift: Any = None

    def mean_drift_nm(self, frames: int) -> tuple[float, float]:
        """The drift (x, y nm) averaged over frames 0..frames-1: where a mean of those raw
        frames sits relative to frame 0 (0, 0 before any estimate)."""
        if self.drift is None or frames <= 0:
            return (0.0, 0.0)
        n = min(frames, self.drift.n_frames)
        return (float(np.mean(self.drift.dx_nm[:n])), float(np.mean(self.drift.dy_nm[:n])))

    def add(self, frame: Frame) -> None:
        from dimscope.smlm.table import block_from_ipc

        block = block_from_ipc(frame.pixels.data)
        if self.field_nm is None:  # the camera's field, so every image has one size
            self.camera_pixel_nm = float(frame.metadata["pixel_nm"])
            h, w = (int(v) for v in frame.metadata["camera_shape"].split("x"))
            self.camera_shape = (h, w)
            self.field_nm = (w * self.camera_pixel_nm, h * self.camera_pixel_nm)
        for name, values in self._columns.items():
            values.append(np.asarray(block[name]))
        self.frames += block.frame_stop - block.frame_start

    def table(self) -> tuple[Any, dict[str, str]]:
        """Every localization so far (drift-corrected when on and there are two segments)
        and what was done, for the frame's header."""
        from dimscope.smlm.block import LocBlock

        cols = {k: np.concatenate(v) for k, v in self._columns.items()}
        n = len(cols["x_nm"])
        frames = cols["frame"].astype(np.int64)
        cols.update(frame=frames, photons=np.ones(n, np.float32),
                    background=np.zeros(n, np.float32))
        last = int(frames.max()) + 1 if n else 0
        locs = LocBlock(0, last, cols)
        meta = {"frames": str(self.frames), "localizations": str(n),
                "drift_corrected": "false"}
        # At most 16 segments (RCC correlates every pair): longer runs get longer segments.
        segments = min(last // self.segment_frames, _MAX_SEGMENTS)
        if self.drift_correction and segments >= 2 and n:
            locs, drift = self._drift_corrected(locs, last, segments)
            meta.update(drift_corrected="true", drift_x_nm=f"{drift[0]:.2f}",
                        drift_y_nm=f"{drift[1]:.2f}")
        return locs, meta

    def _drift_corrected(self, locs: Any, n_frames: int, segments: int
                         ) -> tuple[Any, tuple[float, float]]:
        """RCC over the localizations so far; the corrected positions, and the drift at the
        last frame (x, y nm). The estimate is appended to drift.jsonl."""
        import json

        from dimscope.smlm.drift import rcc

        est = rcc(locs, n_frames=n_frames, n_segments=segments, extent_nm=self.field_nm)
        self.drift_estimates += 1
        self.drift = est
        record = {"node": self.node_name, "frames": n_frames, "segments": segments,
                  "segment_frames": est.segment_frames.round(1).tolist(),
                  "segment_drift_nm": est.segment_drift_nm.round(2).tolist(),
                  "drift_at_last_frame_nm": [round(float(est.dx_nm[-1]), 2),
                                             round(float(est.dy_nm[-1]), 2)],
                  "pairs_used": est.pairs_used, "pairs_total": est.pairs_total,
                  "residual_rms_nm": round(est.residual_rms_nm, 2)}
        with self.drift_log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return est.apply(locs), (float(est.dx_nm[-1]), float(est.dy_nm[-1]))


class RenderStage(Stage):
    """Super-resolution renders of the localizations so far, every `every_frames` frames."""

    #: renders (and their drift estimates) yield the cores to acquisition and localization
    nice = 10

    def __init__(self, node: RenderNodeConfig, run_dir: Path) -> None:
        super().__init__(node.name, node.queue_frames, OverflowPolicy.DROP_OLDEST)
        self.node = node
        self.locs = LocAccumulator(node.name, run_dir / DRIFT_LOG, node.drift_correction,
                                   node.drift_segment_frames)
        self._next_render = node.every_frames
        self._last: Frame | None = None
        self._rendered_frames = -1  # frames covered by the last render
        self.renders = 0

    def process(self, frame: Frame) -> None:
        self.locs.add(frame)
        self._last = frame
        # Behind (more blocks queued)? Take them first: a render is of everything so far.
        if self.locs.frames >= self._next_render and self.depth == 0:
            self._render(frame)
            while self._next_render <= self.locs.frames:
                self._next_render += self.node.every_frames

    def _render(self, frame: Frame) -> None:
        from dimscope.smlm.render import gaussian, histogram

        locs, meta = self.locs.table()
        meta.update(method=self.node.method, pixel_nm=f"{self.node.pixel_nm:g}")
        fn = histogram if self.node.method == "histogram" else gaussian
        image = np.asarray(fn(locs, self.node.pixel_nm, self.locs.field_nm), dtype=np.float32)
        self.renders += 1
        self._rendered_frames = self.locs.frames
        self.emit(frame.replace(
            pixels=freeze(image), kind="render", pixel_size_um=self.node.pixel_nm / 1000.0,
            metadata=meta, source_ids=()).marked(self.name))

    def teardown(self) -> None:
        if self.error is None and self._last is not None and \
                self._rendered_frames < self.locs.frames:
            try:
                self._render(self._last)  # the whole run, once more at the end
            except Exception as exc:  # the run's shutdown goes on
                log.error("%s: the final render failed: %s", self.name, exc)

    def snapshot(self) -> dict[str, object]:
        snap = super().snapshot()
        snap.update(renders=self.renders, frames=self.locs.frames,
                    drift_estimates=self.locs.drift_estimates)
        return snap
