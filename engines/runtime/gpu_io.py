"""GPU plumbing shared by the CUDA and TensorRT runtimes (torch tensors as buffers).

Each of `slots` slots owns a pinned host input, a device input, a device
output and a pinned host output. A frame goes: host -> pinned (memcpy) ->
device on the upload stream; the compute stream waits for that upload, runs
`enqueue(slot)`; the download stream waits for compute and copies back into
pinned memory. With two slots, the upload of frame n+1 and the download of
frame n-1 overlap the inference of frame n (`submit` returns at once;
`collect` waits for that slot only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class SlotRuntime:
    """The submit / collect / run half shared by the GPU runtimes: they set `io` (a
    `GpuSlots`) in `compile()` and enqueue one slot's inference in `_enqueue`."""

    io: Any = None

    def _enqueue(self, index: int, stream: Any) -> None:
        raise NotImplementedError

    def submit(self, *inputs: np.ndarray) -> int:
        """Start one frame (returns at once); pass the slot number to `collect`."""
        return int(self.io.submit(inputs, self._enqueue))

    def collect(self, index: int) -> np.ndarray:
        return np.asarray(self.io.collect(index))

    def run(self, *inputs: np.ndarray) -> np.ndarray:
        return self.collect(self.submit(*inputs))


@dataclass
class _Slot:
    host_in: list[torch.Tensor]
    dev_in: list[torch.Tensor]
    dev_out: torch.Tensor
    host_out: torch.Tensor
    uploaded: Any
    computed: Any
    downloaded: Any


class GpuSlots:
    def __init__(self, in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...],
                 dtype: torch.dtype, slots: int = 2) -> None:
        dev = torch.device("cuda")
        self.dtype = dtype
        self.upload, self.compute, self.download = (torch.cuda.Stream() for _ in range(3))
        self.slots = [
            _Slot(host_in=[torch.empty(s, dtype=torch.float32).pin_memory() for s in in_shapes],
                  dev_in=[torch.empty(s, dtype=dtype, device=dev) for s in in_shapes],
                  dev_out=torch.empty(out_shape, dtype=dtype, device=dev),
                  host_out=torch.empty(out_shape, dtype=torch.float32).pin_memory(),
                  uploaded=torch.cuda.Event(), computed=torch.cuda.Event(),
                  downloaded=torch.cuda.Event())
            for _ in range(slots)]
        self._next = 0

    def submit(self, inputs: tuple[np.ndarray, ...],
               enqueue: Callable[[int, Any], None]) -> int:
        """Start one frame; returns its slot number for `collect`."""
        index = self._next
        self._next = (self._next + 1) % len(self.slots)
        slot = self.slots[index]
        slot.downloaded.synchronize()  # the slot's previous frame has been collected
        for host, array in zip(slot.host_in, inputs, strict=True):
            host.numpy()[...] = array
        with torch.cuda.stream(self.upload):
            for dev, host in zip(slot.dev_in, slot.host_in, strict=True):
                dev.copy_(host, non_blocking=True)
            slot.uploaded.record(self.upload)
        self.compute.wait_event(slot.uploaded)
        with torch.cuda.stream(self.compute):
            enqueue(index, self.compute)
            slot.computed.record(self.compute)
        self.download.wait_event(slot.computed)
        with torch.cuda.stream(self.download):
            slot.host_out.copy_(slot.dev_out, non_blocking=True)
            slot.downloaded.record(self.download)
        return index

    def collect(self, index: int) -> np.ndarray:
        slot = self.slots[index]
        slot.downloaded.synchronize()
        return slot.host_out.numpy().copy()
