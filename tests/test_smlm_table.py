"""The crash-safe table (a writer really killed with SIGKILL), molecules, ThunderSTORM and
Picasso files, missing columns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from dimscope.smlm.block import LocBlock, MissingColumnsError
from dimscope.smlm.table import (
    TS_HEADER,
    LocTableWriter,
    load_localizations,
    load_picasso,
    load_thunderstorm,
    merge_molecules,
    read_table,
    recover_table,
    save_picasso,
    save_thunderstorm,
)


def block(i: int, rows: int = 50) -> LocBlock:
    """Block i: frames [10i, 10i+10), `rows` rows whose values encode i."""
    rng = np.random.default_rng(i)
    return LocBlock(10 * i, 10 * i + 10, {
        "frame": 10 * i + rng.integers(0, 10, rows), "x_nm": rng.uniform(0, 5000, rows),
        "y_nm": rng.uniform(0, 5000, rows), "photons": np.full(rows, 1000.0 + i),
        "background": np.full(rows, 10.0), "precision_nm": rng.uniform(5, 20, rows),
        "sigma_nm": np.full(rows, 130.0)})


def test_roundtrip_with_units_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "t.arrows"
    with LocTableWriter(path, ["sigma_nm", "log_likelihood"], {"pixel_nm": 100}) as w:
        for i in range(3):
            w.append(block(i))
        w.append(LocBlock.empty(30, 40))  # frames with nothing found are recorded too
    read = read_table(path)
    assert read.complete and read.frames_done == 40
    assert [(b.frame_start, b.frame_stop) for b in read.blocks] == [
        (0, 10), (10, 20), (20, 30), (30, 40)]
    assert read.units["x_nm"] == "nm" and read.units["background"] == "photon/pixel"
    assert read.metadata == {"pixel_nm": 100}
    np.testing.assert_allclose(read.blocks[1]["photons"], 1001.0)
    assert np.isnan(read.blocks[0]["log_likelihood"]).all()  # a column the block lacked
    with pytest.raises(FileExistsError):
        LocTableWriter(path)  # never overwrites an earlier run's table


_WRITER = """
import sys, time
import numpy as np
sys.path.insert(0, {tests!r})
from test_smlm_table import block
from dimscope.smlm.table import LocTableWriter
w = LocTableWriter({path!r}, ["sigma_nm"])
i = 0
while True:
    # big blocks so that the kill lands inside a write as often as not
    w.append(block(i, rows=20000))
    print(i, flush=True)
    i += 1
