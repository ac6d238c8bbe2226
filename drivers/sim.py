"""The embedded default source: a simulated low-light fluorescence microscope.

Pure-Python devices — a camera, a laser with shutter and power, a Z stage —
loaded into a real `UniMMCore`, so everything downstream (sequence
acquisition, property changes, MDA) goes through the same Micro-Manager core
API as real hardware.

Physics per frame: expected photoelectrons = QE-weighted photon rate x
exposure x laser power x bleaching x defocus, plus autofluorescence
background; then Poisson shot noise, Gaussian read noise, gain, offset, and
clipping at the bit depth (see `camera_noise`). Bleaching follows the
delivered light dose (power x exposure) with the shutter open.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pymmcore_plus.experimental.unicore import (
    CameraDevice,
    ShutterDevice,
    StageDevice,
    UniMMCore,
    pymm_property,
)

from dimscope.engines.base import CameraCalibration

from .base import paced, release_core, whole_frame_buffer_mb
from .camera_noise import CameraNoise
from .specimen import Specimen, SpecimenState

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

    from .config import SimSourceConfig

CAMERA, LASER, FOCUS = "SimCamera", "SimLaser", "SimZ"


class SimScope:
    """Shared physical state of the simulated microscope (what the devices act on)."""

    def __init__(self, cfg: SimSourceConfig) -> None:
        self.cfg = cfg
        self.specimen = Specimen(cfg.height, cfg.width, seed=cfg.seed, n_tubules=cfg.n_tubules,
                                 n_puncta=cfg.n_puncta, psf_sigma_px=cfg.psf_sigma_px,
                                 drift_px_per_s=cfg.drift_px_per_s)
        self.noise = CameraNoise(seed=cfg.seed + 1)
        self.laser_open = False
        # Set by SimSource to the core's auto-shutter flag (used for snaps).
        self.autoshutter: Callable[[], bool] = lambda: False
        self.laser_power = cfg.excitation_power
        self.z_um = 0.0
        self.dose = 0.0  # accumulated power x ms with the shutter open
        self.t0 = time.monotonic()
        self._states: OrderedDict[int, SpecimenState] = OrderedDict()
        self._signal: dict[int, tuple[float, float]] = {}
        self._states_lock = threading.Lock()
        self.frames_rendered = 0

    def signal_scale(self, exposure_ms: float) -> tuple[float, float]:
        """(photoelectrons at relative intensity 1, background photoelectrons) for one frame."""
        if not self.laser_open:
            return 0.0, 0.0
        power = self.laser_power
        bleach = float(np.exp(-self.dose / self.cfg.bleach_dose))
        defocus = 1.0 / (1.0 + (self.z_um / self.cfg.depth_of_field_um) ** 2)
        peak = self.cfg.photons_per_ms * exposure_ms * power * bleach * defocus
        background = self.cfg.background_photons_per_ms * exposure_ms * power
        return peak, background

    def capture(self, exposure_ms: float, out: np.ndarray) -> dict[str, Any]:
        """Render and expose one frame into `out`; remember its state for ground truth."""
        t = time.monotonic() - self.t0
        peak, background = self.signal_scale(exposure_ms)
        state = self.specimen.state_at(t, brightness=1.0)
        relative = self.specimen.render(state)
        relative *= np.float32(peak)
        relative += np.float32(background)
        if self.laser_open:
            self.dose += self.laser_power * exposure_ms
        self.noise.expose(relative, read_noise_e=self.cfg.read_noise_e,
                          gain_adu_per_e=self.cfg.gain_adu_per_e, offset_adu=self.cfg.offset_adu,
                          bit_depth=self.cfg.bit_depth, out=out)
        index = self.frames_rendered
        self.frames_rendered += 1
        history = self.cfg.ground_truth_history
        with self._states_lock:
            if history == 0:  # nobody can ask: keep nothing
                return self._tags(index, t, peak, background)
            self._states[index] = SpecimenState(state.time_s, state.shift_y2, state.shift_x2,
                                                state.puncta_yx, 1.0)
            self._signal[index] = (peak, background)
            while len(self._states) > history:
                old, _ = self._states.popitem(last=False)
                self._signal.pop(old, None)
        return self._tags(index, t, peak, background)

    @staticmethod
    def _tags(index: int, t: float, peak: float, background: float) -> dict[str, Any]:
        return {"SimFrame": str(index), "SimTime_s": f"{t:.6f}",
                "SimPhotonsPeak": f"{peak:.4f}", "SimPhotonsBackground": f"{background:.4f}"}

    def ground_truth(self, camera_frame: int, scale: int = 1) -> np.ndarray:
        """Expected photoelectrons (no noise) of frame `camera_frame` (the `SimFrame` tag).

        At scale 2 the same specimen is sampled twice as finely (each fine
        pixel holds a quarter of the photons of a camera pixel), for
        evaluating super-resolution.
        """
        with self._states_lock:
            state = self._states.get(camera_frame)
            signal = self._signal.get(camera_frame)
        if state is None or signal is None:
            raise KeyError(f"no ground truth kept for simulated frame {camera_frame} "
                           f"(source.ground_truth_history keeps the last "
                           f"{self.cfg.ground_truth_history} frames)")
        peak, background = signal
        img = self.specimen.render(state, scale)
        img *= np.float32(peak / scale**2)
        img += np.float32(background / scale**2)
        return img


class SimCamera(CameraDevice):
    """16-bit sCMOS-like camera looking at the simulated specimen."""

    def __init__(self, scope: SimScope) -> None:
        self._scope = scope
        self._exposure = scope.cfg.exposure_ms
        super().__init__()

    def get_exposure(self) -> float:
        return self._exposure

    def set_exposure(self, exposure: float) -> None:
        if exposure <= 0:
            raise ValueError(f"exposure must be > 0 ms, got {exposure}")
        self._exposure = float(exposure)

    def shape(self) -> tuple[int, int]:
        return (self._scope.cfg.height, self._scope.cfg.width)

    def dtype(self) -> DTypeLike:
        return np.uint16

    def get_gain(self) -> float:
        return self._scope.cfg.gain_adu_per_e

    def get_offset(self) -> float:
        return self._scope.cfg.offset_adu

    @pymm_property(limits=(0.0, 50.0), name="ReadNoise-e", is_read_only=True)
    def read_noise_e(self) -> float:
        return self._scope.cfg.read_noise_e

    def start_sequence(self, n: int | None,
                       get_buffer: Callable[[Sequence[int], DTypeLike], np.ndarray]
                       ) -> Iterator[Mapping[str, Any]]:
        shape, dtype = self.shape(), self.dtype()
        # A snap (n == 1) with auto-shutter on: CMMCore opens the shutter around a snap,
        # UniMMCore 0.18 does not for Python cameras, so the simulated scope does it
        # for the exposure only (the dose, and so the bleaching, stays right).
        snap_shutter = n == 1 and not self._scope.laser_open and self._scope.autoshutter()
        if snap_shutter:
            self._scope.laser_open = True
        try:
            yield from self._frames(n, shape, dtype, get_buffer)
        finally:
            if snap_shutter:
                self._scope.laser_open = False

    def _frames(self, n: int | None, shape: tuple[int, int], dtype: DTypeLike,
                get_buffer: Callable[[Sequence[int], DTypeLike], np.ndarray]
                ) -> Iterator[Mapping[str, Any]]:
        def frame() -> Mapping[str, Any]:
            meta = self._scope.capture(self._exposure, get_buffer(shape, dtype))
            meta["Exposure-ms"] = f"{self._exposure:.4f}"
            return meta

        return paced(n, self.get_exposure, frame)


class SimLaser(ShutterDevice):
    """Excitation laser: the shutter is the laser on/off, `Power` its relative output."""

    def __init__(self, scope: SimScope) -> None:
        self._scope = scope
        super().__init__()

    def get_open(self) -> bool:
        return self._scope.laser_open

    def set_open(self, open: bool) -> None:
        self._scope.laser_open = bool(open)

    @pymm_property(limits=(0.0, 1.0), name="Power")
    def power(self) -> float:
        return self._scope.laser_power

    @power.setter  # type: ignore[no-redef]  # pymmcore-plus property descriptor, as documented
    def power(self, value: float) -> None:
        self._scope.laser_power = float(value)


class SimFocus(StageDevice):
    """Z stage: defocus dims the specimen (1 / (1 + (z/dof)^2))."""

    def __init__(self, scope: SimScope) -> None:
        self._scope = scope
        super().__init__()

    def set_position_um(self, val: float) -> None:
        self._scope.z_um = float(val)

    def get_position_um(self) -> float:
        return self._scope.z_um

    def home(self) -> None:
        self._scope.z_um = 0.0

    def stop(self) -> None:
        pass

    def set_origin(self) -> None:
        self._scope.z_um = 0.0


class SimSource:
    """Frame source: the simulated microscope inside a real `UniMMCore`."""

    def __init__(self, cfg: SimSourceConfig) -> None:
        self.cfg = cfg
        self.name = "sim"
        self.overflow_shows_as_gap = True  # Python sequence buffer (see FrameSource)
        self._core: UniMMCore | None = None
        self.scope: SimScope | None = None

    @property
    def core(self) -> UniMMCore:
        if self._core is None:
            raise RuntimeError("source is not open")
        return self._core

    @property
    def ended(self) -> bool:
        return False  # a live camera never runs out of frames

    @property
    def pixel_size_um(self) -> float:
        return self.cfg.pixel_size_um

    @property
    def calibration(self) -> CameraCalibration:
        """The simulated camera's noise model, exactly."""
        return CameraCalibration(self.cfg.gain_adu_per_e, self.cfg.offset_adu,
                                 self.cfg.read_noise_e)

    def open(self) -> None:
        scope = SimScope(self.cfg)
        # Pure-Python devices need no C++ adapters: naming a folder as mm_path skips
        # pymmcore-plus's search for a Micro-Manager install, which logs an ERROR on
        # every machine without one (the default `pip install` has none).
        core = UniMMCore(mm_path=str(Path(__file__).resolve().parent))
        core.loadPyDevice(CAMERA, SimCamera(scope))
        core.loadPyDevice(LASER, SimLaser(scope))
        core.loadPyDevice(FOCUS, SimFocus(scope))
        core.initializeAllDevices()
        core.setCameraDevice(CAMERA)
        core.setShutterDevice(LASER)
        core.setFocusDevice(FOCUS)
        core.setAutoShutter(True)
        scope.autoshutter = core.getAutoShutter
        frame_bytes = self.cfg.width * self.cfg.height * np.dtype(np.uint16).itemsize
        core.setCircularBufferMemoryFootprint(
            whole_frame_buffer_mb(self.cfg.buffer_mb, frame_bytes))  # type: ignore[arg-type]
        self.scope, self._core = scope, core

    def ground_truth(self, camera_frame: int, scale: int = 1) -> np.ndarray:
        if self.scope is None:
            raise RuntimeError("source is not open")
        return self.scope.ground_truth(camera_frame, scale)

    def close(self) -> None:
        if self._core is not None:
            release_core(self._core)
            self._core = None
