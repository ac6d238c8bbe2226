"""Acquisition: pop every frame from the core and hand it to the archive and the rest.

The archive must accept every frame (its queue has the FAIL policy). When its
queue is full the loop waits (`archive.backpressure_s`) while new frames wait
in the camera's own buffer; if there is still no room, acquisition stops with
`AcquisitionError`. A frame lost in the camera's buffer meanwhile stops the run
too, with the count (ImageNumber gap). Other consumers drop by their own
policies and never slow this loop down.

The control socket (`control.py`) changes the microscope through this thread only:
`submit(fn)` runs `fn` here between two pops, so no frame is half-handled and every
change has an exact place in the frame sequence. `change_between_frames` first
hands on every frame already in the camera's buffer (they were taken with the old
setting), then applies the change; for a camera setting it stops the sequence
around the change and restarts it (Micro-Manager cameras often refuse or misapply
changes while sequencing), so the first frame after it is wholly new. Live
streaming can be stopped and restarted without ending the run (`pause`, `resume`);
while stopped, single frames (`snap`) and useq MDA sequences (`queue_sequence`)
go through the same fan-out, with frame ids continuing.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

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
    #: a localization run had enough frames (`[smlm] stop_when_ready` and the ready rule)
    READY = "ready"


class AcquisitionMode(enum.StrEnum):
    """What the acquisition thread is doing (the control socket's `status` shows it)."""

    STARTING = "starting"
    #: live streaming: the camera's sequence acquisition runs
    STREAMING = "streaming"
    #: live streaming stopped by the control socket; the run goes on (snap, mda.run)
    STOPPED = "stopped"
    #: a useq MDA sequence is running (from --mda, or `mda.run` on the control socket)
    MDA = "mda"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class ChangePoint:
    """Where a change landed in the frame sequence."""

    #: the id the next frame delivered after the change gets
    next_frame_id: int
    #: the first frame wholly taken with the new setting: `next_frame_id` when the camera
    #: was stopped around the change (or not streaming); one more when it kept streaming,
    #: since the frame it was exposing at that moment straddles the change
    from_frame_id: int
    #: the camera's sequence was stopped and restarted around the change
    sequence_restarted: bool
    #: how long the sequence was stopped (ms), when it was
    stopped_ms: float | None


class AcquisitionBusyError(RuntimeError):
    """The acquisition is not in a state where this change can run (message says why)."""


T = TypeVar("T")


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
        self._stop_reason: FinishReason | None = None
        #: frames still in the camera's buffer when an error stopped acquisition
        self.left_in_camera = 0
        self._pixel_size_um = 1.0
        self.mode = AcquisitionMode.STARTING
        #: the newest frame handed on (a reference, no copy): a new engine is tried on it
        self.last_frame: Frame | None = None
        #: changes waiting to run on this thread, between two frames
        self._commands: deque[tuple[Callable[[Any], Any], Future[Any]]] = deque()
        self._commands_lock = threading.Lock()
        self._accepting = True
        self._wake = threading.Event()
        self._queued_sequence: Any = None
        self._sequence_run: Any = None  # the running mda.SequenceRun, for cancel
        #: what the last sequence started by `queue_sequence` did (status shows it)
        self.last_sequence: dict[str, Any] | None = None

    @property
    def next_frame_id(self) -> int:
        return self.counters.received

    @property
    def accepts_changes(self) -> bool:
        """False for an --mda run (its sequence owns the core) and once acquisition ended."""
        return self._accepting and not self.finished.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dimscope-acquisition",
                                        daemon=True)
        self._thread.start()

    def request_stop(self, reason: FinishReason | None = None) -> None:
        """Stop after the frame in hand; `reason` (default: stopped) is the finish reason."""
        if reason is not None and self._stop_reason is None:
            self._stop_reason = reason
        if self.stop_requested_mono is None:
            self.stop_requested_mono = time.monotonic()
        self._stop.set()
        self._wake.set()
        self.cancel_sequence()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> dict[str, object]:
        snap: dict[str, object] = dict(self.counters.snapshot(0, 0))
        if self.error is not None:
            snap["error"] = str(self.error)
        return snap

    # -- changes from the control socket (called from any thread) ------------------------
    def submit(self, change: Callable[[Any], T]) -> Future[T]:
        """Run `change(core)` on the acquisition thread between two frames.

        The future fails with AcquisitionBusyError when this acquisition takes no
        changes (an --mda run, or one that has ended)."""
        future: Future[T] = Future()
        with self._commands_lock:
            if not self._accepting or self.finished.is_set():
                future.set_exception(AcquisitionBusyError(
                    "acquisition has ended" if self.finished.is_set() else
                    "this run's acquisition takes no changes (an MDA run started with --mda)"))
                return future
            self._commands.append((change, future))
        self._wake.set()
        return future

    def cancel_sequence(self) -> bool:
        """Cancel a running or queued MDA sequence (any thread); True if there was one."""
        run, queued = self._sequence_run, self._queued_sequence
        self._queued_sequence = None
        if run is not None:
            run.cancel()
        return run is not None or queued is not None

    def _refuse_commands(self, why: str) -> None:
        with self._commands_lock:
            self._accepting = False
            pending, self._commands = list(self._commands), deque()
        for _, future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(AcquisitionBusyError(why))

    def _run_commands(self, core: Any) -> None:
        while True:
            with self._commands_lock:
                if not self._commands:
                    return
                change, future = self._commands.popleft()
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up waiting before it ran: nothing changed
            try:
                future.set_result(change(core))
            except AcquisitionError as exc:  # a raw frame could not be kept: stop the run
                future.set_exception(exc)
                raise
            except Exception as exc:  # the change failed; acquisition goes on
                future.set_exception(exc)

    # -- inside a submitted change (the acquisition thread) -------------------------------
    def change_between_frames(self, apply: Callable[[], T], *, camera: bool
                              ) -> tuple[T, ChangePoint]:
        """Apply a change at a frame boundary. `camera`: it changes the camera itself, so
        a streaming sequence is stopped around it and restarted."""
        core = self.source.core
        streaming = self.mode is AcquisitionMode.STREAMING and core.isSequenceRunning()
        restart = streaming and camera
        t0 = time.perf_counter()
        if restart:
            core.stopSequenceAcquisition()
        try:
            self._drain(core)  # frames taken before the change keep their ids and tags
            next_id = self.counters.received
            result = apply()
        finally:
            if restart:
                self._restart_after_change(core)
        stopped_ms = (time.perf_counter() - t0) * 1e3 if restart else None
        straddles = streaming and not restart
        return result, ChangePoint(next_id, next_id + int(straddles), restart, stopped_ms)

    def _restart_after_change(self, core: Any) -> None:
        """Restart the camera's sequence after a change; once more if it refuses; then stop
        the run with an error that says so (not a misleading "camera stopped delivering")."""
        try:
            self._start_sequence(core)
        except Exception as first:
            log.warning("the camera did not restart after a control change (%s); retrying",
                        first)
            try:
                self._start_sequence(core)
            except Exception as exc:
                raise AcquisitionError(
                    f"the camera did not restart its sequence after a control change: {exc} "
                    "(every frame taken before the change is archived)") from exc

    def pause(self) -> int:
        """Stop live streaming, hand on every frame already taken, close the shutter;
        the run goes on. Returns the id the next frame will get."""
        core = self.source.core
        if self.mode is AcquisitionMode.STREAMING:
            if core.isSequenceRunning():
                core.stopSequenceAcquisition()
            self._drain(core)
            self._set_shutter(core, False)
            self.mode = AcquisitionMode.STOPPED
        return self.counters.received

    def resume(self) -> int:
        """Restart live streaming after `pause`; returns the id of its first frame."""
        core = self.source.core
        if self.mode is AcquisitionMode.STOPPED:
            self._set_shutter(core, True)
            if not self._start_sequence(core):
                self._set_shutter(core, False)
                raise AcquisitionBusyError(f"the run's frame limit ({self.max_frames}) is "
                                           "reached")
            self.mode = AcquisitionMode.STREAMING
        return self.counters.received

    def snap(self) -> Frame:
        """One frame from the camera while live streaming is stopped, handed on like
        every other (archived, enhanced, published)."""
        if self.mode is not AcquisitionMode.STOPPED:
            raise AcquisitionBusyError(
                f"acquisition is {self.mode}: snap takes a single frame while live streaming "
                "is stopped (acquisition.stop first); while streaming every frame is already "
                "archived and published")
        core = self.source.core
        core.snapImage()  # the core opens and closes the shutter itself (auto-shutter)
        pixels = core.getImage()
        mono, unix = time.monotonic_ns(), time.time_ns()
        meta = {"Snap": "1", "Exposure-ms": f"{float(core.getExposure()):.4f}"}
        frame = self._make_frame(pixels, meta, mono, unix)
        self._dispatch(frame)
        return frame

    def queue_sequence(self, sequence: Any) -> tuple[int, int]:
        """Run a useq MDA sequence on this thread as soon as the current change returns;
        live streaming must be stopped. Returns (planned frames, id of its first frame)."""
        if self.mode is not AcquisitionMode.STOPPED:
            raise AcquisitionBusyError(
                f"acquisition is {self.mode}: an MDA sequence runs only while live streaming "
                "is stopped (acquisition.stop first; acquisition.start resumes streaming "
                "after it)")
        planned = sum(1 for _ in sequence)
        self._queued_sequence = sequence
        self.mode = AcquisitionMode.MDA
        return planned, self.counters.received

    # -----------------------------------------------------------------------
    def _set_shutter(self, core: Any, open_: bool) -> None:
        if core.getShutterDevice() and core.getAutoShutter():
            core.setShutterOpen(open_)

    def _start_sequence(self, core: Any) -> bool:
        """Start (or restart) the camera's sequence; False when the frame limit is reached."""
        if self.max_frames is not None:
            left = self.max_frames - self.counters.received
            if left <= 0:
                return False
            core.startSequenceAcquisition(left, 0.0, True)
        else:
            core.startContinuousSequenceAcquisition(0.0)
        self._last_image_number = None  # a new sequence numbers its images from 0 again
        return True

    def _run(self) -> None:
        core = self.source.core
        try:
            self._pixel_size_um = float(self.source.pixel_size_um)  # not per frame
            self._set_shutter(core, True)
            self._start_sequence(core)
            self.started_mono = time.monotonic()
            self.mode = AcquisitionMode.STREAMING
            self.finish_reason = self._loop(core)
        except BaseException as exc:
            self.error = exc
            self.finish_reason = FinishReason.ERROR
            log.error("acquisition stopped: %s", exc)
            if self._on_error is not None:
                self._on_error(exc)
        finally:
            self._refuse_commands("acquisition has ended")
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
                    self._set_shutter(core, False)
                except Exception:
                    log.warning("could not close the shutter after acquisition")
                self.mode = AcquisitionMode.FINISHED
                self.finished.set()

    def _loop(self, core: Any) -> FinishReason:
        reason = FinishReason.STOPPED
        while not self._stop.is_set():
            if self._commands:
                self._run_commands(core)
            if self._queued_sequence is not None:
                self._run_queued_sequence()
                continue
            if self.mode is not AcquisitionMode.STREAMING:
                # Stopped by the control socket: wait for the next change, not a frame.
                self._wake.wait(0.05)
                self._wake.clear()
                continue
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
        if reason is FinishReason.STOPPED and self._stop_reason is not None:
            reason = self._stop_reason
        return reason

    @property
    def running_sequence(self) -> Any:
        """The useq sequence an `mda.run` from the control socket is running now, else None."""
        run = self._sequence_run
        return run.sequence if run is not None else None

    def _run_queued_sequence(self) -> None:
        """Run the sequence `queue_sequence` took (blocks this thread until it ends; the
        control socket answers meanwhile and `acquisition.stop` cancels it)."""
        from .mda import SequenceRun

        sequence, self._queued_sequence = self._queued_sequence, None
        run = SequenceRun(self, sequence)
        self._sequence_run = run
        first = self.counters.received
        try:
            run.run()  # an archive failure raises AcquisitionError: the run stops
        finally:
            self._sequence_run = None
            self.mode = AcquisitionMode.STOPPED
            frames = self.counters.received - first
            self.last_sequence = {
                "planned": run.planned, "frames": frames, "first_frame_id": first,
                "cancelled": run.cancelled,
                "error": None if run.cancelled or frames == run.planned else
                f"the MDA sequence ended after {frames} of {run.planned} planned frames"}
            if self.last_sequence["error"]:
                log.error("control: %s", self.last_sequence["error"])

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
        self._dispatch(self._make_frame(pixels, meta, mono, unix))

    def _make_frame(self, pixels: Any, meta: dict[str, str], mono: int, unix: int,
                    mda_index: Mapping[str, int] | None = None,
                    exposure_ms: float | None = None) -> Frame:
        """A raw frame with the next id. Its exposure is the camera's tag for it (the
        exposure it was taken with); the core's current setting only when untagged."""
        if exposure_ms is None:
            try:
                exposure_ms = float(meta.get("Exposure-ms", "nan"))
            except ValueError:
                exposure_ms = float("nan")
            if exposure_ms != exposure_ms:  # NaN: camera did not tag it
                exposure_ms = float(self.source.core.getExposure())
        frozen = freeze(pixels)
        return Frame(
            frame_id=self.counters.received, pixels=frozen, acquired_unix_ns=unix,
            checksum=pixel_checksum(frozen),
            exposure_ms=exposure_ms, pixel_size_um=self._pixel_size_um,
            source=self.source.name, metadata=meta, marks=(("acquired", mono),),
            mda_index=dict(mda_index or {}),
        )

    def _dispatch(self, frame: Frame) -> None:
        """Archive (must accept: AcquisitionError otherwise), then every other consumer."""
        self.counters.received += 1
        try:
            self.archive.offer(frame, wait_s=self.archive_wait_s)
        except (QueueFullError, StageFailedError) as exc:
            where = f" (MDA {dict(frame.mda_index)})" if frame.mda_index else ""
            raise AcquisitionError(f"raw frame {frame.frame_id}{where} could not be archived: "
                                   f"{exc}") from exc
        for consumer in self.consumers:
            # A failed viewer/engine stage reports itself; raw data is unaffected.
            with contextlib.suppress(StageFailedError):
                consumer.offer(frame)
        self.counters.passed += 1
        self.last_frame = frame

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
