"""Runtimes: what executes a model file. One protocol, one file per runtime.

`open_runtime("auto", ...)` picks TensorRT when it imports and a GPU is
present, else CUDA through PyTorch when a GPU is present, else the CPU
runtime (OpenVINO, measured fastest here; onnxruntime if OpenVINO is not
installed). A runtime is chosen only after it has compiled the model for the
camera's shape and run it once on zeros, so a failure anywhere in that (a
parser, a plan build, a kernel) falls back to the next runtime. Every fallback
is logged in one line saying why, and the reason is kept on the runtime
(`fallback_note`) for the status line.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..base import EngineError
from ..model_file import ModelCard, input_shapes

log = logging.getLogger(__name__)

RUNTIMES = {
    "openvino": "dimscope.engines.runtime.openvino_cpu:OpenVINORuntime",
    "onnxruntime": "dimscope.engines.runtime.onnxruntime_cpu:OnnxRuntime",
    "torch": "dimscope.engines.runtime.pytorch:TorchRuntime",
    "cuda": "dimscope.engines.runtime.pytorch:CudaRuntime",
    "tensorrt": "dimscope.engines.runtime.tensorrt_gpu:TensorRTRuntime",
}
RUNTIME_CHOICES = ("auto", "cpu", *RUNTIMES)


@runtime_checkable
class Runtime(Protocol):
    """Runs one model at one fixed input shape (N, C, H, W), float32 in and out."""

    name: str
    precision: str
    fallback_note: str

    def compile(self, shape: tuple[int, int, int, int]) -> None: ...

    def run(self, *inputs: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def gpu_present() -> bool:
    """An NVIDIA GPU usable from PyTorch. Checks the device node before importing torch."""
    if not Path("/dev/nvidiactl").exists():
        return False
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver can raise here rather than return False
        return False


#: runtimes whose CPU thread count can be set per model (torch's is per process)
THREADED_RUNTIMES = ("openvino", "onnxruntime")


def _construct(kind: str, path: Path, card: ModelCard, precision: str,
               threads: int | None = None) -> Runtime:
    module_name, _, cls_name = RUNTIMES[kind].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    extra = {"threads": threads} if threads is not None and kind in THREADED_RUNTIMES else {}
    runtime: Runtime = cls(path, card, precision, **extra)
    return runtime


def _ready(kind: str, path: Path, card: ModelCard, precision: str,
           shape: tuple[int, int, int, int] | None, threads: int | None = None) -> Runtime:
    """Construct, compile for `shape` and run once on zeros: a runtime that passed this runs."""
    runtime = _construct(kind, path, card, precision, threads)
    if shape is not None:
        try:
            runtime.compile(shape)
            runtime.run(*(np.zeros(s, np.float32) for s in input_shapes(path, shape)))
        except BaseException:
            runtime.close()
            raise
    return runtime


def open_runtime(kind: str, path: Path, card: ModelCard, precision: str = "auto",
                 shape: tuple[int, int, int, int] | None = None,
                 threads: int | None = None) -> Runtime:
    """The runtime named `kind` (or chosen by `auto`/`cpu`) for the model at `path`.

    With `shape` (N, C, H, W) the runtime comes back compiled and warmed up for
    it; under `auto`/`cpu` a runtime that fails to do so is passed over. `threads`:
    CPU inference threads for the CPU runtimes (default: every core this process may
    use); GPU runtimes ignore it.
    """
    if kind not in RUNTIME_CHOICES:
        raise EngineError(f"unknown runtime {kind!r}; choose from {', '.join(RUNTIME_CHOICES)}")
    if kind not in ("auto", "cpu"):
        try:
            return _ready(kind, path, card, precision, shape, threads)
        except ImportError as exc:
            raise EngineError(f"runtime {kind!r} is not installed here ({exc})") from None
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"runtime {kind!r} cannot run {path.name} at {shape}: "
                              f"{type(exc).__name__}: {exc}") from None
    notes: list[str] = []
    candidates = ["openvino", "onnxruntime"]
    if kind == "auto":
        if gpu_present():
            candidates = ["tensorrt", "cuda", *candidates]
        else:
            notes.append("no NVIDIA GPU visible")
    for candidate in candidates:
        try:
            runtime = _ready(candidate, path, card, precision, shape, threads)
        except Exception as exc:  # a failed import, init, compile or first run: next one
            notes.append(f"{candidate} unavailable ({type(exc).__name__}: {exc})")
            continue
        if notes and candidate != candidates[0]:
            log.warning("runtime: using %s because %s", candidate, "; ".join(notes))
        runtime.fallback_note = "; ".join(notes)
        return runtime
    raise EngineError("no runtime could load " + str(path) + ": " + "; ".join(notes))
