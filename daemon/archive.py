"""Raw archive: every acquired frame into BigTIFF OME-TIFF, plus a crash-safe index.

Layout of a run folder:

    raw_000.ome.tif   frames in acquisition order (contiguous pixel data)
    raw_001.ome.tif   next file once the first passes `rotate_gb`
    index.jsonl       one JSON line per archived frame, appended as it lands
    run.json          config and summary, written at a clean stop

tifffile writes a contiguous series as one IFD and a block of pixel data, and
the per-page IFDs and OME-XML only at close. A run killed with SIGKILL
therefore leaves pixel data without a complete TIFF structure; `index.jsonl`
records each frame's byte offset *after* its pixels were flushed, which is
what `recover_run` uses to rebuild a valid OME-TIFF.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import tifffile

from .frame import Frame
from .stage import OverflowPolicy, Stage

log = logging.getLogger(__name__)

INDEX_NAME = "index.jsonl"
INDEX_SCHEMA = "dimscope.index/1"


class ArchiveError(RuntimeError):
    """The raw archive could not store a frame: acquisition must stop."""


def mda_layout(planes: list[dict[str, Any]]) -> tuple[tuple[int, ...], str] | None:
    """(T, C, Z) sizes when a file's planes are a complete MDA grid in T, C, Z order.

    Then the OME-XML declares the real dimensions and every Plane carries its
    TheT/TheC/TheZ. Otherwise (live streaming, a partial grid after a stop or a
    file rotation) planes stay a T series and the indices live in index.jsonl.
    """
    indices = [p.get("mda_index") or {} for p in planes]
    if not indices or not all(indices):
        return None
    keys = [tuple(int(i.get(axis, 0)) for axis in "tcz") for i in indices]
    sizes = tuple(max(k[a] for k in keys) + 1 for a in range(3))
    grid = [(t, c, z) for t in range(sizes[0]) for c in range(sizes[1]) for z in range(sizes[2])]
    return (sizes, "TCZ") if keys == grid else None


def write_ome_description(path: Path, n_frames: int, shape: tuple[int, ...], dtype: np.dtype[Any],
                          planes: list[dict[str, Any]], pixel_size_um: float) -> None:
    """Replace a finished file's description with OME-XML that has one Plane per frame."""
    ome = tifffile.OmeXml(Creator="dimscope")
    plane_meta: dict[str, list[Any]] = {
        "DeltaT": [p["delta_t_s"] for p in planes], "DeltaTUnit": ["s"] * n_frames,
        "ExposureTime": [p["exposure_ms"] for p in planes],
        "ExposureTimeUnit": ["ms"] * n_frames,
    }
    image_shape, axes = mda_layout(planes) or ((n_frames,), "T")
    stored = (n_frames, 1, 1, shape[0], shape[1], 1)  # pages, planar, depth, y, x, samples
    ome.addimage(dtype, (*image_shape, *shape), stored,
                 axes=axes + "YX", Name=path.name.split(".")[0], PhysicalSizeX=pixel_size_um,
                 PhysicalSizeY=pixel_size_um, Plane=plane_meta)
    tifffile.tiffcomment(path, ome.tostring(declaration=True).encode())


@dataclass
class _OpenFile:
    path: Path
    writer: tifffile.TiffWriter
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    planes: list[dict[str, Any]] = field(default_factory=list)


