"""MDA time-lapses: a useq-schema `MDASequence` run by pymmcore-plus's runner on the same core.

`MDAAcquisition` replaces the live-streaming acquisition: the runner snaps
each planned event on its thread; every frame it reports goes to the raw
archive (FAIL policy: a frame that cannot be archived cancels the sequence
with a specific error) and to the engine / publishers, carrying its MDA
indices (t, c, z, ...). A sequence that ends with fewer frames than planned,
without being stopped, is an error.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .acquisition import Acquisition, AcquisitionError
from .frame import Frame, freeze, pixel_checksum
from .stage import QueueFullError, Stage, StageFailedError

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


class MDAAcquisition(Acquisition):
    def __init__(self, source: Any, archive: Stage, consumers: list[Stage], sequence: Any,
                 **kwargs: Any) -> None:
        super().__init__(source, archive, consumers, poll_sleep_s=0.0, **kwargs)
        self.sequence = sequence
        self.planned = sum(1 for _ in sequence)
        self._cancelled = False

    def request_stop(self) -> None:
        super().request_stop()
        self._cancelled = True
        with contextlib.suppress(Exception):
            self.source.core.mda.cancel()

    def _run(self) -> None:
        core = self.source.core
        core.mda.events.frameReady.connect(self._on_frame)
        try:
            self._pixel_size_um = float(self.source.pixel_size_um)
            self.started_mono = time.monotonic()
            core.mda.run(self.sequence)  # blocks this thread until the sequence ends
            if self.error is not None:
                raise self.error
            if not self._cancelled and self.counters.received != self.planned:
                raise AcquisitionError(f"the MDA sequence ended after {self.counters.received} "
                                       f"of {self.planned} planned frames")
        except BaseException as exc:
            if self.error is None or exc is not self.error:
                self.error = exc
            log.error("MDA acquisition stopped: %s", exc)
            if self._on_error is not None:
                self._on_error(exc)
        finally:
            core.mda.events.frameReady.disconnect(self._on_frame)
            if self.stop_requested_mono is None:
                self.stop_requested_mono = time.monotonic()
            self.finished.set()

    def _on_frame(self, image: np.ndarray, event: Any, meta: Any) -> None:
        if self.error is not None:
            return
        mono, unix = time.monotonic_ns(), time.time_ns()
        index = {str(getattr(k, "value", k)): int(v) for k, v in event.index.items()}
        exposure = event.exposure if event.exposure is not None else self.source.core.getExposure()
        pixels = freeze(np.array(image))
        frame = Frame(
            frame_id=self.counters.received, pixels=pixels, checksum=pixel_checksum(pixels),
            acquired_unix_ns=unix, exposure_ms=float(exposure),
            pixel_size_um=self._pixel_size_um, source=self.source.name,
            metadata={str(k): str(v) for k, v in (meta or {}).items()
                      if isinstance(v, str | int | float)},
            marks=(("acquired", mono),), mda_index=index,
        )
        self.counters.received += 1
        try:
            self.archive.offer(frame, wait_s=self.archive_wait_s)
        except (QueueFullError, StageFailedError) as exc:
            self.error = AcquisitionError(f"raw frame {frame.frame_id} (MDA {index}) could not "
                                          f"be archived: {exc}")
            self.source.core.mda.cancel()
            return
        for consumer in self.consumers:
            with contextlib.suppress(StageFailedError):
                consumer.offer(frame)
        self.counters.passed += 1
