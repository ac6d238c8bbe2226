"""Engine stage: runs an `Engine` on the newest raw frame, emits enhanced frames.

Its queue holds `queue_frames` (default 1) frames with the DROP_OLDEST
policy: when the engine is slower than the camera it always works on the
newest frame and counts every frame it skipped as `dropped`. The raw archive
is unaffected — it has its own queue.

Latency budget (optional, ms from acquisition to publication), enforced in
this order:
1. **faster tier** — when the engine's own median processing time over its
   last frames (at least `MIN_SAMPLES`) exceeds `TIER_HEADROOM` of the budget, the next
   configured tier (another engine or other options) replaces it; counted in
   `tier_changes`, reported as `tier`.
2. **skip** — a frame whose age plus the expected processing time already
   exceeds the budget is not enhanced: it is published on the enhanced topic
   as the raw pixels, kind "passthrough", header `budget: "skipped"`; counted in
   `skipped`, never as enhanced.
   Every `PROBE_EVERY`-th frame while skipping is enhanced anyway to re-measure,
   so enhancement resumes by itself when the machine has room again.
3. frames enhanced but published past the budget are counted in `late`
   (header `budget: "missed"`; those within it say `budget: "met"`).

Trust (`[trust] enabled`, the default): every enhanced frame is scored against its raw
frame by a `TrustMeter` (engines/trust.py) with the noise model the engine itself used,
right after the engine, so the score is in the enhanced frame's header and its map goes
to topic `trust`; its cost is part of the frame's processing time (the budget sees it).
Counted in `trust_alerts` (frames whose score passed the alert threshold), timed in
`trust_ms`.

Live adaptation (`[engine] adapt = true`, main engine only): every frame the stage
receives — also those its queue or the budget skip — is offered to an
`engines.adaptation.Adapter` (a copy into a shared ring, on the acquisition thread,
never waiting), which fine-tunes the model in a low-priority child process. Between
frames the stage takes finished rounds; adapted weights that are ready are compiled on a
helper thread and swapped in between two frames (`ModelEngine.install`), so no frame waits
on compilation. Counted in `adapt_rounds`, `adapt_swaps`, `adapt_version`,
`adapt_frames_used` and `adapt_frames_dropped` (frames the adapter never trained on: it
samples the stream; in an MDA it takes one position/channel/z, the first one's); each
swap is logged with the held-back loss before and after.
Adaptation that cannot start or stops is logged and reported (`adapt_error`);
enhancement goes on with the model in service.

Changes from the control socket (`engine.set`): the new engine is built, prepared and
tried on a frame by the caller, off this thread; `swap_engine` then installs it under
the stage's engine lock, which `process` holds for the whole of one frame — so the swap
lands between two frames, atomically, and the engine in service never waits for a
model to load. Budget and tiers (`set_budget`) and adaptation (`start_adapting`,
`stop_adapting`) change the same way. Enhanced frames with ids above the returned
`last_frame_id` are the new engine's; raw archiving never takes this lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dimscope.engines import CameraCalibration, Engine, EngineError
from dimscope.engines.noise_model import CameraNoise, NoiseModel
from dimscope.engines.trust import TrustMeter, TrustSettings

from .frame import BudgetOutcome, Frame, freeze
from .metrics import LatencyWindow
from .stage import OverflowPolicy, Stage

if TYPE_CHECKING:
    from dimscope.engines.adaptation import Adapter, RoundReport
    from dimscope.engines.model_engine import ModelEngine, ModelReplacement

log = logging.getLogger(__name__)

#: consecutive failing frames after which the engine is taken out of service
MAX_CONSECUTIVE_ERRORS = 10
#: recent processing times kept per tier (their median is the expected time)
TIER_WINDOW = 8
#: frames measured on a tier before judging it (too slow -> next tier; else skip if late)
MIN_SAMPLES = 3
#: while skipping, every PROBE_EVERY-th frame is enhanced anyway to re-measure the engine,
#: so skipping stops when the machine has room again
PROBE_EVERY = 25
#: a tier whose median processing time exceeds this share of the budget is too slow
#: (the rest is queueing and publishing)
TIER_HEADROOM = 0.8


def _noise_in_use(engine: Engine) -> NoiseModel | None:
    """The noise model a noise-aware engine used for its last frame (so the trust score and
    the engine agree), else None (the meter uses the calibration or its own estimate)."""
    noise = getattr(engine, "noise", None)
    return noise.model if isinstance(noise, CameraNoise) else None


@dataclass(frozen=True, slots=True)
class EngineSwap:
    """What `swap_engine` replaced: the caller closes `old` (off the stage thread)."""

    old: Engine
    #: the last frame the old engine handled (None: none yet); every enhanced frame with a
    #: larger id is the new engine's (frames are handled in id order)
    last_frame_id: int | None
    #: adaptation that the swap stopped (it adapted the old engine's model); caller closes
    stopped_adapter: Adapter | None


def _close_replacement(future: Future[ModelReplacement]) -> None:
    """Release a compiled adapted model that will never be installed."""
    with contextlib.suppress(Exception):
        future.result().runtime.close()


class EngineStage(Stage):
    def __init__(self, engine: Engine, calibration: CameraCalibration, queue_frames: int,
                 budget_ms: float | None = None,
                 tiers: Sequence[tuple[str, Callable[[], Engine]]] = (),
                 name: str = "engine", adapt_dir: Path | None = None,
                 trust: TrustSettings | None = None) -> None:
        """`adapt_dir`: adapt the engine's model live, writing adapted files there;
        `trust`: score every enhanced frame against its raw frame (None: do not)."""
        super().__init__(name, queue_frames, OverflowPolicy.DROP_OLDEST)
        self.trust = TrustMeter(calibration, trust) if trust is not None else None
        self.trust_alerts = 0
        self.trust_errors = 0
        self.trust_ms = LatencyWindow()
        self.engine = engine
        self.calibration = calibration
        self.budget_ms = budget_ms
        self._tiers = list(tiers)  # faster fallbacks, in order
        self.tier = 0
        self.tier_name = engine.info.name
        self.tier_changes = 0
        self.skipped = 0
        self._skips_in_a_row = 0
        self._recent: deque[float] = deque(maxlen=TIER_WINDOW)
        self._prepared_for: tuple[tuple[int, ...], str] | None = None
        self._consecutive_errors = 0
        self.adapt_dir = adapt_dir
        self.adapter: Adapter | None = None
        self._adapted: ModelEngine | None = None  # the engine whose model is adapted
        self.adapt_swaps = 0
        self.adapt_version: str | None = None
        self.adapt_error: str | None = None
        self._adapt_ready: RoundReport | None = None  # newest report with a file to compile
        self._compiling: tuple[RoundReport, Future[ModelReplacement]] | None = None
        self._compiler: ThreadPoolExecutor | None = None
        self._adapt_series: tuple[tuple[str, int], ...] | None = None
        #: held by the stage thread for the whole of one frame (and each idle tick): a swap
        #: taking it lands between two frames
        self._engine_lock = threading.Lock()
        #: the id of the last frame the stage handled (enhanced or passed on raw)
        self.last_frame_id: int | None = None
        #: engines swapped in by the control socket
        self.engine_changes = 0

    # -- changes from the control socket (any thread but the stage's) ---------------------
    @property
    def remaining_tiers(self) -> list[tuple[str, Callable[[], Engine]]]:
        """The faster fallbacks not used yet, in order."""
        with self._engine_lock:
            return list(self._tiers)

    def swap_engine(self, engine: Engine, prepared_for: tuple[tuple[int, ...], str] | None,
                    tiers: Sequence[tuple[str, Callable[[], Engine]]] = (),
                    budget_ms: float | None = None) -> EngineSwap:
        """Put `engine` (already prepared for `prepared_for` = (shape, dtype.str), when
        given) in service between two frames, with its own budget and tiers; returns what
        it replaced. Adaptation of the old engine's model stops (caller closes it)."""
        with self._engine_lock:
            old, last = self.engine, self.last_frame_id
            stopped = self._detach_adapter("adaptation stopped: engine.set replaced the "
                                           "adapted model")
            self.engine, self._prepared_for = engine, prepared_for
            self._tiers = list(tiers)
            self.budget_ms = budget_ms
            self.tier, self.tier_name = 0, engine.info.name
            self._recent.clear()
            self._skips_in_a_row = 0
            self._consecutive_errors = 0
            self.engine_changes += 1
        return EngineSwap(old, last, stopped)

    def set_budget(self, budget_ms: float | None,
                   tiers: Sequence[tuple[str, Callable[[], Engine]]] | None = None
                   ) -> int | None:
        """A new latency budget (None: none) and, when given, new fallback tiers, from the
        next frame; returns the last frame handled under the old ones."""
        with self._engine_lock:
            self.budget_ms = budget_ms
            if tiers is not None:
                self._tiers = list(tiers)
            self._skips_in_a_row = 0
            return self.last_frame_id

    def start_adapting(self, adapt_dir: Path) -> int | None:
        """Adapt the engine in service live (EngineError says why it cannot); returns the
        last frame handled before. The adapter's process starts off the stage thread."""
        with self._engine_lock:
            engine = self.engine
            if self.adapter is not None and self.adapt_error is None:
                return self.last_frame_id  # already adapting this engine
        try:
            adapter = self._new_adapter(engine, adapt_dir)
        except (OSError, ImportError) as exc:
            raise EngineError(f"adaptation cannot start: {exc}") from exc
        with self._engine_lock:
            if self.engine is not engine:  # swapped meanwhile: that model is not served
                adapter.close()
                raise EngineError("the engine changed while adaptation was starting")
            old = self.adapter
            self.adapter, self._adapted = adapter, engine  # type: ignore[assignment]
            self.adapt_dir, self.adapt_error = adapt_dir, None
            self._adapt_series = self._adapt_ready = None
            # A model an earlier adapter was compiling belongs to another run of training
            # (maybe another engine): it must never be installed on this one.
            stale, self._compiling = self._compiling, None
            if self._compiler is None:
                self._compiler = ThreadPoolExecutor(
                    1, thread_name_prefix=f"dimscope-{self.name}-swap")
            self.adapt_version = engine.info.version
            last = self.last_frame_id
        if old is not None:
            old.close()
        if stale is not None:
            stale[1].add_done_callback(_close_replacement)
        log.info("adaptation: %s is adapted live (control socket); adapted files go to %s",
                 engine.info.name, adapt_dir)
        return last

    def stop_adapting(self, why: str = "adaptation turned off (control socket); the "
                      "model in service stays") -> int | None:
        """Stop adapting; the model in service (adapted or not) stays. Returns the last
        frame handled before."""
        with self._engine_lock:
            adapter = self._detach_adapter(why)
            last = self.last_frame_id
        if adapter is not None:
            adapter.close()
        return last

    def _detach_adapter(self, why: str) -> Adapter | None:
        """Under the engine lock: mark adaptation stopped, return the adapter to close."""
        if self.adapter is None or self.adapt_error is not None:
            return None
        self.adapt_error = why
        log.info("%s", why)
        return self.adapter

    @staticmethod
    def _new_adapter(engine: Engine, adapt_dir: Path) -> Adapter:
        """A started adapter for `engine`'s model; EngineError when the engine cannot be
        adapted (OSError, ImportError when the adapter cannot start)."""
        from dimscope.engines.adaptation import Adapter, check_adaptable
        from dimscope.engines.model_engine import ModelEngine

        if not isinstance(engine, ModelEngine) or engine.frame_shape is None:
            raise EngineError(f"engine {engine.info.name!r} is not a prepared model engine "
                              "(adaptation trains a model's weights)")
        check_adaptable(engine.card, engine.path)
        shape = engine.frame_shape
        adapter = Adapter(engine.path, adapt_dir, (shape[0], shape[1]))
        adapter.start()
        return adapter

    # -- live adaptation -------------------------------------------------------------------
    def setup(self) -> None:
        if self.adapt_dir is None:
            return
        try:
            self.adapter = self._new_adapter(self.engine, self.adapt_dir)
            self._adapted = self.engine  # type: ignore[assignment]  # a ModelEngine: checked
        except (EngineError, OSError, ImportError) as exc:
            self._stop_adapting(f"adaptation is not running (enhancement goes on): {exc}")
            return
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix=f"dimscope-{self.name}-swap")
        self.adapt_version = self.engine.info.version
        log.info("adaptation: %s is adapted live; adapted files go to %s",
                 self.engine.info.name, self.adapt_dir)

    def offer(self, frame: Frame, wait_s: float = 0.0) -> None:
        adapter = self.adapter
        if adapter is not None:  # every frame, before the queue's policy may drop it
            # One time series only: in an MDA, the position/channel/z of the first frame
            # (a frame of another one is no Noise2Noise target for this one).
            where = tuple(sorted((k, v) for k, v in frame.mda_index.items() if k != "t"))
            if self._adapt_series is None:
                self._adapt_series = where
            if where == self._adapt_series:
                adapter.offer(frame.pixels)
            else:
                adapter.refused += 1
        super().offer(frame, wait_s)

    def _stop_adapting(self, why: str, wait_s: float = 0.5) -> None:
        self.adapt_error = why
        log.error("%s", why)
        if self.adapter is not None:
            self.adapter.close(wait_s)

    def _adapt_tick(self) -> None:
        """Between frames: take finished rounds, compile the newest adapted file off this
        thread, swap it in once compiled."""
        adapter, engine = self.adapter, self._adapted
        if adapter is None or engine is None or self.adapt_error is not None:
            return
        if self.tier != 0 or engine is not self.engine:
            self._stop_adapting("adaptation stopped: a faster tier replaced the adapted model")
            return
        if engine.noise is not None and engine.noise.model is not None:
            adapter.set_noise(engine.noise.model)
        for report in adapter.poll():
            log.debug("adaptation %s", report.describe())
            if report.path is not None:
                self._adapt_ready = report
        if adapter.error is not None:
            self._stop_adapting(f"adaptation stopped (the model in service stays): "
                                f"{adapter.error}")
            return
        if self._compiling is None and self._adapt_ready is not None:
            report, self._adapt_ready = self._adapt_ready, None
            assert self._compiler is not None and report.path is not None
            self._compiling = (report, self._compiler.submit(engine.load_replacement,
                                                             Path(report.path)))
        if self._compiling is not None and self._compiling[1].done():
            (report, future), self._compiling = self._compiling, None
            try:
                engine.install(future.result())
            except Exception as exc:  # a bad file or a shape change: keep the model in service
                log.error("adaptation: could not swap in %s: %s", report.path, exc)
                return
            self.adapt_swaps += 1
            self.adapt_version = self.engine.info.version
            log.info("adaptation: swapped in %s (%s): held-back loss %.5f -> %.5f (%+.2f%%), "
                     "%d steps on %d frames", Path(str(report.path)).name, self.adapt_version,
                     report.loss_served, report.loss_adapted, 100 * report.change,
                     report.total_steps, report.frames_used)

    def idle(self) -> None:
        with self._engine_lock:
            self._adapt_tick()

    def _ensure_prepared(self, frame: Frame) -> None:
        key = (frame.shape, frame.dtype.str)
        if key != self._prepared_for:
            self.engine.prepare(frame.shape, frame.dtype, self.calibration)
            self._prepared_for = key

    def _expected_ms(self) -> float:
        return float(np.median(self._recent)) if self._recent else 0.0

    def _maybe_next_tier(self) -> None:
        if (self.budget_ms is None or not self._tiers or len(self._recent) < MIN_SAMPLES
                or self._expected_ms() <= TIER_HEADROOM * self.budget_ms):
            return
        name, factory = self._tiers.pop(0)
        slow_ms = self._expected_ms()
        try:
            engine = factory()
        except EngineError as exc:
            log.error("budget: tier %d (%s) cannot load, staying on %s: %s", self.tier + 1,
                      name, self.tier_name, exc)
            return
        self.engine.close()
        self.engine, self._prepared_for = engine, None
        self.tier += 1
        self.tier_name = name
        self.tier_changes += 1
        self._recent.clear()
        log.warning("budget %.1f ms: engine median %.1f ms too slow, switched to tier %d (%s)",
                    self.budget_ms, slow_ms, self.tier, name)

    def process(self, frame: Frame) -> None:
        with self._engine_lock:  # one frame, one engine: a swap waits for the frame
            self.last_frame_id = frame.frame_id
            self._process(frame)

    def _process(self, frame: Frame) -> None:
        if self.adapter is not None:
            self._adapt_tick()
        self._ensure_prepared(frame)
        started = frame.marked("engine_start")
        if self.budget_ms is not None:
            age_ms = (started.marks[-1][1] - frame.marks[0][1]) / 1e6
            # While a faster tier remains, measure this one first (tiers come before skips).
            judged = not self._tiers or len(self._recent) >= MIN_SAMPLES
            probe = self._skips_in_a_row >= PROBE_EVERY
            if judged and not probe and age_ms + self._expected_ms() > self.budget_ms:
                self.skipped += 1
                self._skips_in_a_row += 1
                self.emit(started.replace(kind="passthrough", budget="skipped",
                                          tier=self.tier))
                return
        t0 = time.monotonic_ns()
        try:
            out = self.engine.process(frame.pixels)
        except Exception as exc:  # one bad frame must not end enhancement for good
            self._consecutive_errors += 1
            log.warning("engine %s failed on frame %d: %s", self.engine.info.name,
                        frame.frame_id, exc)
            if self._consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                # Stage._run counts this last frame's error when it takes the stage down.
                raise EngineError(f"engine {self.engine.info.name!r} failed on "
                                  f"{MAX_CONSECUTIVE_ERRORS} consecutive frames; last: {exc}"
                                  ) from exc
            self.counters.errors += 1
            return
        report = None
        if self.trust is not None and frame.pixels.ndim == 2:
            t_trust = time.monotonic_ns()
            try:
                info = self.engine.info
                report = self.trust.measure(frame.pixels, out, self.engine.scale,
                                            noise=_noise_in_use(self.engine),
                                            psf_sigma_px=info.forward_psf_sigma_px,
                                            fit_intensity=info.forward_fits_intensity)
            except Exception as exc:  # a trust failure must not end enhancement
                self.trust_errors += 1
                if self.trust_errors == 1:
                    log.error("trust: cannot score frame %d (the frame is published without "
                              "a trust map; counted in trust_errors): %s", frame.frame_id, exc)
            self.trust_ms.add((time.monotonic_ns() - t_trust) / 1e6)
            if report is not None and report.score.alert:
                self.trust_alerts += 1
                if self.trust_alerts == 1 or self.trust_alerts % 100 == 0:
                    log.warning("trust: enhanced frame %d disagrees with its raw frame (local "
                                "z %.1f, threshold %.1f; %d alert(s) so far)", frame.frame_id,
                                report.score.max_z, report.score.threshold, self.trust_alerts)
        done_ns = time.monotonic_ns()
        self._recent.append((done_ns - t0) / 1e6)
        self._skips_in_a_row = 0
        self._consecutive_errors = 0
        scale = self.engine.scale
        budget: BudgetOutcome | None = None
        if self.budget_ms is not None:
            missed = (done_ns - frame.marks[0][1]) / 1e6 > self.budget_ms
            self.counters.late += int(missed)
            budget = "missed" if missed else "met"
        enhanced = started.replace(
            pixels=freeze(out), kind="enhanced", engine=self.engine.info,
            source_ids=(frame.frame_id,), pixel_size_um=frame.pixel_size_um / scale,
            budget=budget, tier=self.tier if self.budget_ms is not None else None,
            trust=report, raw=frame.pixels,
        ).marked("engine_done", done_ns)
        self.emit(enhanced)
        self._maybe_next_tier()

    def snapshot(self) -> dict[str, object]:
        snap = super().snapshot()
        snap.update({"budget_ms": self.budget_ms, "tier": self.tier, "tier_name": self.tier_name,
                     "tier_changes": self.tier_changes, "skipped": self.skipped})
        if self.trust is not None:
            snap.update({"trust_alerts": self.trust_alerts, "trust_errors": self.trust_errors,
                         "trust_ms": self.trust_ms.summary()})
        if self.adapt_dir is not None:
            a = self.adapter
            snap.update({"adapt_rounds": a.rounds if a else 0, "adapt_swaps": self.adapt_swaps,
                         "adapt_version": self.adapt_version,
                         "adapt_frames_used": a.frames_used if a else 0,
                         "adapt_frames_dropped": a.frames_dropped if a else 0,
                         "adapt_error": self.adapt_error})
        return snap

    def teardown(self) -> None:
        if self.adapter is not None:
            self.adapter.close()
        if self._compiler is not None:
            self._compiler.shutdown(wait=True, cancel_futures=True)
            if self._compiling is not None and self._compiling[1].done():
                with contextlib.suppress(Exception):  # compiled but never installed
                    self._compiling[1].result().runtime.close()
        self.engine.close()
