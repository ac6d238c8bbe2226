"""End-to-end latency (core pop -> subscriber receive) per topic, budget policy engaging.

Runs the simulated microscope at 512² with the shipped `denoise` model on the
CPU runtime and `interp` interpolation (factor 2), with a subscriber in another
process that timestamps every message on arrival. Two cases in the same run:
  - a frame rate where the budget holds,
  - a frame rate where it cannot: the policy (faster tier, then skip) engages,
and prints p50/p99/max latency per topic plus the budget counters. Not a test.

    python bench/latency.py [--seconds 10] [--budget-ms 60]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dimscope.daemon.config import parse_config
from dimscope.daemon.pipeline import Pipeline


def subscriber(address: str, seconds: float, out: Any) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.connect(address)
    for topic in (b"raw", b"enhanced", b"interpolated"):
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    lat: dict[str, list[float]] = {}
    flags: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not sock.poll(100):
            continue
        topic, header, _ = sock.recv_multipart()
        now = time.time_ns()
        h = json.loads(header)
        # For interpolated frames measure from the later source's acquisition: that is
        # when the frame could first exist. (Their synthetic timestamp lies in the past.)
        lat.setdefault(topic.decode(), []).append(h["latency_ms"]["total"] if
                                                  topic == b"interpolated" else
                                                  (now - h["acquired_unix_ns"]) / 1e6)
        if "budget" in h:
            flags[h["budget"]] = flags.get(h["budget"], 0) + 1
    out.put((lat, flags))


def run_case(label: str, exposure_ms: float, budget_ms: float, seconds: float,
             tiers: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config({
            "source": {"kind": "sim", "width": 512, "height": 512, "exposure_ms": exposure_ms},
            "archive": {"out_dir": tmp, "fsync_every_s": 0},
            "publish": {"address": "tcp://127.0.0.1:*"},
            "engine": {"name": "denoise", "budget_ms": budget_ms, "tiers": tiers},
            "interpolate": {"factor": 2, "method": "model"},
        }, origin="<bench>", base_dir=Path(tmp))
        pipeline = Pipeline(cfg)
        pipeline.start()
        queue: Any = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(
            target=subscriber, args=(pipeline.publish_endpoint, seconds + 2, queue))
        proc.start()
        time.sleep(1.0)
        pipeline.wait(duration_s=seconds)
        summary = pipeline.stop().to_dict()
        lat, flags = queue.get(timeout=60)
        proc.join()
    b = summary["budget"]
    interp = summary["stages"].get("interpolate", {})
    print(f"\n== {label}: {1000 / exposure_ms:.0f} frames/s offered, budget {budget_ms:g} ms "
          f"({summary['fps']:.1f} fps acquired, {summary['acquired']} frames, "
          f"{summary['archived']} archived)")
    for topic in ("raw", "enhanced", "interpolated"):
        v = np.asarray(lat.get(topic, []))
        if v.size:
            print(f"  {topic:<13} n={v.size:<5} p50 {np.percentile(v, 50):7.1f} ms  "
                  f"p99 {np.percentile(v, 99):7.1f} ms  max {v.max():7.1f} ms")
    eng = summary["latency_ms"].get("engine", {})
    print(f"  engine processing p50 {eng.get('p50', 0):.1f} ms p99 {eng.get('p99', 0):.1f} ms; "
          f"tier {b['tier']} ({b['tier_name']}), {b['tier_changes']} change(s); enhanced late "
          f"{b['missed']}, skipped {b['skipped']}, dropped by the engine queue "
          f"{summary['stages']['engine']['dropped']}; interpolated {interp.get('passed', 0)}, "
          f"interpolation skipped (out of time) {interp.get('late', 0)}; header flags {flags}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--budget-ms", type=float, default=80.0)
    args = ap.parse_args()
    run_case("budget holds", 100.0, args.budget_ms, args.seconds, [])
    run_case("budget cannot hold, with a faster tier", 5.0, 15.0, args.seconds,
             [{"name": "vst_gaussian"}])
    run_case("budget cannot hold, no tier", 5.0, 15.0, args.seconds, [])


if __name__ == "__main__":
    main()
