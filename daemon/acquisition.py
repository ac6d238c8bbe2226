"""Acquisition: pop every frame from the core and hand it to the archive and the rest.

The archive must accept every frame (its queue has the FAIL policy). When its
queue is full the loop waits (`archive.backpressure_s`) while new frames wait
in the camera's own buffer; if there is still no room, acquisition stops with
`AcquisitionError`. A frame lost in the camera's buffer meanwhile stops the run
too, with the count (ImageNumber gap). Other consumers drop by their own
policies and never slow this loop down.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .frame import Frame, freeze, pixel_checksum
from .metrics import StageCounters
from .stage import QueueFullError, Stage, StageFailedError

log = logging.getLogger(__name__)


class AcquisitionError(RuntimeError):
    """Acquisition stopped because a raw frame could not be kept, or the camera failed."""


class FinishReason(enum.StrEnum):
    """Why acquisition ended (pymmcore-plus `_runner.py` style)."""

    #: the requested number of frames was acquired
    FRAME_LIMIT = "frame_limit"
    #: a finite source (a recording played without `loop`) delivered all it has
    SOURCE_ENDED = "source_ended"
    #: stop was requested (duration reached, SIGINT/SIGTERM, a caller)
    STOPPED = "stopped"
    #: an error stopped it (see the acquisition's `error`)
    ERROR = "error"


def _md_dict(md: Any) -> dict[str, str]:
    if isinstance(md, Mapping):
        return {str(k): str(v) for k, v in md.items()}
    try:  # pymmcore.Metadata
        return {k: md.GetSingleTag(k).GetValue() for k in md.GetKeys()}
    except Exception:
        return {}


class Acquisition:
    """Runs the core's sequence acquisition on its own thread and fans frames out."""

    name = "acquisition"

    def __init__(self, source: Any, archive: Stage, consumers: list[Stage], *,
                 poll_sleep_s: float, max_frames: int | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 archive_wait_s: float = 0.0) -> None:
        self.source = source
        self.archive = archive
        #: how long to wait for room in the archive's queue (the camera buffers meanwhile)
        self.archive_wait_s = archive_wait_s
        self.consumers = consumers
        self.poll_sleep_s = poll_sleep_s
        self.max_frames = max_frames
        self.counters = StageCounters()
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._on_error = on_error
        self._thread: threading.Thread | None = None
        self._last_image_number: int | None = None
        self.started_mono: float | None = None  # when the camera sequence started
        self.stop_requested_mono: float | None = None
        self.finish_reason: FinishReason | None = None
        #: frames still in the camera's buffer when an error stopped acquisition
        self.left_in_camera = 0
        self._pixel_size_um = 1.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dimscope-acquisition",
                                        daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        if self.stop_requested_mono is None:
            self.stop_requested_mono = time.monotonic()
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> dict[str, object]:
        snap: dict[str, object] = dict(self.counters.snapshot(0, 0))
        if self.error is not None:
            snap["error"] = str(self.error)
        return snap

    # -----------------------------------------------------------------------
    def _run(self) -> None:
        core = self.source.core
        try:
            self._pixel_size_um = float(self.source.pixel_size_um)  # not per frame
            if core.getShutterDevice() and core.getAutoShutter():
                core.setShutterOpen(True)
            if self.max_frames is not None:
                core.startSequenceAcquisition(self.max_frames, 0.0, True)
            else:
                core.startContinuousSequenceAcquisition(0.0)
            self.started_mono = time.monotonic()
            self.finish_reason = self._loop(core)
        except BaseException as exc:
            self.error = exc
            self.finish_reason = FinishReason.ERROR
            log.error("acquisition stopped: %s", exc)
            if self._on_error is not None:
                self._on_error(exc)
        finally:
            try:
                if core.isSequenceRunning():
                    core.stopSequenceAcquisition()
                # Frames the camera delivered before the stop are raw data too.
                if self.error is None:
                    self._drain(core)
                else:  # not archived after an error: counted, so the summary can say so
                    self.left_in_camera = int(core.getRemainingImageCount())
            except BaseException as exc:
                if self.error is None:
                    self.error = exc
                    self.finish_reason = FinishReason.ERROR
                    if self._on_error is not None:
                        self._on_error(exc)
            finally:
                try:
                    if core.getShutterDevice() and core.getAutoShutter():
                        core.setShutterOpen(False)
                except Exception:
                    log.warning("could not close the shutter after acquisition")
                self.finished.set()

    def _loop(self, core: Any) -> FinishReason:
        reason = FinishReason.STOPPED
        while not self._stop.is_set():
            if core.getRemainingImageCount() > 0:
                self._pop_one(core)
                continue
            self._check_overflow(core)
            if not core.isSequenceRunning():
                if self.max_frames is not None and self.counters.received >= self.max_frames:
                    reason = FinishReason.FRAME_LIMIT
                    break
                if core.getRemainingImageCount() > 0:
                    continue
                if self.source.ended:
                    reason = FinishReason.SOURCE_ENDED
                    break
                raise AcquisitionError(
                    f"the camera stopped delivering frames after {self.counters.received}"
                    + (f" of {self.max_frames}" if self.max_frames else ""))
            time.sleep(self.poll_sleep_s)  # a busy spin would starve a Python camera
        if self.stop_requested_mono is None:
            self.stop_requested_mono = time.monotonic()
        return reason

    def _check_overflow(self, core: Any) -> None:
        """Stop on a real loss only (a Python buffer's loss is caught as an ImageNumber gap)."""
        if self.source.overflow_shows_as_gap or not core.isBufferOverflowed():
            return
        last = self._last_image_number
        raise AcquisitionError(
            "the core's circular buffer overflowed: the camera stopped after "
            f"{self.counters.received} frame(s)"
            + (f" (last image number {last})" if last is not None else "")
            + "; frames it would have delivered after that were not acquired")

    def _drain(self, core: Any) -> None:
        while core.getRemainingImageCount() > 0:
            self._pop_one(core)
        self._check_overflow(core)

    def _pop_one(self, core: Any) -> None:
        pixels, md = core.popNextImageAndMD()
        mono, unix = time.monotonic_ns(), time.time_ns()
        meta = _md_dict(md)
        self._check_sequence(meta)
        try:
            exposure = float(meta.get("Exposure-ms", "nan"))
        except ValueError:
            exposure = float("nan")
        if exposure != exposure:  # NaN: camera did not tag it
            exposure = float(core.getExposure())
        frozen = freeze(pixels)
        frame = Frame(
            frame_id=self.counters.received, pixels=frozen, acquired_unix_ns=unix,
            checksum=pixel_checksum(frozen),
            exposure_ms=exposure, pixel_size_um=self._pixel_size_um,
            source=self.source.name, metadata=meta, marks=(("acquired", mono),),
        )
        self.counters.received += 1
        try:
            self.archive.offer(frame, wait_s=self.archive_wait_s)
        except (QueueFullError, StageFailedError) as exc:
            raise AcquisitionError(f"raw frame {frame.frame_id} could not be archived: {exc}"
                                   ) from exc
        for consumer in self.consumers:
            # A failed viewer/engine stage reports itself; raw data is unaffected.
            with contextlib.suppress(StageFailedError):
                consumer.offer(frame)
        self.counters.passed += 1

    def _check_sequence(self, meta: Mapping[str, str]) -> None:
        """The core numbers images; a jump means it lost frames we never saw."""
        number = meta.get("ImageNumber")
        if number is None:
            return
        n = int(number)
        last = self._last_image_number
        self._last_image_number = n
        if last is not None and n > last + 1:
            raise AcquisitionError(f"the core skipped {n - last - 1} frame(s) between image "
                                   f"numbers {last} and {n}: its buffer overwrote them")
