"""`dimscope` command line: run, subscribe, check-config, recover (train, eval, models:
`cli_models.py`; enhance, adapt: `cli_enhance.py`)."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .summary import LatencyStats, RunState, RunSummary, StageStats

EXIT_OK, EXIT_RUN_FAILED, EXIT_BAD_INPUT = 0, 1, 2

# Named, not __name__: under `python -m dimscope.daemon.cli` that would be "__main__".
log = logging.getLogger("dimscope.daemon.cli")


def _fmt_status(p: Any, width: int = 79) -> str:
    """One status line that fits `width` columns (it is redrawn in place with \\r)."""
    s: RunSummary = p.summary()
    drops = sum(v.dropped for v in s.stages.values())
    lat = s.latency_ms.get("enhanced") or s.latency_ms.get("raw") or LatencyStats()
    archive = s.stages.get("archive") or StageStats()
    parts = [f"{s.elapsed_s:6.1f}s", f"acq {s.acquired} {s.fps:.0f}/s",
             f"arch {s.archived} q{archive.depth}",
             f"enh {s.enhanced}" if s.engine_info else "RAW ONLY",
             f"drop {drops}", f"lat {lat.p50 or 0:.0f}/{lat.p99 or 0:.0f}ms"]
    if s.budget:
        parts.append(f"T{s.budget.tier} skip {s.budget.skipped}")
    interp = s.stages.get("interpolate")
    if interp:
        parts.append(f"int {interp.passed}")
    line = " ".join(parts)
    return line if len(line) <= width else line[:width - 1] + "…"


def _print_summary(s: RunSummary) -> None:
    out = sys.stdout
    print("\n== dimscope run summary ==", file=out)
    print(f"source {s.source}  engine {s.engine}  {s.elapsed_s:.1f} s  {s.fps:.1f} frames/s"
          + (f"  ended: {s.finish_reason}" if s.finish_reason else ""), file=out)
    info = s.engine_info
    if info:
        print(f"engine {info.name} {info.version} on {info.runtime} "
              f"({info.precision}, x{info.scale})"
              + ("" if getattr(info, "verified", True) else
                 "  UNVERIFIED MODEL (weights do not match its card)"), file=out)
    if s.engine_error:
        print(f"ENGINE ERROR (ran raw only): {s.engine_error}", file=out)
    if s.interpolate_error:
        print(f"INTERPOLATION ERROR (not interpolated): {s.interpolate_error}", file=out)
    for node, why in s.node_errors.items():
        print(f"NODE {node} NOT RUNNING: {why}", file=out)
    if s.budget:
        b = s.budget
        print(f"budget {b.budget_ms:g} ms: final tier {b.tier} ({b.tier_name}), "
              f"{b.tier_changes} tier change(s), {b.missed} enhanced frame(s) late, "
              f"{b.skipped} skipped (published raw, flagged)", file=out)
    print(f"acquired {s.acquired}  archived {s.archived}  enhanced {s.enhanced}  "
          f"published {s.published}", file=out)
    print(f"{'stage':<22}{'received':>10}{'passed':>10}{'dropped':>10}{'late':>8}"
          f"{'errors':>8}{'max q':>7}", file=out)
    for name, v in s.stages.items():
        print(f"{name:<22}{v.received:>10}{v.passed:>10}{v.dropped:>10}{v.late:>8}"
              f"{v.errors:>8}{v.max_depth:>7}", file=out)
    for topic, lat in s.latency_ms.items():
        if lat.n:
            what = "processing" if topic in ("engine", "interpolate") else "acquisition -> publish"
            print(f"latency {topic:<9} ({what}): p50 {lat.p50:.2f} ms  p99 {lat.p99:.2f} ms"
                  f"  max {lat.max:.2f} ms", file=out)
    for r in s.smlm_ready:
        limit = f" of the {r.max_frames} allowed" if r.max_frames else ""
        failing = "; ".join((r.check or {}).get("failing", [])) or "no prediction yet"
        print(f"{r.node}: " + (f"READY at {r.frames_used} frames{limit}" if r.ready else
                               f"not ready ({failing})"), file=out)
    print(f"archive: {s.run_dir}", file=out)
    if s.write_error:
        print(f"COULD NOT WRITE: {s.write_error}", file=out)
    if s.error:
        print(f"ERROR: {s.error}", file=out)


def _say(text: str, level: int = logging.INFO, **fields: Any) -> None:
    """What `run` tells its operator: printed to stderr as always, or — under `--log-json` —
    one log record (the `dimscope: ` prefix dropped), so that only JSON reaches stderr."""
    from .logs import json_logs_enabled

    if json_logs_enabled():
        log.log(level, text.strip().removeprefix("dimscope: "), extra=fields)
    else:
        print(text, file=sys.stderr, flush=True)


def _use_json_logs(enabled: bool) -> None:
    from .logs import use_json_logs

    use_json_logs(enabled)
    # The CLI's own messages are INFO (they are printed regardless of -v without JSON).
    log.setLevel(logging.INFO if enabled else logging.NOTSET)


def _announce_data_rate(pipeline: Any) -> None:
    """Say at start how fast the archive will grow, and warn where that is a lot."""
    import shutil

    core = pipeline.source.core
    frame_bytes = core.getImageWidth() * core.getImageHeight() * core.getBytesPerPixel()
    exposure_ms = max(float(core.getExposure()), 0.01)
    rate = frame_bytes * 1000.0 / exposure_ms  # at most one frame per exposure
    if pipeline.mda_sequence is not None or pipeline.run_dir is None:
        return
    free = shutil.disk_usage(pipeline.run_dir).free
    minutes = free / rate / 60.0
    text = (f"archive grows up to {rate / 1e6:.0f} MB/s ({rate * 3600 / 1e9:.0f} GB/h) at "
            f"{exposure_ms:g} ms exposure; {free / 1e9:.1f} GB free there (~{minutes:.0f} min)")
    if rate > _FAST_ARCHIVE_BYTES_S:
        _say(f"dimscope: WARNING: {text} — point --out / archive.out_dir at a fast disk "
             "with room", logging.WARNING)
    else:
        _say(f"dimscope: {text}")


#: a run that writes faster than this is announced with a warning at start
_FAST_ARCHIVE_BYTES_S = 40e6


def _run_config(args: argparse.Namespace) -> Any:
    """The config file with this command line's overrides (also what a reload re-reads)."""
    from .config import load_config, with_overrides

    return with_overrides(load_config(args.config), engine=args.engine, model=args.model,
                          allow_unverified_model=args.allow_unverified_model,
                          insecure=args.insecure, json_logs=args.log_json)


