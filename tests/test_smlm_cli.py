"""`dimscope smlm ...` through a real argparse parser built with `add_smlm_commands`, on real
files: simulate → localize → render → frc → drift → recover, and bad inputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from dimscope.daemon.cli_smlm import add_smlm_commands
from dimscope.smlm.metrics import match, score
from dimscope.smlm.simulate import GroundTruth
from dimscope.smlm.table import read_table

pytest.importorskip("smappy")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dimscope")
    add_smlm_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    rc: int = args.func(args)
    return rc


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    assert run("smlm", "simulate", "--frames", "240", "--out", str(out), "--size", "64", "64",
               "--emitters", "10", "--seed", "3") == 0
    return out


def test_simulate_then_localize_matches_the_truth(sim_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    meta = json.loads((sim_dir / "simulation.json").read_text())
    cam = meta["settings"]["camera"]
    table = tmp_path / "locs.arrows"
    assert run("smlm", "localize", str(sim_dir / "raw.tif"), "--out", str(table),
               "--gain", str(cam["gain_adu_per_e"]), "--offset", str(cam["offset_adu"]),
               "--read-noise", str(cam["read_noise_e"]), "--merge-nm", "60") == 0
    assert "localizations from 240 frames" in capsys.readouterr().out
    read = read_table(table)
    assert read.complete and read.frames_done == 240
    assert read.metadata["library"] == "smappy-smlm" and read.metadata["field_nm"] == [6400,
                                                                                        6400]
    locs = read.table
    gt = GroundTruth.load(sim_dir / "truth.npz")
    gx, gy = gt.x_nm + gt.drift_nm[gt.frame, 0], gt.y_nm + gt.drift_nm[gt.frame, 1]
    ok = (gx >= 0) & (gx < 6400) & (gy >= 0) & (gy < 6400)
    s = score(match(gt.frame[ok], gx[ok], gy[ok], locs.frame, locs.x_nm, locs.y_nm, 250), 250)
    assert s.jaccard > 0.8
    molecules = read_table(tmp_path / "locs.molecules.arrows").table
    assert 0 < len(molecules) < len(locs) and molecules["n_locs"].sum() == len(locs)

    # the other formats, from the same command
    csv = tmp_path / "locs.csv"
    assert run("smlm", "localize", str(sim_dir / "raw.tif"), "--out", str(csv), "--gain",
               "2", "--offset", "100") == 0
    assert csv.read_text().startswith('"id","frame","x [nm]"')

    png, tif = tmp_path / "r.png", tmp_path / "r.tif"
    assert run("smlm", "render", str(table), "--pixel-nm", "20", "--out", str(png)) == 0
    assert run("smlm", "render", str(table), "--pixel-nm", "20", "--out", str(tif),
               "--gaussian") == 0
    import tifffile
    from PIL import Image

    assert Image.open(png).size == (320, 320)
    img = tifffile.imread(tif)
    assert img.shape == (320, 320) and img.sum() == pytest.approx(len(locs), rel=0.02)
    assert run("smlm", "render", str(csv), "--pixel-nm", "20", "--out", str(png)) == 0

    capsys.readouterr()
    assert run("smlm", "frc", str(table), "--block-frames", "100", "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["block_frames"] == 100 and rep["localizations_a"] > 0
    assert 10 < rep["resolution_nm"] < 400 or np.isnan(rep["resolution_nm"])

    drift = tmp_path / "drift.csv"
    assert run("smlm", "drift", str(table), "--out", str(drift), "--segments", "4") == 0
    d = np.loadtxt(drift, delimiter=",", skiprows=1)
    assert d.shape == (240, 3) and d[0, 1] == 0.0
    assert run("smlm", "render", str(table), "--drift", str(drift), "--out", str(png)) == 0


def test_recover_a_cut_table(sim_dir: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "t.arrows"
    assert run("smlm", "localize", str(sim_dir / "raw.tif"), "--out", str(table), "--chunk",
               "50") == 0
    full = read_table(table)
    data = table.read_bytes()
    table.write_bytes(data[:full.valid_bytes - 100])  # cut inside the last block
    capsys.readouterr()
    assert run("smlm", "recover", str(table)) == 0
    assert "cut" in capsys.readouterr().out
    back = read_table(table)
    assert back.complete and len(back.blocks) == len(full.blocks) - 1
    assert back.frames_done == full.blocks[-1].frame_start


def test_bad_inputs_exit_2_with_a_clear_message(sim_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text('"frame","x [nm]","y [nm]"\n1,10,10\n')
    assert run("smlm", "render", str(bad), "--out", str(tmp_path / "x.png")) == 2
    err = capsys.readouterr().err
    assert "missing required column(s)" in err and "intensity [photon]" in err
    assert not (tmp_path / "x.png").exists()
    assert run("smlm", "localize", str(tmp_path / "none.tif"), "--out",
               str(tmp_path / "a.arrows")) == 2
    assert "no such file" in capsys.readouterr().err
    existing = tmp_path / "exists.arrows"
    existing.write_bytes(b"")
    assert run("smlm", "localize", str(sim_dir / "raw.tif"), "--out", str(existing)) == 2
    assert "exists" in capsys.readouterr().err
    assert run("smlm", "localize", str(sim_dir / "raw.tif"), "--out",
               str(tmp_path / "t.parquet")) == 2
    assert run("smlm", "frc", str(bad)) == 2


def test_the_dimscope_command_runs_smlm(sim_dir: Path, tmp_path: Path) -> None:
    """The installed `dimscope` entry point has the smlm commands (wired in cli.py)."""
    import subprocess
    import sys

    table = tmp_path / "t.arrows"
    done = subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", "smlm", "localize",
                           str(sim_dir / "raw.tif"), "--out", str(table)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert read_table(table).complete and len(read_table(table).table) > 100
    missing = subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", "smlm", "frc",
                              str(tmp_path / "absent.csv")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "absent.csv" in missing.stderr
    assert "Traceback" not in missing.stderr
