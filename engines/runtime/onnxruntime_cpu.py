"""CPU runtime: onnxruntime (the reference; OpenVINO is faster here, see runtime.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..base import EngineError
from ..model_file import ModelCard


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path, card: ModelCard, precision: str = "auto",
                 threads: int | None = None) -> None:
        if precision not in ("auto", "fp32"):
            raise EngineError(f"runtime onnxruntime runs fp32 only, not {precision!r}")
        self.path, self.card = path, card
        self.threads = threads or len(os.sched_getaffinity(0))
        self.precision = "fp32"
        self.fallback_note = ""
        self._session: ort.InferenceSession | None = None
        self._names: list[str] = []

    def compile(self, shape: tuple[int, int, int, int]) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(self.path), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EngineError(f"onnxruntime cannot load {self.path}: {exc}") from None
        self._names = [i.name for i in self._session.get_inputs()]

    def run(self, *inputs: np.ndarray) -> np.ndarray:
        assert self._session is not None, "compile() first"
        out = self._session.run(None, dict(zip(self._names, inputs, strict=True)))
        return np.asarray(out[0], dtype=np.float32)

    def close(self) -> None:
        self._session = None
