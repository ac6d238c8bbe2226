"""GPU speed: dimscope's GPU runtimes against torch eager on the same GPU, same run.

For `denoise` and `interp` at 512² and 2048², frames per second and p99
latency (host frame in -> host result out) of:
  1. torch eager CUDA FP32, one frame at a time (upload, forward, download, sync),
  2. dimscope `cuda` (FP16, channels-last, CUDA graphs, pinned buffers, upload /
     compute / download on separate streams), one frame at a time (latency) and
     two frames in flight (throughput: `submit` the next before `collect`ing),
  3. dimscope `tensorrt` where TensorRT is installed (else it says so),
plus the largest difference from the FP32 reference. Writes the table to
`--json` if given. Prints one line and exits 2 where no NVIDIA GPU is visible.

    python bench/gpu.py [--frames 200] [--json results/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dimscope.engines.model_file import input_shapes, read_card, resolve_model
from dimscope.engines.runtime import gpu_present, open_runtime


def _inputs(path: Path, shape: tuple[int, int, int, int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(s, dtype=np.float32) if s == shape else np.full(s, 0.5, np.float32)
            for s in input_shapes(path, shape)]


def _latencies(step: Callable[[], Any], frames: int) -> np.ndarray:
    for _ in range(5):
        step()
    times = []
    for _ in range(frames):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return np.array(times) * 1e3


def _row(name: str, ms: np.ndarray, fps: float | None = None) -> dict[str, float | str]:
    return {"runtime": name, "fps": fps if fps is not None else 1e3 / float(np.mean(ms)),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def bench_case(model: str, side: int, frames: int) -> list[dict[str, float | str]]:
    import torch

    from dimscope.engines.runtime.pytorch import network_from_file

    path = resolve_model(model)
    card = read_card(path)
    shape = (1, card.channels, side, side)  # a temporal model takes its whole window
    inputs = _inputs(path, shape, 0)
    rows = []
    net = network_from_file(path, card).cuda()

    @torch.inference_mode()
    def eager() -> np.ndarray:
        dev = [torch.from_numpy(x).cuda() for x in inputs]
        out = net(*dev).cpu().numpy()
        torch.cuda.synchronize()
        return np.asarray(out)

    reference = eager()
    rows.append({**_row("torch eager CUDA fp32", _latencies(eager, frames)), "max_diff": 0.0})
    for kind in ("cuda", "tensorrt"):
        try:
            rt: Any = open_runtime(kind, path, card, shape=shape)
        except Exception as exc:
            rows.append({"runtime": kind, "error": str(exc)})
            continue
        diff = float(np.abs(rt.run(*inputs) - reference).max())
        latency = _latencies(lambda rt=rt: rt.run(*inputs), frames)
        # Throughput with two frames in flight: submit n+1, then collect n.
        pending = rt.submit(*inputs)
        t0 = time.perf_counter()
        for _ in range(frames):
            nxt = rt.submit(*inputs)
            rt.collect(pending)
            pending = nxt
        rt.collect(pending)
        fps = frames / (time.perf_counter() - t0)
        rows.append({**_row(f"dimscope {kind} {rt.precision}", latency, fps), "max_diff": diff})
        rt.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not gpu_present():
        print("bench/gpu.py: no NVIDIA GPU visible to PyTorch on this machine: nothing measured")
        return 2
    import torch

    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}")
    print(f"{'model':<8} {'frame':>6} {'runtime':<28} {'fps':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max diff':>9}")
    results: dict[str, Any] = {"device": device, "torch": torch.__version__, "cases": []}
    for model in ("denoise", "interp"):
        for side in (512, 2048):
            frames = args.frames if side == 512 else max(args.frames // 8, 20)
            rows = bench_case(model, side, frames)
            results["cases"].append({"model": model, "side": side, "rows": rows})
            eager_fps = float(rows[0]["fps"])
            for row in rows:
                if "error" in row:
                    print(f"{model:<8} {side:>5}² {row['runtime']:<28} not available: "
                          f"{str(row['error'])[:80]}")
                    continue
                ratio = float(row["fps"]) / eager_fps
                print(f"{model:<8} {side:>5}² {row['runtime']:<28} {row['fps']:>8.1f} "
                      f"{row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['max_diff']:>9.2e}"
                      f"  ({ratio:.2f}x eager)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
