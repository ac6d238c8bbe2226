"""Prometheus metrics over HTTP (`metrics.address`), read from the pipeline at scrape time.

`PipelineCollector` is a `prometheus_client` custom collector: every scrape takes one
`Pipeline.summary()` (the same counters as the status line and `summary.json`) and turns it
into metric families, so serving metrics adds nothing to the per-frame path.

Latency: every stage keeps the exact latency of its last frames in a sliding window
(`daemon/metrics.py`, 2000 frames). Those are exposed as gauges of the window's quantiles
(`quantile` label 0.5, 0.99, 1 = max) — the exact p50/p99 the status line shows, at no
per-frame cost. They are not a Prometheus histogram: quantiles cannot be summed across
microscopes, and what happened between two scrapes beyond the window is not in them. A true
histogram would need an `observe()` in each stage's hot path; see the README.

Names follow the Prometheus conventions: prefix `dimscope_`, counters end in `_total`,
seconds are seconds, and one `stage` (or `topic`) label instead of one metric per stage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from . import __version__
from .summary import LatencyStats, RunState, RunSummary

__all__ = ["MetricsServer", "PipelineCollector", "parse_listen_address"]

log = logging.getLogger(__name__)

#: window quantiles exposed, and the LatencyStats field each comes from
_QUANTILES = (("0.5", "p50"), ("0.99", "p99"), ("1", "max"))

#: the per-stage counters, `StageStats` field -> help text
_STAGE_COUNTERS = {
    "received": "frames offered to the stage",
    "passed": "frames the stage handed on, stored or sent",
    "dropped": "frames the stage discarded by its stated policy",
    "late": "frames that missed a latency budget or deadline",
    "errors": "frames the stage failed on",
}


def parse_listen_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (`[v6]:PORT` for IPv6) -> (host, port); port 0 = any free port.

    ValueError names what is wrong (the CLI exits 2 with it)."""
    host, colon, port = address.rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or "/" in address:
        raise ValueError(f"metrics.address {address!r}: expected HOST:PORT, e.g. "
                         "127.0.0.1:9464 (no scheme, no path: /metrics is served there)")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics.address {address!r}: port must be 0-65535, got {port!r}")
    return host, int(port)


def _latency_gauge(name: str, doc: str, label: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=[label, "quantile"])


def _add_window(family: GaugeMetricFamily, key: str, stats: LatencyStats | None) -> None:
    if stats is None or not stats.n:
        return
    for quantile, field in _QUANTILES:
        value = getattr(stats, field)
        if value is not None:
            family.add_metric([key, quantile], value / 1000.0)


