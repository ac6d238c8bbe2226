"""Raw archive: every acquired frame into BigTIFF OME-TIFF, plus a crash-safe index.

Layout of a run folder:

    raw_000.ome.tif   frames in acquisition order (contiguous pixel data)
    raw_001.ome.tif   next file once the first passes `rotate_gb`
    index.jsonl       one JSON line per archived frame, appended as it lands,
                      with the xxh3-64 checksum of its pixels
    run.json          config, written at a clean stop
    summary.json      the run summary (daemon/summary.py), written at a clean stop

tifffile writes a contiguous series as one IFD and a block of pixel data, and
the per-page IFDs and OME-XML only at close. A run killed with SIGKILL
therefore leaves pixel data without a complete TIFF structure; `index.jsonl`
records each frame's byte offset *after* its pixels were flushed, which is
what `recover_run` uses to rebuild a valid OME-TIFF; the checksum tells it
when the bytes at that offset are not the frame's.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import tifffile

from .frame import Frame, pixel_checksum
from .sinks import SinkStage
from .stage import OverflowPolicy

log = logging.getLogger(__name__)

INDEX_NAME = "index.jsonl"
INDEX_SCHEMA = "dimscope.index/1"


class ArchiveError(RuntimeError):
    """The raw archive could not store a frame: acquisition must stop."""


def create_run_dir(parent: Path, stem: str) -> Path:
    """Create a new, empty run folder `parent/stem[-N]` atomically.

    `mkdir` either creates the folder or fails, so two daemons given the same
    parent at the same moment can never share one (an `exists()` check
    followed by a later `mkdir(exist_ok=True)` could).
    """
    parent.mkdir(parents=True, exist_ok=True)
    for suffix in range(100_000):
        path = parent / (stem if suffix == 0 else f"{stem}-{suffix}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free run folder name {stem}-N left in {parent}")


class PlaneLog:
    """Per-plane OME metadata of one file, 16-40 bytes a frame (a dict a frame cost ~300
    bytes, which a long run at hundreds of frames/s saw as steady memory growth)."""

    def __init__(self) -> None:
        self.delta_t_s = array("d")
        self.exposure_ms = array("d")
        self.tcz = array("l")  # t, c, z per plane while every plane has an MDA index
        self._all_indexed = True

    def __len__(self) -> int:
        return len(self.delta_t_s)

    def add(self, delta_t_s: float, exposure_ms: float, mda_index: Mapping[str, int]) -> None:
        self.delta_t_s.append(delta_t_s)
        self.exposure_ms.append(exposure_ms)
        if self._all_indexed and mda_index:
            self.tcz.extend(int(mda_index.get(axis, 0)) for axis in "tcz")
        elif self._all_indexed:
            self._all_indexed = False
            self.tcz = array("l")

    def mda_layout(self) -> tuple[tuple[int, ...], str] | None:
        """(T, C, Z) sizes when the planes are a complete MDA grid in T, C, Z order.

        Then the OME-XML declares the real dimensions and every Plane carries its
        TheT/TheC/TheZ. Otherwise (live streaming, a partial grid after a stop or a
        file rotation) planes stay a T series and the indices live in index.jsonl.
        """
        if not self._all_indexed or not len(self):
            return None
        keys = np.frombuffer(self.tcz, dtype=np.int_).reshape(-1, 3)
        sizes = tuple(int(v) + 1 for v in keys.max(axis=0))
        grid = np.indices(sizes).reshape(3, -1).T
        return (sizes, "TCZ") if keys.shape == grid.shape and (keys == grid).all() else None


def write_ome_description(path: Path, shape: tuple[int, ...], dtype: np.dtype[Any],
                          planes: PlaneLog, pixel_size_um: float) -> None:
    """Replace a finished file's description with OME-XML that has one Plane per frame."""
    n_frames = len(planes)
    ome = tifffile.OmeXml(Creator="dimscope")
    plane_meta: dict[str, list[Any]] = {
        "DeltaT": planes.delta_t_s.tolist(), "DeltaTUnit": ["s"] * n_frames,
        "ExposureTime": planes.exposure_ms.tolist(), "ExposureTimeUnit": ["ms"] * n_frames,
    }
    image_shape, axes = planes.mda_layout() or ((n_frames,), "T")
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
    planes: PlaneLog = field(default_factory=PlaneLog)
    end: int = 0  # bytes written so far (the next frame's offset, for rotation)


