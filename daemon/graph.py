"""The frame graph: nodes declared in config, each naming the node it takes frames from.

As in EPICS areaDetector, where every plugin names its input port: a node is a
stage (a worker with a bounded queue, a stated overflow policy and counters)
plus the name of its upstream. Every run has the default nodes below; a
config adds more with `[[stages]]` (an engine, a publisher, an interpolator,
on any earlier node), without code:

    acquisition ─┬─> archive               raw frames to OME-TIFF; FAIL: never drops
                 ├─> publish_raw           topic raw; drop-oldest
                 └─> engine                newest frame only; latency budget; trust score
                       ├─> publish_enhanced
                       ├─> publish_trust   topic trust: each enhanced frame's trust map
                       ├─> trust_log       trust.jsonl beside the raw index
                       └─> interpolate ──> publish_interpolated

A node kind is one builder function in `NODE_KINDS`: config in, stage out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dimscope.engines import CameraCalibration, Engine, EngineError, make_engine
from dimscope.engines.interpolators import make_interpolator
from dimscope.engines.trust import TrustSettings

from .archive import RawArchive
from .config import (
    CameraConfig,
    Config,
    DenseNodeConfig,
    EngineNodeConfig,
    InterpolateNodeConfig,
    LocalizeNodeConfig,
    MeanNodeConfig,
    NodeConfig,
    PublishNodeConfig,
    RenderNodeConfig,
    TierConfig,
    TrustConfig,
)
from .engine_stage import EngineStage
from .interpolation_stage import InterpolationStage
from .publisher import PublishSocket, PublishStage
from .stage import Stage
from .trust_log import TRUST_LOG, TRUST_LOG_INTERPOLATED, TrustLogStage

log = logging.getLogger(__name__)

ROOT = "acquisition"


@dataclass(frozen=True)
class ArchiveNodeConfig:
    """The raw archive: always present, always fed by acquisition."""

    name: str = "archive"
    upstream: str = ROOT
    kind: str = "archive"


@dataclass(frozen=True)
class TrustLogNodeConfig:
    """`trust.jsonl` in the run folder: present whenever trust maps are on."""

    name: str = "trust_log"
    upstream: str = "engine"
    kind: str = "trust_log"
    filename: str = TRUST_LOG


@dataclass
class BuildContext:
    """What node builders need from the run being started."""

    config: Config
    run_dir: Path
    socket: PublishSocket
    calibration: CameraCalibration
    frame_shape: tuple[int, int]
    frame_dtype: np.dtype[Any]
    pixel_size_um: float
    #: engines already loaded by the pipeline (the main one), by node name
    engines: dict[str, Engine] = field(default_factory=dict)
    #: node name -> why it is not running (it could not be built, or its upstream is absent)
    errors: dict[str, str] = field(default_factory=dict)


def camera_calibration(camera: CameraConfig, source_model: CameraCalibration | None
                       ) -> CameraCalibration:
    """`[camera]` where set, else the source's own camera model, else gain 1, offset 0 —
    then marked not measured, so noise-aware engines estimate the camera from the frames."""
    base = source_model or CameraCalibration(measured=False)
    configured = camera.gain_adu_per_e is not None and camera.offset_adu is not None
    return CameraCalibration(
        measured=base.measured or configured,
        gain_adu_per_e=camera.gain_adu_per_e if camera.gain_adu_per_e is not None
        else base.gain_adu_per_e,
        offset_adu=camera.offset_adu if camera.offset_adu is not None else base.offset_adu,
        read_noise_e=camera.read_noise_e if camera.read_noise_e is not None
        else base.read_noise_e)


def load_engine(name: str, options: dict[str, Any], ctx: BuildContext) -> Engine:
    """A prepared engine for the camera's frames; EngineError says why not."""
    engine = make_engine(name, **options)
    try:
        engine.prepare(ctx.frame_shape, ctx.frame_dtype, ctx.calibration)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"engine {name!r} cannot run on {ctx.frame_shape} frames: "
                          f"{exc}") from exc
    return engine


def tier_factories(tiers: tuple[TierConfig, ...], calibration: CameraCalibration
                   ) -> list[tuple[str, Callable[[], Engine]]]:
    factories: list[tuple[str, Callable[[], Engine]]] = []
    for tier in tiers:
        def build(tier: TierConfig = tier) -> Engine:
            return make_engine(tier.name, **dict(tier.options))

        label = tier.name + ("" if not tier.options else " " + ",".join(
            f"{k}={v}" for k, v in tier.options.items()))
        factories.append((label, build))
    return factories


