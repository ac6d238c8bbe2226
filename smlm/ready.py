"""When a live localization acquisition has enough frames: the `ready` rule.

Ready when **all** hold, checked at each dense prediction:

1. at least `min_frames` frames have been acquired (and localized);
2. a model-free criterion on the localizations themselves (`criterion`):
   - `frc`: the FRC resolution of the plain render, from alternating blocks of
     `frc_block_frames` (≥ 100) frames, is at most `target_resolution_nm`;
   - `density`: the localization density over the structure (render pixels of the dense
     prediction above a tenth of its 99th percentile) is at least the Nyquist density for
     the target resolution, (2 / target)² per nm² (Shroff et al. 2008);
   - `both`;
3. successive dense predictions changed less than `max_change` (relative L2 difference of the
   two, each scaled to unit mean);
4. the error map flags at most `max_flagged` of the field.

Localizations with no structure (shuffled across the field) give an FRC that falls below
1/7 at the lowest frequencies — no resolution — so criterion 2 (`frc`) never holds for them,
and their dense prediction disagrees with the widefield image (criterion 4). The FRC, the
costliest, is computed only when every other criterion holds (else reported as null).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from .block import LocBlock
from .frc import MIN_BLOCK_FRAMES, THRESHOLD, frc


class ReadySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    min_frames: int = Field(1000, ge=1, description="never ready before this many frames")
    criterion: Literal["frc", "density", "both"] = Field(
        "frc", description="the model-free criterion: FRC of the plain render, Nyquist "
        "density of the localizations, or both")
    target_resolution_nm: float = Field(60.0, gt=0, description="FRC resolution (or the "
                                        "resolution whose Nyquist density is needed), nm")
    frc_block_frames: int = Field(100, ge=MIN_BLOCK_FRAMES,
                                  description="FRC halves: alternating blocks of this many")
    frc_pixel_nm: float = Field(10.0, gt=0, description="render pixel of the FRC images")
    max_change: float = Field(0.1, gt=0, description="relative change of the dense "
                              "prediction since the previous one, at most")
    max_flagged: float = Field(0.01, ge=0, le=1, description="share of the field the error "
                               "map flags, at most")


@dataclass
class ReadyCheck:
    """One evaluation of the rule: each criterion's value and whether it holds."""

    frames: int
    localizations: int
    frc_nm: float | None = None
    density_per_um2: float | None = None
    nyquist_per_um2: float | None = None
    change: float | None = None
    flagged: float | None = None
    failing: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.failing

    def as_dict(self) -> dict[str, Any]:
        def r(v: float | None, n: int = 4) -> float | None:
            return None if v is None or not math.isfinite(v) else round(v, n)

        return {"ready": self.ready, "frames": self.frames, "localizations": self.localizations,
                "frc_nm": r(self.frc_nm, 1), "density_per_um2": r(self.density_per_um2, 1),
                "nyquist_per_um2": r(self.nyquist_per_um2, 1), "change": r(self.change),
                "flagged": r(self.flagged, 5), "failing": list(self.failing)}


def structure_density(locs: LocBlock, dense: npt.NDArray[np.floating], render_pixel_nm: float
                      ) -> float:
    """Localizations per µm² over the structure (see criterion 2)."""
    top = float(np.percentile(dense, 99.0))
    mask = dense > 0.1 * top if top > 0 else np.zeros(dense.shape, bool)
    area_um2 = float(mask.sum()) * (render_pixel_nm / 1000.0) ** 2
    if area_um2 <= 0:
        return 0.0
    col = np.floor(np.asarray(locs.x_nm) / render_pixel_nm).astype(np.int64)
    row = np.floor(np.asarray(locs.y_nm) / render_pixel_nm).astype(np.int64)
    ok = (row >= 0) & (row < mask.shape[0]) & (col >= 0) & (col < mask.shape[1])
    inside = int(mask[row[ok], col[ok]].sum())
    return inside / area_um2


def relative_change(new: npt.NDArray[np.floating], old: npt.NDArray[np.floating] | None
                    ) -> float:
    if old is None or old.shape != new.shape:
        return math.inf
    a = new / max(float(new.mean()), 1e-12)
    b = old / max(float(old.mean()), 1e-12)
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(a)), 1e-12))


class ReadyRule:
    """Evaluates the rule at each dense prediction; remembers the previous one."""

    def __init__(self, settings: ReadySettings, extent_nm: tuple[float, float]) -> None:
        self.settings = settings
        self.extent_nm = extent_nm
        self._previous: npt.NDArray[np.floating] | None = None
        self.first_ready: ReadyCheck | None = None

    def check(self, frames: int, locs: LocBlock, dense: npt.NDArray[np.floating],
              render_pixel_nm: float, flagged: float) -> ReadyCheck:
        s = self.settings
        c = ReadyCheck(frames=frames, localizations=len(locs), flagged=flagged)
        if frames < s.min_frames:
            c.failing.append(f"frames {frames} < {s.min_frames}")
        c.change = relative_change(dense, self._previous)
        self._previous = np.array(dense, copy=True)
        if not c.change <= s.max_change:
            c.failing.append(f"dense change {c.change:.3f} > {s.max_change:g}")
        if not flagged <= s.max_flagged:
            c.failing.append(f"error map flags {flagged:.2%} > {s.max_flagged:.2%}")
        if s.criterion in ("density", "both"):
            c.density_per_um2 = structure_density(locs, dense, render_pixel_nm)
            c.nyquist_per_um2 = (2.0 / (s.target_resolution_nm / 1000.0)) ** 2
            if c.density_per_um2 < c.nyquist_per_um2:
                c.failing.append(f"density {c.density_per_um2:.0f}/µm² < Nyquist "
                                 f"{c.nyquist_per_um2:.0f}/µm²")
        # The FRC costs the most (two FFTs of the field at frc_pixel_nm, in the node that
        # shares the cores with live localization): computed only when it decides, i.e. when
        # everything else holds and the rule has not fired yet; otherwise reported as null.
        if s.criterion in ("frc", "both") and not c.failing and self.first_ready is None:
            c.frc_nm = self._frc(locs, frames)
            if not c.frc_nm <= s.target_resolution_nm:  # NaN (too few frames) fails too
                c.failing.append(f"FRC {c.frc_nm:.0f} nm > {s.target_resolution_nm:g} nm")
        elif s.criterion in ("frc", "both") and self.first_ready is None:
            c.failing.append("FRC not computed (the other criteria fail)")
        if c.ready and self.first_ready is None:
            self.first_ready = c
        return c

    def _frc(self, locs: LocBlock, frames: int) -> float:
        if frames < 2 * self.settings.frc_block_frames or len(locs) < 100:
            return math.nan
        result = frc(locs, pixel_nm=self.settings.frc_pixel_nm,
                     block_frames=self.settings.frc_block_frames, extent_nm=self.extent_nm)
        if math.isnan(result.resolution_nm) and result.n_a and result.n_b \
                and float(np.min(result.curve[1:])) >= THRESHOLD:
            # Never below 1/7 up to the render's Nyquist frequency: finer than 2 pixels.
            return 2.0 * self.settings.frc_pixel_nm
        return result.resolution_nm