@dataclass(frozen=True, slots=True)
class _IndexEntry:
    """What the index line of one frame holds, before it is formatted (off the writer)."""

    frame: Frame
    file: str
    plane: int
    offset: int
    delta_t_s: float
    xxh3: str

    def line(self) -> str:
        f = self.frame
        record = {
            "schema": INDEX_SCHEMA, "frame_id": f.frame_id, "file": self.file,
            "plane": self.plane, "offset": self.offset, "nbytes": f.pixels.nbytes,
            "shape": list(f.shape), "dtype": f.dtype.str, "xxh3": self.xxh3,
            "acquired_unix_ns": f.acquired_unix_ns, "delta_t_s": self.delta_t_s,
            "exposure_ms": f.exposure_ms, "pixel_size_um": f.pixel_size_um,
            "source": f.source, "mda_index": dict(f.mda_index), "metadata": dict(f.metadata),
        }
        return json.dumps(record, separators=(",", ":")) + "\n"


class _IndexLog:
    """Index lines, written in batches by the archive's own thread.

    A frame's line is buffered once its pixels reached the OS and written with the
    others every `flush_every_s` and whenever the writer catches up — so the index
    never names pixels that are not in the file and lags them by at most that long.
    One line at a time (or on a second thread, trading the GIL with the pixel writes)
    cost a quarter of the archive's rate at 512², against tifffile alone.
    """

    def __init__(self, path: Path, flush_every_s: float = 0.02) -> None:
        self._fh: IO[str] = path.open("a", encoding="utf-8")
        self._flush_every_s = flush_every_s
        self._pending: list[_IndexEntry] = []
        self._last_flush = time.monotonic()

    def add(self, entry: _IndexEntry) -> int:
        """Buffer a line; returns how many lines were written now (0 until the timer)."""
        self._pending.append(entry)
        if time.monotonic() - self._last_flush >= self._flush_every_s:
            return self.flush()
        return 0

    def flush(self) -> int:
        """Write and flush every buffered line; returns how many."""
        entries, self._pending = self._pending, []
        if entries:
            self._fh.write("".join(e.line() for e in entries))
        self._fh.flush()
        self._last_flush = time.monotonic()
        return len(entries)

    def fsync(self) -> None:
        os.fsync(self._fh.fileno())

    def close(self, fsync: bool = False) -> int:
        try:
            written = self.flush()
            if fsync:
                self.fsync()
            return written
        finally:
            self._fh.close()