"""


def test_sigkilled_writer_loses_at_most_the_block_being_written(tmp_path: Path) -> None:
    path = tmp_path / "killed.arrows"
    code = _WRITER.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    done = -1
    deadline = time.monotonic() + 60
    while done < 5 and time.monotonic() < deadline:
        done = int(proc.stdout.readline().split()[0])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    read = read_table(path)
    assert not read.complete  # no end-of-stream marker: the writer never closed
    # every block reported written is there, whole, with its content
    assert len(read.blocks) >= done + 1
    for i, b in enumerate(read.blocks):
        assert (b.frame_start, b.frame_stop) == (10 * i, 10 * i + 10)
        ref = block(i, rows=20000)
        np.testing.assert_array_equal(b["frame"], ref["frame"])
        np.testing.assert_allclose(b["x_nm"], ref["x_nm"].astype(np.float32))
    rep = recover_table(path)
    assert rep.blocks == len(read.blocks) and not rep.was_complete
    again = read_table(path)
    assert again.complete and len(again.blocks) == len(read.blocks)
    # a valid stream now, for any Arrow reader
    with pa.OSFile(str(path), "rb") as f:
        assert ipc.open_stream(f).read_all().num_rows == rep.rows
    assert recover_table(path).was_complete


def test_every_cut_inside_the_last_block_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "full.arrows"
    with LocTableWriter(path, fsync=False) as w:
        for i in range(3):
            w.append(block(i, rows=5))
    data = path.read_bytes()
    two = read_table(path)
    cut_path = tmp_path / "cut.arrows"
    ends = []
    for cut in range(len(data) - 8, 0, -7):  # without the end marker, then shorter
        cut_path.write_bytes(data[:cut])
        try:
            r = read_table(cut_path)
        except ValueError:  # cut inside the schema: nothing to recover
            break
        ends.append(len(r.blocks))
        assert not r.complete
        for a, b in zip(r.blocks, two.blocks, strict=False):
            np.testing.assert_array_equal(a["x_nm"], b["x_nm"])
    assert ends[0] == 3 and 2 in ends and 0 in ends and ends == sorted(ends, reverse=True)


def test_table_without_required_columns_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "bad.arrows"
    schema = pa.schema([("frame", pa.int64()), ("x_nm", pa.float32()), ("y_nm", pa.float32())])
    with pa.OSFile(str(path), "wb") as f, ipc.new_stream(f, schema) as w:
        w.write_batch(pa.record_batch([pa.array([0]), pa.array([1.0], pa.float32()),
                                       pa.array([1.0], pa.float32())], schema=schema))
    with pytest.raises(MissingColumnsError, match="background, photons, precision_nm"):
        read_table(path)
    csv = tmp_path / "bad.csv"
    csv.write_text('"id","frame","x [nm]","y [nm]"\n1,1,100,200\n')
    with pytest.raises(MissingColumnsError, match=r"intensity \[photon\], offset \[photon\]"):
        load_localizations(csv)


def test_thunderstorm_roundtrip(tmp_path: Path) -> None:
    b = block(2)
    path = tmp_path / "ts.csv"
    save_thunderstorm(b, path)
    lines = path.read_text().splitlines()
    assert lines[0] == TS_HEADER
    assert int(lines[1].split(",")[1]) == b.frame[0] + 1  # ThunderSTORM counts from 1
    back = load_thunderstorm(path)
    np.testing.assert_array_equal(back.frame, b.frame)
    np.testing.assert_allclose(back.x_nm, b.x_nm, rtol=1e-5)
    np.testing.assert_allclose(back["precision_nm"], b["precision_nm"], rtol=1e-5)
    # a ThunderSTORM file that calls its precision uncertainty_xy
    path2 = tmp_path / "ts2.csv"
    path2.write_text(path.read_text().replace("uncertainty [nm]", "uncertainty_xy [nm]"))
    assert len(load_localizations(path2)) == len(b)


def test_picasso_roundtrip_in_camera_pixels(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    import h5py
    import yaml

    b = block(1)
    path = save_picasso(b, tmp_path / "locs.hdf5", pixel_nm=100.0, shape=(64, 64))
    with h5py.File(path) as f:
        rec = f["locs"][...]
    for name in ("frame", "x", "y", "photons", "sx", "sy", "bg", "lpx", "lpy"):
        assert name in rec.dtype.names
    np.testing.assert_allclose(rec["x"], b.x_nm / 100 - 0.5, rtol=1e-5)  # pixels, centre at j
    info = yaml.safe_load(path.with_suffix(".yaml").read_text())
    assert info["Pixelsize"] == 100.0 and info["Width"] == 64
    back = load_picasso(path)
    np.testing.assert_allclose(back.x_nm, b.x_nm, rtol=1e-5)
    np.testing.assert_array_equal(back.frame, b.frame)
    with h5py.File(tmp_path / "nolp.hdf5", "w") as f:
        f.create_dataset("locs", data=rec[["frame", "x", "y", "photons", "bg"]])
    with pytest.raises(MissingColumnsError, match="lpx, lpy"):
        load_picasso(tmp_path / "nolp.hdf5", pixel_nm=100.0)


def test_merge_molecules() -> None:
    # molecule A blinks in frames 0-3, B in 1-2 nearby (200 nm), A again in 10 (a new one)
    frame = np.array([0, 1, 1, 2, 2, 3, 10])
    x = np.array([100.0, 104, 300, 98, 296, 102, 100])
    y = np.full(7, 500.0)
    locs = LocBlock(0, 11, {"frame": frame, "x_nm": x, "y_nm": y,
                            "photons": np.full(7, 1000.0), "background": np.full(7, 10.0),
                            "precision_nm": np.full(7, 10.0)})
    mol = merge_molecules(locs, max_distance_nm=50, max_gap=1)
    assert len(mol) == 3
    assert list(mol["n_locs"]) == [4, 2, 1]
    assert list(mol["frame"]) == [0, 1, 10] and list(mol["frame_stop"]) == [3, 2, 10]
    np.testing.assert_allclose(mol.x_nm, [101.0, 298.0, 100.0])
    np.testing.assert_allclose(mol["photons"], [4000, 2000, 1000])
    np.testing.assert_allclose(mol["precision_nm"], [5.0, 10 / np.sqrt(2), 10.0], rtol=1e-5)
    # a gap of 6 frames joins A's two blinks
    assert len(merge_molecules(locs, 50, max_gap=7)) == 2