def _archive(node: Any, ctx: BuildContext) -> Stage:
    cfg = ctx.config.archive
    return RawArchive(ctx.run_dir, queue_frames=cfg.queue_frames,
                      rotate_bytes=int(cfg.rotate_gb * 2**30), pixel_size_um=ctx.pixel_size_um,
                      fsync_every_s=cfg.fsync_every_s)


def _engine(node: EngineNodeConfig, ctx: BuildContext) -> Stage:
    engine = ctx.engines.get(node.name) or load_engine(node.engine, dict(node.options), ctx)
    # `[engine] adapt` adapts the main engine's model; its files are kept with the run.
    adapt = node.name == "engine" and ctx.config.engine.adapt
    return EngineStage(engine, ctx.calibration, node.queue_frames, budget_ms=node.budget_ms,
                       tiers=tier_factories(node.tiers, ctx.calibration), name=node.name,
                       adapt_dir=ctx.run_dir / "adapted" if adapt else None,
                       trust=trust_settings(ctx.config.trust))


def trust_settings(cfg: TrustConfig) -> TrustSettings | None:
    if not cfg.enabled:
        return None
    return TrustSettings(false_alarm_rate=cfg.false_alarm_rate, flag_sigma=cfg.flag_sigma,
                         max_residual_sd=cfg.max_residual_sd)


def _publish(node: PublishNodeConfig, ctx: BuildContext) -> Stage:
    return PublishStage(node.topic, ctx.socket, node.queue_frames, name=node.name,
                        payload=node.payload, kinds=node.kinds)


def _trust_log(node: Any, ctx: BuildContext) -> Stage:
    return TrustLogStage(ctx.run_dir, name=node.name, filename=node.filename)


