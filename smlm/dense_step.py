"""One live sparse-to-dense step — prediction, error map, ready rule — and the child process
that runs it.

`DenseStep` is what the `dense` node does every N frames: the dense image of all
localizations so far (`dense.DensePredictor`), its error map against the widefield image
(`errormap.compute`) and the ready rule (`ready.ReadyRule`, which remembers the previous
prediction). It knows nothing of the pipeline.

`DenseWorker` runs one `DenseStep` in a child process (spawned: a fresh interpreter, not a
fork of the daemon's threads) at idle CPU priority. A step is about half a second of numpy
and inference every few seconds; in a thread of the daemon it took the interpreter lock
that the localizer and the acquisition loop wait for, and its runtime's worker threads
(created by whichever thread compiled the model) ran at normal priority. A child has its
own lock, and every thread it starts inherits its priority. Measured on 2 cores at 200
frames/s (30 s runs, four each, alternating): live localization at 1054 frames/s on
average with the dense node in a child against 1091 without a dense node (run-to-run
spread ±12%); in a thread it had cost 15–30%. The cost: a copy of the localizations and
the widefield image per step (all localizations so far: ~7 MB per 250,000, pickled by the
stage's thread — a long run would want only the new ones sent), ~3 s to start, and one more
process. The child ignores Ctrl-C and SIGHUP (the daemon decides when it stops: its final
prediction needs the child) and exits when the daemon is gone.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .block import LocBlock
from .errormap import ErrorMapSettings
from .ready import ReadySettings

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class DenseStepSettings:
    model: str | Path
    runtime: str = "cpu"
    #: CPU inference threads of the runtime (None: every core the process may use)
    threads: int | None = 1
    allow_unverified: bool = False
    error_map: ErrorMapSettings = field(default_factory=ErrorMapSettings)
    ready: ReadySettings = field(default_factory=ReadySettings)


@dataclass(frozen=True)
class DenseResult:
    #: the dense image (render grid) and the error map (camera grid, widefield noise σ)
    dense: F32
    error_sigma: F32
    flagged_fraction: float
    error_summary: dict[str, float]
    #: the ready rule's verdict at this step (`ReadyCheck.as_dict()`), and whether it holds
    check: dict[str, Any]
    ready: bool
    #: the Gaussian blur (render pixels) the card's table gave the output at this density
    output_blur_px: float = 0.0


class DenseStep:
    """Prediction, error map and ready rule for a growing localization set."""

    def __init__(self, settings: DenseStepSettings, extent_nm: tuple[float, float]) -> None:
        from .dense import DensePredictor
        from .ready import ReadyRule

        self.settings = settings
        self.extent_nm = extent_nm
        self.predictor = DensePredictor(settings.model, runtime=settings.runtime,
                                        allow_unverified=settings.allow_unverified,
                                        threads=settings.threads)
        self.grid = self.predictor.grid
        self.rule = ReadyRule(settings.ready, extent_nm)

    def warm_up(self) -> None:
        """Compile and run the model once for the field it will see (a runtime that cannot
        run it fails here, at start)."""
        self.predictor.predict_input(
            np.zeros((2, *self.grid.shape(self.extent_nm)), np.float32))

    def run(self, locs: LocBlock, widefield: F32, frames: int, frames_averaged: int,
            camera_pixel_nm: float) -> DenseResult:
        from . import errormap
        from .dense import localization_density

        dense = self.predictor.predict(locs, widefield, self.extent_nm)
        blur = self.predictor.smoothing_px(localization_density(locs, self.extent_nm))
        emap = errormap.compute(dense, widefield, self.grid.render_pixel_nm, camera_pixel_nm,
                                self.settings.error_map, frames_averaged=frames_averaged)
        check = self.rule.check(frames, locs, dense, self.grid.render_pixel_nm,
                                emap.flagged_fraction)
        return DenseResult(dense=dense, error_sigma=emap.error_sigma,
                           flagged_fraction=emap.flagged_fraction,
                           error_summary=emap.summary(), check=check.as_dict(),
                           ready=check.ready, output_blur_px=blur)

    def close(self) -> None:
        self.predictor.close()


# -- the child process: one DenseStep, kept between calls ----------------------------------------
_step: DenseStep | None = None


def _lower_priority(lower: bool) -> None:
    """SCHED_IDLE where the OS has it (runs only on CPU time others leave), else nice 10; for
    every thread of the process so far (numpy's and the runtime's pools start when their
    modules load or the model compiles, before or after this: called again then)."""
    if not lower:
        return
    tasks = Path("/proc/self/task")
    for tid in ([int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, 10)


_lower = False


def _child_init(lower: bool) -> None:
    """In the child: the daemon decides when it stops (Ctrl-C in its terminal reaches the
    whole process group; the final prediction still needs this process), the child ends when
    the daemon is gone (a SIGKILLed parent leaves no orphan holding the model), and runs at
    idle priority."""
    global _lower
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="dense-parent-watch", daemon=True).start()
    _lower = lower
    _lower_priority(lower)


def _plain(exc: Exception) -> Exception:
    """An error that pickles back to the daemon whatever its class takes (the pool would
    report an unpicklable one as a dead process)."""
    from dimscope.engines.base import EngineError

    if isinstance(exc, (EngineError, ValueError)) and type(exc) in (EngineError, ValueError):
        return exc
    return EngineError(f"{type(exc).__name__}: {exc}")


def _start(settings: DenseStepSettings, extent_nm: tuple[float, float]) -> None:
    global _step
    try:
        _step = DenseStep(settings, extent_nm)
        _step.warm_up()
    except Exception as exc:
        raise _plain(exc) from None
    _lower_priority(_lower)  # the runtime's threads, started by the compile


def _run(locs: LocBlock, widefield: F32, frames: int, frames_averaged: int,
         camera_pixel_nm: float) -> DenseResult:
    assert _step is not None, "the dense worker was not started"
    try:
        return _step.run(locs, widefield, frames, frames_averaged, camera_pixel_nm)
    except Exception as exc:
        raise _plain(exc) from None


def _stop() -> None:
    global _step
    if _step is not None:
        _step.close()
        _step = None


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """While a spawned child starts: hide the caller's main script from `multiprocessing`, which
    would otherwise run it again in the child (a script that builds a pipeline without an
    `if __name__ == "__main__"` guard would start a second one; `python -` cannot be re-run).
    The child needs nothing from it: its functions live in this module."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved: dict[str, Any] = {k: main.__dict__[k] for k in ("__file__", "__spec__")
                             if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class DenseWorker:
    """A `DenseStep` in a child process, at idle CPU priority unless `lower_priority` is
    false; `run` waits for the step (the calling thread holds no lock meanwhile). Errors in
    the child come back as they were raised there; a child that dies is an `EngineError`
    naming it."""

    def __init__(self, settings: DenseStepSettings, extent_nm: tuple[float, float],
                 lower_priority: bool = True) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_child_init, initargs=(lower_priority,))
        try:
            with _main_not_reimported():  # the pool starts its process at the first submit
                self._call(_start, settings, extent_nm)
        except BaseException:
            self.close()
            raise

    def run(self, locs: LocBlock, widefield: F32, frames: int, frames_averaged: int,
            camera_pixel_nm: float) -> DenseResult:
        result: DenseResult = self._call(
            _run, locs, np.ascontiguousarray(widefield, np.float32), frames, frames_averaged,
            camera_pixel_nm)
        return result

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        from dimscope.engines.base import EngineError

        try:  # a pool that saw its child die refuses at submit(), not only at result()
            future: Future[Any] = self._pool.submit(fn, *args)
            return future.result()
        except BrokenProcessPool as exc:
            raise EngineError(f"the dense worker process died ({exc})") from None

    @property
    def pids(self) -> list[int]:
        return list(getattr(self._pool, "_processes", None) or {})

    def close(self, timeout: float = 10.0) -> None:
        try:
            self._pool.submit(_stop).result(timeout=timeout)
        except Exception:  # dead or stuck: end it regardless
            for pid in self.pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self._pool.shutdown(wait=True, cancel_futures=True)
