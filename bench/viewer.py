"""Viewer display latency: from the daemon's publish to the frame drawn in napari.

A daemon on the simulated microscope (512², 33 ms exposure ≈ 30 frames/s, the shipped
`denoise` on the CPU, trust maps on) in this process, the dimscope napari widget in a
real napari window on a virtual X display (Xvfb via pyvirtualdisplay), painting at 60 Hz.
For every painted frame: header `published_unix_ns` → the end of the next draw of napari's
vispy canvas (the canvas's `draw` event; private napari API, used here only). Printed
per slot (raw, enhanced, trust): p50 / p99 / max, frames painted and dropped by the viewer
(a display slower than the stream keeps the newest frame, so drops are expected when the
stream outruns the paint rate). The baseline, measured in the same run: the same frames'
publish → received-by-the-viewer's-thread latency (what any subscriber sees).

    .venv/bin/python bench/viewer.py [--seconds 20] [--size 512] [--exposure-ms 33]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--exposure-ms", type=float, default=33.0)
    ap.add_argument("--engine", default="denoise")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "viewer")
    ap.add_argument("--interpolate", type=int, choices=[1, 2, 4], default=1)
    ap.add_argument("--screenshot", type=Path, default=None,
                    help="also save the whole napari window (dock included) here at the end "
                         "(docs/viewer.png)")
    args = ap.parse_args()

    display = None
    if not os.environ.get("DISPLAY"):
        from pyvirtualdisplay import Display

        display = Display(visible=False, size=(1600, 1000))
        display.start()
    import napari
    from qtpy.QtWidgets import QApplication

    from dimscope.daemon.config import parse_config
    from dimscope.daemon.pipeline import Pipeline
    from dimscope.viewer.widget import DimscopeWidget

    cfg = parse_config({"source": {"kind": "sim", "width": args.size, "height": args.size,
                                   "exposure_ms": args.exposure_ms},
                        "engine": {"name": args.engine},
                        "interpolate": {"factor": args.interpolate},
                        "control": {"address": "tcp://127.0.0.1:*"},
                        "archive": {"out_dir": "/tmp/dimscope-bench-viewer"},
                        "publish": {"address": "tcp://127.0.0.1:*"}})
    pipeline = Pipeline(cfg)
    pipeline.start()
    viewer = napari.Viewer(show=True)
    widget = DimscopeWidget(viewer, address=pipeline.publish_endpoint or "",
                            control_address=pipeline.control_endpoint or "")
    viewer.window.add_dock_widget(widget, name="dimscope")
    drawn: dict[str, list[float]] = {"raw": [], "enhanced": [], "trust": []}
    #: the baseline: publish -> received by the viewer's thread, same frames
    received_ms: dict[str, list[float]] = {"raw": [], "enhanced": [], "trust": []}
    pending: list[tuple[str, int]] = []
    painted_before = 0

    def on_paint_tick() -> None:
        nonlocal painted_before
        widget.paint()
        for slot, _, _, _ in widget.painted[painted_before:]:
            frame = widget._shown[slot]
            published = int(frame.header["published_unix_ns"])
            pending.append((slot, published))
            received_ms[slot].append((frame.received_unix_ns - published) / 1e6)
        painted_before = len(widget.painted)

    def on_draw(_event: Any) -> None:
        now = time.time_ns()
        for slot, published in pending:
            drawn[slot].append((now - published) / 1e6)
        pending.clear()

    widget.connect_stream()
    widget._timer.timeout.disconnect()
    widget._timer.timeout.connect(on_paint_tick)
    viewer.window._qt_viewer.canvas._scene_canvas.events.draw.connect(on_draw)
    app = QApplication.instance()
    assert app is not None
    warmup_until = time.monotonic() + 3.0
    end = time.monotonic() + 3.0 + args.seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.001)
        if time.monotonic() < warmup_until:
            for v in (*drawn.values(), *received_ms.values()):
                v.clear()
    if args.screenshot is not None:
        viewer.window._qt_window.resize(1500, 900)
        for _ in range(50):
            app.processEvents()
            time.sleep(0.01)
        viewer.screenshot(str(args.screenshot), canvas_only=False)
    stream = widget.stream
    assert stream is not None
    counters = {slot: vars(c).copy() for slot, c in stream.counters.items()}
    widget.disconnect_stream()
    summary = pipeline.stop()
    viewer.close()
    if display is not None:
        display.stop()

    def stats(values: list[float]) -> dict[str, float]:
        a = np.asarray(values, float)
        return {"n": int(a.size), "p50": float(np.percentile(a, 50)),
                "p99": float(np.percentile(a, 99)), "max": float(a.max())} if a.size else {}

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU; napari "
                   f"{napari.__version__}, Qt via {os.environ.get('QT_API', 'qtpy default')}, "
                   "Xvfb (software OpenGL)",
        "size": args.size, "exposure_ms": args.exposure_ms, "engine": args.engine,
        "seconds": args.seconds, "acquired": summary.acquired, "archived": summary.archived,
        "fps": summary.fps,
        "publish_to_drawn_ms": {slot: stats(v) for slot, v in drawn.items()},
        "publish_to_received_ms": {slot: stats(v) for slot, v in received_ms.items()},
        "viewer_counters": counters,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Viewer display latency ({args.size}², {1000 / args.exposure_ms:.0f} frames/s "
             f"requested, engine {args.engine})", "",
             f"`bench/viewer.py` on {result['machine']}; {summary.fps:.1f} frames/s acquired, "
             f"{summary.acquired} acquired / {summary.archived} archived.", "",
             "| slot | frames drawn | publish → drawn p50 | p99 | max | baseline: publish → "
             "received p50 / p99 | dropped by the viewer |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for slot, s in result["publish_to_drawn_ms"].items():
        b = result["publish_to_received_ms"][slot]
        if s and b:
            lines.append(f"| {slot} | {s['n']} | {s['p50']:.1f} ms | **{s['p99']:.1f} ms** | "
                         f"{s['max']:.1f} ms | {b['p50']:.1f} / {b['p99']:.1f} ms | "
                         f"{counters[slot]['dropped']} |")
    lines += ["", "Baseline: the same painted frames, publish → received by the viewer's worker "
              "thread (what any subscriber sees); the difference is waiting for the next paint "
              "tick (60 Hz) and napari's draw."]
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
