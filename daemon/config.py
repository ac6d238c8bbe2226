"""Validated configuration: frozen, strict pydantic models loaded from TOML.

Unknown keys are errors. Relative paths are resolved against the folder of
the config file. `ConfigError` messages name the file, the key, what was
expected and what was given.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config file is unreadable or invalid."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = path.expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


class SimSourceConfig(_Model):
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
    buffer_mb: int = Field(512, ge=8)
    seed: int = 0


class MMSourceConfig(_Model):
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
        resolved = [_resolve(p, info) for p in paths]
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


class ReplaySourceConfig(_Model):
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
        path = _resolve(path, info)
        if not path.is_file():
            raise ValueError(f"recording {str(path)!r} does not exist")
        return path


SourceConfig = Annotated[SimSourceConfig | MMSourceConfig | ReplaySourceConfig,
                         Field(discriminator="kind")]


class AcquisitionConfig(_Model):
    poll_sleep_ms: float = Field(
        0.5, gt=0, le=100, description="sleep when the core buffer is empty (a busy spin "
        "would starve a Python camera of the GIL)")
    raw_queue_frames: int = Field(16, ge=1, description="raw publisher queue (drop-oldest)")


class ArchiveConfig(_Model):
    out_dir: Path = Field(Path("runs"), description="relative paths are relative to the "
                          "working directory (not the config file), like --out")
    rotate_gb: float = Field(4.0, gt=0, description="start a new file past this size")
    queue_frames: int = Field(
        512, ge=1, description="frames the writer may lag before acquisition stops")
    fsync_every_s: float = Field(
        2.0, ge=0, description="fsync data+index this often (0 = never; SIGKILL-safe anyway)")
    drain_timeout_s: float = Field(
        90.0, gt=0, description="on stop, time the writer gets to archive every frame "
        "already acquired; frames still queued after it are named in the summary. Keep it "
        "below the service manager's stop timeout (systemd/dimscope.service: 120 s)")


class TierConfig(_Model):
    """A faster fallback for the latency budget: another engine and/or other options."""

    name: str
    options: dict[str, float | int | str | bool] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from dimscope.engines import available_engines

        if name not in available_engines():
            raise ValueError(f"unknown engine {name!r}; available: "
                             f"{', '.join(sorted(available_engines()))}")
        return name


class EngineConfig(_Model):
    name: str = "denoise"
    queue_frames: int = Field(
        1, ge=1, description="frames waiting for the engine; when full the oldest is skipped")
    on_failure: Literal["raw_only", "stop"] = Field(
        "raw_only", description="if the engine cannot load or run: keep acquiring and "
        "archiving raw frames without enhancement (raw_only), or refuse to run (stop)")
    options: dict[str, float | int | str | bool] = Field(default_factory=dict)
    budget_ms: float | None = Field(
        None, gt=0, description="acquisition-to-publication budget for enhanced frames; "
        "over it: faster tier, then skip (see README: Latency budgets)")
    tiers: tuple[TierConfig, ...] = Field(
        (), description="faster fallbacks, in order, used when the budget is not met")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from dimscope.engines import available_engines

        names = available_engines()
        if name not in names:
            raise ValueError(f"unknown engine {name!r}; available: {', '.join(sorted(names))}")
        return name

    @model_validator(mode="after")
    def _model_named(self) -> EngineConfig:
        if self.name == "model" and "model" not in self.options:
            raise ValueError("engine 'model' needs options.model: a shipped model name or an "
                             ".onnx path (on the command line: --model)")
        return self


class InterpolateConfig(_Model):
    """Live frame interpolation between consecutive (enhanced) frames."""

    factor: Literal[1, 2, 4] = Field(
        1, description="1 = off; 2 or 4 = publish 1 or 3 synthesised frames per interval")
    method: Literal["model", "linear", "repeat"] = "model"
    options: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description="for method 'model': model, runtime, precision")


class PublishConfig(_Model):
    address: str = "tcp://127.0.0.1:5555"
    send_hwm: int = Field(
        32, ge=1, description="ZMQ messages buffered per subscriber before PUB drops")
    queue_frames: int = Field(8, ge=1, description="publisher queue per topic (drop-oldest)")
    linger_ms: int = Field(
        1000, ge=0, le=60_000, description="at stop, time queued messages get to reach "
        "subscribers before the socket closes (the tail of every stream)")
    raw: bool = True
    enhanced: bool = True

    @field_validator("address")
    @classmethod
    def _endpoint(cls, address: str) -> str:
        check_endpoint(address, bind=True)
        return address


def check_endpoint(address: str, *, bind: bool) -> None:
    """Raise ValueError naming what is wrong with a ZeroMQ endpoint.

    tcp: the port must be 1-65535 (or `*` for bind: any free port) — ZeroMQ
    itself would silently take 70000 modulo 65536 — and the host must resolve
    (for bind also `*` or a local interface name).
    """
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc"):
        raise ValueError("expected a ZeroMQ endpoint like 'tcp://127.0.0.1:5555' "
                         "(tcp://, ipc:// or inproc://)")
    if scheme != "tcp":
        return
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise ValueError("expected tcp://HOST:PORT")
    any_port = bind and port == "*"
    if not any_port and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise ValueError("port must be 1-65535" + (" or * (any free port)" if bind else "")
                         + f", got {port!r}")
    host = host.strip("[]")
    if bind and host == "*":
        return
    import socket

    if bind and host in {name for _, name in socket.if_nameindex()}:
        return
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"host {host!r} does not resolve ({exc})") from None


def with_overrides(config: Config, *, engine: str | None = None,
                   model: str | None = None) -> Config:
    """The config with command-line overrides applied, validated like the file itself."""
    if engine is None and model is None:
        return config
    data = config.model_dump(mode="python")
    if engine is not None and engine != data["engine"]["name"]:
        data["engine"] = {**data["engine"], "name": engine,
                          "options": {k: v for k, v in data["engine"]["options"].items()
                                      if k not in ("model",)}}
    if model is not None:
        data["engine"]["options"] = {**data["engine"]["options"], "model": model}
    return parse_config(data, origin="command line")


def check_out_dir(path: Path) -> None:
    """Raise OSError unless run folders can be created under `path`.

    Creates (and removes) one probe folder in the nearest existing ancestor,
    so nothing is left behind.
    """
    import tempfile

    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"archive.out_dir {path}: {existing} is not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".dimscope-probe-", dir=existing)).rmdir()
    except OSError as exc:
        raise OSError(f"archive.out_dir {path}: cannot create folders in {existing} "
                      f"({exc.strerror or exc})") from None


def _resolve_mda(value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
    if value is None:
        return None
    from .mda import MDAError, load_sequence

    if "file" in value:
        value = {**value, "file": str(_resolve(Path(value["file"]), info))}
    try:
        load_sequence(value)  # validated now, so a bad sequence is a config error
    except MDAError as exc:
        raise ValueError(str(exc)) from None
    return value


class Config(_Model):
    source: SourceConfig = Field(default_factory=SimSourceConfig)
    acquisition: AcquisitionConfig = Field(default_factory=AcquisitionConfig)
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    interpolate: InterpolateConfig = Field(default_factory=InterpolateConfig)
    mda: dict[str, Any] | None = Field(
        None, description="a useq MDASequence (inline keys, or `file` = YAML/JSON path relative "
        "to the config): run this time-lapse instead of live streaming")
    publish: PublishConfig = Field(default_factory=PublishConfig)

    _mda = field_validator("mda")(_resolve_mda)


def default_adapter_paths() -> list[Path]:
    """Adapter folders to try when a config names none: mm-test-adapters, if installed."""
    try:
        import mm_test_adapters
    except ImportError:
        return []
    return [Path(mm_test_adapters.device_adapter_path())]


def _format_errors(origin: str, exc: ValidationError) -> str:
    lines = [f"{origin}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        parts = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        if len(parts) > 1 and parts[0] == "source" and parts[1] in ("sim", "mm", "replay"):
            del parts[1]  # the discriminator tag pydantic inserts is not a key in the file
        loc = ".".join(parts)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the config schema)"
        elif err["type"] == "union_tag_invalid":
            msg = f"{msg} (source.kind must be one of 'sim', 'mm', 'replay')"
        elif err["type"] == "union_tag_not_found":
            loc = f"{loc}.kind" if loc else "kind"
            msg = "missing: every [source] needs kind = 'sim', 'mm' or 'replay'"
        given = err.get("input")
        given_txt = "" if err["type"] in ("missing",) or isinstance(given, dict) else (
            f" (got {given!r})")
        lines.append(f"  {loc or '<top level>'}: {msg}{given_txt}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], *, origin: str = "<config>",
                 base_dir: Path | None = None) -> Config:
    try:
        return Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(_format_errors(origin, exc)) from None


def load_config(path: Path | str | None) -> Config:
    """Load a TOML config; `None` gives the embedded default (the simulated microscope)."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, origin=str(path), base_dir=path.resolve().parent)
