"""`dimscope pairs register` / `pairs apply`: known warps recovered, unrelated fields refused,
transforms re-applied, folders paired by name, pixel sizes honoured, bad input refused cleanly.

The pairs are made as the acceptance check makes them: HIGH is a field seen sharply (σ 0.7);
LOW is the same field through other optics (σ 2.2, gamma 0.7, independent noise) and warped by
a random affine (±3°, scale 0.98–1.02, ±5 px) plus a smooth elastic field (sinusoids of
0.5–1.2 px, one period across the field). The field has structure everywhere, so the whole
interior is measurable (in a blank region no registration can know how the field moved).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from dimscope.daemon.cli import main
from dimscope.engines.pairs.simulate import warped_pair

M = 24  # interior margin, as in the check


def _norm(x: np.ndarray) -> np.ndarray:
    x = x - np.percentile(x, 1)
    return np.clip(x / max(np.percentile(x, 99.8), 1e-9), 0, 1.2)


def _field(rng: np.random.Generator, n: int) -> np.ndarray:
    """Blobs and a few fibres of random orientation, everywhere in the field."""
    blobs = ndi.gaussian_filter((rng.random((n, n)) > 0.995).astype(float), 3)
    lines = np.zeros((n, n))
    for _ in range(n // 16):
        y0, x0, th = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(0, np.pi)
        t = np.linspace(-n / 4, n / 4, n)
        ys, xs = (y0 + t * np.sin(th)).astype(int), (x0 + t * np.cos(th)).astype(int)
        ok = (ys >= 0) & (ys < n) & (xs >= 0) & (xs < n)
        lines[ys[ok], xs[ok]] = 1.0
    lines = ndi.gaussian_filter(lines, 1.0)
    return blobs / blobs.max() + 0.5 * lines / lines.max()


def make_pair(seed: int, n: int = 256, scale: int = 1, warp: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(high, low, other, truth): `low` has `scale`× HIGH's pixel size; `truth` (2, n, n) is
    LOW's (row, col) for each HIGH pixel; `other` is an unrelated field seen like LOW."""
    rng = np.random.default_rng(seed)
    a, b = _field(rng, n), _field(rng, n)
    high, low, truth = warped_pair(a, rng, scale, warp)
    other = _norm(ndi.gaussian_filter(b, 2.2)) ** 0.7
    return high, low, other, truth


def _save(path: Path, img: np.ndarray, um: float | None) -> Path:
    data = np.clip(img * 20000 + 2000, 0, 65535).astype(np.uint16)
    if um is None:
        tifffile.imwrite(path, data)
    else:
        tifffile.imwrite(path, data, ome=True,
                         metadata={"axes": "YX", "PhysicalSizeX": um, "PhysicalSizeY": um})
    return path


def _rms(transform: np.ndarray, truth: np.ndarray) -> float:
    """RMS distance between two maps over the interior (margin M, as the check)."""
    return float(np.sqrt(((transform - truth) ** 2).sum(0)[M:-M, M:-M].mean()))


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["pairs", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, Path]:
    """One pair registered through the CLI: (out dir, truth, LOW file)."""
    d = tmp_path_factory.mktemp("pair")
    high, low, _, truth = make_pair(7)
    lo = _save(d / "low.ome.tif", low, 0.1)
    hi = _save(d / "high.ome.tif", high, 0.1)
    assert main(["pairs", "register", str(lo), str(hi), "--out", str(d / "reg")]) == 0
    return d / "reg", truth, lo


