"""What a run reports: typed models, serialised to `summary.json` and printed from the same
object (pymmcore-plus `_runner.py` style: a run state and a finish reason, not strings)."""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .acquisition import FinishReason


class RunState(enum.StrEnum):
    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencyStats(_Report):
    """Milliseconds over the last frames (a sliding window); n = 0 when none yet."""

    n: int = 0
    p50: float | None = None
    p99: float | None = None
    max: float | None = None


class StageStats(_Report):
    """One node's counters (see `daemon/stage.py`), plus the engine's budget state."""

    received: int = Field(0, description="frames offered to the node")
    passed: int = Field(0, description="frames it handed on, stored or sent")
    dropped: int = Field(0, description="frames discarded by its stated policy")
    late: int = Field(0, description="frames that missed a latency budget or deadline")
    errors: int = Field(0, description="frames it failed on")
    depth: int = Field(0, description="frames queued when the summary was taken")
    max_depth: int = Field(0, description="the most frames ever queued")
    capacity: int = Field(0, description="queue capacity")
    latency_ms: LatencyStats = LatencyStats()
    error: str | None = None
    budget_ms: float | None = None
    tier: int | None = None
    tier_name: str | None = None
    tier_changes: int | None = None
    skipped: int | None = None
    adapt_rounds: int | None = Field(None, description="live adaptation: rounds finished")
    adapt_swaps: int | None = Field(None, description="adapted models swapped in")
    adapt_version: str | None = Field(None, description="model version in service")
    adapt_frames_used: int | None = Field(None, description="frames adaptation trained or "
                                          "validated on")
    adapt_frames_dropped: int | None = Field(None, description="frames offered to adaptation "
                                             "that it never used (it samples the stream)")
    adapt_error: str | None = Field(None, description="why adaptation is not running")
    trust_alerts: int | None = Field(None, description="enhanced frames whose trust score "
                                     "passed the alert threshold")
    trust_ms: LatencyStats | None = Field(None, description="time to score a frame")
    trust_errors: int | None = Field(None, description="frames that could not be scored "
                                     "(published without a trust map)")
    lag_frames: int | None = Field(None, description="localize: frames waiting to be "
                                   "localized (how far live localization is behind)")
    localizations: int | None = Field(None, description="localize: rows in the table")
    frames_localized: int | None = Field(None, description="localize: frames localized live")
    not_localized: int | None = Field(None, description="localize: frames dropped from live "
                                      "localization by its queue (the raw archive has them)")
    not_localized_ids: list[int] | None = Field(None, description="localize: their ids (the "
                                                "first 10,000)")
    table: str | None = Field(None, description="localize: the localization table's path")
    localize_seconds: float | None = Field(None, description="localize: time spent inside "
                                           "the localizer (its live rate = frames / this)")
    emitters_added: int | None = Field(None, description="localize: emitters the multi-emitter "
                                       "refit found beside ones the library merged them into")
    renders: int | None = Field(None, description="render: images made")
    frames: int | None = Field(None, description="render: frames covered by the "
                               "localizations received so far")
    drift_estimates: int | None = Field(None, description="render: drift estimates applied "
                                        "(drift.jsonl)")
    frames_averaged: int | None = Field(None, description="mean: raw frames in the mean")
    other_kinds: int | None = Field(None, description="publish with `kinds`: frames of other "
                                    "kinds, not this topic's (never queued)")
    predictions: int | None = Field(None, description="dense: predictions made")
    skipped_no_widefield: int | None = Field(None, description="dense: predictions skipped "
                                             "for want of a widefield image")
    prediction_seconds: float | None = Field(None, description="dense: time spent predicting, "
                                             "mapping errors and checking the ready rule")
    ready: bool | None = Field(None, description="dense: the ready rule has held")
    ready_at_frames: int | None = Field(None, description="dense: frames when it first held")
    last_check: dict[str, Any] | None = Field(None, description="dense: the ready rule's "
                                              "values at the last prediction")
    model: str | None = Field(None, description="dense: the model (name@file digest)")


class EngineReport(_Report):
    name: str
    version: str
    runtime: str
    precision: str
    scale: int
    model_sha256: str | None = None
    verified: bool = True


class BudgetReport(_Report):
    budget_ms: float
    tier: int
    tier_name: str
    tier_changes: int
    skipped: int
    missed: int


class SmlmReadyReport(_Report):
    """Dense nodes of a localization run: when the ready rule first held."""

    node: str
    ready: bool
    #: frames localized (and received by the node) when `ready` fired (None: it never
    #: did), against the run's frame limit
    frames_used: int | None
    max_frames: int | None
    stop_when_ready: bool
    #: the rule's values at `ready`, else at the last prediction
    check: dict[str, Any] | None


class RunSummary(_Report):
    state: RunState
    acquired: int
    archived: int
    #: acquired frames the archive could not write before its drain timed out
    not_archived: list[int]
    finish_reason: FinishReason | None
    #: frames the engine really enhanced (not budget skips passed on raw)
    enhanced: int
    published: int
    dropped: dict[str, int]
    fps: float
    elapsed_s: float
    engine: str
    engine_info: EngineReport | None
    mda_planned: int | None
    engine_error: str | None
    #: extra graph nodes that are not running, and why
    node_errors: dict[str, str]
    interpolate_error: str | None
    budget: BudgetReport | None
    source: str
    run_dir: str | None
    archive_files: list[str]
    publish_address: str
    #: the control socket's bound endpoint (None: control disabled or not started)
    control_address: str | None = None
    stages: dict[str, StageStats]
    latency_ms: dict[str, LatencyStats]
    error: str | None
    #: localization runs: each dense node's ready report
    smlm_ready: list[SmlmReadyReport] = []
    #: set when summary.json / run.json could not be written (a full disk)
    write_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what `summary.json` and `--summary-json` hold)."""
        return self.model_dump(mode="json")
