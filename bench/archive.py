"""The archive stage against tifffile's own contiguous write of the same frames, same run.

Baseline: `tifffile.TiffWriter(bigtiff=True).write(frame, contiguous=True)` for
every frame, then close — the fastest way tifffile writes a series one frame at
a time. dimscope: the `RawArchive` stage fed the same frames as fast as they
can be offered, with a run's default settings (fsync of pixels and index every
2 s, 4 GB files), timed until every frame is written, indexed and the file is
closed with its OME-XML and fsynced (what a run's stop does). Both are timed until
their data is on the disk (fsync), so the page cache does not decide the result. Both
write to the same folder (`--dir`, default a temporary folder on the disk the archive
would use).

Prints frames/s and MB/s of both and the ratio (target >= 0.8), for 512² and
2048² uint16 frames; the order of the two alternates between repeats so that
page-cache state does not favour one, and every run starts after `sync` (no dirty pages
of the previous run left to throttle it).

    python bench/archive.py [--frames 2000] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from dimscope.daemon.archive import RawArchive, read_index
from dimscope.daemon.config import ArchiveConfig
from dimscope.daemon.frame import Frame, pixel_checksum


def _frames(n: int, shape: tuple[int, int]) -> list[Frame]:
    rng = np.random.default_rng(0)
    distinct = [rng.integers(90, 4000, size=shape, dtype=np.uint16) for _ in range(8)]
    for px in distinct:
        px.flags.writeable = False
    now = time.time_ns()
    # With the checksum acquisition takes of every frame (the archive records it).
    sums = [pixel_checksum(px) for px in distinct]
    return [Frame(frame_id=i, pixels=distinct[i % 8], acquired_unix_ns=now + i * 1_000_000,
                  exposure_ms=1.0, pixel_size_um=0.1, source="bench", checksum=sums[i % 8],
                  marks=(("acquired", time.monotonic_ns()),)) for i in range(n)]


def tifffile_alone(folder: Path, frames: list[Frame]) -> float:
    t0 = time.perf_counter()
    path = folder / "tifffile.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for f in frames:
            writer.write(f.pixels, contiguous=True, metadata={}, software="bench")
    fd = os.open(path, os.O_RDONLY)  # on the disk, as the archive's stop makes its files
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def archive_stage(folder: Path, frames: list[Frame]) -> float:
    run = folder / "run"
    defaults = ArchiveConfig()  # as a run writes: fsync every 2 s, 4 GB files
    archive = RawArchive(run, queue_frames=len(frames) + 1,
                         rotate_bytes=int(defaults.rotate_gb * 2**30), pixel_size_um=0.1,
                         fsync_every_s=defaults.fsync_every_s)
    archive.start()
    t0 = time.perf_counter()
    for f in frames:
        archive.offer(f)
    archive.stop(timeout=600)
    elapsed = time.perf_counter() - t0
    records, bad = read_index(run)
    assert len(records) == len(frames) and not bad, "the archive lost frames"
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=1000, help="frames per case at 512²")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: /tmp)")
    args = ap.parse_args()
    worst = float("inf")
    print(f"{'frame':>7} {'frames':>7} {'tifffile fps':>13} {'MB/s':>7} {'archive fps':>12} "
          f"{'MB/s':>7} {'ratio':>6}")
    for side, n in ((512, args.frames), (2048, max(args.frames // 8, 50))):
        frames = _frames(n, (side, side))
        mb = n * side * side * 2 / 1e6
        base_s, ours_s = [], []
        for r in range(args.repeats):
            for name in (("tifffile", "archive") if r % 2 == 0 else ("archive", "tifffile")):
                folder = Path(tempfile.mkdtemp(prefix="dimscope-bench-", dir=args.dir))
                # Start each run with no dirty pages of the previous one: the kernel's
                # writeback throttling would otherwise land on whichever runs next.
                os.sync()
                try:
                    if name == "tifffile":
                        base_s.append(tifffile_alone(folder, frames))
                    else:
                        ours_s.append(archive_stage(folder, frames))
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
        base, ours = float(np.median(base_s)), float(np.median(ours_s))
        ratio = base / ours
        worst = min(worst, ratio)
        print(f"{side:>5}² {n:>7} {n / base:>13.0f} {mb / base:>7.0f} {n / ours:>12.0f} "
              f"{mb / ours:>7.0f} {ratio:>6.2f}")
    print(f"archive / tifffile (median of {args.repeats}): worst ratio {worst:.2f} "
          f"(target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
