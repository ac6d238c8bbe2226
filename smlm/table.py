"""The localization table on disk: crash-safe, append-only; merging; other programs' files.

**Format** (`.arrows`): an Arrow IPC *stream* (not the IPC file format, whose footer is
written at close, nor Parquet, whose footer is too). The schema message comes first, with
the units of every column in its field metadata (`unit`) and the run's metadata (the
localizer, its settings, the pixel size…) as JSON under the schema key `dimscope.smlm`. Each
`LocBlock` is then one record batch with its frame range in the batch's custom metadata
(`frame_start`, `frame_stop`), written, flushed and fsynced before `append` returns
(`LocTableWriter`). A clean close writes the stream's end marker. Blocks with no rows are
written too: they say that those frames were localized and had nothing.

A process killed mid-run leaves a stream cut inside (at most) the block being written.
`read_table` returns every complete block and says whether the stream ended cleanly;
`recover_table` cuts the file after the last complete block and writes the end marker, so the
file is a valid stream again; the frames not in any block are then localized again from the
raw archive (`TableRead.frames_done`).

**Molecules** (`merge_molecules`): localizations in consecutive frames (up to `max_gap`
frames missing) within `max_distance_nm` of the molecule's last position are one molecule:
photons summed, position and precision weighted by 1/precision², `frame` its first frame,
`frame_stop` its last, `n_locs` how many were merged. An optional second table.

**Other programs' files**:
- ThunderSTORM CSV (`"id","frame","x [nm]","y [nm]","sigma [nm]","intensity [photon]",
  "offset [photon]","bkgstd [photon]","uncertainty [nm]"`, frames from 1; `offset` is the
  background per pixel; `uncertainty_xy [nm]` is read too);
- Picasso HDF5 (`locs` dataset: `frame`, `x`, `y` in camera pixels — pixel centres at
  integers, as in Picasso's fitters —, `photons`, `sx`, `sy`, `bg`, `lpx`, `lpy` in pixels,
  `ellipticity`, `net_gradient`) with its YAML sidecar (`Width`, `Height`, `Frames`,
  `Pixelsize` in nm). Needs h5py (installed with the `smlm` extra).
A file lacking a required column is refused with an error naming the missing columns
(`MissingColumnsError`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.ipc as ipc

from .block import OPTIONAL, REQUIRED, UNITS, LocBlock, MissingColumnsError, concat

META_KEY = b"dimscope.smlm"
#: the Arrow IPC stream's end-of-stream marker (continuation token, zero length)
EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"

_ARROW_TYPES: Mapping[str, pa.DataType] = {
    "int64": pa.int64(), "int32": pa.int32(), "float32": pa.float32(), "float64": pa.float64()}


def schema_for(columns: Iterable[str], metadata: Mapping[str, Any] | None = None) -> pa.Schema:
    """The table's schema: required columns first, then `columns` (units in field metadata)."""
    names = list(REQUIRED) + [c for c in columns if c not in REQUIRED]
    fields = []
    for name in names:
        spec = REQUIRED.get(name) or OPTIONAL.get(name)
        dtype = _ARROW_TYPES[spec[0]] if spec else pa.float64()
        unit = UNITS.get(name, "")
        fields.append(pa.field(name, dtype, metadata={"unit": unit} if unit else None))
    meta = {META_KEY: json.dumps(dict(metadata or {}), default=str).encode()}
    return pa.schema(fields, metadata=meta)


def _batch(block: LocBlock, schema: pa.Schema) -> pa.RecordBatch:
    arrays = []
    for f in schema:
        if f.name in block.columns:
            values = block.columns[f.name]
        else:  # an optional column this block lacks
            kind = np.dtype(f.type.to_pandas_dtype()).kind
            values = np.full(len(block), np.nan if kind == "f" else 0)
        arrays.append(pa.array(np.asarray(values), type=f.type))
    return pa.record_batch(arrays, schema=schema)