def _first_frame_stored(pipeline: Any) -> bool:
    """READY means data is being kept: a frame's pixels are in the archive and its index
    line is on disk (the index trails the pixels by up to 20 ms)."""
    from .archive import INDEX_NAME

    archive = pipeline.stage("archive")
    if archive is None or archive.counters.passed < 1 or pipeline.run_dir is None:
        return False
    try:
        return bool((pipeline.run_dir / INDEX_NAME).stat().st_size > 0)
    except OSError:
        return False


def _frames_stored(pipeline: Any) -> int:
    archive = pipeline.stage("archive")
    return int(archive.counters.passed) if archive is not None else 0


def _quiet_on_purpose(pipeline: Any, monitor: Any) -> bool:
    """Whether no frames are expected now: live streaming stopped from the control socket.
    Also refreshes the allowed gap between frames, which a control `set exposure` or an
    `mda.run` started from the control socket changes during the run."""
    from .acquisition import AcquisitionMode

    acquisition = pipeline.acquisition
    if acquisition is None:
        return False
    monitor.grace_s = _expected_gap_s(pipeline)
    return getattr(acquisition, "mode", None) is AcquisitionMode.STOPPED


def _expected_gap_s(pipeline: Any) -> float:
    """How long frames may legitimately not arrive: two exposures, plus the longest planned
    wait of an MDA time-lapse. The watchdog keeps pinging through such a gap."""
    gap = 2 * max(float(pipeline.source.core.getExposure()), 0.0) / 1000.0
    acquisition = pipeline.acquisition
    sequence = (getattr(acquisition, "running_sequence", None)  # an mda.run in progress
                or getattr(acquisition, "sequence", None) or pipeline.mda_sequence)
    plan = getattr(sequence, "time_plan", None)
    if plan is not None:
        times = [float(t) for t in plan]
        gap += max((b - a for a, b in itertools.pairwise(times)), default=0.0)
    return gap


