"""MDA time-lapses: a useq-schema `MDASequence` run by pymmcore-plus's runner on the same core.

`MDAAcquisition` replaces the live-streaming acquisition (`--mda`, `[mda]`): the
runner snaps each planned event on its thread; every frame it reports goes to the
raw archive (FAIL policy: a frame that cannot be archived cancels the sequence
with a specific error) and to the engine / publishers, carrying its MDA indices
(t, c, z, ...). A sequence that ends with fewer frames than planned, without
being stopped, is an error.

`SequenceRun` is one sequence through an acquisition's fan-out; the control
socket's `mda.run` uses it too, on a live run whose streaming is stopped (frame
ids continue from the live frames).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .acquisition import Acquisition, AcquisitionError, AcquisitionMode
from .stage import Stage

log = logging.getLogger(__name__)


class MDAError(ValueError):
    """An MDA sequence file or block that cannot be used; the message names it."""


def load_sequence(spec: str | Path | dict[str, Any], base_dir: Path | None = None) -> Any:
    """A useq `MDASequence` from a YAML/JSON file or a dict (a config's `[mda]` block)."""
    import useq
    from pydantic import ValidationError

    if isinstance(spec, dict):
        if "file" in spec:
            extra = sorted(set(spec) - {"file"})
            if extra:
                raise MDAError(f"[mda]: give either `file` or inline sequence keys, not both "
                               f"(also got {extra})")
            return load_sequence(spec["file"], base_dir)
        try:
            return useq.MDASequence.model_validate(spec)
        except ValidationError as exc:
            raise MDAError(f"[mda]: not a valid useq MDASequence: {exc}") from None
    path = Path(spec).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise MDAError(f"MDA sequence file not found: {path}")
    try:
        return useq.MDASequence.from_file(path)
    except (ValidationError, ValueError, OSError) as exc:
        raise MDAError(f"MDA sequence {path}: {exc}") from None


class SequenceRun:
    """One useq sequence run by pymmcore-plus's runner on the calling thread, every frame
    it reports handed on by `acquisition` (archive first) with its MDA indices."""

    def __init__(self, acquisition: Acquisition, sequence: Any) -> None:
        self.acquisition = acquisition
        self.sequence = sequence
        self.planned = sum(1 for _ in sequence)
        self.cancelled = False
        #: why the sequence was cancelled from inside (a frame that could not be archived)
        self.error: AcquisitionError | None = None

    def run(self) -> None:
        """Blocks until the sequence ends; raises the archive error that cancelled it."""
        if self.cancelled:  # cancelled before it started
            return
        core = self.acquisition.source.core
        core.mda.events.frameReady.connect(self._on_frame)
        try:
            core.mda.run(self.sequence)
        finally:
            core.mda.events.frameReady.disconnect(self._on_frame)
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True
        with contextlib.suppress(Exception):
            self.acquisition.source.core.mda.cancel()

    def _on_frame(self, image: np.ndarray, event: Any, meta: Any) -> None:
        if self.error is not None:
            return
        acq = self.acquisition
        mono, unix = time.monotonic_ns(), time.time_ns()
        index = {str(getattr(k, "value", k)): int(v) for k, v in event.index.items()}
        exposure = event.exposure if event.exposure is not None else acq.source.core.getExposure()
        metadata = {str(k): str(v) for k, v in (meta or {}).items()
                    if isinstance(v, str | int | float)}
        frame = acq._make_frame(np.array(image), metadata, mono, unix, mda_index=index,
                                exposure_ms=float(exposure))
        try:
            acq._dispatch(frame)
        except AcquisitionError as exc:
            # Raised from the runner's callback it would be lost: keep it, stop the sequence.
            self.error = exc
            acq.source.core.mda.cancel()


class MDAAcquisition(Acquisition):
    def __init__(self, source: Any, archive: Stage, consumers: list[Stage], sequence: Any,
                 **kwargs: Any) -> None:
        super().__init__(source, archive, consumers, poll_sleep_s=0.0, **kwargs)
        self.sequence = sequence
        self.planned = sum(1 for _ in sequence)
        self._accepting = False  # the sequence owns the core: the control socket reads only
        # Made now, so a stop requested before the thread runs cancels it too.
        self._sequence_run = SequenceRun(self, sequence)

    def _run(self) -> None:
        run = self._sequence_run
        assert run is not None
        try:
            self._pixel_size_um = float(self.source.pixel_size_um)
            self.started_mono = time.monotonic()
            self.mode = AcquisitionMode.MDA
            run.run()  # blocks this thread until the sequence ends
            if not run.cancelled and self.counters.received != self.planned:
                raise AcquisitionError(f"the MDA sequence ended after {self.counters.received} "
                                       f"of {self.planned} planned frames")
        except BaseException as exc:
            self.error = exc
            log.error("MDA acquisition stopped: %s", exc)
            if self._on_error is not None:
                self._on_error(exc)
        finally:
            self._sequence_run = None
            if self.stop_requested_mono is None:
                self.stop_requested_mono = time.monotonic()
            self.mode = AcquisitionMode.FINISHED
            self.finished.set()