def test_known_warp_recovered(registered: tuple[Path, np.ndarray, Path]) -> None:
    out, truth, _ = registered
    transform = tifffile.imread(out / "transform" / "low.tif")
    assert transform.shape == (2, 256, 256) and transform.dtype == np.float32
    assert _rms(transform, truth) <= 0.2
    report = json.loads((out / "report.json").read_text())
    (entry,) = report["pairs"]
    assert entry["status"] == "registered" and entry["reason"] == "ok"
    assert entry["ncc_after"] > entry["ncc_before"] and entry["ncc_after"] > 0.9
    assert 0 <= entry["residual_shift_px"]["median"] <= entry["residual_shift_px"]["p95"] < 0.5
    for sub in ("low", "high", "mask"):
        assert tifffile.imread(out / sub / "low.tif").shape == (256, 256)
    low_reg = tifffile.imread(out / "low" / "low.tif")
    mask = tifffile.imread(out / "mask" / "low.tif").astype(bool)
    assert low_reg.dtype == np.float32 and (low_reg[~mask] == 0).all() and mask.mean() > 0.85
    assert (out / "montage" / "low.png").stat().st_size > 1000
    assert not list(out.parent.glob(".reg.partial-*"))  # the staging folder was renamed


def test_apply_reproduces_low(registered: tuple[Path, np.ndarray, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out, _, lo = registered
    rc, _, err = _run(capsys, "apply", str(out), str(lo), "--out", str(tmp_path / "again"))
    assert rc == 0, err
    again = tifffile.imread(tmp_path / "again" / "low" / "low.tif")
    assert np.array_equal(again, tifffile.imread(out / "low" / "low.tif"))
    assert np.array_equal(tifffile.imread(tmp_path / "again" / "mask" / "low.tif"),
                          tifffile.imread(out / "mask" / "low.tif"))
    # another channel on a different grid is refused, naming the file, and nothing is written
    wrong = _save(tmp_path / "wrong.tif", np.zeros((100, 100)), None)
    rc, _, err = _run(capsys, "apply", str(out), str(wrong), "--out", str(tmp_path / "w"))
    assert rc == 2 and "wrong.tif" in err and not (tmp_path / "w").exists()


def test_unrelated_pair_refused_by_the_real_cli(tmp_path: Path) -> None:
    high, _, other, _ = make_pair(3)
    hi = _save(tmp_path / "high.ome.tif", high, 0.1)
    ot = _save(tmp_path / "other.ome.tif", other, 0.1)
    out = tmp_path / "bad"
    p = subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", "pairs", "register",
                        str(ot), str(hi), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    report = json.loads((out / "report.json").read_text())
    (entry,) = report["pairs"]
    assert entry["status"] == "rejected" and entry["reason"].startswith("NCC too low")
    assert report["registered"] == 0
    assert sorted(x.name for x in out.iterdir()) == ["report.json"]  # no images


def test_folders_paired_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lows, highs = tmp_path / "wf", tmp_path / "conf"
    lows.mkdir()
    highs.mkdir()
    high_a, low_a, _, truth_a = make_pair(11, n=192)
    high_b, _, other_b, _ = make_pair(12, n=192)
    _save(lows / "cell_a.ome.tif", low_a, 0.1)
    _save(highs / "cell_a.tif", high_a, 0.1)
    _save(lows / "cell_b.tif", other_b, 0.1)  # not the same field as conf/cell_b
    _save(highs / "cell_b.ome.tiff", high_b, 0.1)
    _save(lows / "only_low.tif", low_a, 0.1)
    _save(highs / "only_high.tif", high_a, 0.1)
    rc, stdout, err = _run(capsys, "register", str(lows), str(highs), "--out",
                           str(tmp_path / "out"))
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    status = {e["name"]: e["status"] for e in report["pairs"]}
    assert status == {"cell_a": "registered", "cell_b": "rejected"}
    assert report["unpaired"] == {"low_only": ["only_low"], "high_only": ["only_high"]}
    assert "cell_b: REJECTED" in stdout
    assert [p.name for p in (tmp_path / "out" / "transform").iterdir()] == ["cell_a.tif"]
    assert _rms(tifffile.imread(tmp_path / "out" / "transform" / "cell_a.tif"), truth_a) <= 0.2


def test_pixel_sizes_from_metadata_and_from_the_command_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # LOW has pixels twice HIGH's size: 128² at 0.2 µm against 256² at 0.1 µm.
    high, low, _, truth = make_pair(5, scale=2)
    lo = _save(tmp_path / "low.ome.tif", low, 0.2)
    hi = _save(tmp_path / "high.ome.tif", high, 0.1)
    rc, _, err = _run(capsys, "register", str(lo), str(hi), "--out", str(tmp_path / "meta"))
    assert rc == 0, err
    transform = tifffile.imread(tmp_path / "meta" / "transform" / "low.tif")
    assert transform.shape == (2, 256, 256)
    assert _rms(transform, truth) <= 0.1  # in LOW's pixels, half the size of HIGH's
    assert tifffile.imread(tmp_path / "meta" / "low" / "low.tif").shape == (256, 256)
    # the same files without metadata: refused, then registered with --pixel-size
    lo2 = _save(tmp_path / "plain_low.tif", low, None)
    hi2 = _save(tmp_path / "plain_high.tif", high, None)
    rc, _, err = _run(capsys, "register", str(lo2), str(hi2), "--out", str(tmp_path / "x"))
    assert rc == 2 and "plain_low.tif" in err and "--pixel-size" in err
    assert not (tmp_path / "x").exists()
    rc, _, err = _run(capsys, "register", str(lo2), str(hi2), "--out", str(tmp_path / "cli"),
                      "--pixel-size", "0.2", "0.1")
    assert rc == 0, err
    assert np.array_equal(tifffile.imread(tmp_path / "cli" / "transform" / "plain_low.tif"),
                          transform)


def test_wider_low_field_found_and_stack_resampled(tmp_path: Path) -> None:
    """HIGH is a 160² part of a 320² LOW field (found by the coarse NCC step); LOW is a
    3-plane stack: registered on its mean, every plane resampled with the one transform."""
    from dimscope.engines.pairs import register

    rng = np.random.default_rng(2)
    field = _field(rng, 320)
    high = _norm(ndi.gaussian_filter(field, 0.7))[100:260, 40:200]
    low2 = _norm(ndi.gaussian_filter(field, 2.2)) ** 0.7 + rng.normal(0, 0.02, (320, 320))
    low = np.stack([low2, 2 * low2, low2 + 1]).astype(np.float32)
    reg = register(low, high.astype(np.float32), 0.1, 0.1)
    assert reg.status == "registered", reg.reason
    yy, xx = np.mgrid[0:160, 0:160].astype(float)
    truth = np.stack([yy + 100, xx + 40])
    assert _rms(reg.transform, truth) <= 0.1
    assert reg.low_on_high.shape == (3, 160, 160) and reg.mask.all()
    np.testing.assert_allclose(reg.low_on_high[1], 2 * reg.low_on_high[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["empty folder", "no names in common", "file and folder",
                                  "not a tiff", "missing", "bad pixel size", "out not empty"])
def test_bad_input_refused_cleanly(case: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    img = np.random.default_rng(0).random((64, 64))
    out = tmp_path / "out"
    args = [str(a), str(b)]
    named = ""
    if case == "empty folder":
        _save(b / "x.tif", img, 0.1)
        named = str(a)
    elif case == "no names in common":
        _save(a / "x.tif", img, 0.1)
        _save(b / "y.tif", img, 0.1)
        named = "no image names in common"
    elif case == "file and folder":
        args = [str(_save(a / "x.tif", img, 0.1)), str(b)]
        named = "both be files or both be folders"
    elif case == "not a tiff":
        (a / "x.tif").write_text("not an image")
        _save(b / "x.tif", img, 0.1)
        named = "x.tif"
    elif case == "missing":
        args = [str(tmp_path / "nope.tif"), str(_save(b / "x.tif", img, 0.1))]
        named = "nope.tif"
    elif case == "bad pixel size":
        args = [str(_save(a / "x.tif", img, None)), str(_save(b / "x.tif", img, None)),
                "--pixel-size", "0", "0.1"]
        named = "--pixel-size"
    elif case == "out not empty":
        args = [str(_save(a / "x.tif", img, 0.1)), str(_save(b / "x.tif", img, 0.1))]
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        named = "not an empty folder"
    rc, _, err = _run(capsys, "register", *args, "--out", str(out))
    assert rc == 2
    assert named in err and "Traceback" not in err
    if case == "out not empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))