def _localize(node: LocalizeNodeConfig, ctx: BuildContext) -> Stage:
    # A queue of frames shares their pixels with the archive while queued: bounded in bytes
    # too, so a large camera does not hold gigabytes.
    frame_bytes = int(np.prod(ctx.frame_shape)) * ctx.frame_dtype.itemsize
    capacity = max(16, min(node.queue_frames, node.queue_mb * 2**20 // max(frame_bytes, 1)))
    try:
        from .localize_stage import LocalizeStage

        return LocalizeStage(node.model_copy(update={"queue_frames": capacity}), ctx.run_dir,
                             ctx.pixel_size_um, ctx.calibration)
    except ImportError as exc:  # smappy or pyarrow absent
        raise EngineError(f"node {node.name!r} needs the smlm extra (pip install "
                          f"'dimscope[smlm]'): {exc}") from None
    except ValueError as exc:  # a setting the localizer refuses
        raise EngineError(f"node {node.name!r}: {exc}") from None


def _render(node: RenderNodeConfig, ctx: BuildContext) -> Stage:
    from .localize_stage import RenderStage

    return RenderStage(node, ctx.run_dir)


def _mean(node: MeanNodeConfig, ctx: BuildContext) -> Stage:
    from .dense_stage import MeanStage

    return MeanStage(node)


def _dense(node: DenseNodeConfig, ctx: BuildContext) -> Stage:
    try:
        from .dense_stage import DenseStage

        return DenseStage(node, ctx.run_dir, ctx.calibration, ctx.frame_shape,
                          ctx.pixel_size_um * 1000.0)
    except ImportError as exc:  # onnx/openvino/scipy of the smlm extra absent
        raise EngineError(f"node {node.name!r} needs the smlm extra (pip install "
                          f"'dimscope[smlm]'): {exc}") from None
    except (ValueError, KeyError) as exc:
        raise EngineError(f"node {node.name!r}: {exc}") from None


def _interpolate(node: InterpolateNodeConfig, ctx: BuildContext) -> Stage:
    interpolator = make_interpolator(node.method, **dict(node.options))
    return InterpolationStage(interpolator, node.factor, name=node.name,
                              queue_frames=node.queue_frames,
                              trust=trust_settings(ctx.config.trust),
                              calibration=ctx.calibration)


#: node kind -> builder; a builder raises EngineError when its node cannot run here
NODE_KINDS: dict[str, Callable[[Any, BuildContext], Stage]] = {
    "archive": _archive,
    "engine": _engine,
    "publish": _publish,
    "interpolate": _interpolate,
    "trust_log": _trust_log,
    "localize": _localize,
    "render": _render,
    "mean": _mean,
    "dense": _dense,
}


def register_node_kind(kind: str, builder: Callable[[Any, BuildContext], Stage]
                       ) -> Callable[[Any, BuildContext], Stage] | None:
    """Add (or replace) the builder of a node kind, for plugins; returns the previous one."""
    previous = NODE_KINDS.get(kind)
    NODE_KINDS[kind] = builder
    return previous


def declared_nodes(config: Config, *, interpolate_factor: int | None = None
                   ) -> list[NodeConfig | ArchiveNodeConfig | TrustLogNodeConfig]:
    """Every node of the run in declaration order: the defaults, then `[[stages]]`."""
    pub = config.publish
    nodes: list[NodeConfig | ArchiveNodeConfig | TrustLogNodeConfig] = [ArchiveNodeConfig()]
    if pub.raw:
        nodes.append(PublishNodeConfig(name="publish_raw", topic="raw",
                                       queue_frames=config.acquisition.raw_queue_frames))
    eng = config.engine
    nodes.append(EngineNodeConfig(name="engine", engine=eng.name, options=eng.options,
                                  queue_frames=eng.queue_frames, budget_ms=eng.budget_ms,
                                  tiers=eng.tiers))
    if pub.enhanced:
        nodes.append(PublishNodeConfig(name="publish_enhanced", upstream="engine",
                                       topic="enhanced", queue_frames=pub.queue_frames))
    if config.trust.enabled:
        if pub.trust:
            nodes.append(PublishNodeConfig(name="publish_trust", upstream="engine",
                                           topic="trust", payload="trust",
                                           queue_frames=pub.queue_frames))
        nodes.append(TrustLogNodeConfig())
    factor = interpolate_factor or config.interpolate.factor
    if factor > 1:
        interp = config.interpolate
        # Interpolate what viewers see: the enhanced stream (raw if no engine runs).
        nodes.append(InterpolateNodeConfig(name="interpolate", upstream="engine",
                                           factor=factor, method=interp.method,
                                           options=interp.options, queue_frames=1))
        nodes.append(PublishNodeConfig(name="publish_interpolated", upstream="interpolate",
                                       topic="interpolated", queue_frames=pub.queue_frames))
        if config.trust.enabled:
            if pub.trust:
                nodes.append(PublishNodeConfig(
                    name="publish_trust_interpolated", upstream="interpolate",
                    topic="interp_trust", payload="trust",
                    queue_frames=pub.queue_frames))
            nodes.append(TrustLogNodeConfig(name="trust_log_interpolated",
                                            upstream="interpolate",
                                            filename=TRUST_LOG_INTERPOLATED))
    nodes.extend(config.stages)
    return nodes


@dataclass
class Graph:
    """Built stages by name, and who feeds whom."""

    stages: dict[str, Stage]
    #: stages fed straight by acquisition, in declaration order (the archive first)
    roots: list[Stage]

    def in_start_order(self) -> list[Stage]:
        """Downstream first, so no stage is offered a frame before it runs."""
        return list(reversed(self.stages.values()))


def build_graph(nodes: list[NodeConfig | ArchiveNodeConfig | TrustLogNodeConfig],
                ctx: BuildContext,
                *, reroute: dict[str, str] | None = None) -> Graph:
    """Build and connect the nodes. A node that cannot be built (its engine does not load)
    is left out with its reason in `ctx.errors`, and so are the nodes below it — except
    those `reroute` maps to another upstream (interpolation falls back to raw frames)."""
    reroute = reroute or {}
    stages: dict[str, Stage] = {}
    roots: list[Stage] = []
    for node in nodes:
        upstream = node.upstream
        if upstream != ROOT and upstream not in stages:
            upstream = reroute.get(node.name, upstream)
        if upstream != ROOT and upstream not in stages:
            ctx.errors[node.name] = f"not running: its upstream {node.upstream!r} is not"
            continue
        try:
            stage = NODE_KINDS[node.kind](node, ctx)
        except EngineError as exc:
            ctx.errors[node.name] = str(exc)
            log.error("node %s is not running (raw archiving unaffected): %s", node.name, exc)
            continue
        # A second input (a dense node's widefield image): the named node's frames, unqueued.
        side = getattr(node, "widefield", None)
        if side is not None:
            if side not in stages:
                ctx.errors[node.name] = f"not running: its widefield node {side!r} is not"
                stage.teardown()
                continue
            stages[side].connect(stage.widefield_input)  # type: ignore[attr-defined]
        stages[node.name] = stage
        if upstream == ROOT:
            roots.append(stage)
        else:
            stages[upstream].connect(stage.offer)
    return Graph(stages, roots)
