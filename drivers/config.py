"""Config models of the frame sources (frozen, strict pydantic), one per source kind.

They live beside the sources so that `drivers` never imports `daemon`; the
daemon's config composes them under `[source]`, told apart by `kind`. Relative
paths resolve against the config file's folder (validation context `base_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class StrictModel(BaseModel):
    """Frozen; unknown keys are errors; defaults validated too."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def resolve_path(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = path.expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


class SimSourceConfig(StrictModel):
    """The embedded simulated microscope (see drivers/sim.py for the physics)."""

    kind: Literal["sim"] = "sim"
    width: int = Field(512, ge=16, le=8192)
    height: int = Field(512, ge=16, le=8192)
    exposure_ms: float = Field(10.0, gt=0, le=60_000)
    excitation_power: float = Field(1.0, ge=0, le=1, description="relative laser power")
    photons_per_ms: float = Field(
        2.0, gt=0, description="photoelectrons per ms at full power at the brightest structure")
    background_photons_per_ms: float = Field(0.1, ge=0)
    read_noise_e: float = Field(1.6, ge=0)
    gain_adu_per_e: float = Field(2.0, gt=0)
    offset_adu: float = Field(100.0, ge=0)
    bit_depth: int = Field(16, ge=8, le=16)
    pixel_size_um: float = Field(0.1, gt=0)
    psf_sigma_px: float = Field(1.2, gt=0)
    drift_px_per_s: float = 2.0
    n_tubules: int = Field(120, ge=0)
    n_puncta: int = Field(30, ge=0)
    bleach_dose: float = Field(
        2.0e6, gt=0, description="power x ms of illumination that bleaches to 1/e")
    depth_of_field_um: float = Field(0.8, gt=0)
    ground_truth_history: int = Field(
        0, ge=0, description="frames whose noiseless truth is kept for in-process callers "
        "(tests, benchmarks); 0 = none, so a long run's memory stays flat")
    buffer_mb: int = Field(512, ge=1, description="the core's sequence buffer (MB)")
    seed: int = 0


class MMSourceConfig(StrictModel):
    """Any Micro-Manager hardware configuration, through pymmcore-plus."""

    kind: Literal["mm"] = "mm"
    config_file: Path
    adapter_paths: list[Path] = Field(
        default_factory=list,
        description="device adapter folders; empty = Micro-Manager install or mm-test-adapters")
    exposure_ms: float | None = Field(None, gt=0)
    properties: list[tuple[str, str, str]] = Field(
        default_factory=list, description="(device, property, value) set after loading")
    pixel_size_um: float | None = Field(None, gt=0, description="overrides the core's pixel size")
    buffer_mb: int = Field(512, ge=8)

    @field_validator("adapter_paths", mode="after")
    @classmethod
    def _adapters_exist(cls, paths: list[Path], info: ValidationInfo) -> list[Path]:
        resolved = [resolve_path(p, info) for p in paths]
        for p in resolved:
            if not p.is_dir():
                raise ValueError(f"adapter folder {str(p)!r} does not exist")
        return resolved

    @model_validator(mode="before")
    @classmethod
    def _find_cfg(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or "config_file" not in data:
            return data
        raw = Path(str(data["config_file"])).expanduser()
        candidates = [raw] if raw.is_absolute() else []
        if not raw.is_absolute():
            base = (info.context or {}).get("base_dir")
            candidates.append(Path(base) / raw if base else raw)
            for folder in data.get("adapter_paths") or default_adapter_paths():
                candidates.append(Path(folder) / raw)
        for c in candidates:
            if c.is_file():
                return {**data, "config_file": c}
        looked = ", ".join(str(c) for c in candidates) or str(raw)
        raise ValueError(f"Micro-Manager config file {str(raw)!r} not found (looked in: {looked})")


class ReplaySourceConfig(StrictModel):
    """Play a recorded TIFF time-lapse through the core, optionally re-noised."""

    kind: Literal["replay"] = "replay"
    path: Path
    fps: float = Field(20.0, gt=0, le=10_000)
    loop: bool = True
    photons: float | None = Field(
        None, gt=0, description="re-noise: photoelectrons at the recording's 99.9th percentile")
    background_photons: float = Field(1.0, ge=0)
    read_noise_e: float = Field(1.6, ge=0)
    gain_adu_per_e: float = Field(2.0, gt=0)
    offset_adu: float = Field(100.0, ge=0)
    pixel_size_um: float = Field(0.1, gt=0)
    buffer_mb: int = Field(256, ge=8)
    seed: int = 0

    @field_validator("path", mode="after")
    @classmethod
    def _exists(cls, path: Path, info: ValidationInfo) -> Path:
        path = resolve_path(path, info)
        if not path.is_file():
            raise ValueError(f"recording {str(path)!r} does not exist")
        return path


class SMLMSimSourceConfig(StrictModel):
    """The simulated localization microscope (drivers/smlm_sim.py): blinking single
    emitters on a structure, the activation laser's power a device property."""

    kind: Literal["smlm_sim"] = "smlm_sim"
    width: int = Field(128, ge=16, le=2048)
    height: int = Field(128, ge=16, le=2048)
    fps: float = Field(200.0, gt=0, le=5000)
    structure: Literal["filaments", "rings", "image"] = "filaments"
    image: Path | None = Field(None, description="structure `image`: a TIFF used as the "
                               "density map")
    image_pixel_nm: float = Field(20.0, gt=0)
    emitters_per_frame: float = Field(
        30.0, gt=0, description="emitting labels per frame at the start (sets the "
        "activation power; the `Activation` laser's `Power` changes it live)")
    pixel_nm: float = Field(100.0, gt=0)
    psf_sigma_nm: float = Field(130.0, gt=0)
    gain_adu_per_e: float = Field(2.0, gt=0)
    offset_adu: float = Field(100.0, ge=0)
    read_noise_e: float = Field(1.5, ge=0)
    ground_truth_history: int = Field(
        0, ge=0, description="frames whose emitter truth is kept for in-process callers")
    buffer_mb: int = Field(256, ge=8)
    seed: int = 0

    @field_validator("image", mode="after")
    @classmethod
    def _image_exists(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None:
            return None
        path = resolve_path(path, info)
        if not path.is_file():
            raise ValueError(f"density image {str(path)!r} does not exist")
        return path

    @model_validator(mode="after")
    def _image_given(self) -> SMLMSimSourceConfig:
        if self.structure == "image" and self.image is None:
            raise ValueError("structure 'image' needs `image`, a TIFF path")
        return self


SourceConfig = Annotated[SimSourceConfig | MMSourceConfig | ReplaySourceConfig
                         | SMLMSimSourceConfig, Field(discriminator="kind")]


def default_adapter_paths() -> list[Path]:
    """Adapter folders to try when a config names none: mm-test-adapters, if installed."""
    try:
        import mm_test_adapters
    except ImportError:
        return []
    return [Path(mm_test_adapters.device_adapter_path())]


