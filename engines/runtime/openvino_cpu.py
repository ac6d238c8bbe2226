"""CPU runtime: OpenVINO, compiled for the camera's fixed frame (or tile) shape.

Measured on this project's 2-core CI machine kind (`bench/engines.py`): a
static-shape compile is ~10% faster than a dynamic one, and OpenVINO FP32 is
~15-20% faster than onnxruntime FP32 for these networks. `precision="bf16"`
asks for bfloat16 inference where the CPU supports it (AVX-512 BF16 / AMX), and
`auto` asks for BF16 where OpenVINO reports that the CPU computes it natively (its own
default there) and FP32 elsewhere (measured here: 512² `denoise` 25 -> 15 ms, 0.007 dB
from FP32 on the simulator, 0.023 dB on average on real data); the
precision actually used is read back from the compiled model and reported.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import openvino as ov

from ..base import EngineError
from ..model_file import ModelCard, input_shapes

_PRECISIONS = {"auto": None, "fp32": "f32", "bf16": "bf16"}


def precision_name(value: object) -> str:
    """dimscope's name for the precision OpenVINO reports.

    OpenVINO returns an `ov.Type` whose str() is e.g. `<Type: 'bfloat16'>`, not
    `bf16`; older releases returned a plain string. Both forms are read here.
    """
    if isinstance(value, ov.Type):
        value = value.get_type_name()
    text = str(value).lower()
    if "bf16" in text or "bfloat16" in text:
        return "bf16"
    if "f16" in text or "float16" in text:
        return "fp16"
    return "fp32"


def native_bf16(core: ov.Core | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), as OpenVINO sees
    it: there `precision = "auto"` runs BF16 (OpenVINO's own default), elsewhere FP32."""
    capabilities = (core or ov.Core()).get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in [str(c).upper() for c in capabilities]


class OpenVINORuntime:
    name = "openvino"

    def __init__(self, path: Path, card: ModelCard, precision: str = "auto",
                 threads: int | None = None) -> None:
        if precision not in _PRECISIONS:
            raise EngineError(f"runtime openvino: precision {precision!r} not one of "
                              f"{', '.join(_PRECISIONS)}")
        self.path, self.card, self.requested = path, card, precision
        self.threads = threads or len(os.sched_getaffinity(0))
        self.core = ov.Core()
        self.precision = "fp32" if precision == "auto" else precision
        self.fallback_note = ""
        self._request: ov.InferRequest | None = None

    def compile(self, shape: tuple[int, int, int, int]) -> None:
        try:
            model = self.core.read_model(str(self.path))
            # Frame inputs take the frame shape; a scalar input (interpolation time) stays 1x1.
            shapes = input_shapes(self.path, shape)
            model.reshape({inp.get_any_name(): list(s)
                           for inp, s in zip(model.inputs, shapes, strict=True)})
        except Exception as exc:
            raise EngineError(f"OpenVINO cannot load {self.path} for input {shape}: {exc}"
                              ) from None
        config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY",
                                     "INFERENCE_NUM_THREADS": self.threads}
        # auto: asked explicitly by the capability OpenVINO reports, so the choice never
        # depends on a release's default for CPUs with partial BF16 support
        hint = _PRECISIONS[self.requested] or ("bf16" if native_bf16(self.core) else "f32")
        config["INFERENCE_PRECISION_HINT"] = hint
        compiled = self.core.compile_model(model, "CPU", config)
        self.precision = precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        self._request = compiled.create_infer_request()

    def run(self, *inputs: np.ndarray) -> np.ndarray:
        assert self._request is not None, "compile() first"
        # The inputs are read in place (no copy into OpenVINO's tensors: ~1 ms of a 6-channel
        # 512² window); the output is copied, as the next call overwrites its tensor.
        result = self._request.infer([np.ascontiguousarray(a, dtype=np.float32) for a in inputs],
                                     share_inputs=True)
        return np.array(result[0], dtype=np.float32)

    def close(self) -> None:
        self._request = None