def block_to_ipc(block: LocBlock, schema: pa.Schema) -> bytes:
    """One block as a self-contained Arrow IPC stream (schema with units, the batch with its
    frame range, end marker): the `localizations` topic's payload (`block_from_ipc`)."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, schema) as writer:
        writer.write_batch(_batch(block, schema), custom_metadata={
            "frame_start": str(block.frame_start), "frame_stop": str(block.frame_stop)})
    return bytes(sink.getvalue())


def block_from_ipc(payload: bytes | memoryview) -> LocBlock:
    """The block a `localizations` message carries (see `block_to_ipc`)."""
    reader = ipc.open_stream(pa.py_buffer(payload))
    missing = set(REQUIRED) - set(reader.schema.names)
    if missing:
        raise MissingColumnsError(missing, "localizations message")
    blocks = []
    while True:
        try:
            batch, meta = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            break
        blocks.append(_block_of(batch, meta))
    if len(blocks) != 1:
        raise ValueError(f"a localizations message holds one block, this one {len(blocks)}")
    return blocks[0]


class LocTableWriter:
    """Append `LocBlock`s to an Arrow IPC stream file, each flushed (and fsynced) at once."""

    def __init__(self, path: str | Path, columns: Iterable[str] = (),
                 metadata: Mapping[str, Any] | None = None, fsync: bool = True) -> None:
        self.path = Path(path)
        self.schema = schema_for(columns, metadata)
        self.fsync = fsync
        # "x": never overwrite a table from an earlier run (recover it instead)
        self._file = self.path.open("xb")
        self._writer = ipc.new_stream(self._file, self.schema)
        self._sync()  # the schema is on disk before the first block
        self.blocks = 0
        self.rows = 0
        self.frame_stop = 0

    def _sync(self) -> None:
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def append(self, block: LocBlock) -> None:
        meta = {"frame_start": str(block.frame_start), "frame_stop": str(block.frame_stop)}
        self._writer.write_batch(_batch(block, self.schema), custom_metadata=meta)
        self._sync()
        self.blocks += 1
        self.rows += len(block)
        self.frame_stop = max(self.frame_stop, block.frame_stop)

    def close(self) -> None:
        if self._file.closed:
            return
        self._writer.close()  # writes the end-of-stream marker
        self._sync()
        self._file.close()

    def __enter__(self) -> LocTableWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TableRead:
    """What a table file holds: its complete blocks, metadata, and whether it ended cleanly."""

    blocks: list[LocBlock]
    metadata: dict[str, Any]
    units: dict[str, str]
    complete: bool  # the end-of-stream marker was read
    valid_bytes: int  # bytes up to the end of the last complete block (or the marker)
    total_bytes: int

    @property
    def table(self) -> LocBlock:
        return concat(self.blocks)

    @property
    def frames_done(self) -> int:
        """Frames localized from 0 without a gap: where to resume after a crash."""
        stop = 0
        for b in sorted(self.blocks, key=lambda b: b.frame_start):
            if b.frame_start > stop:
                break
            stop = max(stop, b.frame_stop)
        return stop


def _block_of(batch: pa.RecordBatch, meta: Mapping[bytes, bytes] | None) -> LocBlock:
    cols = {name: batch.column(i).to_numpy(zero_copy_only=False)
            for i, name in enumerate(batch.schema.names)}
    frames = cols["frame"]
    if meta and b"frame_start" in meta:
        start, stop = int(meta[b"frame_start"]), int(meta[b"frame_stop"])
    else:  # a stream written by someone else: the range the rows span
        start = int(frames.min()) if len(frames) else 0
        stop = int(frames.max()) + 1 if len(frames) else 0
    return LocBlock(start, stop, cols)


def read_table(path: str | Path) -> TableRead:
    """Every complete block of an `.arrows` table, also from a file cut by a crash."""
    path = Path(path)
    total = path.stat().st_size
    blocks: list[LocBlock] = []
    with pa.OSFile(str(path), "rb") as f:
        try:
            reader = ipc.open_stream(f)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{path}: not a localization table (no complete Arrow IPC "
                             f"stream schema): {exc}") from exc
        schema = reader.schema
        missing = set(REQUIRED) - set(schema.names)
        if missing:
            raise MissingColumnsError(missing, str(path))
        valid = f.tell()
        complete = False
        while True:
            try:
                batch, meta = reader.read_next_batch_with_custom_metadata()
            except StopIteration:
                # Arrow also stops at a clean end of file without the marker (a writer
                # killed between two blocks): only the marker says the writer closed
                f.seek(valid)
                complete = f.read(len(EOS)) == EOS
                if complete:
                    valid = total
                break
            except (pa.ArrowInvalid, OSError):
                break  # the block being written when the writer died
            blocks.append(_block_of(batch, meta))
            valid = f.tell()
    raw = (schema.metadata or {}).get(META_KEY, b"{}")
    units = {f.name: (f.metadata or {}).get(b"unit", b"").decode() for f in schema}
    return TableRead(blocks, json.loads(raw), units, complete, valid, total)


@dataclass(frozen=True)
class RecoverReport:
    path: Path
    blocks: int
    rows: int
    frames_done: int
    bytes_dropped: int
    was_complete: bool


def recover_table(path: str | Path) -> RecoverReport:
    """Make a crashed table a valid stream again: cut after the last complete block, end it."""
    path = Path(path)
    read = read_table(path)
    if not read.complete:
        with path.open("r+b") as f:
            f.truncate(read.valid_bytes)
            f.seek(read.valid_bytes)
            f.write(EOS)
            f.flush()
            os.fsync(f.fileno())
    return RecoverReport(path, len(read.blocks), sum(len(b) for b in read.blocks),
                         read.frames_done, read.total_bytes - read.valid_bytes, read.complete)


def recovered_copy(path: str | Path, out: str | Path) -> RecoverReport:
    """Like `recover_table`, into a new file `out`; the original is not touched (what
    `dimscope recover RUN` does beside the raw archive's recovery)."""
    path, out = Path(path), Path(out)
    read = read_table(path)
    with path.open("rb") as src, out.open("xb") as dst:
        dst.write(src.read(read.valid_bytes))
        if not read.complete:
            dst.write(EOS)
        dst.flush()
        os.fsync(dst.fileno())
    return RecoverReport(out, len(read.blocks), sum(len(b) for b in read.blocks),
                         read.frames_done, read.total_bytes - read.valid_bytes, read.complete)


# ----------------------------------------------------------------------------- molecules
def merge_molecules(locs: LocBlock, max_distance_nm: float = 50.0,
                    max_gap: int = 1) -> LocBlock:
    """Localizations of one molecule in consecutive frames → one row (see module docstring).

    A localization joins the nearest open molecule whose last localization is within
    `max_distance_nm` and at most `max_gap` frames back (`max_gap=1`: consecutive frames
    only); each molecule takes at most one localization per frame.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial import cKDTree

    n = len(locs)
    order = np.argsort(locs.frame, kind="stable")
    frame = locs.frame[order]
    x, y = locs.x_nm[order].astype(np.float64), locs.y_nm[order].astype(np.float64)
    mol = np.full(n, -1, np.int64)
    next_id = 0
    # open molecules: id, last x, y, last frame
    o_id = np.zeros(0, np.int64)
    o_xy = np.zeros((0, 2))
    o_f = np.zeros(0, np.int64)
    uniq, starts = np.unique(frame, return_index=True)
    stops = np.append(starts[1:], n)
    for f, a, b in zip(uniq, starts, stops, strict=True):
        alive = f - o_f <= max_gap
        o_id, o_xy, o_f = o_id[alive], o_xy[alive], o_f[alive]
        idx = np.arange(a, b)
        xy = np.stack([x[a:b], y[a:b]], 1)
        taken = np.zeros(len(idx), bool)
        if len(o_id):
            pairs = cKDTree(o_xy).query_ball_point(xy, max_distance_nm)
            if any(pairs):
                d = np.full((len(idx), len(o_id)), 1e12)
                for i, js in enumerate(pairs):
                    for j in js:
                        d[i, j] = np.hypot(*(xy[i] - o_xy[j]))
                rows, cols = linear_sum_assignment(d)
                ok = d[rows, cols] <= max_distance_nm
                rows, cols = rows[ok], cols[ok]
                mol[idx[rows]] = o_id[cols]
                o_xy[cols] = xy[rows]
                o_f[cols] = f
                taken[rows] = True
        new = idx[~taken]
        ids = np.arange(next_id, next_id + len(new))
        next_id += len(new)
        mol[new] = ids
        o_id = np.concatenate([o_id, ids])
        o_xy = np.concatenate([o_xy, xy[~taken]])
        o_f = np.concatenate([o_f, np.full(len(new), f)])
    return _aggregate(locs.select(order), mol, next_id)


def _aggregate(locs: LocBlock, mol: npt.NDArray[np.int64], n_mol: int) -> LocBlock:
    prec = np.maximum(locs["precision_nm"].astype(np.float64), 1e-3)
    w = 1.0 / prec ** 2
    wsum = np.bincount(mol, w, n_mol)

    def wmean(v: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        return np.bincount(mol, w * v.astype(np.float64), n_mol) / wsum

    count = np.bincount(mol, minlength=n_mol)
    first = np.full(n_mol, np.iinfo(np.int64).max)
    np.minimum.at(first, mol, locs.frame)
    last = np.full(n_mol, -1, np.int64)
    np.maximum.at(last, mol, locs.frame)
    cols = {
        "frame": first, "frame_stop": last,
        "x_nm": wmean(locs.x_nm), "y_nm": wmean(locs.y_nm),
        "photons": np.bincount(mol, locs["photons"].astype(np.float64), n_mol),
        "background": np.bincount(mol, locs["background"].astype(np.float64), n_mol) / count,
        "precision_nm": 1.0 / np.sqrt(wsum),
        "n_locs": count,
    }
    order = np.argsort(first, kind="stable")
    return LocBlock(locs.frame_start, locs.frame_stop, {k: v[order] for k, v in cols.items()})


# ----------------------------------------------------------------------------- ThunderSTORM
TS_HEADER = ('"id","frame","x [nm]","y [nm]","sigma [nm]","intensity [photon]",'
             '"offset [photon]","bkgstd [photon]","uncertainty [nm]"')
_TS_REQUIRED = {"frame": "frame", "x [nm]": "x_nm", "y [nm]": "y_nm",
                "intensity [photon]": "photons", "offset [photon]": "background"}
_TS_PRECISION = ("uncertainty [nm]", "uncertainty_xy [nm]")


def save_thunderstorm(locs: LocBlock, path: str | Path) -> None:
    """ThunderSTORM CSV; frames from 1 as ThunderSTORM counts them; bkgstd = √background."""
    n = len(locs)
    sigma = locs.columns.get("sigma_nm", np.full(n, np.nan))
    table = np.column_stack([
        np.arange(1, n + 1), locs.frame + 1, locs.x_nm, locs.y_nm, sigma, locs["photons"],
        locs["background"], np.sqrt(np.maximum(locs["background"], 0)), locs["precision_nm"]])
    with Path(path).open("w") as f:
        f.write(TS_HEADER + "\n")
        np.savetxt(f, table, delimiter=",", fmt=["%d", "%d"] + ["%.6g"] * 7)


def load_thunderstorm(path: str | Path) -> LocBlock:
    with Path(path).open() as f:
        header = [h.strip().strip('"') for h in f.readline().rstrip("\n").split(",")]
    missing = [k for k in _TS_REQUIRED if k not in header]
    if not any(p in header for p in _TS_PRECISION):
        missing.append(_TS_PRECISION[0])
    if missing:
        raise MissingColumnsError(missing, f"ThunderSTORM file {path}")
    data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    col = {h: data[:, i] for i, h in enumerate(header)}
    prec = next(p for p in _TS_PRECISION if p in col)
    cols: dict[str, npt.NDArray[Any]] = {ours: col[theirs] for theirs, ours in
                                         _TS_REQUIRED.items()}
    cols["frame"] = np.rint(cols["frame"]).astype(np.int64) - 1
    cols["precision_nm"] = col[prec]
    if "sigma [nm]" in col:
        cols["sigma_nm"] = col["sigma [nm]"]
    return _whole(cols)


def _whole(cols: dict[str, npt.NDArray[Any]]) -> LocBlock:
    f = cols["frame"]
    return LocBlock(int(f.min()) if len(f) else 0, int(f.max()) + 1 if len(f) else 0, cols)


# ----------------------------------------------------------------------------- Picasso
_PICASSO_REQUIRED = ("frame", "x", "y", "photons", "bg", "lpx", "lpy")


def save_picasso(locs: LocBlock, path: str | Path, pixel_nm: float,
                 shape: tuple[int, int], n_frames: int | None = None) -> Path:
    """Picasso HDF5 (+ YAML sidecar): positions and precisions in camera pixels."""
    import h5py
    import yaml

    path = Path(path)
    n = len(locs)

    def column(name: str, default: str) -> npt.NDArray[np.float64]:
        return np.asarray(locs.columns.get(name, locs[default]), np.float64)

    sigma = column("sigma_nm", "precision_nm") / pixel_nm if "sigma_nm" in locs.columns \
        else np.full(n, np.nan)
    rec = np.zeros(n, dtype=[(k, np.uint32 if k == "frame" else np.float32) for k in (
        "frame", "x", "y", "photons", "sx", "sy", "bg", "lpx", "lpy", "ellipticity",
        "net_gradient")])
    rec["frame"] = locs.frame
    # dimscope puts pixel j's centre at j + ½ (psf); Picasso at j
    rec["x"] = locs.x_nm / pixel_nm - 0.5
    rec["y"] = locs.y_nm / pixel_nm - 0.5
    rec["photons"] = locs["photons"]
    rec["sx"] = rec["sy"] = sigma
    rec["bg"] = locs["background"]
    rec["lpx"] = column("x_err_nm", "precision_nm") / pixel_nm
    rec["lpy"] = column("y_err_nm", "precision_nm") / pixel_nm
    frames = n_frames if n_frames is not None else locs.frame_stop
    info = {"Generated by": "dimscope.smlm", "Width": int(shape[1]), "Height": int(shape[0]),
            "Frames": int(frames), "Pixelsize": float(pixel_nm)}
    with h5py.File(path, "w") as f:
        f.create_dataset("locs", data=rec)
    path.with_suffix(".yaml").write_text(yaml.safe_dump_all([info]))
    return path


def load_picasso(path: str | Path, pixel_nm: float | None = None) -> LocBlock:
    """A Picasso HDF5 file; the pixel size from its YAML (`Pixelsize`) unless given."""
    import h5py
    import yaml

    path = Path(path)
    with h5py.File(path, "r") as f:
        if "locs" not in f:
            raise ValueError(f"{path}: no 'locs' dataset (not a Picasso localization file)")
        rec = f["locs"][...]
    names = rec.dtype.names or ()
    missing = [c for c in _PICASSO_REQUIRED if c not in names]
    if missing:
        raise MissingColumnsError(missing, f"Picasso file {path}")
    if pixel_nm is None:
        sidecar = path.with_suffix(".yaml")
        if not sidecar.exists():
            raise ValueError(f"{path}: no {sidecar.name} with the pixel size; pass pixel_nm")
        infos = [d for d in yaml.safe_load_all(sidecar.read_text()) if isinstance(d, dict)]
        px = next((d["Pixelsize"] for d in infos if "Pixelsize" in d), None)
        if px is None:
            raise ValueError(f"{sidecar}: no Pixelsize; pass pixel_nm")
        pixel_nm = float(px)
    lpx, lpy = rec["lpx"].astype(np.float64), rec["lpy"].astype(np.float64)
    cols: dict[str, npt.NDArray[Any]] = {
        "frame": rec["frame"].astype(np.int64),
        "x_nm": (rec["x"] + 0.5) * pixel_nm, "y_nm": (rec["y"] + 0.5) * pixel_nm,
        "photons": rec["photons"], "background": rec["bg"],
        "precision_nm": np.sqrt((lpx ** 2 + lpy ** 2) / 2) * pixel_nm,
        "x_err_nm": lpx * pixel_nm, "y_err_nm": lpy * pixel_nm}
    if "sx" in names and "sy" in names:
        cols["sigma_nm"] = 0.5 * (rec["sx"] + rec["sy"]) * pixel_nm
    if "log_likelihood" in names:
        cols["log_likelihood"] = rec["log_likelihood"]
    return _whole(cols)


# ----------------------------------------------------------------------------- any file
def load_localizations(path: str | Path, pixel_nm: float | None = None) -> LocBlock:
    """A table by its extension: `.arrows`/`.arrow` (ours, also a crashed one), `.csv`
    (ThunderSTORM), `.hdf5`/`.h5` (Picasso)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in (".arrows", ".arrow"):
        return read_table(path).table
    if ext == ".csv":
        return load_thunderstorm(path)
    if ext in (".hdf5", ".h5"):
        return load_picasso(path, pixel_nm)
    raise ValueError(f"{path}: unknown table format {ext!r} (.arrows, .csv, .hdf5)")


def save_localizations(locs: LocBlock, path: str | Path, pixel_nm: float | None = None,
                       shape: tuple[int, int] | None = None,
                       metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a whole table by extension (see `load_localizations`); Picasso needs the pixel
    size and the frame shape."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in (".arrows", ".arrow"):
        extra = [c for c in locs.columns if c not in REQUIRED]
        with LocTableWriter(path, extra, metadata) as w:
            w.append(locs)
    elif ext == ".csv":
        save_thunderstorm(locs, path)
    elif ext in (".hdf5", ".h5"):
        if pixel_nm is None or shape is None:
            raise ValueError("a Picasso file needs the pixel size and the frame shape")
        save_picasso(locs, path, pixel_nm, shape)
    else:
        raise ValueError(f"{path}: unknown table format {ext!r} (.arrows, .csv, .hdf5)")
    return path
