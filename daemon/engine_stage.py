"""Engine stage: runs an `Engine` on the newest raw frame, emits enhanced frames.

Its queue holds `queue_frames` (default 1) frames with the DROP_OLDEST
policy: when the engine is slower than the camera it always works on the
newest frame and counts every frame it skipped as `dropped`. The raw archive
is unaffected — it has its own queue.
"""

from __future__ import annotations

import logging

from dimscope.engines import CameraCalibration, Engine, EngineError

from .frame import Frame, freeze
from .stage import OverflowPolicy, Stage

log = logging.getLogger(__name__)

#: consecutive failing frames after which the engine is taken out of service
MAX_CONSECUTIVE_ERRORS = 10


class EngineStage(Stage):
    def __init__(self, engine: Engine, calibration: CameraCalibration, queue_frames: int) -> None:
        super().__init__("engine", queue_frames, OverflowPolicy.DROP_OLDEST)
        self.engine = engine
        self.calibration = calibration
        self._prepared_for: tuple[tuple[int, ...], str] | None = None
        self._consecutive_errors = 0

    def process(self, frame: Frame) -> None:
        key = (frame.shape, frame.dtype.str)
        if key != self._prepared_for:
            self.engine.prepare(frame.shape, frame.dtype, self.calibration)
            self._prepared_for = key
        started = frame.marked("engine_start")
        try:
            out = self.engine.process(frame.pixels)
        except Exception as exc:  # one bad frame must not end enhancement for good
            self._consecutive_errors += 1
            log.warning("engine %s failed on frame %d: %s", self.engine.info.name,
                        frame.frame_id, exc)
            if self._consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                # Stage._run counts this last frame's error when it takes the stage down.
                raise EngineError(f"engine {self.engine.info.name!r} failed on "
                                  f"{MAX_CONSECUTIVE_ERRORS} consecutive frames; last: {exc}"
                                  ) from exc
            self.counters.errors += 1
            return
        self._consecutive_errors = 0
        scale = self.engine.scale
        enhanced = started.replace(
            pixels=freeze(out), kind="enhanced", engine=self.engine.info,
            source_ids=(frame.frame_id,), pixel_size_um=frame.pixel_size_um / scale,
        ).marked("engine_done")
        self.emit(enhanced)

    def teardown(self) -> None:
        self.engine.close()
