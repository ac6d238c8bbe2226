"""MDA time-lapses through pymmcore-plus's runner on the real UniMMCore sim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tifffile
import useq

from dimscope.daemon.archive import read_index
from dimscope.daemon.config import ConfigError, load_config
from dimscope.daemon.pipeline import Pipeline

from .conftest import make_config


def test_mda_time_lapse_archives_every_planned_frame_with_its_indices(tmp_path: Path) -> None:
    seq = useq.MDASequence(time_plan={"interval": 0.05, "loops": 5},
                           z_plan={"range": 1.0, "step": 0.5})
    cfg = make_config(tmp_path, engine={"name": "identity"},
                      interpolate={"factor": 2, "method": "linear"})
    pipeline = Pipeline(cfg, mda=seq)
    pipeline.start()
    pipeline.wait(duration_s=60)
    summary = pipeline.stop().to_dict()
    assert summary["error"] is None
    assert summary["mda_planned"] == 15 == summary["acquired"] == summary["archived"]
    entries, torn = read_index(Path(summary["run_dir"]))
    assert torn == 0
    assert [(e["mda_index"]["t"], e["mda_index"]["z"]) for e in entries] == [
        (t, z) for t in range(5) for z in range(3)]
    # The OME-XML declares the real T and Z sizes, one Plane per frame with its indices.
    with tifffile.TiffFile(summary["archive_files"][0]) as tif:
        ome = tif.ome_metadata
        assert 'SizeT="5"' in ome and 'SizeZ="3"' in ome and 'SizeC="1"' in ome
        assert '<Plane TheC="0" TheZ="2" TheT="4"' in ome
        assert tif.series[0].shape == (5, 1, 3, 96, 128) or tif.series[0].shape == (5, 3, 96, 128)
    assert summary["stages"]["engine"]["passed"] == 15
    # Snapped frames are lit (the laser opens for each exposure only) — not dark frames.
    from dimscope.daemon.archive import read_frame

    mean = float(read_frame(Path(summary["run_dir"]), entries[0]).mean())
    assert mean > 100.0 + 3.0, f"frame looks dark (mean {mean:.1f} ADU, offset 100)"
    assert pipeline.source.scope is None or not pipeline.source.scope.laser_open  # type: ignore[attr-defined]
    # Interpolation runs in time at each z position: 4 intervals x 3 z = 12 frames.
    assert summary["stages"]["interpolate"]["passed"] + summary["stages"]["interpolate"][
        "late"] + summary["stages"]["interpolate"]["dropped"] >= 12 - 3
    assert summary["stages"]["interpolate"]["passed"] > 0


def test_mda_block_in_config_and_its_errors(tmp_path: Path) -> None:
    (tmp_path / "seq.yaml").write_text("time_plan:\n  interval: 0.01\n  loops: 3\n")
    good = tmp_path / "good.toml"
    good.write_text('[source]\nkind = "sim"\nwidth = 64\nheight = 64\nexposure_ms = 2.0\n'
                    '[engine]\nname = "identity"\n[publish]\naddress = "tcp://127.0.0.1:*"\n'
                    '[mda]\nfile = "seq.yaml"\n')
    run = subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", "run", "-c", str(good),
                          "--out", str(tmp_path / "runs"), "-q", "--summary-json",
                          str(tmp_path / "s.json")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "s.json").read_text())["archived"] == 3
    bad = tmp_path / "bad.toml"
    bad.write_text('[mda]\nfile = "missing.yaml"\n')
    with pytest.raises(ConfigError, match=r"mda: .*MDA sequence file not found: .*missing.yaml"):
        load_config(bad)
    bad.write_text('[mda]\ntime_plan = { interval = "soon", loops = 3 }\n')
    with pytest.raises(ConfigError, match="not a valid useq MDASequence"):
        load_config(bad)
