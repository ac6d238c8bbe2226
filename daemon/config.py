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
    AfterValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dimscope.drivers.config import (
    MMSourceConfig,
    ReplaySourceConfig,
    SimSourceConfig,
    SourceConfig,
    StrictModel,
    default_adapter_paths,
    resolve_path,
)
from dimscope.engines.options import (
    EngineOptions,
    FlowInterpolatorOptions,
    InterpolatorOptions,
    option_problems,
    validate_options,
)
from dimscope.smlm.ready import ReadySettings

from .frame import FrameKind

__all__ = ["MMSourceConfig", "ReplaySourceConfig", "SimSourceConfig", "SourceConfig",
           "default_adapter_paths"]


class ConfigError(ValueError):
    """A config file is unreadable or invalid."""


class AcquisitionConfig(StrictModel):
    poll_sleep_ms: float = Field(
        0.5, gt=0, le=100, description="sleep when the core buffer is empty (a busy spin "
        "would starve a Python camera of the GIL)")
    raw_queue_frames: int = Field(16, ge=1, description="raw publisher queue (drop-oldest)")


class ArchiveConfig(StrictModel):
    out_dir: Path = Field(Path("runs"), description="relative paths are relative to the "
                          "working directory (not the config file), like --out")
    rotate_gb: float = Field(4.0, gt=0, description="start a new file past this size")
    queue_frames: int = Field(
        512, ge=1, description="frames the writer may lag before acquisition stops")
    fsync_every_s: float = Field(
        2.0, ge=0, description="fsync data+index this often (0 = never; SIGKILL-safe anyway)")
    backpressure_s: float = Field(
        10.0, ge=0, description="when the writer's queue is full, how long acquisition "
        "waits for room (frames wait in the camera's buffer meanwhile) before the run stops "
        "with an error; 0 = stop at once")
    drain_timeout_s: float = Field(
        90.0, gt=0, description="on stop, time the writer gets to archive every frame "
        "already acquired; frames still queued after it are named in the summary. Keep it "
        "below the service manager's stop timeout (systemd/dimscope.service: 120 s)")


class CameraConfig(StrictModel):
    """The camera's noise model, for engines that use it (VST, trust maps).

    Unset values come from the source when it models its camera (sim, a re-noised
    replay), else gain 1 ADU/e-, offset 0, read noise 0.
    """

    gain_adu_per_e: float | None = Field(None, gt=0)
    offset_adu: float | None = Field(None, ge=0)
    read_noise_e: float | None = Field(None, ge=0)


def known_engine(name: str) -> str:
    from dimscope.engines import available_engines

    names = available_engines()
    if name not in names:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(sorted(names))}")
    return name


#: an engine name that is registered (`dimscope.engines.available_engines`)
EngineName = Annotated[str, AfterValidator(known_engine)]


