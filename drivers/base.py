"""The one protocol every frame source implements, plus shared core helpers."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """A frame source could not be opened or failed while running."""


@runtime_checkable
class FrameSource(Protocol):
    """A configured Micro-Manager core whose camera the pipeline pops frames from.

    Every source — real hardware, the simulator, a replayed recording — is a
    core; the acquisition stage only ever talks to `core`.
    """

    name: str
    #: True when the core's buffer drops its *oldest* frames on overflow
    #: (pymmcore-plus's Python sequence buffer): a real loss then always shows
    #: as a gap in the `ImageNumber` tags, and the buffer's overflow flag alone
    #: proves nothing. False for MMCore's C++ buffer, which stops the camera.
    overflow_shows_as_gap: bool

    @property
    def core(self) -> CMMCorePlus: ...

    @property
    def pixel_size_um(self) -> float: ...

    @property
    def ended(self) -> bool:
        """True once a finite source (a recording played once) has delivered everything."""
        ...

    def open(self) -> None: ...

    def close(self) -> None: ...


#: how far behind its clock a Python camera may fall and still catch up (seconds)
MAX_CATCH_UP_S = 1.0


def paced(n: int | None, exposure_ms: Callable[[], float],
          frame: Callable[[], Mapping[str, Any] | None]) -> Iterator[Mapping[str, Any]]:
    """A Python camera's sequence: `frame()` (fill the next buffer, return its tags; None
    once the source has run out) `n` times (None: until stopped), on the camera's own clock
    of one exposure per frame, as a hardware-timed sequence: a frame late by a moment (the
    host was busy) is followed at once by the next, as a real camera's buffered frames
    would be; a camera more than `MAX_CATCH_UP_S` behind (slower than its exposure) starts
    its clock again, with no burst."""
    remaining = n if n is not None else -1
    next_due = time.perf_counter()
    while remaining != 0:
        next_due += exposure_ms() / 1000.0
        tags = frame()
        if tags is None:
            return
        delay = next_due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        elif delay < -MAX_CATCH_UP_S:
            next_due = time.perf_counter()
        yield tags
        remaining -= 1


def whole_frame_buffer_mb(buffer_mb: float, frame_bytes: int) -> float:
    """The largest buffer size <= `buffer_mb` that holds a whole number of frames.

    pymmcore-plus 0.18's Python `SequenceBuffer` loses track of its tail when a
    frame does not fit in the space left before the end of its pool, and then
    flags an overflow (and may evict unread frames) although the consumer kept
    up. A pool of exactly N frames never leaves such a gap.
    """
    frames = int(buffer_mb * 2**20) // frame_bytes
    if frames < 2:
        raise SourceError(f"sequence buffer of {buffer_mb:g} MB holds {frames} frame(s) of "
                          f"{frame_bytes} bytes; it needs at least 2 (raise buffer_mb)")
    return frames * frame_bytes / 2**20


def release_core(core: CMMCorePlus) -> None:
    """Stop acquisition and unload devices so the interpreter can exit cleanly.

    With C++ adapters loaded, leaving devices and the core's callback relay to
    interpreter teardown can abort the process (exit code 134); releasing them
    explicitly here avoids that.
    """
    import pymmcore

    with contextlib.suppress(Exception):
        if core.isSequenceRunning():
            core.stopSequenceAcquisition()
    with contextlib.suppress(Exception):
        core.mda.cancel()
    with contextlib.suppress(Exception):
        pymmcore.CMMCore.registerCallback(core, None)
    try:
        core.unloadAllDevices()
    except Exception as exc:
        log.warning("unloading devices failed: %s", exc)
