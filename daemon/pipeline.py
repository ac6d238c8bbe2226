"""One run: open the source, build the declared frame graph (`graph.py`), acquire, stop
cleanly, summarise. The graph's nodes come from config; this module owns only the
order of things — bind (publisher, control socket), load the engine, create the run
folder, start sinks first, acquire, then serve the control socket (`control.py`); on
stop: the control socket first (no change races the drain), acquisition, then drain
every queue, archive first.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from dimscope.drivers import SourceError, make_source
from dimscope.engines import EngineError

from . import __version__
from .acquisition import Acquisition, FinishReason
from .archive import create_run_dir
from .config import DEFAULT_NODE_NAMES, Config, with_overrides
from .control import ControlServer
from .dense_stage import DenseStage
from .graph import BuildContext, build_graph, camera_calibration, declared_nodes, load_engine
from .mda import MDAAcquisition, load_sequence
from .publisher import PublishSocket, PublishStage
from .stage import Stage
from .summary import (
    BudgetReport,
    EngineReport,
    LatencyStats,
    RunState,
    RunSummary,
    SmlmReadyReport,
    StageStats,
)

__all__ = ["Pipeline"]

log = logging.getLogger(__name__)


#: enhancement and publishing queues are short: this is ample to drain them
_OTHER_DRAIN_S = 10.0


def _id_ranges(ids: list[int]) -> str:
    """`[3, 4, 5, 9]` -> `3-5, 9`: frame ids named compactly, every one of them."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _engine_report(info: Any) -> EngineReport | None:
    if info is None:
        return None
    return EngineReport(name=info.name, version=info.version, runtime=info.runtime,
                        precision=info.precision, scale=info.scale,
                        model_sha256=info.model_sha256 or None, verified=info.verified)


def _budget(engine: Any) -> BudgetReport | None:
    if engine is None or getattr(engine, "budget_ms", None) is None:
        return None
    return BudgetReport(budget_ms=engine.budget_ms, tier=engine.tier, tier_name=engine.tier_name,
                        tier_changes=engine.tier_changes, skipped=engine.skipped,
                        missed=engine.counters.late)