class TierConfig(StrictModel):
    """A faster fallback for the latency budget: another engine and/or other options."""

    name: EngineName
    options: dict[str, float | int | str | bool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _typed_options(self) -> TierConfig:
        validate_options(self.name, dict(self.options))
        return self


class EngineConfig(StrictModel):
    name: EngineName = "denoise"
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
    adapt: bool = Field(
        False, description="fine-tune the noise-aware denoiser on the sample while it runs "
        "(self-supervised, in a low-priority child process; needs torch) and swap in the "
        "adapted weights when their held-back loss falls")

    @model_validator(mode="after")
    def _model_named(self) -> EngineConfig:
        validate_options(self.name, dict(self.options))
        if self.name == "model" and "model" not in self.options:
            raise ValueError("engine 'model' needs options.model: a shipped model name or an "
                             ".onnx path (on the command line: --model)")
        if self.adapt:
            _check_adaptable(self.name, dict(self.options))
        return self


def _check_adaptable(name: str, options: dict[str, Any]) -> None:
    """ValueError unless `adapt` can work on this engine: a model engine whose model is a
    noise-aware (VST) denoiser. A model file that cannot be read here is left to the
    engine's own load, which names the problem."""
    if name not in ("denoise", "model"):
        raise ValueError(f"adapt = true needs a noise-aware denoising model (engine 'denoise' "
                         f"or 'model' with a model whose card has normalization 'vst'); engine "
                         f"{name!r} is not a trained model and cannot be adapted")
    from dimscope.engines import EngineError
    from dimscope.engines.adaptation import check_adaptable
    from dimscope.engines.model_file import read_card, resolve_model

    try:
        path = resolve_model(str(options.get("model", name)))
        card = read_card(path)
    except EngineError:
        return
    try:
        check_adaptable(card, path)
    except EngineError as exc:
        raise ValueError(f"adapt = true: {exc}") from None


InterpolateMethod = Literal["model", "flow", "linear", "repeat"]

#: interpolation method -> its options model (a method not listed takes no options)
_INTERPOLATE_OPTIONS: dict[str, type[EngineOptions]] = {
    "model": InterpolatorOptions, "flow": FlowInterpolatorOptions}


def _check_interpolate_options(method: str, options: dict[str, Any]) -> None:
    """ValueError naming each bad option of an interpolation method, and what is allowed."""
    model = _INTERPOLATE_OPTIONS.get(method)
    if model is None:
        if options:
            raise ValueError(f"method {method!r} takes no options")
        return
    try:
        model.model_validate(options)
    except ValidationError as exc:
        raise ValueError(f"method {method!r}: {option_problems(exc, 'options.')} (allowed: "
                         f"{', '.join(model.model_fields)})") from None


class InterpolateConfig(StrictModel):
    """Live frame interpolation between consecutive (enhanced) frames."""

    factor: Literal[1, 2, 4] = Field(
        1, description="1 = off; 2 or 4 = publish 1 or 3 synthesised frames per interval")
    method: InterpolateMethod = "model"
    options: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description="for method 'model': model, runtime, precision; "
        "for 'flow': preset, presmooth, tau")

    @model_validator(mode="after")
    def _typed_options(self) -> InterpolateConfig:
        _check_interpolate_options(self.method, dict(self.options))
        return self


class PublishConfig(StrictModel):
    address: str = "tcp://127.0.0.1:5555"
    send_hwm: int = Field(
        32, ge=1, description="ZMQ messages buffered per subscriber before PUB drops")
    queue_frames: int = Field(8, ge=1, description="publisher queue per topic (drop-oldest)")
    linger_ms: int = Field(
        1000, ge=0, le=60_000, description="at stop, time queued messages get to reach "
        "subscribers before the socket closes (the tail of every stream)")
    raw: bool = True
    enhanced: bool = True
    curve: bool = Field(False, description="encrypt and authenticate the data streams with "
                        "CURVE (keys from [security]); subscribers need an allowed key")
    trust: bool = Field(True, description="publish each enhanced frame's trust map on topic "
                        "`trust` (needs `[trust] enabled`)")

    @field_validator("address")
    @classmethod
    def _endpoint(cls, address: str) -> str:
        check_endpoint(address, bind=True)
        return address


