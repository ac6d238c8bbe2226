"""The frame graph is declared in config: extra nodes need no code in `daemon/`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dimscope.daemon.archive import read_index

from .conftest import run_and_record
from .procs import dimscope, write_config


def test_extra_engine_and_publisher_from_config_alone(tmp_path: Path) -> None:
    # A second, classical engine on the raw frames, published on its own topic beside the
    # model's stream; and a second publisher of the enhanced stream, for a remote relay.
    from .conftest import make_config

    cfg = make_config(
        tmp_path, source={"kind": "sim", "width": 96, "height": 64, "exposure_ms": 5.0},
        engine={"name": "identity"},
        stages=[{"kind": "engine", "name": "classical", "engine": "vst_gaussian",
                 "options": {"sigma": 1.5}},
                {"kind": "publish", "name": "publish_classical", "upstream": "classical",
                 "topic": "classical"},
                {"kind": "publish", "name": "relay", "upstream": "engine",
                 "topic": "relay"}])
    summary, received = run_and_record(cfg, 2.0, ["enhanced", "classical", "relay"])
    stages = summary["stages"]
    assert {"classical", "publish_classical", "relay"} <= set(stages)
    assert stages["classical"]["received"] == summary["acquired"]  # fed by acquisition
    by_topic: dict[str, list[dict[str, object]]] = {}
    for topic, header, _ in received:
        by_topic.setdefault(topic, []).append(header)
    assert {h["engine"]["name"] for h in by_topic["classical"]} == {"vst_gaussian"}  # type: ignore[index]
    assert {h["engine"]["name"] for h in by_topic["enhanced"]} == {"identity"}  # type: ignore[index]
    assert by_topic["relay"] and all(h["kind"] == "enhanced" for h in by_topic["relay"])
    # The raw archive is untouched by the extra nodes.
    assert summary["acquired"] == summary["archived"]
    assert len(read_index(Path(summary["run_dir"]))[0]) == summary["acquired"]


@pytest.mark.parametrize(("stages", "needle"), [
    ('[[stages]]\nkind = "publish"\nname = "p"\nupstream = "nowhere"\ntopic = "x"\n',
     "upstream 'nowhere' is not an earlier node"),
    ('[[stages]]\nkind = "publish"\nname = "archive"\ntopic = "x"\n', "already taken"),
    ('[[stages]]\nkind = "publish"\nname = "p"\ntopic = "raw"\n', "already published"),
    ('[[stages]]\nkind = "engine"\nname = "e"\nengine = "nope"\n', "unknown engine 'nope'"),
    ('[[stages]]\nkind = "teleport"\nname = "t"\n', "stages.0"),
])
def test_a_badly_declared_graph_is_a_config_error(tmp_path: Path, stages: str,
                                                  needle: str) -> None:
    path = write_config(tmp_path / "g.toml", stages)
    result = dimscope("check-config", path, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert needle in result.stderr, result.stderr


def test_an_extra_engine_that_cannot_load_is_named_and_the_rest_runs(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        '[source]\nkind = "sim"\nwidth = 64\nheight = 64\nexposure_ms = 2.0\n'
        '[engine]\nname = "identity"\n'
        '[[stages]]\nkind = "engine"\nname = "mine"\nengine = "model"\n'
        'options = { model = "no_such_model.onnx" }\n'
        '[[stages]]\nkind = "publish"\nname = "publish_mine"\nupstream = "mine"\n'
        'topic = "mine"\n')
    summary_path = tmp_path / "s.json"
    result = dimscope("run", "-c", config, "--frames", "20", "--out", tmp_path / "runs", "-q",
                      "--summary-json", summary_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(summary_path.read_text())
    assert "no_such_model.onnx" in summary["node_errors"]["mine"]
    assert "not running" in summary["node_errors"]["publish_mine"]
    assert summary["archived"] == 20 and summary["stages"]["publish_enhanced"]["passed"] > 0


@pytest.mark.parametrize(("toml", "needle"), [
    ('[engine]\nname = "denoise"\noptions = { runtim = "cpu" }\n',
     "runtim: unknown option"),
    ('[engine]\nname = "denoise"\noptions = { precision = "int3" }\n', "precision"),
    ('[engine]\nname = "vst_gaussian"\noptions = { sigma = -1 }\n', "sigma"),
    ('[engine]\nname = "vst_gaussian"\noptions = { gain_adu_per_e = 2.0 }\n',
     "set it in [camera]"),
    ('[engine]\nname = "identity"\ntiers = [{ name = "vst_gaussian", options = { sgima = 1 } }]\n',
     "sgima: unknown option"),
    ('[interpolate]\nfactor = 2\nmethod = "linear"\noptions = { model = "x" }\n',
     "takes no options"),
])
def test_engine_options_are_typed_per_engine(tmp_path: Path, toml: str, needle: str) -> None:
    path = write_config(tmp_path / "o.toml", toml)
    result = dimscope("check-config", path, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert needle in result.stderr, result.stderr


def test_camera_section_sets_the_calibration_engines_see(tmp_path: Path) -> None:
    from dimscope.daemon.pipeline import Pipeline

    from .conftest import make_config

    cfg = make_config(tmp_path, camera={"read_noise_e": 3.0}, engine={"name": "vst_gaussian"})
    pipeline = Pipeline(cfg)
    pipeline.start(max_frames=3)
    pipeline.wait()
    engine = pipeline.stage("engine")
    pipeline.stop()
    # read noise from [camera]; gain and offset still the simulated camera's own (2, 100)
    assert engine is not None
    assert engine.calibration.read_noise_e == 3.0  # type: ignore[attr-defined]
    assert (engine.calibration.gain_adu_per_e, engine.calibration.offset_adu) == (2.0, 100.0)  # type: ignore[attr-defined]
