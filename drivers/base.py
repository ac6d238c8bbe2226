"""The one protocol every frame source implements, plus shared core helpers."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
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

    @property
    def core(self) -> CMMCorePlus: ...

    @property
    def pixel_size_um(self) -> float: ...

    def open(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class GroundTruthSource(Protocol):
    """A source that knows the noiseless image behind each frame it produced."""

    def ground_truth(self, camera_frame: int, scale: int = 1) -> np.ndarray: ...


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