class SecurityConfig(StrictModel):
    """CURVE keys (ZeroMQ's elliptic-curve encryption and authentication, `zmq.auth`).

    Key files are those `dimscope keys` (or `zmq.auth.create_certificates`) writes: the
    daemon's secret key file, and a folder of the public key files of the clients allowed
    to connect (an allow-list; any other key is refused and logged).
    """

    server_secret_key: Path | None = Field(
        None, description="the daemon's `*.key_secret` file (relative to the config)")
    allowed_clients: Path | None = Field(
        None, description="folder of client `*.key` public key files allowed to connect")

    @field_validator("server_secret_key", "allowed_clients", mode="after")
    @classmethod
    def _relative_to_config(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else resolve_path(path, info)


class ControlConfig(StrictModel):
    """The control socket (ZMQ ROUTER, JSON requests; docs/control.md)."""

    enabled: bool = True
    address: str | None = Field(
        None, description="ROUTER endpoint; default tcp://127.0.0.1:5556 — when that port is "
        "taken (another daemon), an ephemeral loopback port, said in the log and in the run "
        "folder's control.json")
    curve: bool = Field(False, description="require CURVE (keys from [security])")
    insecure: bool = Field(
        False, description="allow binding beyond loopback without CURVE (--insecure)")
    max_message_bytes: int = Field(65536, ge=1024, le=16 * 2**20,
                                   description="larger requests are refused")
    aliases: dict[str, tuple[str, str]] = Field(
        default_factory=dict, description="friendly setting names for `set`/`get`, e.g. "
        "{ laser_power = [\"Laser\", \"Power\"] } for a Micro-Manager device and property "
        "(the sim source has laser_power built in)")

    @field_validator("address")
    @classmethod
    def _endpoint(cls, address: str | None) -> str | None:
        if address is not None:
            check_endpoint(address, bind=True)
        return address


class MetricsConfig(StrictModel):
    """Prometheus metrics over HTTP (`prometheus-client`)."""

    address: str | None = Field(
        None, description="host:port to serve /metrics on, e.g. 127.0.0.1:9464; none = off")


class LoggingConfig(StrictModel):
    json_logs: bool = Field(False, description="one JSON object per log line on stderr "
                            "(--log-json), for journald/Loki/ELK")


#: node and topic names: lower-case words (they become file, metric and topic names)
_NAME = r"^[a-z][a-z0-9_]{0,47}$"


class _NodeConfig(StrictModel):
    """A stage of the frame graph: a name, the node it takes frames from, its queue."""

    name: str = Field(pattern=_NAME)
    upstream: str = Field(
        "acquisition", description="the node whose output this one takes: `acquisition` "
        "(raw frames) or the name of an earlier node")
    queue_frames: int = Field(8, ge=1, description="frames waiting (drop-oldest when full)")


class EngineNodeConfig(_NodeConfig):
    """An enhancement engine on the frames of its upstream."""

    kind: Literal["engine"] = "engine"
    engine: EngineName
    options: dict[str, float | int | str | bool] = Field(default_factory=dict)
    queue_frames: int = Field(1, ge=1, description="1 = always the newest frame")
    budget_ms: float | None = Field(None, gt=0)
    tiers: tuple[TierConfig, ...] = ()

    @model_validator(mode="after")
    def _typed_options(self) -> EngineNodeConfig:
        validate_options(self.engine, dict(self.options))
        return self


class PublishNodeConfig(_NodeConfig):
    """Publish the frames of its upstream on a ZeroMQ topic of the daemon's PUB socket."""

    kind: Literal["publish"] = "publish"
    topic: str = Field(pattern=_NAME)
    payload: Literal["frame", "trust"] = Field(
        "frame", description="send the frames, or their trust maps (frames of an engine node)")
    kinds: tuple[FrameKind, ...] = Field(
        (), description="send only frames of these kinds (e.g. a dense node's `dense`, "
        "`error_map` or `ready`); empty = all")


class TrustConfig(StrictModel):
    """Trust maps: each enhanced frame checked against its raw frame through the camera's
    forward model (see engines/trust.py and README: Trust)."""

    enabled: bool = Field(True, description="score every enhanced frame (header `trust`, "
                          "topic `trust`, trust.jsonl in the run folder)")
    false_alarm_rate: float = Field(
        1e-3, gt=0, lt=0.5, description="share of frames on which white noise alone would "
        "alert: sets the local z threshold for the frame size")
    flag_sigma: float = Field(3.0, gt=0, description="a map pixel beyond this local z counts "
                              "as flagged (the score's flagged_fraction)")
    max_residual_sd: float = Field(
        2.0, ge=0, description="also alert when the residual's robust spread (1 for an "
        "honest restoration) is above this: inconsistent everywhere; 0 = never")


class InterpolateNodeConfig(_NodeConfig):
    """Synthesise frames between consecutive frames of its upstream."""

    kind: Literal["interpolate"] = "interpolate"
    factor: Literal[2, 4] = 2
    method: InterpolateMethod = "model"
    options: dict[str, float | int | str | bool] = Field(default_factory=dict)
    queue_frames: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _typed_options(self) -> InterpolateNodeConfig:
        _check_interpolate_options(self.method, dict(self.options))
        return self


class LocalizeNodeConfig(_NodeConfig):
    """Localize single molecules in every frame of its upstream (raw SMLM frames) while
    they are acquired; the table is written crash-safe beside the raw archive, and each
    finished block goes downstream (frames of kind `localizations`: publish them)."""

    kind: Literal["localize"] = "localize"
    queue_frames: int = Field(
        8192, ge=16, description="frames waiting to be localized (a frame is shared with "
        "the archive, so this costs its pixels only while queued). Overflow leaves a gap in "
        "the table, counted and named; the raw archive still has the frames")
    psf_sigma_nm: float = Field(130.0, gt=0, description="width of the Gaussian PSF: the fit's "
                                "start, and the multi-emitter refit's fixed width")
    roisize: int = Field(7, ge=5, description="fit box, pixels (odd)")
    cutoff: float = Field(1.7, gt=0, description="detection: dynamic cutoff factor")
    queue_mb: int = Field(
        1024, ge=16, description="the queue's frames at most hold this much memory (a large "
        "camera gets fewer than queue_frames)")
    block_frames: int = Field(100, ge=1, description="close and publish a block of "
                              "localizations at least every N frames")
    push_frames: int = Field(100, ge=1, le=1000, description="frames handed to the "
                             "localizer per call: frames wait for the stack to fill (or "
                             "push_wait_s), so the library fits in batches as it does offline")
    push_wait_s: float = Field(0.5, gt=0, description="hand frames over once the oldest has "
                               "waited this long, however few (a slow camera)")
    edge_em_iterations: int = Field(
        0, ge=0, description="EM refits of fits at the frame edge (accuracy at the edge for "
        "about a fifth of the rate; see README: Localization microscopy)")
    threads: int = Field(0, ge=0, description="fit threads; 0: one per core")
    multi_emitter: bool = Field(
        False, description="refit emitters the single-emitter fit merged as several: RMSE "
        "34 → 12 nm at 30 emitters per 128² frame, but the localizer's rate falls to about a "
        "quarter (on 2 cores the simulated camera then no longer reaches 200 frames/s); off "
        "live by default, on in `dimscope smlm localize` (README: Localization microscopy)")
    table: str = Field("localizations.arrows", pattern=r"^[A-Za-z0-9_.-]+\.arrows$",
                       description="the table's file name in the run folder")

    @field_validator("roisize")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"roisize must be odd (the fit box has a centre pixel), got {value}")
        return value