class Pipeline:
    """One run: open the source, start the stages, acquire, stop cleanly, summarise."""

    def __init__(self, config: Config, *, out_dir: Path | None = None,
                 engine: str | None = None, interpolate: int | None = None,
                 mda: Any = None) -> None:
        self.config = config
        self.interpolate_factor = interpolate
        # A useq MDASequence: from the command line, else the config's [mda] block.
        self.mda_sequence = mda if mda is not None else (
            load_sequence(dict(config.mda)) if config.mda else None)
        if engine is not None:
            config = with_overrides(config, engine=engine)
            self.config = config
        self.engine_name = config.engine.name
        #: the main engine's options (the control socket's `engine.set` changes both)
        self.engine_options: dict[str, Any] = dict(config.engine.options)
        self.out_dir = Path(out_dir) if out_dir is not None else config.archive.out_dir
        self.source = make_source(config.source)
        self.run_dir: Path | None = None
        self.stages: list[Stage] = []
        self.acquisition: Acquisition | None = None
        self.socket: PublishSocket | None = None
        self.control: ControlServer | None = None
        #: what the graph was built with (frame shape, calibration): new engines need it
        self.build_context: BuildContext | None = None
        self.started_mono: float | None = None
        #: the control socket's address once it has closed (the summary still names it)
        self.control_address: str | None = None
        self.error: str | None = None
        self.engine_error: str | None = None
        self.interpolate_error: str | None = None
        self.engine_info: Any = None
        #: extra nodes that are not running, and why
        self.node_errors: dict[str, str] = {}
        self.state = RunState.IDLE
        self._stop_requested = threading.Event()
        #: the frame limit the run was started with (the SMLM summary compares with it)
        self.max_frames: int | None = None

    # -- lifecycle ------------------------------------------------------------------
    def start(self, max_frames: int | None = None) -> None:
        cfg = self.config
        self.state = RunState.STARTING
        self.started_mono = time.monotonic()
        self.max_frames = max_frames
        try:
            self.source.open()
        except SourceError:
            raise
        except Exception as exc:  # adapters raise anything; name the source
            raise SourceError(f"opening source {cfg.source.kind!r} failed: {exc}") from exc
        try:
            self._start_stages(max_frames)
        except BaseException:
            self._shutdown()
            self.state = RunState.FINISHED
            raise
        self.state = RunState.RUNNING

    def _load_main_engine(self, ctx: BuildContext) -> None:
        """Load `[engine]` before anything is created, so `on_failure = "stop"` refuses to start
        cleanly; under `raw_only` a failure leaves the run raw-only (said loudly)."""
        try:
            engine = load_engine(self.engine_name, dict(self.config.engine.options), ctx)
        except EngineError as exc:
            if self.config.engine.on_failure == "stop":
                raise
            self.engine_error = str(exc)
            log.error("engine %r unavailable, running raw only (archive and raw stream "
                      "unaffected): %s", self.engine_name, exc)
            return
        ctx.engines["engine"] = engine
        self.engine_info = engine.info

    def _start_stages(self, max_frames: int | None) -> None:
        cfg = self.config
        core = self.source.core
        calibration = camera_calibration(cfg.camera, getattr(self.source, "calibration", None))
        # Bind first: a port in use is bad input and must leave no run folder behind.
        self.socket = PublishSocket.from_config(cfg.publish, cfg.security)
        if cfg.control.enabled:  # refuses an exposed socket (SecurityError), or OSError
            self.control = ControlServer(self, cfg)
        ctx = self.build_context = BuildContext(
            config=cfg, run_dir=self.out_dir, socket=self.socket, calibration=calibration,
            frame_shape=(core.getImageHeight(), core.getImageWidth()),
            frame_dtype=np.dtype(f"uint{8 * core.getBytesPerPixel()}"),
            pixel_size_um=self.source.pixel_size_um)
        self._load_main_engine(ctx)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        try:
            self.run_dir = ctx.run_dir = create_run_dir(
                self.out_dir, f"{stamp}-{self.source.name.split(':')[0]}")
        except OSError as exc:
            raise OSError(f"cannot create a run folder in {self.out_dir}: "
                          f"{exc.strerror or exc}") from None
        nodes = declared_nodes(cfg, interpolate_factor=self.interpolate_factor)
        graph = build_graph([n for n in nodes if not (n.name == "engine" and self.engine_error)],
                            ctx, reroute={"interpolate": "acquisition"})
        interp_error = ctx.errors.get("interpolate")
        if interp_error:
            if cfg.engine.on_failure == "stop":
                raise EngineError(interp_error)
            self.interpolate_error = interp_error
        self.node_errors = {k: v for k, v in ctx.errors.items() if k not in DEFAULT_NODE_NAMES}
        for stage in graph.stages.values():
            stage.on_error(self._stage_failed)
            if cfg.smlm.stop_when_ready and hasattr(stage, "on_ready"):
                stage.on_ready(functools.partial(self._ready_stop, stage))
        self.stages = list(graph.stages.values())
        for stage in graph.in_start_order():  # sinks first: nothing offered to a dead stage
            stage.start()
        archive = graph.stages["archive"]
        consumers = [s for s in graph.roots if s is not archive]
        if self.mda_sequence is not None:
            self.acquisition = MDAAcquisition(self.source, archive, consumers, self.mda_sequence,
                                              on_error=self._acquisition_failed,
                                              archive_wait_s=cfg.archive.backpressure_s)
        else:
            self.acquisition = Acquisition(self.source, archive, consumers,
                                           poll_sleep_s=cfg.acquisition.poll_sleep_ms / 1000.0,
                                           max_frames=max_frames,
                                           on_error=self._acquisition_failed,
                                           archive_wait_s=cfg.archive.backpressure_s)
        self.acquisition.start()
        if self.control is not None:
            self.control.start(self.run_dir)  # requests queued since the bind are served now

    def _stage_failed(self, stage: Stage, exc: BaseException) -> None:
        if stage.name == "archive":
            self._fail(f"{exc}")
        else:  # enhancement and viewers never stop raw acquisition
            log.error("stage %s is out of service (raw archiving continues): %s",
                      stage.name, exc)

    def _acquisition_failed(self, exc: BaseException) -> None:
        self._fail(str(exc))

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
        self._stop_requested.set()
        if self.acquisition is not None:
            self.acquisition.request_stop()

    def request_stop(self, reason: FinishReason | None = None) -> None:
        self._stop_requested.set()
        if self.acquisition is not None:
            self.acquisition.request_stop(reason)

    def _ready_stop(self, stage: Stage, ready: dict[str, Any]) -> None:
        """`[smlm] stop_when_ready`: a dense node said the acquisition has enough frames."""
        log.info("%s is ready at %s frames: stopping acquisition ([smlm] stop_when_ready)",
                 stage.name, ready.get("frames"))
        self.request_stop(FinishReason.READY)

    def wait(self, *, duration_s: float | None = None, poll_s: float = 0.1,
             on_tick: Any = None, tick_s: float = 0.5) -> None:
        """Block until the frame limit, the duration, a stop request or an error."""
        assert self.acquisition is not None
        deadline = None if duration_s is None else time.monotonic() + duration_s
        next_tick = time.monotonic() + tick_s
        while not self.acquisition.finished.is_set():
            if self._stop_requested.is_set():
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            self._stop_requested.wait(poll_s)
            if on_tick is not None and time.monotonic() >= next_tick:
                on_tick(self)
                next_tick += tick_s

    def stop(self) -> RunSummary:
        """Stop acquiring, archive every acquired frame, drain the rest; return the summary.

        The archive gets `archive.drain_timeout_s` to write what it holds; frames
        it could not write in that time are named in the summary (`not_archived`).
        """
        self.state = RunState.STOPPING
        self._close_control()
        if self.acquisition is not None:
            self.acquisition.request_stop()
            self.acquisition.join()
        self._shutdown()
        left = self.acquisition.left_in_camera if self.acquisition is not None else 0
        if left and self.error is not None:
            self.error += (f"; {left} frame(s) the camera had delivered were still in its "
                           "buffer and were not archived")
        archive = self.stage("archive")
        if archive is not None and archive.abandoned_ids:
            ids = archive.abandoned_ids
            self._fail(f"the archive could not write {len(ids)} acquired frame(s) within "
                       f"archive.drain_timeout_s = {self.config.archive.drain_timeout_s:g} s; "
                       f"not on disk: frame ids {_id_ranges(ids)}")
        self.state = RunState.FINISHED
        summary = self.summary()
        if self.run_dir is not None and self.run_dir.exists():
            run_json = {"dimscope": __version__, "engine": self.engine_name,
                        "config": json.loads(self.config.model_dump_json())}
            written: list[Path] = []
            try:
                for name, text in (("summary.json", summary.model_dump_json(indent=2)),
                                   ("run.json", json.dumps(run_json, indent=2, default=str))):
                    (self.run_dir / name).write_text(text)
                    written.append(self.run_dir / name)
            except OSError as exc:
                # On a full disk the summary still reaches the terminal (and --summary-json).
                failed = self.run_dir / ("run.json" if len(written) else "summary.json")
                log.error("could not write %s: %s", failed, exc.strerror or exc)
                failed.unlink(missing_ok=True)
                summary = summary.model_copy(
                    update={"write_error": f"{failed}: {exc.strerror or exc}"})
        return summary

    def _close_control(self) -> None:
        control, self.control_address = self.control, self.control_endpoint
        self.control = None
        if control is not None:
            control.close()

    def _shutdown(self) -> None:
        self._close_control()
        # Upstream first: archive and engine drain into publishers that are still up.
        drain_s = self.config.archive.drain_timeout_s
        for stage in self.stages:
            try:
                stage.stop(drain_s if stage.name == "archive" else
                           stage.drain_timeout_s or _OTHER_DRAIN_S)
            except Exception:  # one stage's teardown must not leave the others running
                log.exception("stopping stage %s failed", stage.name)
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        self.source.close()

    @property
    def control_endpoint(self) -> str | None:
        """The control socket's bound address (while it serves; then the last one)."""
        if self.control is not None:
            return self.control.endpoint
        return self.control_address

    @property
    def publish_endpoint(self) -> str | None:
        """The bound address (resolves a wildcard port such as tcp://127.0.0.1:*)."""
        return self.socket.endpoint if self.socket is not None else None

    # -- reporting ------------------------------------------------------------------
    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def elapsed_s(self) -> float:
        """Acquisition time: camera sequence start to stop request (not setup or drain)."""
        acq = self.acquisition
        if acq is None or acq.started_mono is None:
            return 0.0
        end = acq.stop_requested_mono if acq.stop_requested_mono is not None else time.monotonic()
        return max(end - acq.started_mono, 1e-9)

    def summary(self) -> RunSummary:
        acq = self.acquisition
        stages: dict[str, StageStats] = {}
        if acq is not None:
            stages["acquisition"] = StageStats.model_validate(acq.snapshot())
        for s in self.stages:
            stages[s.name] = StageStats.model_validate(s.snapshot())
        archive = self.stage("archive")
        engine = self.stage("engine")
        latency: dict[str, LatencyStats] = {}
        published = 0
        for s in self.stages:
            if isinstance(s, PublishStage):
                latency[s.topic] = LatencyStats(**s.end_to_end.summary())
                published += s.counters.passed
        if engine is not None:
            latency["engine"] = LatencyStats(**engine.latency.summary())
        interp = self.stage("interpolate")
        if interp is not None:
            latency["interpolate"] = LatencyStats(**interp.latency.summary())
        acquired = acq.counters.received if acq is not None else 0
        elapsed = self.elapsed_s()
        # Frames the engine passed on raw (budget skips) are published but not enhanced.
        enhanced = (engine.counters.passed - getattr(engine, "skipped", 0)
                    if engine is not None else 0)
        return RunSummary(
            state=self.state,
            acquired=acquired,
            archived=archive.counters.passed if archive is not None else 0,
            not_archived=list(archive.abandoned_ids) if archive is not None else [],
            finish_reason=acq.finish_reason if acq is not None else None,
            enhanced=enhanced,
            published=published,
            dropped={name: snap.dropped for name, snap in stages.items()},
            fps=acquired / elapsed if elapsed else 0.0,
            elapsed_s=elapsed,
            engine=self.engine_name,
            engine_info=_engine_report(self.engine_info),
            mda_planned=getattr(acq, "planned", None),
            engine_error=self.engine_error,
            node_errors=dict(self.node_errors),
            interpolate_error=self.interpolate_error,
            budget=_budget(engine),
            source=self.source.name,
            run_dir=str(self.run_dir) if self.run_dir else None,
            archive_files=[str(p) for p in getattr(archive, "files", [])],
            publish_address=self.config.publish.address,
            control_address=self.control_endpoint,
            stages=stages,
            latency_ms=latency,
            error=self.error,
            smlm_ready=[SmlmReadyReport(
                node=s.name, ready=s.ready is not None,
                frames_used=(s.ready or {}).get("frames"), max_frames=self.max_frames,
                stop_when_ready=self.config.smlm.stop_when_ready,
                check=s.ready or s.last_check) for s in self.stages if isinstance(s, DenseStage)],
        )
