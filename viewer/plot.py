"""A small live plot (QPainter, no plotting library): two series over the last minute."""

from __future__ import annotations

import itertools
from typing import Any

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget


class Sparkline(QWidget):
    """Latency (ms, orange, left scale) and frame rate (frames/s, cyan, right scale) against
    time; or any two (x, y) series, e.g. trust max |z| and its threshold over frame ids."""

    def __init__(self, labels: tuple[str, str] = ("latency ms", "fps"),
                 height: int = 90) -> None:
        super().__init__()
        self.labels = labels
        self.setMinimumHeight(height)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self._series: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])

    def set_series(self, first: list[tuple[float, float]],
                   second: list[tuple[float, float]]) -> None:
        self._series = (first, second)
        self.update()

    def paintEvent(self, _event: Any) -> None:
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(30, 30, 34))
        w, h = self.width(), self.height()
        xs = [x for s in self._series for x, _ in s]
        if xs:
            x0, x1 = min(xs), max(xs)
            span = max(x1 - x0, 1e-9)
            for series, color, label, right in zip(
                    self._series, (QColor(255, 160, 60), QColor(80, 200, 230)), self.labels,
                    (False, True), strict=True):
                if not series:
                    continue
                top = max(y for _, y in series) or 1.0
                p.setPen(QPen(color, 1.5))
                points = [QPointF(4 + (x - x0) / span * (w - 8), h - 14 - y / top * (h - 22))
                          for x, y in series]
                for a, b in itertools.pairwise(points):
                    p.drawLine(a, b)
                text = f"{label} {series[-1][1]:.1f} (max {top:.1f})"
                flags = Qt.AlignmentFlag.AlignRight if right else Qt.AlignmentFlag.AlignLeft
                p.drawText(4, h - 12, w - 8, 12, flags, text)
        else:
            p.setPen(QColor(150, 150, 150))
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "no data yet")
        p.end()
