"""Replay a real recording through the core's Python camera path.

Frames of a TIFF time-lapse (T, Y, X) are served by a pure-Python camera at a
fixed rate. Without `photons`, frames are delivered bit-identical to the file.
With `photons`, each frame is treated as the noiseless truth: scaled so its
99.9th percentile collects that many photoelectrons, then exposed with the
same camera noise model as the simulator — real structures at a chosen
light level.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile
from pymmcore_plus.experimental.unicore import CameraDevice, UniMMCore

from dimscope.engines.base import CameraCalibration

from .base import SourceError, paced, release_core, whole_frame_buffer_mb
from .camera_noise import CameraNoise

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

    from .config import ReplaySourceConfig

CAMERA = "ReplayCamera"


def read_recording(path: str) -> np.ndarray:
    """A (T, Y, X) stack from a TIFF; single images become one frame."""
    try:
        data = tifffile.imread(path)
    except Exception as exc:
        raise SourceError(f"cannot read recording {path}: {exc}") from exc
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise SourceError(f"recording {path} has shape {data.shape}; expected (T, Y, X)")
    return np.ascontiguousarray(data)


class ReplayCamera(CameraDevice):
    def __init__(self, cfg: ReplaySourceConfig, stack: np.ndarray) -> None:
        self._cfg = cfg
        self._stack = stack
        self._exposure = 1000.0 / cfg.fps
        self.position = 0
        self._noise: CameraNoise | None = None
        if cfg.photons is not None:
            self._noise = CameraNoise(seed=cfg.seed)
            lo = float(np.percentile(stack, 0.1))
            hi = float(np.percentile(stack, 99.9))
            self._scale = cfg.photons / max(hi - lo, 1e-12)
            self._low = lo
        super().__init__()

    def get_exposure(self) -> float:
        return self._exposure

    def set_exposure(self, exposure: float) -> None:
        self._exposure = float(exposure)

    def shape(self) -> tuple[int, int]:
        return (int(self._stack.shape[1]), int(self._stack.shape[2]))

    @property
    def frame_count(self) -> int:
        return int(self._stack.shape[0])

    def dtype(self) -> DTypeLike:
        return np.uint16 if self._noise is not None else self._stack.dtype

    def truth(self, index: int) -> np.ndarray:
        """Expected photoelectrons behind frame `index` of the recording (re-noised mode)."""
        frame = self._stack[index].astype(np.float32)
        if self._noise is None:
            return frame
        frame -= np.float32(self._low)
        np.maximum(frame, 0, out=frame)
        frame *= np.float32(self._scale)
        frame += np.float32(self._cfg.background_photons)
        return frame

    def start_sequence(self, n: int | None,
                       get_buffer: Callable[[Sequence[int], DTypeLike], np.ndarray]
                       ) -> Iterator[Mapping[str, Any]]:
        shape, dtype = self.shape(), self.dtype()
        n_frames = self._stack.shape[0]

        def frame() -> Mapping[str, Any] | None:
            if self.position >= n_frames:
                if not self._cfg.loop:
                    return None
                self.position = 0
            index = self.position
            buf = get_buffer(shape, dtype)
            if self._noise is None:
                buf[...] = self._stack[index]
            else:
                self._noise.expose(self.truth(index), read_noise_e=self._cfg.read_noise_e,
                                   gain_adu_per_e=self._cfg.gain_adu_per_e,
                                   offset_adu=self._cfg.offset_adu, bit_depth=16, out=buf)
            self.position += 1
            return {"ReplayFrame": str(index), "ReplayFile": self._cfg.path.name}

        return paced(n, self.get_exposure, frame)


class ReplaySource:
    def __init__(self, cfg: ReplaySourceConfig) -> None:
        self.cfg = cfg
        self.name = f"replay:{cfg.path.name}"
        self.overflow_shows_as_gap = True  # Python sequence buffer (see FrameSource)
        self._core: UniMMCore | None = None
        self.camera: ReplayCamera | None = None

    @property
    def core(self) -> UniMMCore:
        if self._core is None:
            raise RuntimeError("source is not open")
        return self._core

    @property
    def ended(self) -> bool:
        """Played once (`loop = false`) to its last frame."""
        camera = self.camera
        return (camera is not None and not self.cfg.loop
                and camera.position >= camera.frame_count)

    @property
    def pixel_size_um(self) -> float:
        return self.cfg.pixel_size_um

    @property
    def calibration(self) -> CameraCalibration | None:
        """Known only when re-noising; a bit-identical replay has the recording's own camera."""
        if self.cfg.photons is None:
            return None
        return CameraCalibration(self.cfg.gain_adu_per_e, self.cfg.offset_adu,
                                 self.cfg.read_noise_e)

    def open(self) -> None:
        stack = read_recording(str(self.cfg.path))
        camera = ReplayCamera(self.cfg, stack)
        # Python camera only: skip the search for a Micro-Manager install (see sim.py).
        core = UniMMCore(mm_path=str(Path(__file__).resolve().parent))
        core.loadPyDevice(CAMERA, camera)
        core.initializeAllDevices()
        core.setCameraDevice(CAMERA)
        height, width = camera.shape()
        frame_bytes = height * width * np.dtype(camera.dtype()).itemsize
        core.setCircularBufferMemoryFootprint(
            whole_frame_buffer_mb(self.cfg.buffer_mb, frame_bytes))  # type: ignore[arg-type]
        self._core, self.camera = core, camera

    def ground_truth(self, camera_frame: int, scale: int = 1) -> np.ndarray:
        """`camera_frame` is the `ReplayFrame` tag: the index into the recording."""
        if self.camera is None:
            raise RuntimeError("source is not open")
        if scale != 1:
            raise ValueError("a replayed recording has ground truth at its own sampling only")
        return self.camera.truth(camera_frame)

    def close(self) -> None:
        if self._core is not None:
            release_core(self._core)
            self._core = None
