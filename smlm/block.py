"""The localization block: what a localizer hands out and a table stores.

A `LocBlock` is every localization found in the frames `[frame_start, frame_stop)` —
complete for that range: a frame in the range that has no row had no localization. A
pipeline stage pushes frames and receives blocks; the table appends them one by one.

Columns are named arrays of one length. The required ones (`REQUIRED`) are the issue's table;
others (`OPTIONAL`, or any extra a backend adds) travel along. Units are part of the schema
(`UNITS`), and the Arrow table writes them into its field metadata.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.generic]

#: column -> (dtype, unit, meaning). `frame` counts from 0.
REQUIRED: Mapping[str, tuple[str, str, str]] = MappingProxyType({
    "frame": ("int64", "frame", "camera frame index, from 0"),
    "x_nm": ("float32", "nm", "x position in the sample plane (column axis)"),
    "y_nm": ("float32", "nm", "y position in the sample plane (row axis)"),
    "photons": ("float32", "photon", "photons of the emitter in this frame"),
    "background": ("float32", "photon/pixel", "background photons per camera pixel"),
    "precision_nm": ("float32", "nm", "lateral localization precision (the fit's CRLB)"),
})

#: columns a backend may add; the smappy backend fills all of them.
OPTIONAL: Mapping[str, tuple[str, str, str]] = MappingProxyType({
    "x_err_nm": ("float32", "nm", "CRLB of x"),
    "y_err_nm": ("float32", "nm", "CRLB of y"),
    "photons_err": ("float32", "photon", "CRLB of photons"),
    "background_err": ("float32", "photon/pixel", "CRLB of background"),
    "sigma_nm": ("float32", "nm", "fitted PSF width"),
    "log_likelihood": ("float32", "1", "fit quality: log-likelihood of the fit (library's)"),
    "log_likelihood_per_pixel": ("float32", "1", "fit quality: log-likelihood per ROI pixel"),
    "iterations": ("int32", "1", "iterations the fit took"),
    "emitters_in_fit": ("int32", "1", "emitters in the multi-emitter fit that placed this "
                                      "one (0: the library's own fit); see `multi_emitter`"),
    # merged molecules (`table.merge_molecules`)
    "frame_stop": ("int64", "frame", "last frame of a merged molecule, inclusive"),
    "n_locs": ("int32", "1", "localizations merged into a molecule"),
    # drift correction applied (`drift`)
    "drift_x_nm": ("float32", "nm", "drift subtracted from x"),
    "drift_y_nm": ("float32", "nm", "drift subtracted from y"),
})

UNITS: Mapping[str, str] = MappingProxyType(
    {k: v[1] for k, v in (*REQUIRED.items(), *OPTIONAL.items())})


class MissingColumnsError(ValueError):
    """A localization table lacks required columns; the message names them."""

    def __init__(self, missing: Iterable[str], where: str = "localization table") -> None:
        self.missing = tuple(sorted(missing))
        super().__init__(f"{where} is missing required column(s): {', '.join(self.missing)} "
                         f"(required: {', '.join(REQUIRED)})")


def dtype_of(name: str) -> str:
    """The column's dtype in the schema; float32 for a column it does not name."""
    spec = REQUIRED.get(name) or OPTIONAL.get(name)
    return spec[0] if spec else "float32"


def _as_column(name: str, values: npt.ArrayLike) -> Array:
    spec = REQUIRED.get(name) or OPTIONAL.get(name)
    arr = np.asarray(values)
    if spec is not None:
        arr = arr.astype(spec[0], copy=False)
    if arr.ndim != 1:
        raise ValueError(f"column {name!r} must be 1-D, got shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class LocBlock:
    """Localizations of frames `[frame_start, frame_stop)`, as named 1-D arrays."""

    frame_start: int
    frame_stop: int
    columns: Mapping[str, Array] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cols = {k: _as_column(k, v) for k, v in self.columns.items()}
        missing = set(REQUIRED) - set(cols)
        if missing:
            raise MissingColumnsError(missing, "localization block")
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of unequal length: "
                             f"{ {k: len(v) for k, v in cols.items()} }")
        if self.frame_stop < self.frame_start:
            raise ValueError(f"frame_stop {self.frame_stop} < frame_start {self.frame_start}")
        object.__setattr__(self, "columns", MappingProxyType(cols))

    def __reduce__(self) -> tuple[type[LocBlock], tuple[int, int, dict[str, Array]]]:
        # a read-only mapping does not pickle; the block goes to other processes (dense step)
        return (LocBlock, (self.frame_start, self.frame_stop, dict(self.columns)))

    @classmethod
    def empty(cls, frame_start: int = 0, frame_stop: int = 0,
              extra: Iterable[str] = ()) -> LocBlock:
        names = [*REQUIRED, *extra]
        return cls(frame_start, frame_stop, {k: np.zeros(0, dtype_of(k)) for k in names})

    def __len__(self) -> int:
        return len(self.columns["frame"])

    def __getitem__(self, name: str) -> Array:
        return self.columns[name]

    @property
    def frame(self) -> npt.NDArray[np.int64]:
        return self.columns["frame"].astype(np.int64, copy=False)

    @property
    def x_nm(self) -> npt.NDArray[np.float32]:
        return self.columns["x_nm"].astype(np.float32, copy=False)

    @property
    def y_nm(self) -> npt.NDArray[np.float32]:
        return self.columns["y_nm"].astype(np.float32, copy=False)

    def select(self, mask: npt.NDArray[np.bool_] | npt.NDArray[np.intp]) -> LocBlock:
        """The rows `mask` picks, over the same frame range."""
        return LocBlock(self.frame_start, self.frame_stop,
                        {k: v[mask] for k, v in self.columns.items()})

    def with_columns(self, **columns: npt.ArrayLike) -> LocBlock:
        return LocBlock(self.frame_start, self.frame_stop,
                        {**self.columns, **{k: np.asarray(v) for k, v in columns.items()}})


def concat(blocks: Iterable[LocBlock]) -> LocBlock:
    """One block over the union of the ranges; the columns every block has.

    Blocks from one run are consecutive; the result spans the first start to the last stop.
    """
    blocks = list(blocks)
    if not blocks:
        return LocBlock.empty()
    names = [k for k in blocks[0].columns if all(k in b.columns for b in blocks)]
    return LocBlock(min(b.frame_start for b in blocks), max(b.frame_stop for b in blocks),
                    {k: np.concatenate([b.columns[k] for b in blocks]) for k in names})
