"""Any Micro-Manager hardware configuration (.cfg), through pymmcore-plus."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymmcore_plus import CMMCorePlus

from .base import SourceError, release_core

if TYPE_CHECKING:
    from .config import MMSourceConfig


class MMSource:
    def __init__(self, cfg: MMSourceConfig) -> None:
        self.cfg = cfg
        self.name = f"mm:{cfg.config_file.name}"
        self.overflow_shows_as_gap = False  # MMCore's C++ buffer stops the camera instead
        self._core: CMMCorePlus | None = None

    @property
    def core(self) -> CMMCorePlus:
        if self._core is None:
            raise RuntimeError("source is not open")
        return self._core

    @property
    def ended(self) -> bool:
        return False  # a live camera never runs out of frames

    @property
    def pixel_size_um(self) -> float:
        if self.cfg.pixel_size_um is not None:
            return self.cfg.pixel_size_um
        size = self.core.getPixelSizeUm() if self._core is not None else 0.0
        return float(size) if size > 0 else 1.0

    def open(self) -> None:
        from .config import default_adapter_paths

        adapters = [str(p) for p in (self.cfg.adapter_paths or default_adapter_paths())]
        core = CMMCorePlus(adapter_paths=adapters or None)  # type: ignore[arg-type]  # None = MM default
        try:
            core.loadSystemConfiguration(str(self.cfg.config_file))
            if not core.getCameraDevice():
                raise SourceError(f"{self.cfg.config_file}: the configuration defines no camera")
            for device, prop, value in self.cfg.properties:
                core.setProperty(device, prop, value)
            if self.cfg.exposure_ms is not None:
                core.setExposure(self.cfg.exposure_ms)
            core.setCircularBufferMemoryFootprint(self.cfg.buffer_mb)
        except SourceError:
            release_core(core)
            raise
        except Exception as exc:
            release_core(core)
            raise SourceError(f"loading Micro-Manager config {self.cfg.config_file} failed "
                              f"(adapter paths: {adapters or 'none'}): {exc}") from exc
        self._core = core

    def close(self) -> None:
        if self._core is not None:
            release_core(self._core)
            self._core = None
