"""Live sparse-to-dense prediction for localization microscopy, with its error map and the
`ready` event.

`MeanStage` (node kind `mean`, upstream: raw frames) keeps the running mean of the raw
frames (ADU, float32) and emits it every `every_frames` frames as a frame of kind `mean`
(metadata `frames_averaged`): the widefield image of a run that takes no widefield frame. A
frame its queue drops is left out of the mean (counted), never out of the archive.

`DenseStage` (node kind `dense`, upstream: a `localize` node) accumulates the localizations
(`LocAccumulator`, drift-corrected like the render node; estimates in drift.jsonl) and every
`every_frames` frames, and at the end of the run:

1. predicts the dense image (`smlm.dense.DensePredictor`: the model on dimscope's runtimes,
   tiled for any field) from all localizations so far and the widefield image — the newest
   frame of a `mean` node (`widefield`), or a TIFF taken before the run (`widefield_file`);
2. computes its error map against that widefield image (`smlm.errormap`, camera noise from
   the run's calibration, divided by the frames averaged);
3. evaluates the ready rule (`smlm.ready`);
4. emits a `dense` frame (float32, render grid; metadata: frames and localizations used,
   the model and its weights hash, the widefield source, drift applied, error-map summary)
   and an `error_map` frame (float32, camera grid: the resolution-scaled error in noise σ;
   metadata: flagged share, fitted PSF, the limit of what the map can see), and, the first
   time the rule holds, one `ready` frame: a JSON object (UTF-8 bytes as uint8 pixels) with
   every criterion's value, its header's `smlm` metadata the same values as strings.

Steps 1–3 run in a child process at idle CPU priority (`smlm.dense_step.DenseWorker`), so
they take neither the interpreter lock nor CPU time that acquisition and live localization
need. A prediction waits while more localization blocks are queued (it is of everything so far);
predictions are skipped (counted: `skipped_no_widefield`) until a widefield image exists.
With `[smlm] stop_when_ready` the pipeline is told when `ready` fires (`on_ready`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dimscope.engines import CameraCalibration, EngineError

from .config import DenseNodeConfig, MeanNodeConfig
from .frame import Frame, freeze
from .localize_stage import DRIFT_LOG, LocAccumulator
from .stage import OverflowPolicy, Stage

log = logging.getLogger(__name__)


class MeanStage(Stage):
    """The running mean of the raw frames, emitted every `every_frames` frames."""

    def __init__(self, node: MeanNodeConfig) -> None:
        super().__init__(node.name, node.queue_frames, OverflowPolicy.DROP_OLDEST)
        self.node = node
        self._sum: np.ndarray | None = None
        self.frames_averaged = 0
        self._last: Frame | None = None
        self._emitted_at = 0

    def process(self, frame: Frame) -> None:
        pixels = np.asarray(frame.pixels, np.float64)
        if self._sum is None:
            self._sum = np.zeros(pixels.shape, np.float64)
        self._sum += pixels
        self.frames_averaged += 1
        self._last = frame
        if self.frames_averaged - self._emitted_at >= self.node.every_frames:
            self._emit_mean(frame)

    def _emit_mean(self, frame: Frame) -> None:
        assert self._sum is not None
        mean = (self._sum / self.frames_averaged).astype(np.float32)
        self._emitted_at = self.frames_averaged
        self.emit(frame.replace(pixels=freeze(mean), kind="mean", source_ids=(),
                                metadata={"frames_averaged": str(self.frames_averaged),
                                          "last_frame": str(frame.frame_id)}
                                ).marked(self.name))

    def teardown(self) -> None:
        if self.error is None and self._last is not None and \
                self._emitted_at < self.frames_averaged:
            self._emit_mean(self._last)

    def snapshot(self) -> dict[str, object]:
        snap = super().snapshot()
        snap.update(frames_averaged=self.frames_averaged)
        return snap


def read_widefield(path: Path, camera_shape: tuple[int, int] | None = None
                   ) -> tuple[np.ndarray, int]:
    """A widefield TIFF (one image, or frames: their mean) and the frames it averages;
    EngineError naming the problem (unreadable, not 2-D, not on the camera grid)."""
    import tifffile

    from dimscope.smlm.dense import check_widefield

    try:
        image = np.squeeze(np.asarray(tifffile.imread(str(path)), np.float32))
    except FileNotFoundError:
        raise EngineError(f"widefield image not found: {path}") from None
    except Exception as exc:
        raise EngineError(f"widefield image {path} cannot be read: {exc}") from None
    averaged = 1
    if image.ndim == 3:  # frames: their mean (its noise is that of one frame / their number)
        averaged = image.shape[0]
        image = image.mean(axis=0)
    if image.ndim != 2:
        raise EngineError(f"widefield image {path}: expected a 2-D image or a stack of "
                          f"frames, got shape {image.shape}")
    if camera_shape is not None:
        try:
            check_widefield(image.shape, camera_shape)
        except ValueError as exc:
            raise EngineError(f"widefield image {path}: {exc}") from None
    return image, averaged


class DenseStage(Stage):
    """Dense prediction, error map and ready rule every `every_frames` frames."""

    #: at stop, the blocks still queued and the final prediction of the whole run (a few s)
    drain_timeout_s = 120.0
    #: the node's own work (accumulating, drift) yields to acquisition, the archive and the
    #: localizer (its predictions run in a child process at idle priority)
    nice = 10

    def __init__(self, node: DenseNodeConfig, run_dir: Path, calibration: CameraCalibration,
                 camera_shape: tuple[int, int], camera_pixel_nm: float) -> None:
        super().__init__(node.name, node.queue_frames, OverflowPolicy.DROP_OLDEST)
        from dimscope.smlm.dense import DensePredictor
        from dimscope.smlm.dense_step import DenseStepSettings, DenseWorker
        from dimscope.smlm.errormap import ErrorMapSettings
        self.node = node
        # Read (and checked against its card) here: a missing or altered model is a named
        # node error at graph building, and raw acquisition goes on.
        self.predictor = DensePredictor(node.model, runtime=node.runtime,
                                        allow_unverified=node.allow_unverified,
                                        threads=node.threads)
        self.grid = self.predictor.grid
        self.locs = LocAccumulator(node.name, run_dir / DRIFT_LOG, node.drift_correction,
                                   node.drift_segment_frames)
        self.error_settings = ErrorMapSettings(
            psf_sigma_nm=node.error_map.psf_sigma_nm, flag_sigma=node.error_map.flag_sigma,
            relative_tolerance=node.error_map.relative_tolerance,
            gain_adu_per_e=calibration.gain_adu_per_e, offset_adu=calibration.offset_adu,
            read_noise_e=calibration.read_noise_e)
        self._widefield_lock = threading.Lock()
        self._widefield: tuple[np.ndarray, int, str] | None = None
        if node.widefield_file is not None:
            image, averaged = read_widefield(node.widefield_file, camera_shape)
            self._widefield = (image, averaged, f"file:{node.widefield_file.name}")
        # The steps run in a child process (see smlm.dense_step: in a thread they slowed
        # live localization); it compiles and runs the model once now, for the field it will
        # see: a runtime that cannot run the model is a named node error at start.
        self.field_nm = (camera_shape[1] * camera_pixel_nm, camera_shape[0] * camera_pixel_nm)
        try:
            self.worker = DenseWorker(DenseStepSettings(
                model=self.predictor.path, runtime=node.runtime, threads=node.threads,
                allow_unverified=node.allow_unverified, error_map=self.error_settings,
                ready=node.ready), self.field_nm)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"the dense model cannot run on runtime {node.runtime!r}: "
                              f"{type(exc).__name__}: {exc}") from None
        self._next_prediction = node.every_frames
        self._predicted_frames = -1
        self._last: Frame | None = None
        self.predictions = 0
        self.skipped_no_widefield = 0
        self.ready: dict[str, Any] | None = None
        self.last_check: dict[str, Any] | None = None
        self.prediction_seconds = 0.0
        self._on_ready: list[Callable[[dict[str, Any]], None]] = []

    def on_ready(self, callback: Callable[[dict[str, Any]], None]) -> None:
        self._on_ready.append(callback)

    def widefield_input(self, frame: Frame) -> None:
        """Side input from a `mean` node: keep its newest frame (never queued, never blocks)."""
        if frame.kind != "mean":
            return
        averaged = int(frame.metadata.get("frames_averaged", "1"))
        with self._widefield_lock:
            self._widefield = (np.asarray(frame.pixels, np.float32), averaged,
                               f"mean of {averaged} raw frames")

    def process(self, frame: Frame) -> None:
        self.locs.add(frame)
        self._last = frame
        if self.locs.frames >= self._next_prediction and self.depth == 0:
            self._predict(frame)
            while self._next_prediction <= self.locs.frames:
                self._next_prediction += self.node.every_frames

    def _predict(self, frame: Frame) -> None:
        import time

        from scipy.ndimage import shift as ndi_shift

        from dimscope.smlm import errormap

        with self._widefield_lock:
            widefield = self._widefield
        if widefield is None:
            self.skipped_no_widefield += 1
            log.warning("%s: no widefield image yet (its mean node has not emitted): "
                        "prediction at %d frames skipped", self.name, self.locs.frames)
            return
        image, averaged, origin = widefield
        assert self.locs.field_nm is not None
        if image.shape != self.locs.camera_shape:
            raise ValueError(f"the widefield image is {image.shape} but the camera is "
                             f"{self.locs.camera_shape}")
        started = time.monotonic()
        locs, meta = self.locs.table()
        if origin.startswith("mean of") and self.locs.drift is not None:
            # The mean of drifting raw frames sits at their mean drift; the localizations are
            # corrected to frame 0: shift the mean back, or every edge reads as an error.
            dx, dy = self.locs.mean_drift_nm(averaged)
            px = self.locs.camera_pixel_nm
            image = np.asarray(ndi_shift(image, (-dy / px, -dx / px), order=1,
                                         mode="nearest"), np.float32)
            meta.update(widefield_shift_nm=f"{-dx:.1f},{-dy:.1f}")
        # (the localize node sends its pixel size to 6 digits: 108.333 for 108.3333…)
        if not np.allclose(self.locs.field_nm, self.field_nm, rtol=1e-4):
            raise ValueError(f"the localizations' field {self.locs.field_nm} nm is not the "
                             f"camera's {self.field_nm} nm")
        step = self.worker.run(locs, image, self.locs.frames, averaged,
                               self.locs.camera_pixel_nm)
        dense, check = step.dense, step.check
        self.last_check = check
        self.prediction_seconds += time.monotonic() - started
        self.predictions += 1
        self._predicted_frames = self.locs.frames
        card = self.predictor.card
        meta.update(model=self.predictor.label, model_sha256=card.weights_sha256 or "",
                    widefield=origin, render_pixel_nm=f"{self.grid.render_pixel_nm:g}",
                    flagged=f"{step.flagged_fraction:.5f}",
                    output_blur_px=f"{step.output_blur_px:g}",
                    ready="true" if self.ready is not None or step.ready else "false")
        self.emit(frame.replace(pixels=freeze(dense), kind="dense", source_ids=(),
                                pixel_size_um=self.grid.render_pixel_nm / 1000.0,
                                metadata=meta).marked(self.name))
        trust_meta = {**meta, **{k: str(v) for k, v in step.error_summary.items()},
                      "map": "resolution-scaled error, widefield noise sigma",
                      "flag_sigma": f"{self.error_settings.flag_sigma:g}",
                      "limit": errormap.LIMIT_NOTE}
        self.emit(frame.replace(pixels=freeze(step.error_sigma), kind="error_map",
                                source_ids=(), pixel_size_um=self.locs.camera_pixel_nm / 1000,
                                metadata=trust_meta).marked(self.name))
        if step.ready and self.ready is None:
            self.ready = {**check, "model": self.predictor.label}
            log.info("%s: ready at %d frames (%s)", self.name, self.locs.frames,
                     json.dumps(self.ready))
            payload = np.frombuffer(json.dumps(self.ready).encode(), np.uint8)
            self.emit(frame.replace(pixels=freeze(payload.copy()), kind="ready", source_ids=(),
                                    metadata={k: json.dumps(v) if not isinstance(v, str)
                                              else v for k, v in self.ready.items()}
                                    ).marked(self.name))
            for callback in self._on_ready:
                callback(self.ready)

    def teardown(self) -> None:
        try:
            if self.error is None and self._last is not None and \
                    self._predicted_frames < self.locs.frames:
                self._predict(self._last)  # the whole run, once more at the end
        except Exception as exc:  # the run's shutdown goes on
            log.error("%s: the final prediction failed: %s", self.name, exc)
        finally:
            self.worker.close()

    def snapshot(self) -> dict[str, object]:
        snap = super().snapshot()
        snap.update(predictions=self.predictions, frames=self.locs.frames,
                    skipped_no_widefield=self.skipped_no_widefield,
                    prediction_seconds=round(self.prediction_seconds, 3),
                    ready=self.ready is not None, ready_at_frames=(
                        self.ready or {}).get("frames"), last_check=self.last_check,
                    model=self.predictor.label)
        return snap