class RenderNodeConfig(_NodeConfig):
    """Render the localizations of its upstream (a `localize` node) as a super-resolution
    image every `every_frames` frames (frames of kind `render`: publish them)."""

    kind: Literal["render"] = "render"
    every_frames: int = Field(200, ge=1, description="one render per this many frames")
    pixel_nm: float = Field(20.0, gt=0, description="render pixel size, nm")
    method: Literal["histogram", "gaussian"] = "histogram"
    queue_frames: int = Field(64, ge=1)
    drift_correction: bool = Field(
        True, description="estimate the drift by redundant cross-correlation of sub-renders "
        "(RCC) at each render once there are two segments, and render corrected; each "
        "estimate is appended to drift.jsonl in the run folder")
    drift_segment_frames: int = Field(1000, ge=50, description="frames per RCC segment")


class MeanNodeConfig(_NodeConfig):
    """The running mean of the raw frames of its upstream (`acquisition`), emitted every
    `every_frames` frames (frames of kind `mean`): the widefield image of a localization
    run that takes no widefield frame."""

    kind: Literal["mean"] = "mean"
    every_frames: int = Field(50, ge=1, description="emit the mean so far every N frames")
    queue_frames: int = Field(64, ge=1, description="frames waiting; a frame dropped "
                              "(counted) is left out of the mean, never out of the archive")


class ErrorMapConfig(StrictModel):
    """The error map of each dense prediction against the widefield image (smlm/errormap.py)."""

    psf_sigma_nm: float = Field(130.0, gt=0, description="widefield PSF σ before fitting")
    flag_sigma: float = Field(5.0, gt=0, description="flag where the resolution-scaled "
                              "error exceeds this many noise σ ...")
    relative_tolerance: float = Field(0.25, ge=0, description="... and this share of the "
                                      "local widefield intensity")