class PipelineCollector(Collector):
    """A `prometheus_client` collector over a live `Pipeline` (anything with `summary()`)."""

    def __init__(self, pipeline: Any, *, started_mono: float | None = None) -> None:
        self.pipeline = pipeline
        self.started_mono = time.monotonic() if started_mono is None else started_mono

    def collect(self) -> Iterator[Metric]:
        # A family with no samples (no adaptation, no budget in this run) is left out.
        return (family for family in self._collect() if family.samples)

    def _collect(self) -> Iterator[Metric]:
        s: RunSummary = self.pipeline.summary()
        info = InfoMetricFamily("dimscope", "the daemon: version, source, configured engine")
        info.add_metric([], {"version": __version__, "source": s.source, "engine": s.engine})
        yield info
        yield StateSetMetricFamily("dimscope_run_state", "where the run is in its life",
                                   value={state.value: s.state == state for state in RunState})
        yield GaugeMetricFamily("dimscope_uptime_seconds", "seconds since the daemon started",
                                value=time.monotonic() - self.started_mono)
        yield GaugeMetricFamily("dimscope_acquisition_seconds",
                                "seconds of acquisition (camera start to stop request)",
                                value=s.elapsed_s)
        yield from self._frames(s)
        yield from self._stages(s)
        yield from self._latency(s)
        yield from self._engines(s)

    def _frames(self, s: RunSummary) -> Iterator[Metric]:
        archive = s.stages.get("archive")
        totals = (
            ("acquired", "raw frames taken from the camera", s.acquired),
            ("archived", "raw frames whose pixels are in the archive", s.archived),
            ("enhanced", "frames the engine enhanced (not budget skips)", s.enhanced),
            ("published", "messages sent on every topic", s.published),
            # Raw frames acquired that the archive will never write: refused by a failed
            # archive, or still queued when its drain ran out of time. 0 in a healthy run.
            ("lost", "raw frames acquired that were not archived (archive failed or its "
             "drain timed out)", archive.dropped if archive is not None else 0),
        )
        for name, doc, value in totals:
            yield CounterMetricFamily(f"dimscope_frames_{name}", doc, value=value)
        yield GaugeMetricFamily("dimscope_frames_not_archived",
                                "frames named in the summary as not archived at stop",
                                value=len(s.not_archived))

    def _stages(self, s: RunSummary) -> Iterator[Metric]:
        counters = {key: CounterMetricFamily(f"dimscope_stage_frames_{key}", doc,
                                             labels=["stage"])
                    for key, doc in _STAGE_COUNTERS.items()}
        depth = GaugeMetricFamily("dimscope_stage_queue_depth", "frames queued now",
                                  labels=["stage"])
        max_depth = GaugeMetricFamily("dimscope_stage_queue_max_depth",
                                      "the most frames ever queued", labels=["stage"])
        capacity = GaugeMetricFamily("dimscope_stage_queue_capacity",
                                     "queue capacity in frames", labels=["stage"])
        up = GaugeMetricFamily("dimscope_stage_up", "1 while the stage works, 0 once it "
                               "failed (raw archiving continues unless it is the archive)",
                               labels=["stage"])
        for name, st in s.stages.items():
            for key, family in counters.items():
                family.add_metric([name], getattr(st, key))
            up.add_metric([name], 0.0 if st.error else 1.0)
            if st.capacity:  # the acquisition node has no queue
                depth.add_metric([name], st.depth)
                max_depth.add_metric([name], st.max_depth)
                capacity.add_metric([name], st.capacity)
        yield from counters.values()
        yield from (depth, max_depth, capacity, up)

    def _latency(self, s: RunSummary) -> Iterator[Metric]:
        e2e = _latency_gauge("dimscope_latency_window_seconds",
                             "acquisition to publication per topic, quantiles over the last "
                             "frames (sliding window, not a histogram)", "topic")
        for topic, stats in s.latency_ms.items():
            if topic not in ("engine", "interpolate"):  # those two are processing times
                _add_window(e2e, topic, stats)
        processing = _latency_gauge("dimscope_stage_processing_window_seconds",
                                    "time a stage spends on one frame, quantiles over the "
                                    "last frames (sliding window)", "stage")
        trust = _latency_gauge("dimscope_trust_scoring_window_seconds",
                               "time to score one enhanced frame's trust map, quantiles over "
                               "the last frames", "stage")
        for name, st in s.stages.items():
            _add_window(processing, name, st.latency_ms)
            _add_window(trust, name, st.trust_ms)
        yield from (e2e, processing, trust)

    def _engines(self, s: RunSummary) -> Iterator[Metric]:
        info = InfoMetricFamily("dimscope_engine", "the main engine's model in service")
        if s.engine_info is not None:
            e = s.engine_info
            info.add_metric([], {"name": e.name, "version": e.version, "runtime": e.runtime,
                                 "precision": e.precision, "scale": str(e.scale),
                                 "model_sha256": e.model_sha256 or "",
                                 "verified": str(e.verified).lower()})
        yield info
        engine = s.stages.get("engine")
        yield GaugeMetricFamily(
            "dimscope_engine_up", "1 while the main engine enhances frames; 0 when the run "
            "is raw only (it could not load, or failed)",
            value=1.0 if s.engine_info is not None and engine is not None and not engine.error
            else 0.0)
        alerts = CounterMetricFamily("dimscope_trust_alerts",
                                     "enhanced frames whose trust score passed the alert "
                                     "threshold", labels=["stage"])
        skipped = CounterMetricFamily("dimscope_budget_skipped_frames",
                                      "frames published raw because enhancing them would "
                                      "have missed the latency budget", labels=["stage"])
        changes = CounterMetricFamily("dimscope_budget_tier_changes",
                                      "switches between engine tiers", labels=["stage"])
        tier = GaugeMetricFamily("dimscope_budget_tier",
                                 "engine tier in use (0 = the configured engine)",
                                 labels=["stage"])
        tier_info = InfoMetricFamily("dimscope_budget_tier_name", "engine tier in use, by name",
                                     labels=["stage"])
        budget = GaugeMetricFamily("dimscope_budget_seconds", "latency budget",
                                   labels=["stage"])
        adapt = InfoMetricFamily("dimscope_adaptation",
                                 "live adaptation: the model version in service",
                                 labels=["stage"])
        rounds = CounterMetricFamily("dimscope_adaptation_rounds",
                                     "adaptation rounds finished", labels=["stage"])
        swaps = CounterMetricFamily("dimscope_adaptation_swaps",
                                    "adapted models swapped in", labels=["stage"])
        lag = GaugeMetricFamily("dimscope_localize_lag_frames",
                                "frames waiting to be localized (live localization behind "
                                "acquisition by this many)", labels=["stage"])
        locs = CounterMetricFamily("dimscope_localizations",
                                   "single-molecule localizations written to the table",
                                   labels=["stage"])
        added = CounterMetricFamily("dimscope_localize_emitters_added",
                                    "emitters the multi-emitter refit added beside ones the "
                                    "library merged them into (before dropping any fitted "
                                    "at a fit box's rim)", labels=["stage"])
        not_localized = CounterMetricFamily(
            "dimscope_frames_not_localized", "frames left out of live localization by its "
            "queue (the raw archive has them)", labels=["stage"])
        predictions = CounterMetricFamily("dimscope_dense_predictions",
                                          "dense (sparse-to-dense) predictions made",
                                          labels=["stage"])
        ready = GaugeMetricFamily("dimscope_dense_ready", "1 once the ready rule has held",
                                  labels=["stage"])
        flagged = GaugeMetricFamily("dimscope_dense_flagged_fraction", "share of the field "
                                    "the last error map flags", labels=["stage"])
        for name, st in s.stages.items():
            if st.predictions is not None:
                predictions.add_metric([name], st.predictions)
                ready.add_metric([name], 1.0 if st.ready else 0.0)
                if st.last_check is not None and st.last_check.get("flagged") is not None:
                    flagged.add_metric([name], float(st.last_check["flagged"]))
            if st.lag_frames is not None:
                lag.add_metric([name], st.lag_frames)
                locs.add_metric([name], st.localizations or 0)
                not_localized.add_metric([name], st.not_localized or 0)
                added.add_metric([name], st.emitters_added or 0)
            if st.trust_alerts is not None:
                alerts.add_metric([name], st.trust_alerts)
            if st.budget_ms is not None:  # tiers only change under a budget
                budget.add_metric([name], st.budget_ms / 1000.0)
                skipped.add_metric([name], st.skipped or 0)
                changes.add_metric([name], st.tier_changes or 0)
                tier.add_metric([name], st.tier or 0)
                tier_info.add_metric([name], {"tier_name": st.tier_name or ""})
            if st.adapt_rounds is not None:
                adapt.add_metric([name], {"version": st.adapt_version or ""})
                rounds.add_metric([name], st.adapt_rounds)
                swaps.add_metric([name], st.adapt_swaps or 0)
        yield from (alerts, budget, skipped, changes, tier, tier_info, adapt, rounds, swaps,
                    lag, locs, added, not_localized, predictions, ready, flagged)


class MetricsServer:
    """`/metrics` over HTTP on `HOST:PORT`, from its own registry (the pipeline collector
    plus the standard process and platform collectors). Binds at construction — a port in
    use raises OSError there — and `close()` frees the port (tests rebind it)."""

    def __init__(self, address: str, collector: Collector) -> None:
        from prometheus_client import (
            GC_COLLECTOR,
            PLATFORM_COLLECTOR,
            PROCESS_COLLECTOR,
            start_http_server,
        )

        host, port = parse_listen_address(address)
        self.registry = CollectorRegistry()
        for c in (collector, PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(c)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host,
                                                          registry=self.registry)
        except OSError as exc:
            raise OSError(f"metrics.address {address}: cannot serve /metrics there: "
                          f"{exc.strerror or exc}") from None
        self.address = address
        if host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("metrics served on %s: every host that reaches it can read the run's "
                        "counters (bind 127.0.0.1 and scrape through a proxy to restrict)",
                        address)
        self._closed = threading.Event()

    @property
    def port(self) -> int:
        return int(self._httpd.server_port)

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)
