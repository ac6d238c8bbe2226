"""The napari viewer (issue 14): a real napari window under a real X server (Xvfb, started by
pytest-xvfb), driving a real daemon on the simulated microscope over loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imageio.v3
import napari
import numpy as np
import pytest

from dimscope.daemon.pipeline import Pipeline
from dimscope.viewer.review import RunReviewWidget
from dimscope.viewer.widget import DimscopeWidget

from .conftest import make_config


@pytest.fixture
def viewer(qtbot: Any) -> Iterator[napari.Viewer]:
    v = napari.Viewer(show=True)
    yield v
    v.close()


def _daemon(tmp_path: Path, **sections: Any) -> Pipeline:
    pipeline = Pipeline(make_config(tmp_path, **sections))
    pipeline.start()
    return pipeline


def test_live_layers_kinds_order_readout_and_screenshot(tmp_path: Path, qtbot: Any,
                                                        viewer: napari.Viewer) -> None:
    pipeline = _daemon(tmp_path, source={"kind": "sim", "width": 256, "height": 192,
                                         "exposure_ms": 25.0},
                       engine={"name": "denoise"}, interpolate={"factor": 2})
    widget = DimscopeWidget(viewer, address=pipeline.publish_endpoint or "",
                            control_address="tcp://127.0.0.1:9")  # nothing listens there
    viewer.window.add_dock_widget(widget, name="dimscope")
    try:
        widget.connect_stream()
        qtbot.waitUntil(lambda: {"raw", "enhanced", "trust"} <= {lay.name for lay in
                                                                  viewer.layers},
                        timeout=20000)
        qtbot.wait(3000)
        assert viewer.layers["raw"].data.shape == (192, 256)
        assert viewer.layers["enhanced"].data.shape == (192, 256)
        assert viewer.layers["trust"].data.shape == (96, 128)
        assert viewer.layers["enhanced"].data.dtype == np.float32
        # enhanced and interpolated frames painted in time order, interpolated ones between
        # their neighbours
        timeline = [(t, kind) for slot, t, kind, _ in widget.painted if slot == "enhanced"]
        times = [t for t, _ in timeline]
        assert times == sorted(times) and len(set(times)) == len(times)
        kinds = [k for _, k in timeline]
        assert any(kinds[i - 1] == "enhanced" and kinds[i] == "interpolated"
                   and kinds[i + 1] == "enhanced" for i in range(1, len(kinds) - 1)), kinds
        assert "denoise" in widget.readout.text() and "dropped by this viewer" in \
            widget.readout.text()
        # no control socket at that address: controls disabled, and the tooltip says why
        assert not widget.exposure.isEnabled()
        assert "no control socket" in widget.exposure.toolTip()
        shot = tmp_path / "viewer.png"
        viewer.screenshot(str(shot), canvas_only=True)
        pixels = imageio.v3.imread(shot)  # the file as written, read back
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 5 and len(np.unique(pixels.reshape(-1, pixels.shape[-1]),
                                                  axis=0)) > 50
    finally:
        widget.disconnect_stream()
        summary = pipeline.stop()
    assert summary.acquired == summary.archived > 0


def test_a_slow_gui_shows_the_newest_frame_and_counts_its_drops(
        tmp_path: Path, qtbot: Any, viewer: napari.Viewer) -> None:
    pipeline = _daemon(tmp_path, source={"kind": "sim", "width": 256, "height": 256,
                                         "exposure_ms": 5.0},
                       engine={"name": "identity"})
    widget = DimscopeWidget(viewer, address=pipeline.publish_endpoint or "",
                            control_address="tcp://127.0.0.1:9")
    shown_ids: list[int] = []

    def slow_paint() -> None:
        time.sleep(0.15)  # a GUI thread busy with something else
        widget.paint()
        raw = widget._shown.get("raw")
        if raw is not None and (not shown_ids or raw.header["frame_id"] != shown_ids[-1]):
            shown_ids.append(int(raw.header["frame_id"]))

    try:
        widget.connect_stream()
        qtbot.waitUntil(lambda: "raw" in viewer.layers, timeout=15000)
        widget._timer.timeout.disconnect()
        widget._timer.timeout.connect(slow_paint)
        dropped_before = widget.stream.counters["raw"].dropped if widget.stream else 0
        qtbot.wait(3000)
        assert widget.stream is not None
        dropped_after = widget.stream.counters["raw"].dropped
    finally:
        widget.disconnect_stream()
        summary = pipeline.stop()
    assert len(shown_ids) >= 10
    # Each paint jumps to the newest frame: tens of frames arrive during a 0.15 s paint at
    # 200 frames/s, so a display working through a backlog would step by 1 instead.
    steps = np.diff(shown_ids[2:])
    assert steps.min() >= 5, shown_ids
    assert dropped_after > dropped_before + 50  # ~20 frames arrive per slow paint
    assert summary.acquired == summary.archived  # the daemon was never slowed into losses


def test_controls_drive_the_daemon_through_its_control_socket(
        tmp_path: Path, qtbot: Any, viewer: napari.Viewer) -> None:
    pipeline = _daemon(tmp_path, source={"kind": "sim", "width": 128, "height": 128,
                                         "exposure_ms": 10.0},
                       engine={"name": "identity"})
    widget = DimscopeWidget(viewer, address=pipeline.publish_endpoint or "",
                            control_address=pipeline.control_endpoint or "")
    try:
        widget.connect_stream()
        assert widget.exposure.isEnabled() and widget.exposure.value() == pytest.approx(10.0)
        widget.exposure.setValue(15.0)
        widget.exposure.editingFinished.emit()
        qtbot.waitUntil(lambda: widget.control_status.text() == "set: ok", timeout=10000)
        qtbot.waitUntil(lambda: "raw" in widget._shown
                        and widget._shown["raw"].header["exposure_ms"] == 15.0, timeout=10000)
        assert "· 15.0 ms" in widget.readout.text()
        # leaving a field without a change sends nothing
        widget.exposure.editingFinished.emit()
        assert widget.control_status.text() == "set: ok"
        # the budget alone: the engine stays
        assert widget.engine_box.currentText() == "identity"
        widget.budget.setValue(50.0)
        widget.budget.editingFinished.emit()
        qtbot.waitUntil(lambda: widget.control_status.text() == "engine: ok", timeout=10000)
        stage = pipeline.stage("engine")
        assert getattr(stage, "budget_ms", None) == 50.0 and pipeline.engine_name == "identity"
        # the engine alone: the budget stays
        widget.engine_box.setCurrentText("vst_gaussian")
        widget.engine_box.activated.emit(widget.engine_box.currentIndex())
        qtbot.waitUntil(lambda: pipeline.engine_name == "vst_gaussian", timeout=20000)
        assert getattr(pipeline.stage("engine"), "budget_ms", None) == 50.0
    finally:
        widget.disconnect_stream()
        summary = pipeline.stop()
    events = (Path(summary.run_dir or "") / "events.jsonl").read_text()
    assert '"exposure"' in events and "15" in events
    assert summary.acquired == summary.archived


def test_review_a_finished_run(tmp_path: Path, qtbot: Any, viewer: napari.Viewer) -> None:
    pipeline = _daemon(tmp_path, engine={"name": "denoise"})
    time.sleep(1.5)
    summary = pipeline.stop()
    run_dir = Path(summary.run_dir or "")
    widget = RunReviewWidget(viewer, run_dir)
    layer = viewer.layers[f"raw {run_dir.name}"]
    assert layer.data.shape[0] == summary.archived
    assert "trust alert" in widget.readout.text()
    viewer.dims.set_current_step(0, 1)
    qtbot.wait(100)
    assert "frame 1" in widget.readout.text() or widget.trust.get(1) is None
