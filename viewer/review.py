"""Review a finished run: its raw archive as a layer, and the trust scores over time.

`dimscope view RUN_DIR` (or the "dimscope run review" widget): the raw frames
(`raw_*.ome.tif`, in acquisition order) become one (T, Y, X) layer; `trust.jsonl` becomes a
plot of each enhanced frame's strongest local z against its alert threshold, and the
readout names the frame under the time slider with its score, engine and model version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget

from .plot import Sparkline


def read_raw_archive(run_dir: Path) -> np.ndarray:
    """The run's raw frames as one (T, Y, X) array (memory-mapped where the files allow)."""
    import tifffile

    files = sorted(run_dir.glob("raw_*.ome.tif")) or sorted(run_dir.glob("recovered_*.ome.tif"))
    if not files:
        raise FileNotFoundError(f"{run_dir} holds no raw_*.ome.tif (is it a dimscope run "
                                "folder?)")
    stacks: list[np.ndarray] = []
    for f in files:
        try:
            stacks.append(tifffile.memmap(f))
        except ValueError:  # not memory-mappable (compressed, odd layout): read it
            stacks.append(tifffile.imread(f))
        except tifffile.TiffFileError as exc:
            raise ValueError(f"{f} is not a complete TIFF ({exc}); the run was probably "
                             f"killed: run `dimscope recover {run_dir}` first") from None
    arrays = [s if s.ndim == 3 else s[None] for s in stacks]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def read_trust(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "trust.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line after a crash
            continue
    return out


class RunReviewWidget(QWidget):
    def __init__(self, napari_viewer: Any, run_dir: Path | str | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        layout = QVBoxLayout(self)
        self.path_edit = QLineEdit(str(run_dir or ""))
        self.path_edit.setPlaceholderText("run folder")
        open_button = QPushButton("open run")
        open_button.clicked.connect(lambda: self.open(Path(self.path_edit.text().strip())))
        self.plot = Sparkline(labels=("trust max |z|", "threshold"))
        self.readout = QLabel("")
        self.readout.setWordWrap(True)
        for w in (self.path_edit, open_button, self.plot, self.readout):
            layout.addWidget(w)
        layout.addStretch(1)
        self.trust: dict[int, dict[str, Any]] = {}
        self.viewer.dims.events.current_step.connect(self._on_step)
        if run_dir:
            self.open(Path(run_dir))

    def open(self, run_dir: Path) -> None:
        try:
            raw = read_raw_archive(run_dir)
        except (FileNotFoundError, ValueError) as exc:
            self.readout.setText(str(exc))
            return
        self.viewer.add_image(raw, name=f"raw {run_dir.name}")
        entries = read_trust(run_dir)
        self.trust = {int(e["frame_id"]): e for e in entries}
        scored = [e for e in entries if e.get("trust")]
        self.plot.set_series([(float(e["frame_id"]), abs(float(e["trust"]["max_z"])))
                              for e in scored],
                             [(float(e["frame_id"]), float(e["trust"]["threshold"]))
                              for e in scored])
        alerts = [e["frame_id"] for e in scored if e["trust"]["alert"]]
        self.readout.setText(f"{run_dir.name}: {raw.shape[0]} raw frames, {len(scored)} "
                             f"enhanced frames scored, {len(alerts)} trust alert(s)"
                             + (f" (frames {alerts[:20]})" if alerts else ""))

    def _on_step(self, event: Any) -> None:
        step = self.viewer.dims.current_step
        if not step or not self.trust:
            return
        entry = self.trust.get(int(step[0]))
        if entry is None:
            return
        t = entry.get("trust") or {}
        self.readout.setText(
            f"frame {entry['frame_id']} · {entry['kind']} · {entry.get('engine')} "
            f"{entry.get('version')}" + (f" · trust max z {t['max_z']:+.1f} / "
                                         f"{t['threshold']:.1f}" if t else "")
            + (" ALERT" if t.get("alert") else ""))