class RawArchive(Stage):
    """Sink stage with the FAIL policy: a full queue stops acquisition, never drops."""

    def __init__(self, run_dir: Path, *, queue_frames: int, rotate_bytes: int,
                 pixel_size_um: float, fsync_every_s: float = 2.0) -> None:
        super().__init__("archive", queue_frames, OverflowPolicy.FAIL)
        self.run_dir = run_dir
        self.rotate_bytes = rotate_bytes
        self.pixel_size_um = pixel_size_um
        self.fsync_every_s = fsync_every_s
        self.files: list[Path] = []
        self.bytes_written = 0
        self._file: _OpenFile | None = None
        self._index: IO[str] | None = None
        self._t0_ns: int | None = None
        self._last_sync = time.monotonic()

    def setup(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._index = (self.run_dir / INDEX_NAME).open("a", encoding="utf-8")

    def _open_next(self, frame: Frame) -> _OpenFile:
        path = self.run_dir / f"raw_{len(self.files):03d}.ome.tif"
        writer = tifffile.TiffWriter(path, bigtiff=True, ome=False)
        self.files.append(path)
        return _OpenFile(path, writer, frame.shape, frame.dtype)

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        f.writer.close()
        if f.planes:
            write_ome_description(f.path, len(f.planes), f.shape, f.dtype, f.planes,
                                  self.pixel_size_um)

    def process(self, frame: Frame) -> None:
        try:
            self._write(frame)
        except OSError as exc:
            where = self._file.path if self._file else self.run_dir
            reason = exc.strerror or str(exc)
            # ENOSPC/EDQUOT/EFBIG, or a short write (errno unset), all mean no room left.
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or exc.errno is None:
                reason += " — disk full or file-size limit reached"
            raise ArchiveError(f"raw archive: writing frame {frame.frame_id} to {where} failed: "
                               f"{reason}; frames before it are on disk and indexed") from exc

    def _write(self, frame: Frame) -> None:
        f = self._file
        nbytes = frame.pixels.nbytes
        if f is not None and (f.shape != frame.shape or f.dtype != frame.dtype or
                              f.writer.filehandle.tell() + nbytes > self.rotate_bytes):
            self._close_file()
            f = None
        if f is None:
            f = self._file = self._open_next(frame)
        if self._t0_ns is None:
            self._t0_ns = frame.acquired_unix_ns
        f.writer.write(frame.pixels, contiguous=True, metadata={}, software="dimscope")
        fh = f.writer.filehandle
        fh.flush()  # pixels reach the OS before the index says they exist
        offset = fh.tell() - nbytes
        plane = {"delta_t_s": (frame.acquired_unix_ns - self._t0_ns) / 1e9,
                 "exposure_ms": frame.exposure_ms}
        f.planes.append({**plane, "mda_index": dict(frame.mda_index)})
        record = {
            "schema": INDEX_SCHEMA, "frame_id": frame.frame_id, "file": f.path.name,
            "plane": len(f.planes) - 1, "offset": offset, "nbytes": nbytes,
            "shape": list(frame.shape), "dtype": frame.dtype.str,
            "acquired_unix_ns": frame.acquired_unix_ns, **plane,
            "pixel_size_um": frame.pixel_size_um, "source": frame.source,
            "mda_index": dict(frame.mda_index), "metadata": dict(frame.metadata),
        }
        assert self._index is not None
        self._index.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._index.flush()
        self.bytes_written += nbytes
        now = time.monotonic()
        if self.fsync_every_s and now - self._last_sync >= self.fsync_every_s:
            os.fsync(fh.fileno())
            os.fsync(self._index.fileno())
            self._last_sync = now
        self.counters.passed += 1

    def teardown(self) -> None:
        try:
            self._close_file()
        except OSError as exc:
            log.error("raw archive: finishing %s failed (%s); run `dimscope recover %s`",
                      self.files[-1] if self.files else self.run_dir, exc, self.run_dir)
        if self._index is not None:
            self._index.close()
            self._index = None


# -- reading back ------------------------------------------------------------------------


def read_index(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Index records in order, and the number of unreadable lines (a torn last write)."""
    records: list[dict[str, Any]] = []
    bad = 0
    path = Path(run_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {INDEX_NAME}: not a dimscope run folder")
    with path.open("r", encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "offset" not in rec:
                    raise ValueError
                records.append(rec)
            except ValueError:
                bad += 1
    return records, bad


def read_frame(run_dir: Path, record: dict[str, Any]) -> np.ndarray:
    """Read one archived frame straight from its recorded byte offset."""
    with (Path(run_dir) / record["file"]).open("rb") as fh:
        fh.seek(record["offset"])
        data = fh.read(record["nbytes"])
    if len(data) != record["nbytes"]:
        raise ValueError(f"frame {record['frame_id']}: file {record['file']} is truncated")
    return np.frombuffer(data, dtype=np.dtype(record["dtype"])).reshape(record["shape"])


@dataclass
class RecoveryReport:
    run_dir: Path
    outputs: list[Path]
    recovered: int
    unreadable_index_lines: int
    missing_frames: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "outputs": [str(p) for p in self.outputs],
                "recovered": self.recovered,
                "unreadable_index_lines": self.unreadable_index_lines,
                "missing_frames": self.missing_frames}


def recover_run(run_dir: Path | str) -> RecoveryReport:
    """Rebuild valid OME-TIFF(s) holding every frame the index records.

    Originals are never modified; output goes to `recovered_NNN.ome.tif`
    (one per frame shape/dtype, in acquisition order).
    """
    run_dir = Path(run_dir)
    records, bad = read_index(run_dir)
    outputs: list[Path] = []
    missing: list[int] = []
    recovered = 0
    groups: list[tuple[tuple[tuple[int, ...], str], list[dict[str, Any]]]] = []
    for rec in records:
        key = (tuple(rec["shape"]), rec["dtype"])
        if not groups or groups[-1][0] != key:
            groups.append((key, []))
        groups[-1][1].append(rec)
    for (shape, dtype_str), group in groups:
        out = run_dir / f"recovered_{len(outputs):03d}.ome.tif"
        planes: list[dict[str, Any]] = []
        with tifffile.TiffWriter(out, bigtiff=True, ome=False) as writer:
            for rec in group:
                try:
                    pixels = read_frame(run_dir, rec)
                except (OSError, ValueError):
                    missing.append(int(rec["frame_id"]))
                    continue
                writer.write(pixels, contiguous=True, metadata={}, software="dimscope recover")
                planes.append(rec)
        if planes:
            write_ome_description(out, len(planes), shape, np.dtype(dtype_str), planes,
                                  float(planes[0].get("pixel_size_um", 1.0)))
            outputs.append(out)
            recovered += len(planes)
            (run_dir / f"{out.name.split('.')[0]}.frames.json").write_text(
                json.dumps([int(p["frame_id"]) for p in planes]))
        else:
            out.unlink(missing_ok=True)
    return RecoveryReport(run_dir, outputs, recovered, bad, missing)
