"""Sparse-to-dense prediction, its error map and the ready rule: offline and live.

The shipped `dense` model on simulated acquisitions (the simulator's kinetics, localizations
at the Cramér–Rao bound, the widefield frame with a PSF 15 % wider than nominal); a live run
on the simulated SMLM microscope through a real core, with its topics subscribed over ZMQ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("smappy")
pytest.importorskip("pyarrow")

from dimscope.engines.training.dense import SimField, simulate_field
from dimscope.smlm import errormap
from dimscope.smlm.dense import DenseGrid, DensePredictor, shuffled
from dimscope.smlm.ready import ReadyRule, ReadySettings
from dimscope.smlm.simulate import SimSettings
from dimscope.smlm.table import save_thunderstorm

from .conftest import make_config, run_and_record
from .procs import dimscope

GRID = DenseGrid()
SETTINGS = SimSettings(shape=(64, 64))
CAM = SETTINGS.camera
ERR = errormap.ErrorMapSettings(gain_adu_per_e=CAM.gain_adu_per_e, offset_adu=CAM.offset_adu,
                                read_noise_e=CAM.read_noise_e)


@pytest.fixture(scope="module")
def field() -> SimField:
    return simulate_field("filaments", 3, 6000, GRID, SETTINGS)


@pytest.fixture(scope="module")
def predictor() -> DensePredictor:
    return DensePredictor("dense")


def test_the_model_beats_the_plain_renders_it_is_made_from(
        field: SimField, predictor: DensePredictor) -> None:
    from dimscope.engines.evaluation.quality import score
    from dimscope.smlm.dense import gaussian_baseline

    sparse = field.sparse(300)  # 5 % of the frames
    dense = predictor.predict(sparse, field.widefield, field.extent_nm)
    assert dense.shape == GRID.shape(field.extent_nm) and np.isfinite(dense).all()
    model = score(field.target, dense)["psnr"]
    best_gaussian = max(score(field.target, gaussian_baseline(sparse, field.extent_nm, GRID,
                                                              s))["psnr"]
                        for s in (20.0, 40.0, 80.0))
    assert model > best_gaussian


def test_the_output_is_blurred_as_the_card_says_for_the_input_density(
        field: SimField, predictor: DensePredictor) -> None:
    from dimscope.smlm.dense import (
        localization_density,
        model_input,
        output_smoothing_px,
        smooth_output,
    )

    table = [(10.0, 6.0), (1000.0, 0.0)]
    assert output_smoothing_px(table, 2.0) == 6.0 and output_smoothing_px(table, 5e3) == 0.0
    assert output_smoothing_px(table, 100.0) == pytest.approx(3.0)  # log-midpoint
    assert output_smoothing_px([], 10.0) == 0.0
    assert output_smoothing_px(table, 0.0) == 6.0  # no localizations: the sparsest row's
    sparse = field.sparse(60)  # 1 % of the frames: the shipped card blurs this
    density = localization_density(sparse, field.extent_nm)
    blur = predictor.smoothing_px(density)
    assert blur > 1.0
    network = predictor.predict_input(model_input(sparse, field.widefield, field.extent_nm,
                                                  predictor.grid))
    dense = predictor.predict(sparse, field.widefield, field.extent_nm)
    np.testing.assert_allclose(dense, smooth_output(network, blur), rtol=1e-5, atol=1e-7)
    assert np.abs(np.diff(dense)).mean() < 0.5 * np.abs(np.diff(network)).mean()
    assert predictor.smoothing_px(1e4) == 0.0  # a dense input is left as the network made it


def test_the_error_map_finds_inserted_and_removed_structures(field: SimField) -> None:
    """The full reconstruction is an honest dense image: next to nothing flagged. A blob at
    3σ widefield contrast put into it, or a stretch of filament taken out, is flagged."""
    honest = errormap.compute(field.target, field.widefield, GRID.render_pixel_nm,
                              CAM.pixel_nm, ERR)
    assert honest.flagged_fraction <= 0.01
    assert honest.psf_sigma_nm == pytest.approx(SETTINGS.psf_sigma_nm * 1.15, rel=0.1)
    noise = math.sqrt(CAM.gain_adu_per_e * float(np.median(field.widefield - CAM.offset_adu))
                      + (CAM.gain_adu_per_e * CAM.read_noise_e) ** 2)
    rng = np.random.default_rng(0)
    h, w = field.target.shape
    found = 0
    for _ in range(5):
        r, c = (int(v) for v in rng.integers(60, (h - 60, w - 60)))
        blob = np.zeros_like(field.target)
        blob[r - 3:r + 4, c - 3:c + 4] = 1.0
        peak = errormap.forward(blob, GRID.render_pixel_nm, CAM.pixel_nm,
                                field.widefield.shape, honest.psf_sigma_nm).max() * honest.scale
        inserted = field.target + blob * (3.0 * noise / peak)
        m = errormap.compute(inserted, field.widefield, GRID.render_pixel_nm, CAM.pixel_nm,
                             ERR)
        found += bool(m.flagged[r // 5 - 2:r // 5 + 3, c // 5 - 2:c // 5 + 3].any())
    assert found == 5
    # Removed: the brightest 1 µm of structure, gone.
    r, c = np.unravel_index(np.argmax(honest.predicted_widefield), honest.flagged.shape)
    removed = field.target.copy()
    removed[max(r * 5 - 25, 0):r * 5 + 25, max(c * 5 - 25, 0):c * 5 + 25] = 0
    m = errormap.compute(removed, field.widefield, GRID.render_pixel_nm, CAM.pixel_nm, ERR)
    assert m.flagged[max(r - 3, 0):r + 4, max(c - 3, 0):c + 4].any()


def test_ready_comes_before_the_frame_limit_and_never_for_shuffled_localizations(
        field: SimField, predictor: DensePredictor) -> None:
    settings = ReadySettings(min_frames=1000, target_resolution_nm=60.0)
    honest = ReadyRule(settings, field.extent_nm)
    random = ReadyRule(settings, field.extent_nm)
    rng = np.random.default_rng(1)
    for frames in range(500, field.frames + 1, 500):
        locs = field.sparse(frames)
        for rule, table in ((honest, locs), (random, shuffled(locs, field.extent_nm, rng))):
            dense = predictor.predict(table, field.widefield, field.extent_nm)
            emap = errormap.compute(dense, field.widefield, GRID.render_pixel_nm,
                                    CAM.pixel_nm, ERR)
            rule.check(frames, table, dense, GRID.render_pixel_nm, emap.flagged_fraction)
    assert honest.first_ready is not None and honest.first_ready.frames < field.frames
    assert random.first_ready is None


def _dense_stages(model: str = "dense", widefield_file: Path | None = None,
                  ready: dict[str, object] | None = None) -> list[dict[str, object]]:
    dense: dict[str, object] = {"kind": "dense", "name": "dense", "upstream": "localize",
                                "every_frames": 250, "model": model,
                                "ready": ready or {"min_frames": 500,
                                                   "target_resolution_nm": 200.0,
                                                   "max_change": 0.5, "max_flagged": 0.2}}
    if widefield_file is None:
        dense["widefield"] = "raw_mean"
    else:
        dense["widefield_file"] = str(widefield_file)
    return [{"kind": "localize", "name": "localize"},
            {"kind": "publish", "name": "publish_localizations", "upstream": "localize",
             "topic": "localizations"},
            {"kind": "render", "name": "render", "upstream": "localize", "every_frames": 250},
            {"kind": "publish", "name": "publish_render", "upstream": "render",
             "topic": "render"},
            {"kind": "mean", "name": "raw_mean", "every_frames": 50},
            dense,
            {"kind": "publish", "name": "publish_dense", "upstream": "dense",
             "topic": "dense", "kinds": ["dense"]},
            {"kind": "publish", "name": "publish_dense_trust", "upstream": "dense",
             "topic": "trust", "kinds": ["error_map"]},
            {"kind": "publish", "name": "publish_ready", "upstream": "dense",
             "topic": "ready", "kinds": ["ready"]}]


SOURCE = {"kind": "smlm_sim", "width": 48, "height": 48, "fps": 400.0,
          "emitters_per_frame": 10}


def test_a_live_run_publishes_dense_trust_and_ready_and_archives_everything(
        tmp_path: Path) -> None:
    cfg = make_config(tmp_path, source=SOURCE, stages=_dense_stages(),
                      engine={"name": "identity"}, trust={"enabled": False})
    summary, messages = run_and_record(cfg, 4.0, ["localizations", "render", "dense",
                                                  "trust", "ready"])
    assert summary["archived"] == summary["acquired"] > 1000
    topics = {t for t, _, _ in messages}
    assert topics == {"localizations", "render", "dense", "trust", "ready"}
    dense = [(h, p) for t, h, p in messages if t == "dense"]
    header, image = dense[-1]
    assert image.shape == (48 * 5, 48 * 5) and header["kind"] == "dense"
    meta = header["smlm"]
    assert meta["model"].startswith("dense@") and len(meta["model_sha256"]) == 64
    assert meta["widefield"].startswith("mean of ")
    # A prediction every 250 frames or so (at the first block past each), and one of the
    # whole run at its end.
    covered = [int(h["smlm"]["frames"]) for h, _ in dense]
    assert covered == sorted(set(covered)) and len(covered) >= 3
    assert covered[-1] == summary["stages"]["localize"]["frames_localized"]
    assert int(meta["localizations"]) == summary["stages"]["localize"]["localizations"]
    trust = [(h, p) for t, h, p in messages if t == "trust"]
    assert trust and trust[0][1].shape == (48, 48) and trust[0][0]["kind"] == "error_map"
    assert "diffraction limit" in trust[0][0]["smlm"]["limit"]
    ready = [(h, p) for t, h, p in messages if t == "ready"]
    assert len(ready) == 1
    event = json.loads(ready[0][1].tobytes())
    assert event["ready"] is True and event["frames"] >= 500 and event["failing"] == []
    report = summary["smlm_ready"][0]
    assert report["ready"] and report["frames_used"] == event["frames"]
    # The table of every localization, beside the raw frames.
    assert Path(summary["stages"]["localize"]["table"]).is_file()


def test_stop_when_ready_ends_the_run_before_its_frame_limit(tmp_path: Path) -> None:
    from dimscope.daemon.pipeline import Pipeline

    cfg = make_config(tmp_path, source=SOURCE, stages=_dense_stages(),
                      engine={"name": "identity"}, trust={"enabled": False},
                      smlm={"stop_when_ready": True})
    pipeline = Pipeline(cfg)
    pipeline.start(max_frames=20_000)
    pipeline.wait(duration_s=60.0)
    summary = pipeline.stop().to_dict()
    assert summary["finish_reason"] == "ready"
    report = summary["smlm_ready"][0]
    assert report["ready"] and report["max_frames"] == 20_000
    assert report["frames_used"] < summary["acquired"] < 20_000
    assert summary["archived"] == summary["acquired"]


def test_a_missing_model_or_a_wrong_size_widefield_stops_the_node_not_the_run(
        tmp_path: Path) -> None:
    wrong = tmp_path / "wf.tif"
    tifffile.imwrite(wrong, np.zeros((32, 40), np.uint16))
    for stages, problem in ((_dense_stages(model=str(tmp_path / "gone.onnx")),
                             "model file not found"),
                            (_dense_stages(widefield_file=wrong), "register it")):
        cfg = make_config(tmp_path, source=SOURCE, stages=stages,
                          engine={"name": "identity"}, trust={"enabled": False})
        summary, _ = run_and_record(cfg, 1.5, [])
        assert problem in summary["node_errors"]["dense"]
        assert summary["archived"] == summary["acquired"] > 0
        assert summary["stages"]["localize"]["frames_localized"] > 0


def test_smlm_dense_offline_and_its_bad_inputs(tmp_path: Path, field: SimField) -> None:
    table = tmp_path / "locs.csv"
    save_thunderstorm(field.sparse(600), table)
    wf = tmp_path / "wf.tif"
    tifffile.imwrite(wf, field.widefield)
    out, emap = tmp_path / "dense.tif", tmp_path / "error.tif"
    done = dimscope("smlm", "dense", table, "--widefield", wf, "--out", out, "--error-map",
                    emap, "--gain", str(CAM.gain_adu_per_e), "--offset", str(CAM.offset_adu),
                    "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert tifffile.imread(out).shape == (320, 320) and tifffile.imread(emap).shape == (64, 64)
    assert report["frames"] == 600 and report["flagged_fraction"] <= 0.05

    small = tmp_path / "small.tif"
    tifffile.imwrite(small, field.widefield[:32, :32])
    bad = dimscope("smlm", "dense", table, "--widefield", small, "--out", tmp_path / "x.tif")
    assert bad.returncode == 2 and "outside the widefield image's field" in bad.stderr
    broken = tmp_path / "broken.csv"
    broken.write_text("frame,intensity [photon]\n1,100\n")
    bad = dimscope("smlm", "dense", broken, "--widefield", wf, "--out", tmp_path / "y.tif")
    assert bad.returncode == 2 and "x [nm]" in bad.stderr
    assert not (tmp_path / "x.tif").exists() and not (tmp_path / "y.tif").exists()


@pytest.mark.parametrize(("nodes", "problem"), [
    ([{"kind": "localize", "name": "localize"},
      {"kind": "dense", "name": "dense", "upstream": "engine", "widefield_file": "wf.tif"}],
     "dense node takes localizations"),
    ([{"kind": "localize", "name": "localize"},
      {"kind": "dense", "name": "dense", "upstream": "localize"}],
     "exactly one of `widefield`"),
    ([{"kind": "localize", "name": "localize"},
      {"kind": "dense", "name": "dense", "upstream": "localize", "widefield": "localize"}],
     "is not an earlier mean node"),
    ([{"kind": "mean", "name": "m", "upstream": "engine"}], "must be 'acquisition'"),
])
def test_a_badly_declared_dense_graph_is_a_config_error(tmp_path: Path,
                                                        nodes: list[dict[str, object]],
                                                        problem: str) -> None:
    from dimscope.daemon.config import ConfigError

    with pytest.raises(ConfigError, match=problem):
        make_config(tmp_path, stages=nodes)


def test_smlm_train_makes_a_dense_model_the_node_can_load(tmp_path: Path) -> None:
    out = tmp_path / "mine.onnx"
    done = dimscope("smlm", "train", "--structures", "rings", "--fields", "1", "--frames",
                    "400", "--steps", "3", "--batch", "2", "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    loaded = DensePredictor(out)
    assert loaded.card.task == "dense" and loaded.card.dense is not None
    assert loaded.card.dense.structures == ["rings"] and not loaded.card.dense.adversarial_loss
    assert "WO2019025298A1" in loaded.card.dense.notice
    table = loaded.card.dense.output_smoothing  # calibrated on its training field
    assert len(table) == 6 and all(0 <= blur <= 6.0 for _, blur in table)
    assert "output blur by density" in done.stdout
    bad = dimscope("smlm", "train", "--structures", "spirals", "--out", tmp_path / "x.onnx")
    assert bad.returncode == 2 and "unknown structure 'spirals'" in bad.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_the_dense_worker_matches_the_step_in_process_and_names_its_death(
        field: SimField) -> None:
    import os
    import signal
    import time

    from dimscope.engines import EngineError
    from dimscope.smlm.dense_step import DenseStep, DenseStepSettings, DenseWorker

    settings = DenseStepSettings(model="dense", error_map=ERR,
                                 ready=ReadySettings(min_frames=1))
    sparse = field.sparse(300)
    here = DenseStep(settings, field.extent_nm).run(sparse, field.widefield, 300, 1,
                                                     CAM.pixel_nm)
    worker = DenseWorker(settings, field.extent_nm)
    try:
        there = worker.run(sparse, field.widefield, 300, 1, CAM.pixel_nm)
        np.testing.assert_allclose(there.dense, here.dense, rtol=1e-5, atol=1e-6)
        assert there.flagged_fraction == here.flagged_fraction
        assert there.check["localizations"] == len(sparse)
        # the child keeps the ready rule's state: the same input again changes nothing
        assert worker.run(sparse, field.widefield, 600, 1, CAM.pixel_nm
                          ).check["change"] == pytest.approx(0.0, abs=1e-6)
        for pid in worker.pids:  # a real kill of the real child
            os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)  # the pool notices: run() must still name the death
        with pytest.raises(EngineError, match="dense worker process died"):
            worker.run(sparse, field.widefield, 900, 1, CAM.pixel_nm)
    finally:
        worker.close()
