"""PyTorch runtimes: the network is rebuilt from the ONNX file's card and weights.

- `TorchRuntime`: eager FP32 on the CPU, one frame at a time — what offline
  tools do; the baseline of `bench/engines.py` and the reference in tests.
- `CudaRuntime`: any NVIDIA GPU. FP16 (default) or BF16, channels-last, one
  CUDA graph per slot for the fixed camera shape, and the upload / inference
  / download overlap of `gpu_io.GpuSlots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base import EngineError
from ..model_file import ModelCard, input_shapes, onnx_weights
from ..nets import build_network
from .gpu_io import GpuSlots, SlotRuntime


def network_from_file(path: Path, card: ModelCard) -> nn.Module:
    """The torch network described by the card, with the weights stored in the file."""
    net = build_network(card.arch, **card.hparams)
    weights = onnx_weights(path)
    state = net.state_dict()
    missing = [k for k in state if k not in weights]
    if missing:
        raise EngineError(f"model file {path} lacks weights for {len(missing)} parameter(s) of "
                          f"architecture {card.arch!r} (first: {missing[0]})")
    net.load_state_dict({k: torch.from_numpy(weights[k].copy()) for k in state})
    return net.eval()


class TorchRuntime:
    name = "torch"

    def __init__(self, path: Path, card: ModelCard, precision: str = "auto") -> None:
        if precision not in ("auto", "fp32"):
            raise EngineError(f"runtime torch (CPU) runs fp32 only, not {precision!r}")
        self.precision = "fp32"
        self.fallback_note = ""
        self.net = network_from_file(path, card)

    def compile(self, shape: tuple[int, int, int, int]) -> None:
        pass

    @torch.inference_mode()
    def run(self, *inputs: np.ndarray) -> np.ndarray:
        out = self.net(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
        return np.asarray(out.numpy(), dtype=np.float32)

    def close(self) -> None:
        pass


_DTYPES = {"auto": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16,
           "fp32": torch.float32}


class CudaRuntime(SlotRuntime):
    name = "cuda"

    def __init__(self, path: Path, card: ModelCard, precision: str = "auto",
                 cuda_graphs: bool = True) -> None:
        if not torch.cuda.is_available():
            raise EngineError("runtime cuda: no CUDA device visible to PyTorch")
        if precision not in _DTYPES:
            raise EngineError(f"runtime cuda: precision {precision!r} not one of "
                              f"{', '.join(_DTYPES)}")
        self.dtype = _DTYPES[precision]
        self.precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")
        self.fallback_note = ""
        self.path, self.card, self.cuda_graphs = path, card, cuda_graphs
        self.net = network_from_file(path, card).to("cuda", self.dtype)
        self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.io = None
        self._graphs: list[torch.cuda.CUDAGraph] = []

    def compile(self, shape: tuple[int, int, int, int]) -> None:
        n, _, h, w = shape
        out_shape = (n, 1, h * self.card.scale, w * self.card.scale)
        # One buffer per model input: frames, and the interpolation time `t` (1x1x1x1).
        self.io = GpuSlots(input_shapes(self.path, shape), out_shape, self.dtype)
        self._graphs = []
        with torch.inference_mode():
            # Warm-up on the stream the graphs are captured on (cuDNN autotuning; PyTorch
            # requires a side-stream warm-up before capture).
            self.io.compute.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.io.compute):
                for _ in range(3):
                    for index in range(len(self.io.slots)):
                        self._eager(index)
            torch.cuda.synchronize()
            if self.cuda_graphs:
                for slot in self.io.slots:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.io.compute):
                        slot.dev_out.copy_(self.net(*slot.dev_in))
                    self._graphs.append(graph)

    def _eager(self, index: int, _stream: Any = None) -> None:
        slot = self.io.slots[index]
        slot.dev_out.copy_(self.net(*slot.dev_in))

    def _enqueue(self, index: int, stream: Any) -> None:
        if self._graphs:
            self._graphs[index].replay()
        else:
            with torch.inference_mode():
                self._eager(index)

    def close(self) -> None:
        self._graphs = []
        self.io = None