class OmeTiffSink:
    """The raw archive's writer (a `Sink`): OME-TIFF files plus the index."""

    def __init__(self, run_dir: Path, *, rotate_bytes: int, pixel_size_um: float,
                 fsync_every_s: float = 2.0) -> None:
        self.run_dir = run_dir
        self.rotate_bytes = rotate_bytes
        self.pixel_size_um = pixel_size_um
        self.fsync_every_s = fsync_every_s
        self.files: list[Path] = []
        self.bytes_written = 0
        self._file: _OpenFile | None = None
        self._index: _IndexLog | None = None
        self._t0_ns: int | None = None
        self._last_sync = time.monotonic()

    def setup(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._index = _IndexLog(self.run_dir / INDEX_NAME)

    def flush(self) -> None:
        """Caught up with acquisition: write the index lines still buffered."""
        if self._index is not None:
            try:
                self._index.flush()
            except OSError as exc:
                raise ArchiveError(f"raw archive: writing {INDEX_NAME} failed: "
                                   f"{exc.strerror or exc}") from exc

    def skip(self, frame_ids: Sequence[int]) -> None:
        # The archive's queue never drops (FAIL policy): nothing is ever skipped.
        raise ArchiveError(f"raw archive: frames {list(frame_ids)} were skipped")

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
            write_ome_description(f.path, f.shape, f.dtype, f.planes, self.pixel_size_um)
        if self.fsync_every_s:  # a finished file is on the disk, not only in the page cache
            fd = os.open(f.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def append(self, frame: Frame) -> bool:
        try:
            self._write(frame)
            return True
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
                              f.end + nbytes > self.rotate_bytes):
            self._close_file()
            f = None
        if f is None:
            f = self._file = self._open_next(frame)
        if self._t0_ns is None:
            self._t0_ns = frame.acquired_unix_ns
        fh = f.writer.filehandle
        f.writer.write(frame.pixels, contiguous=True, metadata={}, software="dimscope")
        fh.flush()  # pixels reach the OS before the index says they exist
        f.end = fh.tell()
        delta_t_s = (frame.acquired_unix_ns - self._t0_ns) / 1e9
        f.planes.add(delta_t_s, frame.exposure_ms, frame.mda_index)
        assert self._index is not None
        # Formatted on the index thread; the checksum was taken at acquisition, where the
        # pixels were hot in cache (here it cost the pixel writes a third of their rate).
        self._index.add(_IndexEntry(
            frame, f.path.name, len(f.planes) - 1, f.end - nbytes, delta_t_s,
            frame.checksum or pixel_checksum(frame.pixels)))
        self.bytes_written += nbytes
        if self.fsync_every_s:
            now = time.monotonic()
            if now - self._last_sync >= self.fsync_every_s:
                os.fsync(fh.fileno())
                self._index.flush()
                self._index.fsync()
                self._last_sync = now

    def close(self) -> None:
        try:
            self._close_file()
        except OSError as exc:
            log.error("raw archive: finishing %s failed (%s); run `dimscope recover %s`",
                      self.files[-1] if self.files else self.run_dir, exc, self.run_dir)
        index, self._index = self._index, None
        if index is not None:
            try:
                index.close(fsync=bool(self.fsync_every_s))
            except OSError as exc:
                raise ArchiveError(f"raw archive: writing {INDEX_NAME} failed: "
                                   f"{exc.strerror or exc}") from exc


class RawArchive(SinkStage):
    """The raw archive node: FAIL policy (a full queue makes acquisition wait, then stop;
    it never drops) in front of an `OmeTiffSink`. `archived` counts frames whose pixels
    are in the file; their index lines follow within 20 ms."""

    def __init__(self, run_dir: Path, *, queue_frames: int, rotate_bytes: int,
                 pixel_size_um: float, fsync_every_s: float = 2.0) -> None:
        self.writer = OmeTiffSink(run_dir, rotate_bytes=rotate_bytes,
                                  pixel_size_um=pixel_size_um, fsync_every_s=fsync_every_s)
        super().__init__("archive", self.writer, queue_frames, OverflowPolicy.FAIL)
        self.run_dir = run_dir

    @property
    def files(self) -> list[Path]:
        return self.writer.files


# -- reading back ------------------------------------------------------------------------


_REQUIRED_KEYS = ("frame_id", "file", "offset", "nbytes", "shape", "dtype")


@dataclass
class IndexProblem:
    """An index line or frame that could not be recovered, and why."""

    line: int
    frame_id: int | None
    reason: str

    def __str__(self) -> str:
        what = f"frame {self.frame_id}" if self.frame_id is not None else "a frame"
        return f"index line {self.line} ({what}): {self.reason}"


def read_index(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Index records in order, and the number of unusable lines (torn, or keys missing)."""
    records, problems = read_index_checked(run_dir)
    return records, len(problems)


def read_index_checked(run_dir: Path) -> tuple[list[dict[str, Any]], list[IndexProblem]]:
    """Index records in order (each with its `line`), and every unusable line named."""
    records: list[dict[str, Any]] = []
    problems: list[IndexProblem] = []
    path = Path(run_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {INDEX_NAME}: not a dimscope run folder")
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                problems.append(IndexProblem(number, None, "not valid JSON (a torn write?)"))
                continue
            if not isinstance(rec, dict):
                problems.append(IndexProblem(number, None, "not a JSON object"))
                continue
            frame_id = rec.get("frame_id") if isinstance(rec.get("frame_id"), int) else None
            missing = [k for k in _REQUIRED_KEYS if k not in rec]
            if missing:
                problems.append(IndexProblem(number, frame_id,
                                             f"missing key(s) {', '.join(missing)}"))
                continue
            records.append({**rec, "line": number})
    return records, problems


def read_frame(run_dir: Path, record: dict[str, Any]) -> np.ndarray:
    """Read one archived frame straight from its recorded byte offset, checksum verified."""
    path = Path(run_dir) / record["file"]
    try:
        with path.open("rb") as fh:
            fh.seek(int(record["offset"]))
            data = fh.read(int(record["nbytes"]))
    except FileNotFoundError:
        raise ValueError(f"archive file {path} is missing") from None
    if len(data) != record["nbytes"]:
        raise ValueError(f"file {record['file']} is truncated: {len(data)} of "
                         f"{record['nbytes']} bytes at offset {record['offset']}")
    expected = record.get("xxh3")
    if expected is not None and pixel_checksum(data) != expected:
        raise ValueError(f"checksum mismatch in {record['file']} at offset {record['offset']} "
                         "(the bytes there are not this frame's)")
    return np.frombuffer(data, dtype=np.dtype(record["dtype"])).reshape(record["shape"])


@dataclass
class RecoveryReport:
    run_dir: Path
    outputs: list[Path]
    recovered: int
    problems: list[IndexProblem]

    @property
    def missing_frames(self) -> list[int]:
        """Frames the index names whose pixels could not be recovered."""
        return [p.frame_id for p in self.problems if p.frame_id is not None]

    @property
    def unreadable_index_lines(self) -> int:
        return len(self.problems)

    def as_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "outputs": [str(p) for p in self.outputs],
                "recovered": self.recovered, "missing_frames": self.missing_frames,
                "problems": [str(p) for p in self.problems]}


def recover_run(run_dir: Path | str, out_dir: Path | str | None = None) -> RecoveryReport:
    """Rebuild valid OME-TIFF(s) holding every frame the index records.

    Originals are never modified; output goes to `recovered_NNN.ome.tif` (one
    per frame shape/dtype, in acquisition order) in `out_dir` (default: the run
    folder; give another when the run's disk is full). A record that cannot be
    used — keys missing, its file missing or truncated, a checksum mismatch —
    is named in the report and skipped; every other frame is recovered.
    """
    run_dir = Path(run_dir)
    out_dir = run_dir if out_dir is None else Path(out_dir)
    records, problems = read_index_checked(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: list[Path] = []
    recovered = 0
    groups: list[tuple[tuple[tuple[int, ...], str], list[dict[str, Any]]]] = []
    for rec in records:
        key = (tuple(rec["shape"]), rec["dtype"])
        if not groups or groups[-1][0] != key:
            groups.append((key, []))
        groups[-1][1].append(rec)
    for (shape, dtype_str), group in groups:
        out = out_dir / f"recovered_{len(outputs):03d}.ome.tif"
        planes = PlaneLog()
        frame_ids: list[int] = []
        pixel_size_um = 1.0
        with tifffile.TiffWriter(out, bigtiff=True, ome=False) as writer:
            for rec in group:
                try:
                    pixels = read_frame(run_dir, rec)
                except (OSError, ValueError, TypeError) as exc:
                    problems.append(IndexProblem(rec["line"], int(rec["frame_id"]), str(exc)))
                    continue
                writer.write(pixels, contiguous=True, metadata={}, software="dimscope recover")
                planes.add(float(rec.get("delta_t_s", 0.0)),
                           float(rec.get("exposure_ms", float("nan"))),
                           rec.get("mda_index") or {})
                frame_ids.append(int(rec["frame_id"]))
                pixel_size_um = float(rec.get("pixel_size_um", pixel_size_um))
        if frame_ids:
            write_ome_description(out, shape, np.dtype(dtype_str), planes, pixel_size_um)
            outputs.append(out)
            recovered += len(frame_ids)
            (out_dir / f"{out.name.split('.')[0]}.frames.json").write_text(
                json.dumps(frame_ids))
        else:
            out.unlink(missing_ok=True)
    problems.sort(key=lambda p: p.line)
    return RecoveryReport(run_dir, outputs, recovered, problems)
