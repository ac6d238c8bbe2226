"""TensorRT runtime (NVIDIA GPUs): the thin TensorRT-specific part.

Everything else is shared with the CUDA runtime and tested there: the plan
cache (`plan_cache`), the buffers and the upload / inference / download
overlap (`gpu_io.GpuSlots`). Importing this module fails with ImportError
when TensorRT is not installed; `runtime.open_runtime` catches that (and any
failure of the builder) and falls back with a one-line reason.
NOT VERIFIED: no machine available to this project has TensorRT installed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import tensorrt as trt
import torch

from ..base import EngineError
from ..model_file import ModelCard, file_digest, model_inputs
from .gpu_io import GpuSlots, SlotRuntime
from .plan_cache import load_plan, plan_key, store_plan

log = logging.getLogger(__name__)


class TensorRTRuntime(SlotRuntime):
    name = "tensorrt"

    def __init__(self, path: Path, card: ModelCard, precision: str = "auto") -> None:
        if not torch.cuda.is_available():
            raise EngineError("runtime tensorrt: no CUDA device visible")
        if precision not in ("auto", "fp16", "fp32"):
            raise EngineError(f"runtime tensorrt: precision {precision!r} not fp16/fp32")
        self.path, self.card = path, card
        self.precision = "fp32" if precision == "fp32" else "fp16"
        self.fallback_note = ""
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.io = None
        self._contexts: list[Any] = []

    def _build(self, shape: tuple[int, int, int, int]) -> bytes:
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(self.path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse {self.path}: {errors}")
        config = builder.create_builder_config()
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for name, input_shape in model_inputs(self.path, shape):  # frames, and `t`
            profile.set_shape(name, input_shape, input_shape, input_shape)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"TensorRT failed to build an engine for {self.path} at {shape}")
        return bytes(plan)

    def compile(self, shape: tuple[int, int, int, int]) -> None:
        key = plan_key(file_digest(self.path), torch.cuda.get_device_name(), trt.__version__,
                       shape, self.precision)
        plan = load_plan(key)
        if plan is None:
            plan = self._build(shape)
            log.info("TensorRT plan built and cached at %s", store_plan(key, plan))
        engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        n, _, h, w = shape
        out_shape = (n, 1, h * self.card.scale, w * self.card.scale)
        inputs = model_inputs(self.path, shape)
        self.io = GpuSlots([s for _, s in inputs], out_shape, torch.float32)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        output = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._contexts = []
        for slot in self.io.slots:
            context = engine.create_execution_context()
            # Bound by name, in the ONNX file's input order (the slot's buffer order).
            for (name, _), tensor in zip(inputs, slot.dev_in, strict=True):
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            context.set_tensor_address(output, slot.dev_out.data_ptr())
            self._contexts.append(context)

    def _enqueue(self, index: int, stream: Any) -> None:
        if not self._contexts[index].execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execution failed")

    def close(self) -> None:
        self._contexts = []
        self.io = None