class DenseNodeConfig(_NodeConfig):
    """Predict the dense super-resolution image from the localizations of its upstream (a
    `localize` node) every `every_frames` frames, with its error map against the widefield
    image, and say when the acquisition is ready (frames of kinds `dense`, `error_map`,
    `ready`: publish them, filtered with `kinds`)."""

    kind: Literal["dense"] = "dense"
    model: str = Field("dense", description="a shipped model name or an .onnx path")
    runtime: str = Field("cpu", description="auto, cpu, openvino, onnxruntime, torch, ...")
    threads: int = Field(
        1, ge=1, le=256, description="CPU inference threads of the CPU runtimes: 1 leaves "
        "the other cores to acquisition, the archive and the localizer (on 2 cores, all of "
        "them made the localizer 0.76-0.84x the library's rate); more predicts sooner")
    allow_unverified: bool = False
    every_frames: int = Field(500, ge=1, description="one prediction per this many frames")
    widefield: str | None = Field(
        None, description="a `mean` node (declared earlier) whose newest frame is the "
        "widefield image: the mean of the raw frames")
    widefield_file: Path | None = Field(
        None, description="a widefield image taken before the run (TIFF, camera grid, ADU; "
        "relative to the config file)")
    queue_frames: int = Field(256, ge=1)
    drift_correction: bool = True
    drift_segment_frames: int = Field(1000, ge=50)
    error_map: ErrorMapConfig = Field(default_factory=ErrorMapConfig)
    ready: ReadySettings = Field(default_factory=ReadySettings, description="when the "
                                 "acquisition has enough frames (smlm/ready.py): all must hold")

    @field_validator("widefield_file", mode="after")
    @classmethod
    def _relative_to_config(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else resolve_path(path, info)

    @model_validator(mode="after")
    def _one_widefield(self) -> DenseNodeConfig:
        if (self.widefield is None) == (self.widefield_file is None):
            raise ValueError("give the widefield image as exactly one of `widefield` (a mean "
                             "node of the raw frames) or `widefield_file` (a TIFF)")
        return self


#: one `[[stages]]` entry, told apart by `kind` (each kind one model, CAREamics-style)
NodeConfig = Annotated[EngineNodeConfig | PublishNodeConfig | InterpolateNodeConfig
                       | LocalizeNodeConfig | RenderNodeConfig | MeanNodeConfig
                       | DenseNodeConfig, Field(discriminator="kind")]

#: the nodes every run has (see `daemon/graph.py`); extra `[[stages]]` may not reuse them
DEFAULT_NODE_NAMES = ("acquisition", "archive", "publish_raw", "engine", "publish_enhanced",
                      "publish_trust", "trust_log", "interpolate", "publish_interpolated",
                      "publish_trust_interpolated", "trust_log_interpolated")


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


#: engines whose options take `allow_unverified` (they load a model file)
MODEL_ENGINES = ("denoise", "sr2", "transfer", "denoise_hq", "denoise_hq_t5", "sr2_hq",
                 "transfer_hq", "model")


def with_overrides(config: Config, *, engine: str | None = None,
                   model: str | None = None, allow_unverified_model: bool = False,
                   insecure: bool = False, json_logs: bool = False) -> Config:
    """The config with command-line overrides applied, validated like the file itself.

    `allow_unverified_model` (`--allow-unverified-model`) lets every model this run loads
    (the engine's, its tiers', `[[stages]]` engines' and the interpolation model) load even
    when its weights do not match its card's SHA-256; their frames then say so."""
    if engine is None and model is None and not (allow_unverified_model or insecure
                                                 or json_logs):
        return config
    data = config.model_dump(mode="python")
    if insecure:
        data["control"]["insecure"] = True
    if json_logs:
        data["logging"]["json_logs"] = True
    if engine is not None and engine != data["engine"]["name"]:
        data["engine"] = {**data["engine"], "name": engine,
                          "options": {k: v for k, v in data["engine"]["options"].items()
                                      if k not in ("model",)}}
    if model is not None:
        data["engine"]["options"] = {**data["engine"]["options"], "model": model}
    if allow_unverified_model:
        engines = [data["engine"], *data["engine"]["tiers"]]
        interpolators = [data["interpolate"]]
        for node in data["stages"]:
            if node.get("kind") == "engine":
                engines += [{**node, "name": node["engine"]}, *node["tiers"]]
            elif node.get("kind") == "interpolate":
                interpolators.append(node)
        for item in engines:
            if item["name"] in MODEL_ENGINES:
                item["options"]["allow_unverified"] = True
        for item in interpolators:
            if item["method"] == "model":
                item["options"]["allow_unverified"] = True
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
        value = {**value, "file": str(resolve_path(Path(value["file"]), info))}
    try:
        load_sequence(value)  # validated now, so a bad sequence is a config error
    except MDAError as exc:
        raise ValueError(str(exc)) from None
    return value


class SmlmConfig(StrictModel):
    """Localization microscopy runs (the `localize`, `render`, `dense` nodes)."""

    stop_when_ready: bool = Field(
        False, description="end acquisition when a dense node's ready rule holds (finish "
        "reason `ready`); the summary states the frames used against the frame limit. In an "
        "MDA run this ends the whole sequence: moving on to the next position is not built")


class Config(StrictModel):
    source: SourceConfig = Field(default_factory=SimSourceConfig)
    acquisition: AcquisitionConfig = Field(default_factory=AcquisitionConfig)
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig)
    camera: CameraConfig = Field(default_factory=CameraConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    interpolate: InterpolateConfig = Field(default_factory=InterpolateConfig)
    mda: dict[str, Any] | None = Field(
        None, description="a useq MDASequence (inline keys, or `file` = YAML/JSON path relative "
        "to the config): run this time-lapse instead of live streaming")
    publish: PublishConfig = Field(default_factory=PublishConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    smlm: SmlmConfig = Field(default_factory=SmlmConfig)
    stages: tuple[NodeConfig, ...] = Field(
        (), description="extra nodes of the frame graph, each naming its upstream "
        "(see docs/architecture.md)")

    _mda = field_validator("mda")(_resolve_mda)

    @model_validator(mode="after")
    def _graph_is_declared_in_order(self) -> Config:
        known = set(DEFAULT_NODE_NAMES)
        topics = {"raw", "enhanced", "interpolated"}
        if self.trust.enabled:  # the engine's trust maps (a run without them may reuse it)
            topics |= {"trust", "interp_trust"}
        for i, node in enumerate(self.stages):
            where = f"stages[{i}] ({node.name!r})"
            if node.name in known:
                raise ValueError(f"{where}: the name is already taken")
            if node.upstream not in known:
                raise ValueError(f"{where}: upstream {node.upstream!r} is not an earlier node "
                                 f"(declared so far: {', '.join(sorted(known))})")
            if isinstance(node, LocalizeNodeConfig) and node.upstream != "acquisition":
                raise ValueError(f"{where}: a localize node takes the raw frames (camera "
                                 f"units, every frame in order): its upstream must be "
                                 f"'acquisition', not {node.upstream!r}")
            if isinstance(node, RenderNodeConfig | DenseNodeConfig) and not any(
                    isinstance(n, LocalizeNodeConfig) and n.name == node.upstream
                    for n in self.stages[:i]):
                raise ValueError(f"{where}: a {node.kind} node takes localizations: its "
                                 f"upstream must be a localize node, not {node.upstream!r}")
            if isinstance(node, MeanNodeConfig) and node.upstream != "acquisition":
                raise ValueError(f"{where}: a mean node averages the raw frames: its upstream "
                                 f"must be 'acquisition', not {node.upstream!r}")
            if isinstance(node, DenseNodeConfig) and node.widefield is not None and not any(
                    isinstance(n, MeanNodeConfig) and n.name == node.widefield
                    for n in self.stages[:i]):
                raise ValueError(f"{where}: widefield {node.widefield!r} is not an earlier "
                                 f"mean node")
            if isinstance(node, PublishNodeConfig):
                if node.topic in topics:
                    raise ValueError(f"{where}: topic {node.topic!r} is already published")
                topics.add(node.topic)
            known.add(node.name)
        if self.smlm.stop_when_ready and not any(isinstance(n, DenseNodeConfig)
                                                 for n in self.stages):
            raise ValueError("[smlm] stop_when_ready needs a `dense` node (its ready rule "
                             "decides when to stop); none is declared in [[stages]]")
        return self


def _format_errors(origin: str, exc: ValidationError) -> str:
    lines = [f"{origin}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        parts = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        if len(parts) > 1 and parts[0] == "source" and parts[1] in ("sim", "mm", "replay",
                                                                  "smlm_sim"):
            del parts[1]  # the discriminator tag pydantic inserts is not a key in the file
        if len(parts) > 2 and parts[0] == "stages" and parts[2] in (
                "engine", "publish", "interpolate", "localize", "render", "mean", "dense"):
            del parts[2]
        loc = ".".join(parts)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the config schema)"
        elif err["type"] == "union_tag_invalid":
            msg = f"{msg} (source.kind must be one of 'sim', 'mm', 'replay', 'smlm_sim')"
        elif err["type"] == "union_tag_not_found":
            loc = f"{loc}.kind" if loc else "kind"
            msg = "missing: every [source] needs kind = 'sim', 'mm', 'replay' or 'smlm_sim'"
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
