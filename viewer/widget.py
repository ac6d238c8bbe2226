"""The napari dock widget: a live dimscope stream beside the raw frames, with its trust map.

Receiving happens on `LiveStream`'s worker thread; this widget paints on the GUI thread
at display rate (a QTimer, default 60 Hz), taking only the newest frame per slot — a slow
GUI drops frames (counted, shown in the readout) instead of queueing a backlog.

Layers (created with the first frame of each):
- `raw` and `enhanced` side by side (the enhanced layer shifted right by the raw width
  plus a gap; an `sr2` stream is drawn at the raw frame's physical size) — or overlaid
  when side-by-side is off, to compare by toggling;
- `enhanced` plays enhanced and interpolated frames in time order (`stream.py`);
- `trust`: the enhanced frame's trust map (signed local z) added over the enhanced layer:
  black (adds nothing) where they agree (|z| under 40 % of the threshold), green where the
  raw frame is brighter than the enhanced one (something erased), magenta where it is
  dimmer (something added), full colour at ±the frame's alert threshold; toggled with its
  checkbox.
Contrast limits follow the data on the first frames (percentiles 1 / 99.8 over 5 frames),
then stay put; "reset contrast" re-arms that.

The readout shows frame id, kind, model and version, latency, budget tier, trust score and
the viewer's own drops; a plot shows latency and frame rate over the last minute. Controls
(exposure, laser power, engine, budget, start/stop) go through the control socket's
`ControlClient`, the same client `dimscope ctl` uses; they are disabled, with a tooltip,
when the daemon has no control socket. "Record" saves what is painted as TIFF stacks
with the headers of every frame (provenance) beside them.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .plot import Sparkline
from .stream import SLOTS, LiveStream, ViewFrame

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
DEFAULT_CONTROL = "tcp://127.0.0.1:5556"
#: frames that set the contrast limits before they are held
_CONTRAST_FRAMES = 5
#: pixels between the raw and enhanced images side by side
_GAP = 8
#: frames a recording keeps per slot (a bounded buffer, not a disk writer)
_RECORD_LIMIT = 2000


class DimscopeWidget(QWidget):
    def __init__(self, napari_viewer: Any, address: str = DEFAULT_ADDRESS,
                 control_address: str = DEFAULT_CONTROL, paint_hz: float = 60.0,
                 server_key: Path | None = None, client_key: Path | None = None) -> None:
        """`server_key`/`client_key`: CURVE key files (the daemon's public key, this
        viewer's secret key) for a daemon whose streams and control socket use CURVE."""
        super().__init__()
        self.viewer = napari_viewer
        self._keys = (server_key, client_key)
        self.stream: LiveStream | None = None
        self.control: Any = None
        self._contrast: dict[str, list[tuple[float, float]]] = {}
        self._held: dict[str, tuple[float, float]] = {}
        self._shown: dict[str, ViewFrame] = {}
        #: (slot, acquired_unix_ns, kind, frame_id) of every painted frame, for tests/records
        self.painted: list[tuple[str, int, str, int]] = []
        #: publish -> painted (ms) of painted frames, per slot
        self.display_latency_ms: dict[str, list[float]] = {s: [] for s in SLOTS}
        self._recording: dict[str, list[ViewFrame]] | None = None
        #: the engine of the newest enhanced (not interpolated) frame shown
        self._restored_by: dict[str, Any] | None = None
        #: control requests run here, one at a time, never on the GUI thread
        self._requests = ThreadPoolExecutor(1, thread_name_prefix="dimscope-view-control")
        self._pending: list[tuple[str, Future[Any]]] = []
        #: the daemon's settings as last read or sent (only changes are sent)
        self._known: dict[str, Any] = {}
        self._build(address, control_address)
        self._timer = QTimer(self)
        self._timer.setInterval(max(1, int(1000 / paint_hz)))
        self._timer.timeout.connect(self.paint)

    # -- layout ----------------------------------------------------------------------------
    def _build(self, address: str, control_address: str) -> None:
        # A dock that grows with its text would squeeze napari's canvas to nothing.
        self.setMaximumWidth(460)
        root = QVBoxLayout(self)
        conn = QGroupBox("stream")
        form = QFormLayout(conn)
        self.address_edit = QLineEdit(address)
        self.control_edit = QLineEdit(control_address)
        form.addRow("data", self.address_edit)
        form.addRow("control", self.control_edit)
        self.topic_boxes: dict[str, QCheckBox] = {}
        topics = QHBoxLayout()
        for topic in ("raw", "enhanced", "interpolated", "trust"):
            box = QCheckBox(topic)
            box.setChecked(True)
            self.topic_boxes[topic] = box
            topics.addWidget(box)
        form.addRow("topics", topics)
        buttons = QHBoxLayout()
        self.connect_button = QPushButton("connect")
        self.connect_button.clicked.connect(self.toggle_connection)
        self.reset_button = QPushButton("reset contrast")
        self.reset_button.clicked.connect(self.reset_contrast)
        buttons.addWidget(self.connect_button)
        buttons.addWidget(self.reset_button)
        form.addRow(buttons)
        view = QHBoxLayout()
        self.side_by_side = QCheckBox("side by side")
        self.side_by_side.setChecked(True)
        self.side_by_side.toggled.connect(self._arrange)
        self.show_trust = QCheckBox("trust map")
        self.show_trust.setChecked(True)
        self.show_trust.toggled.connect(self._trust_visibility)
        self.record_button = QPushButton("record")
        self.record_button.setCheckable(True)
        self.record_button.toggled.connect(self._record_toggled)
        view.addWidget(self.side_by_side)
        view.addWidget(self.show_trust)
        view.addWidget(self.record_button)
        form.addRow(view)
        root.addWidget(conn)

        self.readout = QLabel("not connected")
        self.readout.setWordWrap(True)
        self.readout.setMinimumHeight(150)  # room for every line when they wrap
        root.addWidget(self.readout)
        self.plot = Sparkline()
        root.addWidget(self.plot)

        self.controls = QGroupBox("control")
        cform = QFormLayout(self.controls)
        self.exposure = QDoubleSpinBox()
        self.exposure.setRange(0.01, 10000.0)
        self.exposure.setSuffix(" ms")
        self.exposure.editingFinished.connect(lambda: self._set("exposure", self.exposure))
        self.laser = QDoubleSpinBox()
        self.laser.setRange(0.0, 100.0)
        self.laser.setSingleStep(0.05)
        self.laser.editingFinished.connect(lambda: self._set("laser_power", self.laser))
        self.engine_box = QComboBox()
        self.engine_box.addItems(["denoise", "sr2", "vst_gaussian", "identity"])
        self.engine_box.activated.connect(lambda _: self._engine_name())
        self.budget = QDoubleSpinBox()
        self.budget.setRange(0.0, 10000.0)
        self.budget.setSuffix(" ms (0 = none)")
        self.budget.editingFinished.connect(self._budget)
        run = QHBoxLayout()
        self.start_button, self.stop_button = QPushButton("start"), QPushButton("stop")
        self.start_button.clicked.connect(lambda: self._command("start"))
        self.stop_button.clicked.connect(lambda: self._command("stop"))
        run.addWidget(self.start_button)
        run.addWidget(self.stop_button)
        cform.addRow("exposure", self.exposure)
        cform.addRow("laser power", self.laser)
        cform.addRow("engine", self.engine_box)
        cform.addRow("budget", self.budget)
        cform.addRow(run)
        self.control_status = QLabel("")
        self.control_status.setWordWrap(True)  # long reasons must not widen the dock
        cform.addRow(self.control_status)
        self._enable_controls(False, "connect to a daemon first")
        root.addWidget(self.controls)
        root.addStretch(1)

    # -- connection ------------------------------------------------------------------------
    def toggle_connection(self) -> None:
        if self.stream is None:
            self.connect_stream()
        else:
            self.disconnect_stream()

    def connect_stream(self, address: str | None = None) -> None:
        if address is not None:
            self.address_edit.setText(address)
        topics = [t for t, box in self.topic_boxes.items() if box.isChecked()]
        self.stream = LiveStream(self.address_edit.text().strip(), topics,
                                 server_key=self._keys[0], client_key=self._keys[1]).start()
        self.connect_button.setText("disconnect")
        self._connect_control()
        self._timer.start()

    def disconnect_stream(self) -> None:
        self._timer.stop()
        if self.stream is not None:
            self.stream.stop()
            self.stream = None
        if self.control is not None:
            # closed on the request thread, after any request still in flight
            self._requests.submit(self.control.close)
            self.control = None
        self.connect_button.setText("connect")
        self._enable_controls(False, "connect to a daemon first")

    def _connect_control(self) -> None:
        """Controls work only with a daemon that answers on its control socket."""
        try:
            from dimscope.daemon.client import ControlClient
        except ImportError:
            self._enable_controls(False, "this dimscope has no control client")
            return
        address = self.control_edit.text().strip()
        try:  # a camera restart takes a while: requests wait up to 10 s
            client = ControlClient(address, timeout_s=10.0, server_key=self._keys[0],
                                   client_key=self._keys[1])
        except Exception as exc:  # unreadable key files
            self._enable_controls(False, f"cannot use the control socket at {address}: {exc}")
            return
        try:
            status = client.request("status", timeout_s=0.5)  # a quick probe
        except Exception as exc:  # no daemon there, an old daemon, a refused key
            client.close()
            self._enable_controls(False, f"the daemon has no control socket at {address} "
                                         f"({exc})")
            return
        self.control = client
        self._enable_controls(True, f"control: {address}")
        settings = status.get("settings", {})
        engine = status.get("engine", {})
        for box, key, name in ((self.exposure, "exposure_ms", "exposure"),
                               (self.laser, "laser_power", "laser_power")):
            value = settings.get(key)
            if isinstance(value, (int, float)):
                box.setValue(float(value))
                self._known[name] = box.value()
        name = engine.get("engine") or engine.get("name")
        if isinstance(name, str):
            if self.engine_box.findText(name) < 0:
                self.engine_box.addItem(name)
            self.engine_box.setCurrentText(name)
            self._known["engine"] = name
        budget = engine.get("budget_ms")
        self.budget.setValue(float(budget) if isinstance(budget, (int, float)) else 0.0)
        self._known["budget_ms"] = self.budget.value()

    def _enable_controls(self, enabled: bool, why: str) -> None:
        for child in self.controls.findChildren(QWidget):
            child.setEnabled(enabled)
            child.setToolTip("" if enabled else why)
        self.controls.setToolTip("" if enabled else why)
        self.control_status.setEnabled(True)
        self.control_status.setText(why)

    def _command(self, method: str, **args: Any) -> Future[Any] | None:
        """Send a control request off the GUI thread (loading a model can take seconds);
        the outcome appears under the controls when it is back."""
        if self.control is None:
            return None
        self.control_status.setText(f"{method}: sent")
        future = self._requests.submit(getattr(self.control, method), **args)
        self._pending.append((method, future))
        return future

    def _collect_replies(self) -> None:
        for method, future in [p for p in self._pending if p[1].done()]:
            self._pending.remove((method, future))
            exc = future.exception()
            self.control_status.setText(f"{method}: ok" if exc is None else f"{method}: {exc}")

    def _changed(self, key: str, value: Any) -> bool:
        """Whether `value` differs from what the daemon last said or was last sent (leaving
        a field without editing it must not re-send: a camera setting restarts the camera)."""
        if self._known.get(key) == value:
            return False
        self._known[key] = value
        return True

    def _set(self, prop: str, box: QDoubleSpinBox) -> None:
        if self._changed(prop, box.value()):
            self._command("set", name=prop, value=box.value())

    def _engine_name(self) -> None:
        if self._changed("engine", self.engine_box.currentText()):
            self._command("engine", name=self.engine_box.currentText())

    def _budget(self) -> None:
        # budget 0 removes the budget (the control socket's convention); the engine stays
        if self._changed("budget_ms", self.budget.value()):
            self._command("engine", budget_ms=self.budget.value())

    # -- painting --------------------------------------------------------------------------
    def paint(self) -> None:
        """Take the newest frames and show them (GUI thread, every timer tick)."""
        self._collect_replies()
        if self.stream is None:
            return
        frames = self.stream.take()
        for slot, frame in frames.items():
            self._show(slot, frame)
        now_ns = time.time_ns()
        for slot, frame in frames.items():
            published = int(frame.header.get("published_unix_ns", now_ns))
            self.display_latency_ms[slot].append((now_ns - published) / 1e6)
            self.painted.append((slot, frame.acquired_unix_ns, frame.kind,
                                 int(frame.header["frame_id"])))
            if self._recording is not None and len(self._recording[slot]) < _RECORD_LIMIT:
                self._recording[slot].append(frame)
        if frames:
            self._update_readout()
        self.plot.set_series(self.stream.latency.values(), self.stream.fps.values())

    def _show(self, slot: str, frame: ViewFrame) -> None:
        self._shown[slot] = frame
        data = frame.pixels
        if slot in self.viewer.layers:
            layer = self.viewer.layers[slot]
            if layer.data.shape != data.shape:  # e.g. the engine switched to sr2
                self.viewer.layers.remove(slot)
        if slot not in self.viewer.layers:
            kwargs: dict[str, Any] = {"name": slot}
            if slot == "trust":
                kwargs.update(colormap=_trust_colormap(), opacity=0.9, blending="additive",
                              visible=self.show_trust.isChecked())
            layer = self.viewer.add_image(data, **kwargs)
            self._arrange()
            self.viewer.reset_view()  # both images in view
        else:
            layer = self.viewer.layers[slot]
            layer.data = data
        layer.contrast_limits = self._limits(slot, frame)

    def _limits(self, slot: str, frame: ViewFrame) -> tuple[float, float]:
        if slot == "trust":
            threshold = float(frame.header.get("trust", {}).get("threshold", 5.0))
            return (-threshold, threshold)
        if slot in self._held:
            return self._held[slot]
        lo, hi = (float(v) for v in np.percentile(frame.pixels, [1.0, 99.8]))
        seen = self._contrast.setdefault(slot, [])
        seen.append((lo, hi if hi > lo else lo + 1.0))
        limits = (float(np.median([s[0] for s in seen])), float(np.median([s[1] for s in seen])))
        if len(seen) >= _CONTRAST_FRAMES:
            self._held[slot] = limits
        return limits

    def reset_contrast(self) -> None:
        self._contrast.clear()
        self._held.clear()

    def _arrange(self) -> None:
        """Side by side: the enhanced (and trust) layers right of the raw one, at the raw
        frame's physical size; overlaid otherwise."""
        raw = self._shown.get("raw")
        enhanced = self._shown.get("enhanced")
        width = raw.pixels.shape[1] if raw is not None else (
            enhanced.pixels.shape[1] if enhanced is not None else 0)
        shift = float(width + _GAP) if self.side_by_side.isChecked() else 0.0
        scale = 1.0
        if enhanced is not None and enhanced.header.get("engine"):
            scale = 1.0 / float(enhanced.header["engine"].get("scale", 1) or 1)
        if "enhanced" in self.viewer.layers:
            layer = self.viewer.layers["enhanced"]
            layer.scale = (scale, scale)
            layer.translate = (0.0, shift)
        if "trust" in self.viewer.layers:
            layer = self.viewer.layers["trust"]
            layer.scale = (2.0, 2.0)  # the map is at half the camera's sampling
            layer.translate = (0.5, shift + 0.5)

    def _trust_visibility(self, visible: bool) -> None:
        if "trust" in self.viewer.layers:
            self.viewer.layers["trust"].visible = visible

    def _update_readout(self) -> None:
        assert self.stream is not None
        lines = []
        enhanced = self._shown.get("enhanced")
        if enhanced is not None:
            h = enhanced.header
            if h.get("kind") == "enhanced":
                self._restored_by = h.get("engine")
            lines.append(f"frame {h['frame_id']} · {h.get('kind')}"
                         + (f" (t = {h['t']:g})" if "t" in h else ""))
            lines.append("model " + _model_text(self._restored_by)
                         + (f" · interpolated by {_model_text(h.get('engine'))}"
                            if h.get("kind") == "interpolated" else ""))
            lat = float(h.get("latency_ms", {}).get("total", float("nan")))
            tier = h.get("tier")
            lines.append(f"latency {lat:.1f} ms" + (f" · tier {tier}" if tier is not None else "")
                         + (f" · budget {h['budget']}" if "budget" in h else ""))
        trust_frame = self._shown.get("trust")
        if trust_frame is not None and trust_frame.header.get("trust"):
            trust = trust_frame.header["trust"]
            lines.append(f"trust (frame {trust_frame.header['frame_id']}): max z "
                         f"{trust['max_z']:+.1f}, threshold {trust['threshold']:.1f}"
                         + (" ALERT" if trust["alert"] else ""))
        raw = self._shown.get("raw")
        if raw is not None:
            lines.append(f"raw frame {raw.header['frame_id']} · {raw.header['exposure_ms']} ms")
        c = self.stream.counters
        lines.append(f"dropped by this viewer: {self.stream.dropped()} (raw {c['raw'].dropped}, "
                     f"enhanced {c['enhanced'].dropped}); missed on the wire: "
                     f"{sum(x.missed for x in c.values())}; playout "
                     f"{self.stream.playout_delay_ms():.0f} ms")
        if self.stream.error:
            lines.append(self.stream.error)
        self.readout.setText("\n".join(lines))

    # -- recording -------------------------------------------------------------------------
    def _record_toggled(self, on: bool) -> None:
        if on:
            self._recording = {s: [] for s in SLOTS}
            self.record_button.setText("stop recording")
        else:
            self.record_button.setText("record")
            if self._recording is not None:
                saved = self.save_recording(self._recording, Path.cwd())
                self.control_status.setText("saved " + ", ".join(p.name for p in saved))
            self._recording = None

    @staticmethod
    def save_recording(recording: dict[str, list[ViewFrame]], folder: Path) -> list[Path]:
        """One TIFF stack per slot of what was painted, and its headers as JSON beside it."""
        import tifffile

        stamp = time.strftime("%Y%m%d-%H%M%S")
        saved = []
        for slot, frames in recording.items():
            if not frames:
                continue
            path = folder / f"dimscope-view-{stamp}-{slot}.tif"
            shapes = {f.pixels.shape for f in frames}
            if len(shapes) == 1:
                tifffile.imwrite(path, np.stack([f.pixels for f in frames]),
                                 photometric="minisblack",
                                 description=json.dumps({"dimscope": "viewer recording",
                                                         "slot": slot}))
            else:  # the engine changed scale mid-recording: one page per frame
                with tifffile.TiffWriter(path) as tif:
                    for f in frames:
                        tif.write(f.pixels, photometric="minisblack")
            path.with_suffix(".tif.json").write_text(json.dumps(
                [{"topic": f.topic, **f.header} for f in frames], indent=1) + "\n")
            saved.append(path)
        return saved

    def closeEvent(self, event: Any) -> None:
        self.disconnect_stream()  # queues the control client's close behind its requests
        self._requests.shutdown(wait=False)
        super().closeEvent(event)


def _trust_colormap() -> Any:
    from napari.utils.colormaps import Colormap

    # Black (nothing added) within ±40 % of the threshold, so noise-level agreement stays
    # out of the way and real disagreements stand out.
    magenta, black, green = [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]
    return Colormap([magenta, black, black, green], controls=[0.0, 0.3, 0.7, 1.0],
                    name="dimscope trust (−z magenta, +z green)")


def _model_text(engine: dict[str, Any] | None) -> str:
    if not engine:
        return "none (raw)"
    text = f"{engine.get('name', '?')} {engine.get('version', '')} ({engine.get('runtime', '')})"
    return text + (" UNVERIFIED" if not engine.get("verified", True) else "")