class _ServiceStatus:
    """`STATUS=` for systemd: state, frames archived and their recent rate, losses, engine."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self._last = (time.monotonic(), 0)
        #: set when the stop begins, before `Pipeline.stop()` changes the pipeline's state
        self.stopping = False

    def __call__(self) -> str:
        s: RunSummary = self.pipeline.summary()
        now = time.monotonic()
        t0, n0 = self._last
        self._last = (now, s.archived)
        fps = (s.archived - n0) / (now - t0) if now > t0 else 0.0
        archive = s.stages.get("archive") or StageStats()
        drops = sum(v.dropped for name, v in s.stages.items() if name != "archive")
        engine = s.stages.get("engine")
        if s.engine_info is None or (engine is not None and engine.error):
            what = "RAW ONLY (engine unavailable)"
        else:
            e = s.engine_info
            what = f"engine {e.name} {e.version} on {e.runtime}"
            if s.budget:
                what += f" tier {s.budget.tier}"
        state = {RunState.IDLE: "starting"}.get(s.state, s.state.value)  # before start()
        if self.stopping and s.state is RunState.RUNNING:
            state = "stopping"
        text = (f"{state}: {s.archived} frames archived ({fps:.1f}/s), "
                f"lost {archive.dropped}, dropped by slower stages {drops}; {what}")
        if state == "starting":
            text += "; waiting for the first frame"
        elif state == "stopping":
            text += f"; {archive.depth} frame(s) still to archive"
        return text + (f"; ERROR {s.error}" if s.error else "")


class _Reloader:
    """SIGHUP: re-read the config file. What can change live is applied (`logging.json_logs`,
    `metrics.address`); every other changed key is named as needing a restart, and the run
    goes on unchanged — a reload never touches acquisition, so no frame is lost."""

    def __init__(self, args: argparse.Namespace, config: Any, collector: Any,
                 metrics: Any) -> None:
        self.args = args
        self.running = config
        self.collector = collector
        self.metrics = metrics

    def __call__(self) -> str:
        from .config import ConfigError
        from .service import config_changes

        where = str(self.args.config or "the embedded default config")
        try:
            new = _run_config(self.args)
        except ConfigError as exc:
            _say(f"dimscope: reload: {exc}\nrunning on with the configuration loaded before",
                 logging.ERROR)
            return f"reload of {where} failed: invalid config, nothing changed"
        changed = config_changes(self.running.model_dump(mode="json"),
                                 new.model_dump(mode="json"))
        applied: list[str] = []
        if "logging.json_logs" in changed:
            _use_json_logs(new.logging.json_logs)
            self.running = self.running.model_copy(update={"logging": new.logging})
            applied.append("logging.json_logs")
        if "metrics.address" in changed and self._move_metrics(new.metrics.address):
            self.running = self.running.model_copy(update={"metrics": new.metrics})
            applied.append("metrics.address")
        pending = [key for key in changed if key not in applied]
        if pending:
            _say(f"dimscope: reload: {len(pending)} changed key(s) need a restart to take "
                 f"effect (systemctl restart dimscope): {', '.join(pending)}", logging.WARNING,
                 needs_restart=pending)
        outcome = (f"reloaded {where}: "
                   + (f"applied {', '.join(applied)}" if applied else "nothing applied")
                   + (f"; {len(pending)} key(s) need a restart" if pending else "")
                   + ("" if changed else " (no changes)"))
        _say(f"dimscope: {outcome}", applied=applied)
        return outcome

    def _move_metrics(self, address: str | None) -> bool:
        """Serve /metrics on the new address (bound before the old one closes); False, with
        the reason said, when it cannot bind there — the old server stays."""
        from .prometheus import MetricsServer

        new = None
        if address is not None:
            try:
                new = MetricsServer(address, self.collector)
            except (ValueError, OSError) as exc:
                _say(f"dimscope: reload: {exc}; /metrics stays where it was", logging.ERROR)
                return False
        if self.metrics is not None:
            self.metrics.close()
        self.metrics = new
        _say(f"dimscope: metrics on {new.url}" if new else "dimscope: metrics off")
        return True

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def cmd_run(args: argparse.Namespace) -> int:
    from dimscope.engines import EngineError

    from .config import ConfigError
    from .mda import MDAError
    from .pipeline import Pipeline
    from .prometheus import MetricsServer, PipelineCollector
    from .service import Notifier, ServiceMonitor

    started = time.monotonic()
    if args.log_json:  # before anything is said: a config error comes out as JSON too
        _use_json_logs(True)
    try:
        config = _run_config(args)
        if config.logging.json_logs:
            _use_json_logs(True)
        sequence = None
        if args.mda is not None:
            from .mda import load_sequence

            sequence = load_sequence(args.mda)
        pipeline = Pipeline(config, out_dir=args.out, interpolate=args.interpolate,
                            mda=sequence)
    except (ConfigError, EngineError, MDAError) as exc:
        _say(f"dimscope: {exc}", logging.ERROR)
        return EXIT_BAD_INPUT
    collector = PipelineCollector(pipeline, started_mono=started)
    metrics = None
    if config.metrics.address:
        # Bound before the run starts: a port in use is bad input, with no run folder made.
        try:
            metrics = MetricsServer(config.metrics.address, collector)
        except (ValueError, OSError) as exc:
            _say(f"dimscope: {exc}", logging.ERROR)
            return EXIT_BAD_INPUT
    notifier, watchdog_s = Notifier.from_environ()
    reloader = _Reloader(args, config, collector, metrics)
    status = _ServiceStatus(pipeline)
    monitor = ServiceMonitor(notifier, ready=lambda: _first_frame_stored(pipeline),
                             progress=lambda: _frames_stored(pipeline), status=status,
                             watchdog_s=watchdog_s, reload=reloader,
                             idle_ok=lambda: _quiet_on_purpose(pipeline, monitor))
    monitor.start()
    try:
        return _run(args, config, pipeline, monitor, reloader, status)
    finally:
        monitor.close()
        reloader.close()
        notifier.close()


def _run(args: argparse.Namespace, config: Any, pipeline: Any, monitor: Any,
         reloader: _Reloader, status: _ServiceStatus) -> int:
    """`cmd_run` once the pipeline exists: signals, start, wait, stop, summary."""
    from dimscope.drivers import SourceError
    from dimscope.engines import EngineError

    from .security import SecurityError

    def _stop(signum: int, _frame: Any) -> None:
        _say(f"\ndimscope: {signal.Signals(signum).name} received, stopping (draining queues)",
             logging.WARNING)
        pipeline.request_stop()

    def _reload(_signum: int, _frame: Any) -> None:
        monitor.request_reload()  # the monitor thread re-reads the config, not this handler

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    # SIGHUP reloads under systemd (ExecReload) or detached from a terminal; in a terminal a
    # hang-up means the terminal is gone: stop cleanly, as for SIGTERM, rather than die
    # with frames still queued for the archive.
    detached = sys.stdin is None or not sys.stdin.isatty()
    signal.signal(signal.SIGHUP, _reload if monitor.notifier.enabled or detached else _stop)
    try:
        pipeline.start(max_frames=args.frames)
    except (SourceError, EngineError, OSError, SecurityError) as exc:
        _say(f"dimscope: {exc}", logging.ERROR)
        return EXIT_BAD_INPUT
    monitor.grace_s = _expected_gap_s(pipeline)
    tty = sys.stderr.isatty() and not _json_logs()
    if pipeline.engine_error:
        _say(f"dimscope: ENGINE ERROR, running raw only (every raw frame is still archived "
             f"and published): {pipeline.engine_error}", logging.ERROR)
    elif pipeline.engine_info is not None:
        e = pipeline.engine_info
        _say(f"dimscope: engine {e.name} {e.version} on {e.runtime} ({e.precision})")
        if not e.verified:
            _say(f"dimscope: WARNING: model {e.name} {e.version} does not match its card "
                 f"(loaded with --allow-unverified-model): every frame it makes says "
                 f"verified: false", logging.WARNING)
    _say(f"dimscope {__version__}: {pipeline.source.name} -> engine {pipeline.engine_name}; "
         f"publishing on {config.publish.address}"
         + (f"; control on {pipeline.control_endpoint}" if pipeline.control_endpoint else "")
         + f"; archiving to {pipeline.run_dir}",
         run_dir=str(pipeline.run_dir))
    if reloader.metrics is not None:
        _say(f"dimscope: metrics on {reloader.metrics.url}")
    _announce_data_rate(pipeline)
    last_line = [time.monotonic()]

    def tick(p: Any) -> None:
        if args.quiet:
            return
        if tty:
            print("\r" + _fmt_status(p), end="", file=sys.stderr, flush=True)
        elif time.monotonic() - last_line[0] >= 5.0:
            _say(_fmt_status(p))
            last_line[0] = time.monotonic()

    pipeline.wait(duration_s=args.duration, on_tick=tick)
    status.stopping = True
    monitor.stopping()  # STOPPING=1 before the drain: systemd's stop timeout now applies
    summary = pipeline.stop()
    if tty and not args.quiet:
        print(file=sys.stderr)
    _print_summary(summary)
    if _json_logs():  # the summary above is prose on stdout; this is the line to query
        _say(f"dimscope: run finished: {summary.acquired} acquired, {summary.archived} "
             "archived" + (f", NOT archived: {len(summary.not_archived)}"
                           if summary.not_archived else "")
             + (f"; ERROR {summary.error}" if summary.error else ""),
             logging.ERROR if summary.error else logging.INFO,
             acquired=summary.acquired, archived=summary.archived,
             not_archived=len(summary.not_archived), run_dir=summary.run_dir,
             finish_reason=summary.finish_reason, error=summary.error)
    if args.summary_json:
        try:
            Path(args.summary_json).write_text(summary.model_dump_json(indent=2))
        except OSError as exc:
            _say(f"dimscope: could not write the summary to {args.summary_json}: "
                 f"{exc.strerror or exc}", logging.ERROR)
    failed = summary.error or summary.engine_error
    return EXIT_RUN_FAILED if failed else EXIT_OK


def _json_logs() -> bool:
    from .logs import json_logs_enabled

    return json_logs_enabled()


def _save_per_topic(path: Path, frames: dict[str, list[tuple[Any, dict[str, Any]]]]) -> None:
    """One TIFF (+ `.frames.json`) per topic; a topic mixing shapes or dtypes splits further."""
    import numpy as np
    import tifffile

    for topic, items in frames.items():
        groups: dict[tuple[tuple[int, ...], str], list[tuple[Any, dict[str, Any]]]] = {}
        for pixels, ids in items:
            groups.setdefault((pixels.shape, pixels.dtype.str), []).append((pixels, ids))
        for (shape, dtype), group in groups.items():
            name = path.stem + ("" if len(frames) == 1 else f"-{topic}")
            if len(groups) > 1:
                name += f"-{'x'.join(map(str, shape))}-{np.dtype(dtype).name}"
            out = path.with_name(name + path.suffix)
            tifffile.imwrite(out, np.stack([p for p, _ in group]), metadata={"axes": "TYX"})
            sidecar = Path(str(out) + ".frames.json")
            sidecar.write_text(json.dumps([ids for _, ids in group]))
            print(f"saved {len(group)} {topic} frame(s) to {out} (frame ids in {sidecar})",
                  file=sys.stderr)


def cmd_subscribe(args: argparse.Namespace) -> int:
    import numpy as np

    from .client import Subscriber
    from .config import check_endpoint

    try:
        check_endpoint(args.address, bind=False)
    except ValueError as exc:
        print(f"dimscope: --address {args.address!r}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    topics = [args.topic] if args.topic else ["raw", "enhanced", "interpolated"]
    saved: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    interrupted = False

    def _stop(_signum: int, _frame: Any) -> None:
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    print(f"dimscope: waiting for {', '.join(topics)} frames from {args.address}"
          + (f" (giving up after {args.timeout:g} s)" if args.timeout is not None else
             " (Ctrl-C to stop; --timeout S to give up)"), file=sys.stderr)
    n = 0
    try:
        sub = Subscriber(args.address, topics=topics,
                         max_message_bytes=int(args.max_frame_mb * 2**20),
                         server_key=args.server_key, client_key=args.client_key)
    except (ValueError, OSError) as exc:  # half a key pair, unreadable key files
        print(f"dimscope: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with sub:
        last_frame = started = time.monotonic()
        next_notice = started + _WAIT_NOTICE_S
        while not interrupted and (args.count is None or n < args.count):
            msg = sub.recv(timeout_s=0.2)
            now = time.monotonic()
            if msg is None:
                if args.timeout is not None and now - last_frame >= args.timeout:
                    print(f"dimscope: no frames from {args.address} for {args.timeout:g} s "
                          f"({n} received in all)", file=sys.stderr)
                    return EXIT_RUN_FAILED
                if now >= next_notice:
                    print(f"dimscope: still waiting for frames from {args.address} "
                          f"({now - last_frame:.0f} s): is a daemon publishing there?",
                          file=sys.stderr)
                    next_notice = now + _WAIT_NOTICE_S
                continue
            last_frame, next_notice = now, now + _WAIT_NOTICE_S
            n += 1
            h = msg.header
            lat = h["latency_ms"].get("total", float("nan"))
            engine = h["engine"]["name"] if h.get("engine") else "-"
            gap = f"  GAP {msg.gap}" if msg.gap else ""
            if "t" in h:  # interpolated: which interval, and where in it
                gap = f"  t={h['t']:g} of {h['source_ids']}" + gap
            if "budget" in h:
                gap = f"  budget {h['budget']}" + gap
            if h.get("trust"):
                tr = h["trust"]
                gap = f"  trust z {tr['max_z']:+.1f}{' ALERT' if tr['alert'] else ''}" + gap
            if h.get("engine") and not h["engine"].get("verified", True):
                gap = "  UNVERIFIED MODEL" + gap
            print(f"{msg.topic:<9} frame {h['frame_id']:>7} seq {h['seq']:>7} "
                  f"{'x'.join(map(str, h['shape']))} {h['dtype']} engine {engine} "
                  f"latency {lat:6.2f} ms{gap}", flush=True)
            if args.save:
                saved.setdefault(msg.topic, []).append(
                    (np.array(msg.pixels),
                     {"topic": msg.topic, "frame_id": h["frame_id"], "seq": h["seq"]}))
    if args.save and saved:
        _save_per_topic(args.save, saved)
    total_gaps = sum(sub.gaps.values())
    if total_gaps:
        print(f"dimscope: {total_gaps} frame(s) missed (gaps in seq)", file=sys.stderr)
    return EXIT_OK


#: `subscribe` says it is still waiting this often while nothing arrives
_WAIT_NOTICE_S = 5.0


def _open_models(cfg: Any) -> list[Any]:
    """Construct every model engine and model interpolator the config names (the engine,
    tiers, `[[stages]]` engines and their tiers, live and `[[stages]]` model interpolation):
    each reads its model file and checks its weights against its card. The engine itself is
    always constructed; other engines only if they load a model (the classical ones may need
    optional packages a run without them would not). Returns their infos."""
    from dimscope.engines import make_engine
    from dimscope.engines.interpolators import make_interpolator

    from .config import MODEL_ENGINES

    engines = [(cfg.engine.name, cfg.engine.options)]
    engines += [(t.name, t.options) for t in cfg.engine.tiers if t.name in MODEL_ENGINES]
    for node in cfg.stages:
        if node.kind == "engine":
            engines += [(node.engine, node.options), *((t.name, t.options) for t in node.tiers)]
    engines = engines[:1] + [(n, o) for n, o in engines[1:] if n in MODEL_ENGINES]
    interpolators = [cfg.interpolate.options] if (
        cfg.interpolate.factor > 1 and cfg.interpolate.method == "model") else []
    interpolators += [node.options for node in cfg.stages
                      if node.kind == "interpolate" and node.method == "model"]
    infos = []
    for name, options in engines:
        engine = make_engine(name, **dict(options))
        infos.append(engine.info)
        engine.close()
    for options in interpolators:
        interpolator = make_interpolator("model", **dict(options))
        infos.append(interpolator.info)
        interpolator.close()
    return infos


def cmd_check_config(args: argparse.Namespace) -> int:
    from dimscope.engines import EngineError

    from .config import ConfigError, check_out_dir, load_config, with_overrides

    try:
        cfg = with_overrides(load_config(args.config),
                             allow_unverified_model=args.allow_unverified_model)
        check_out_dir(cfg.archive.out_dir)
        # Constructing the engines reads their model files and cards and checks the weights
        # against the cards: a missing, damaged or changed model is reported here, before
        # any run.
        infos = _open_models(cfg)
    except (ConfigError, EngineError, OSError) as exc:
        print(f"dimscope: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    unverified = [f"{i.name} {i.version}" for i in infos if not i.verified]
    print(f"{args.config}: OK (source {cfg.source.kind}, engine {cfg.engine.name}, "
          f"publish {cfg.publish.address}, archive {cfg.archive.out_dir})"
          + (f"; UNVERIFIED model(s), allowed by --allow-unverified-model: "
             f"{', '.join(unverified)}" if unverified else ""))
    return EXIT_OK


def cmd_recover(args: argparse.Namespace) -> int:
    from .archive import recover_run

    try:
        report = recover_run(args.run_dir, args.out)
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"dimscope: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        where = args.out or args.run_dir
        print(f"dimscope: cannot write the recovered files to {where}: {exc.strerror or exc}"
              + ("" if args.out else " (use --out DIR on another disk)"), file=sys.stderr)
        return EXIT_RUN_FAILED
    for out in report.outputs:
        print(f"wrote {out}")
    for problem in report.problems:
        print(f"skipped {problem}", file=sys.stderr)
    print(f"recovered {report.recovered} frame(s) from {report.run_dir}"
          + (f"; NOT recovered: frames {report.missing_frames}" if report.missing_frames
             else ""))
    tables_ok = _recover_tables(Path(args.run_dir), Path(args.out or args.run_dir))
    return EXIT_RUN_FAILED if report.missing_frames or not tables_ok else EXIT_OK


def _recover_tables(run_dir: Path, out_dir: Path) -> bool:
    """Localization tables of the run (`*.arrows`, from a `localize` node): a table a crash
    cut is copied up to its last complete block (`<name>.recovered.arrows`); False if one
    cannot be read at all."""
    ok = True
    for path in sorted(run_dir.glob("*.arrows")):
        if path.name.endswith(".recovered.arrows"):
            continue
        try:
            from dimscope.smlm.table import read_table, recovered_copy

            if read_table(path).complete:
                print(f"table {path.name}: complete (closed cleanly)")
                continue
            out = out_dir / f"{path.stem}.recovered.arrows"
            out.unlink(missing_ok=True)
            rep = recovered_copy(path, out)
        except (ImportError, ValueError, OSError) as exc:
            print(f"dimscope: table {path}: {exc}", file=sys.stderr)
            ok = False
            continue
        print(f"wrote {out}: {rep.blocks} complete block(s), {rep.rows} localization(s), "
              f"frames 0-{rep.frames_done - 1} localized (the rest: `dimscope smlm localize` "
              f"on the recovered raw frames); {rep.bytes_dropped} byte(s) of a cut block left "
              "out")
    return ok


#: `--allow-unverified-model` (run, check-config, enhance)
_ALLOW_UNVERIFIED_HELP = (
    "load models whose weights do not match the SHA-256 their card records (or whose card "
    "records none) instead of refusing them; a warning names each, and every frame they make "
    "says verified: false")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dimscope", description=(
        "Live low-light enhancement beside a Micro-Manager microscope: every raw frame "
        "archived, enhanced frames published over ZeroMQ."))
    p.add_argument("--version", action="version", version=f"dimscope {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="acquire, archive, enhance and publish (foreground)")
    r.add_argument("-c", "--config", type=Path, default=None,
                   help="TOML config (default: the embedded simulated microscope)")
    lim = r.add_mutually_exclusive_group()
    lim.add_argument("--frames", type=int, default=None, help="stop after N frames")
    lim.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    r.add_argument("--out", type=Path, default=None, help="parent folder of the run folder")
    r.add_argument("--engine", default=None, help="engine name (overrides the config)")
    r.add_argument("--model", default=None,
                   help="model name or .onnx path for the engine (engine.options.model)")
    r.add_argument("--mda", type=Path, default=None,
                   help="run this useq-schema MDA sequence (YAML/JSON) instead of streaming")
    r.add_argument("--interpolate", type=int, choices=[1, 2, 4], default=None,
                   help="publish 1 (2) or 3 (4) interpolated frames per interval "
                        "(overrides the config)")
    r.add_argument("--summary-json", type=Path, default=None, help="write the summary as JSON")
    r.add_argument("--allow-unverified-model", action="store_true", help=_ALLOW_UNVERIFIED_HELP)
    r.add_argument("--insecure", action="store_true",
                   help="allow a control socket bound beyond loopback without CURVE "
                        "(control.insecure)")
    r.add_argument("--log-json", action="store_true",
                   help="structured logs: one JSON object per line on stderr "
                        "(logging.json_logs)")
    r.add_argument("-q", "--quiet", action="store_true", help="no live status line")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("subscribe", help="print (and optionally save) published frames")
    s.add_argument("--address", default="tcp://127.0.0.1:5555")
    s.add_argument("--topic", choices=["raw", "enhanced", "interpolated", "trust"], default=None)
    s.add_argument("--count", type=int, default=None)
    s.add_argument("--timeout", type=float, default=None,
                   help="give up if no frame arrives within S seconds")
    s.add_argument("--save", type=Path, default=None,
                   help="save received frames to FILE.tif (one file per topic: FILE-TOPIC.tif)")
    s.add_argument("--max-frame-mb", type=float, default=512.0,
                   help="refuse messages larger than this (a rogue publisher cannot fill memory)")
    from .cli_keys import add_client_key_args

    add_client_key_args(s)  # streams published with CURVE
    s.set_defaults(func=cmd_subscribe)

    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("config", type=Path)
    c.add_argument("--allow-unverified-model", action="store_true", help=_ALLOW_UNVERIFIED_HELP)
    c.set_defaults(func=cmd_check_config)

    from .cli_control import add_control_parsers
    from .cli_enhance import add_adapt_parser, add_enhance_parser
    from .cli_keys import add_security_parsers
    from .cli_models import add_eval_parser, add_models_parser, add_train_parser
    from .cli_pairs import add_pairs_parsers
    from .cli_smlm import add_smlm_commands
    from .cli_view import add_view_parser

    add_train_parser(sub)
    add_eval_parser(sub)
    add_models_parser(sub)
    add_enhance_parser(sub)
    add_adapt_parser(sub)
    add_control_parsers(sub)  # ctl
    add_security_parsers(sub)  # keys, relay
    add_view_parser(sub)  # view (napari; the viewer extra)
    add_pairs_parsers(sub)  # pairs register, pairs apply
    add_smlm_commands(sub)  # smlm simulate|localize|render|frc|drift|recover (smlm extra)

    rc = sub.add_parser("recover", help="rebuild OME-TIFF from a killed run's index")
    rc.add_argument("run_dir", type=Path)
    rc.add_argument("--out", type=Path, default=None,
                    help="write recovered files here (default: the run folder)")
    rc.set_defaults(func=cmd_recover)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pymmcore-plus logs every device load at DEBUG to stderr by default.
    logging.getLogger("pymmcore-plus").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if getattr(args, "frames", None) is not None and args.frames < 1:
        print(f"dimscope: --frames must be >= 1, got {args.frames}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if getattr(args, "duration", None) is not None and not args.duration > 0:
        print(f"dimscope: --duration must be > 0 seconds, got {args.duration:g}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
