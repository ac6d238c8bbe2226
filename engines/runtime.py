"""Runtimes: what executes a model file. One protocol, one file per runtime.

`open_runtime("auto", ...)` picks TensorRT when it imports and a GPU is
present, else CUDA through PyTorch when a GPU is present, else the CPU
runtime (OpenVINO, measured fastest here; onnxruntime if OpenVINO is not
installed). Every fallback is logged in one line saying why, and the reason
is kept on the runtime (`fallback_note`) for the status line.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .base import EngineError
from .model_file import ModelCard

log = logging.getLogger(__name__)

RUNTIMES = {
    "openvino": "dimscope.engines.runtime_openvino:OpenVINORuntime",
    "onnxruntime": "dimscope.engines.runtime_onnxruntime:OnnxRuntime",
    "torch": "dimscope.engines.runtime_torch:TorchRuntime",
    "cuda": "dimscope.engines.runtime_torch:CudaRuntime",
    "tensorrt": "dimscope.engines.runtime_tensorrt:TensorRTRuntime",
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


def _construct(kind: str, path: Path, card: ModelCard, precision: str) -> Runtime:
    module_name, _, cls_name = RUNTIMES[kind].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    runtime: Runtime = cls(path, card, precision)
    return runtime


def open_runtime(kind: str, path: Path, card: ModelCard, precision: str = "auto") -> Runtime:
    """The runtime named `kind` (or chosen by `auto`/`cpu`) for the model at `path`."""
    if kind not in RUNTIME_CHOICES:
        raise EngineError(f"unknown runtime {kind!r}; choose from {', '.join(RUNTIME_CHOICES)}")
    if kind not in ("auto", "cpu"):
        try:
            return _construct(kind, path, card, precision)
        except ImportError as exc:
            raise EngineError(f"runtime {kind!r} is not installed here ({exc})") from None
    notes: list[str] = []
    candidates = ["openvino", "onnxruntime"]
    if kind == "auto":
        if gpu_present():
            candidates = ["tensorrt", "cuda", *candidates]
        else:
            notes.append("no NVIDIA GPU visible")
    for candidate in candidates:
        try:
            runtime = _construct(candidate, path, card, precision)
        except Exception as exc:  # any failed import or failed init means: try the next one
            notes.append(f"{candidate} unavailable ({type(exc).__name__}: {exc})")
            continue
        if notes and candidate != candidates[0]:
            log.warning("runtime: using %s because %s", candidate, "; ".join(notes))
        runtime.fallback_note = "; ".join(notes)
        return runtime
    raise EngineError("no runtime could load " + str(path) + ": " + "; ".join(notes))
