"""GPU runtimes (CUDA through PyTorch, TensorRT) run every shipped model.

Skipped with a reason on machines without an NVIDIA GPU (CI has none); run on
a GPU machine with `pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import numpy as np
import pytest

from dimscope.engines.model_file import input_shapes, read_card, resolve_model
from dimscope.engines.runtime import gpu_present, open_runtime

pytestmark = pytest.mark.skipif(not gpu_present(), reason="no NVIDIA GPU visible to PyTorch")

SHAPE = (1, 1, 256, 256)


def _shape(model: str) -> tuple[int, int, int, int]:
    """SHAPE with the model's input channels (a temporal model takes its window)."""
    return (1, read_card(resolve_model(model)).channels, *SHAPE[2:])


def _inputs(model: str, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    frame = _shape(model)
    shapes = input_shapes(resolve_model(model), frame)
    # frames in 0..1 (as normalised), the interpolation time t = 0.5
    return [rng.random(s, dtype=np.float32) if s == frame else np.full(s, 0.5, np.float32)
            for s in shapes]


@pytest.mark.parametrize("runtime", ["cuda", "tensorrt"])
@pytest.mark.parametrize("model", ["denoise", "sr2", "interp"])
def test_gpu_runtime_matches_the_cpu_reference(runtime: str, model: str) -> None:
    if runtime == "tensorrt":
        pytest.importorskip("tensorrt", reason="TensorRT is not installed here")
    path = resolve_model(model)
    card = read_card(path)
    reference = open_runtime("onnxruntime", path, card, shape=_shape(model))
    gpu = open_runtime(runtime, path, card, shape=_shape(model))  # compiled and warmed up
    assert gpu.name == runtime and gpu.precision in ("fp16", "bf16", "fp32")
    first, second = _inputs(model, 1), _inputs(model, 2)
    want = [reference.run(*first), reference.run(*second)]
    got = gpu.run(*first)
    assert got.shape == want[0].shape
    assert np.abs(got - want[0]).max() < 3e-2  # FP16 against FP32
    # Two frames in flight (upload of one overlaps the other's inference) give the same.
    a, b = gpu.submit(*first), gpu.submit(*second)  # type: ignore[attr-defined]
    np.testing.assert_allclose(gpu.collect(a), got, atol=1e-3)  # type: ignore[attr-defined]
    assert np.abs(gpu.collect(b) - want[1]).max() < 3e-2  # type: ignore[attr-defined]
    gpu.close()


def test_auto_picks_a_gpu_runtime_and_says_so() -> None:
    path = resolve_model("interp")
    runtime = open_runtime("auto", path, read_card(path), shape=SHAPE)
    assert runtime.name in ("tensorrt", "cuda")
    if runtime.name == "cuda":  # TensorRT passed over: the note says why
        assert "tensorrt unavailable" in runtime.fallback_note
