"""The simulated localization microscope: `dimscope.smlm`'s simulator behind a real core.

A pure-Python camera serves `SMLMSimulator` frames (blinking labels on filaments,
nuclear-pore-like rings or an image used as a density map; on/off/bleach kinetics; the
camera's Poisson and read noise, gain and offset — `camera_noise`, the widefield
simulator's fast camera; slow drift) at a set frame rate, and an
`Activation` laser whose `Power` property drives the switching-on rate live, as on a real
PALM/STORM set-up. `widefield()` renders one widefield frame of the unbleached labels (PSF
15 % wider than the localizer assumes). The emitter truth of the last
`ground_truth_history` frames is kept for tests and benchmarks (`truth(frame)`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pymmcore_plus.experimental.unicore import (
    CameraDevice,
    ShutterDevice,
    UniMMCore,
    pymm_property,
)

from dimscope.engines.base import CameraCalibration

from .base import SourceError, paced, release_core, whole_frame_buffer_mb
from .camera_noise import CameraNoise

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

    from dimscope.smlm.simulate import FrameTruth, SMLMSimulator

    from .config import SMLMSimSourceConfig

CAMERA, LASER = "SMLMCamera", "Activation"


class SMLMCamera(CameraDevice):
    def __init__(self, source: SMLMSimSource) -> None:
        self._source = source
        self._exposure = 1000.0 / source.cfg.fps
        super().__init__()

    def get_exposure(self) -> float:
        return self._exposure

    def set_exposure(self, exposure: float) -> None:
        self._exposure = float(exposure)

    def shape(self) -> tuple[int, int]:
        return (self._source.cfg.height, self._source.cfg.width)

    def dtype(self) -> DTypeLike:
        return np.uint16

    def start_sequence(self, n: int | None,
                       get_buffer: Callable[[Sequence[int], DTypeLike], np.ndarray]
                       ) -> Iterator[Mapping[str, Any]]:
        shape, dtype = self.shape(), self.dtype()

        def frame() -> Mapping[str, Any]:
            index = self._source.render_into(get_buffer(shape, dtype))
            return {"SMLMFrame": str(index), "Exposure-ms": f"{self._exposure:.4f}"}

        return paced(n, self.get_exposure, frame)


class ActivationLaser(ShutterDevice):
    """The activation (e.g. 405 nm) laser: `Power` sets how fast labels switch on."""

    def __init__(self, source: SMLMSimSource) -> None:
        self._source = source
        self._open = True
        super().__init__()

    def get_open(self) -> bool:
        return self._open

    def set_open(self, open: bool) -> None:
        self._open = bool(open)

    @pymm_property(limits=(0.0, 100.0), name="Power")
    def power(self) -> float:
        return self._source.activation_power

    @power.setter  # type: ignore[no-redef]  # pymmcore-plus property descriptor, as documented
    def power(self, value: float) -> None:
        self._source.activation_power = float(value)


class SMLMSimSource:
    """Frame source: the simulated localization microscope inside a real `UniMMCore`."""

    def __init__(self, cfg: SMLMSimSourceConfig) -> None:
        self.cfg = cfg
        self.name = f"smlm_sim:{cfg.structure}"
        self.overflow_shows_as_gap = True  # Python sequence buffer (see FrameSource)
        self._core: UniMMCore | None = None
        self.simulator: SMLMSimulator | None = None
        self._lock = threading.Lock()
        self._truth: OrderedDict[int, FrameTruth] = OrderedDict()

    @property
    def core(self) -> UniMMCore:
        if self._core is None:
            raise RuntimeError("source is not open")
        return self._core

    @property
    def ended(self) -> bool:
        return False

    @property
    def pixel_size_um(self) -> float:
        return self.cfg.pixel_nm / 1000.0

    @property
    def calibration(self) -> CameraCalibration:
        return CameraCalibration(self.cfg.gain_adu_per_e, self.cfg.offset_adu,
                                 self.cfg.read_noise_e)

    @property
    def activation_power(self) -> float:
        return self.simulator.activation_power if self.simulator is not None else 0.0

    @activation_power.setter
    def activation_power(self, value: float) -> None:
        if self.simulator is not None:
            with self._lock:
                self.simulator.activation_power = value

    def open(self) -> None:
        try:
            from dimscope.smlm.simulate import (
                Camera,
                SimSettings,
                SMLMSimulator,
                make_structure,
            )
        except ImportError as exc:
            raise SourceError(f"source smlm_sim needs the smlm extra (pip install "
                              f"'dimscope[smlm]'): {exc}") from None
        cfg = self.cfg
        settings = SimSettings(
            shape=(cfg.height, cfg.width), psf_sigma_nm=cfg.psf_sigma_nm,
            camera=Camera(pixel_nm=cfg.pixel_nm, gain_adu_per_e=cfg.gain_adu_per_e,
                          offset_adu=cfg.offset_adu, read_noise_e=cfg.read_noise_e))
        rng = np.random.default_rng(cfg.seed)
        try:
            structure = make_structure(cfg.structure, settings, rng, image=cfg.image,
                                       image_pixel_nm=cfg.image_pixel_nm)
        except (ValueError, OSError) as exc:
            raise SourceError(f"smlm_sim: {exc}") from exc
        power = settings.kinetics.power_for(len(structure.labels_nm), cfg.emitters_per_frame)
        # The widefield simulator's camera (a table of Poisson quantiles, a bank of read
        # noise): numpy's exact samplers took ~1.2 ms of the ~1.4 ms a 128² frame cost, a
        # quarter of a core at 200 frames/s that a real camera does not take from the
        # localizer beside it.
        noise = CameraNoise(cfg.seed + 2)
        # the brightest pixel: a whole emitter's photons in its PSF's peak pixel
        sigma_px = settings.psf_sigma_nm / cfg.pixel_nm
        # (twice that: two emitters on one pixel; a table rebuilt mid-run stalls the camera)
        noise.poisson.reserve(2 * settings.photons_range[1] / (2 * np.pi * sigma_px ** 2)
                              + settings.background_photons)

        def expose(electrons: np.ndarray) -> np.ndarray:
            return noise.expose(electrons.astype(np.float32), read_noise_e=cfg.read_noise_e,
                                gain_adu_per_e=cfg.gain_adu_per_e, offset_adu=cfg.offset_adu,
                                bit_depth=16)

        self.simulator = SMLMSimulator(
            structure, settings.model_copy(update={"activation_power": power}),
            seed=cfg.seed + 1, expose=expose)
        core = UniMMCore(mm_path=str(Path(__file__).resolve().parent))
        core.loadPyDevice(CAMERA, SMLMCamera(self))
        core.loadPyDevice(LASER, ActivationLaser(self))
        core.initializeAllDevices()
        core.setCameraDevice(CAMERA)
        core.setShutterDevice(LASER)
        frame_bytes = cfg.width * cfg.height * 2
        core.setCircularBufferMemoryFootprint(
            whole_frame_buffer_mb(cfg.buffer_mb, frame_bytes))  # type: ignore[arg-type]
        self._core = core

    def render_into(self, out: np.ndarray) -> int:
        """The next frame into `out`; its index in the simulation."""
        assert self.simulator is not None
        with self._lock:
            frame, truth = self.simulator.step()
            if self.cfg.ground_truth_history:
                self._truth[truth.frame] = truth
                while len(self._truth) > self.cfg.ground_truth_history:
                    self._truth.popitem(last=False)
        out[...] = frame
        return truth.frame

    def truth(self, frame: int) -> FrameTruth:
        """The emitters of simulation frame `frame` (the `SMLMFrame` tag), if still kept."""
        with self._lock:
            if frame not in self._truth:
                raise KeyError(f"no truth kept for frame {frame} (ground_truth_history)")
            return self._truth[frame]

    def widefield(self) -> np.ndarray:
        """One widefield frame of the labels not yet bleached (ADU)."""
        assert self.simulator is not None
        with self._lock:
            return self.simulator.widefield()

    def close(self) -> None:
        if self._core is not None:
            release_core(self._core)
            self._core = None
