"""Interpolation stage: synthesises the frames between consecutive frames, live.

For each new frame n it produces `factor - 1` frames at t = k/factor between
frame n-1 and frame n, in time order, and emits them to the `interpolated`
publisher. Each carries kind "interpolated", its fraction `t`, a synthetic
acquisition timestamp interpolated between its two sources, and both source
frame ids (earlier first). It never reaches the raw archive.

Deadline: the pair (n-1, n) must be done before frame n+1 arrives. When a
newer frame is already waiting, the remaining frames of the pair are skipped
and counted (`late`); the queue keeps only the newest frame and counts what
it discards (`dropped`).

Trust (`[trust] enabled`): each synthesised frame is checked against the raw frames of
its two neighbours moved to its time by the motion between them
(`engines.trust.InterpolatedTrust`); the score is in its header, the map goes to topic
`interp_trust`, alerts are counted (`trust_alerts`).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from dimscope.engines import CameraCalibration
from dimscope.engines.interpolators import Interpolator
from dimscope.engines.trust import InterpolatedTrust, TrustReport, TrustSettings

from .frame import Frame, freeze
from .metrics import LatencyWindow
from .stage import OverflowPolicy, Stage

log = logging.getLogger(__name__)


class InterpolationStage(Stage):
    def __init__(self, interpolator: Interpolator, factor: int, name: str = "interpolate",
                 queue_frames: int = 1, trust: TrustSettings | None = None,
                 calibration: CameraCalibration | None = None) -> None:
        super().__init__(name, queue_frames, OverflowPolicy.DROP_OLDEST)
        self.trust = (InterpolatedTrust(calibration or CameraCalibration(measured=False), trust)
                      if trust is not None else None)
        self.trust_alerts = 0
        self.trust_ms = LatencyWindow()
        if factor < 2:
            raise ValueError(f"interpolation factor must be >= 2, got {factor}")
        self.interpolator = interpolator
        self.factor = factor
        # Previous frame per MDA position (channel, z, stage position...): in a
        # time-lapse with z-stacks, frames are interpolated in time at each z, never
        # across z. Live streaming has one position, ().
        self._previous: dict[tuple[tuple[str, int], ...], Frame] = {}
        self._prepared_for: tuple[int, ...] | None = None

    def process(self, frame: Frame) -> None:
        position = tuple(sorted((k, v) for k, v in frame.mda_index.items() if k != "t"))
        previous = self._previous.get(position)
        self._previous[position] = frame
        if previous is None or previous.shape != frame.shape:
            return
        if frame.shape != self._prepared_for:
            self.interpolator.prepare(frame.shape)
            self._prepared_for = frame.shape
        span_ns = frame.acquired_unix_ns - previous.acquired_unix_ns
        for k in range(1, self.factor):
            if self.depth > 0:  # frame n+1 is here: this pair is out of time
                self.counters.late += self.factor - k
                return
            t = k / self.factor
            started = time.monotonic_ns()
            pixels = self.interpolator.between(previous.pixels, frame.pixels, t)
            out = frame.replace(
                pixels=freeze(pixels), kind="interpolated", engine=self.interpolator.info,
                source_ids=(previous.frame_id, frame.frame_id),
                acquired_unix_ns=previous.acquired_unix_ns + round(t * span_ns),
                metadata={}, t=t, budget=None, tier=None, raw=None,
                trust=self._score(previous, frame, pixels, t),
                mda_index={**frame.mda_index, **({"t": frame.mda_index["t"] - 1}
                                                 if "t" in frame.mda_index else {})},
            ).marked("interp_start", started).marked("interp_done")
            self.emit(out)

    def _score(self, a: Frame, b: Frame, pixels: np.ndarray, t: float) -> TrustReport | None:
        """The synthesised frame against its neighbours' raw frames (None without trust,
        or for neighbours that carry no raw frame)."""
        raw_a = a.raw if a.raw is not None else (a.pixels if a.kind == "raw" else None)
        raw_b = b.raw if b.raw is not None else (b.pixels if b.kind == "raw" else None)
        if self.trust is None or raw_a is None or raw_b is None or raw_a.ndim != 2:
            return None
        started = time.monotonic_ns()
        scale = b.engine.scale if b.engine is not None and b.kind == "enhanced" else 1
        try:
            report = self.trust.measure_interpolated(raw_a, raw_b, a.pixels, b.pixels, pixels,
                                                     t, scale)
        except Exception as exc:  # a trust failure must not end interpolation: say so, go on
            log.error("interpolated frames are published without trust maps from now on: %s",
                      exc)
            self.trust = None
            return None
        self.trust_ms.add((time.monotonic_ns() - started) / 1e6)
        self.trust_alerts += int(report.score.alert)
        return report

    def snapshot(self) -> dict[str, object]:
        snap = super().snapshot()
        if self.trust is not None:
            snap.update({"trust_alerts": self.trust_alerts,
                         "trust_ms": self.trust_ms.summary()})
        return snap

    def teardown(self) -> None:
        self.interpolator.close()
