"""Model integrity: a card records the SHA-256 of its network; a file whose weights differ is
refused (naming the file) unless --allow-unverified-model, and then every frame says so.

Real model files in tmp_path (copies of the shipped ones, bytes flipped in place), real
runtimes, the real command line.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tifffile

from dimscope.daemon.cli import main
from dimscope.engines import CameraCalibration, EngineError, make_engine
from dimscope.engines.interpolators import make_interpolator
from dimscope.engines.model_file import (
    CARD_KEY,
    ModelIntegrityError,
    network_sha256,
    open_model_card,
    read_card,
    resolve_model,
    shipped_models,
    write_card_metadata,
)

CAL = CameraCalibration(2.0, 100.0, 1.6)


def _copy(name: str, to: Path) -> Path:
    """A shipped model copied to `to` (with its card JSON)."""
    src = resolve_model(name)
    shutil.copyfile(src, to)
    shutil.copyfile(src.with_suffix(".json"), to.with_suffix(".json"))
    return to


def _flip_weights(path: Path, n: int = 64) -> int:
    """XOR-flip `n` bytes in the middle of the largest initializer's raw data, in the file as
    it is (so it still parses and only its weights differ); returns the offset."""
    proto = onnx.load(str(path))
    raw = max(proto.graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    data = bytearray(path.read_bytes())
    at = data.find(raw)
    assert len(raw) > 4 * n and at > 0 and data.find(raw, at + 1) == -1
    start = at + len(raw) // 2
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    path.write_bytes(bytes(data))
    return start


def _tampered(name: str, to: Path) -> Path:
    _flip_weights(_copy(name, to))
    return to


def _frames(n: int = 3, shape: tuple[int, int] = (64, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.poisson(30.0, shape) * 2 + 100).astype(np.uint16) for _ in range(n)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dimscope.daemon.cli", *args],
                          capture_output=True, text=True, timeout=120)


def _config(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text('[source]\nkind = "sim"\nwidth = 64\nheight = 64\n'
                    '[publish]\naddress = "tcp://127.0.0.1:*"\n'
                    f'[archive]\nout_dir = "{tmp_path / "runs"}"\n'
                    f'[engine]\nname = "model"\noptions = {{ model = "{model}" }}\n')
    return path


# -- the hash ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["denoise", "denoise_v2", "sr2", "interp"])
def test_shipped_models_record_their_hash_and_match_it(name: str) -> None:
    path = resolve_model(name)
    opened = open_model_card(path)
    assert opened.verified and opened.sha256 == opened.card.weights_sha256
    assert json.loads(path.with_suffix(".json").read_text())["weights_sha256"] == opened.sha256
    assert network_sha256(onnx.load(str(path))) == opened.sha256
    assert name in shipped_models()


def test_the_hash_covers_the_network_not_the_card(tmp_path: Path) -> None:
    path = _copy("denoise_v2", tmp_path / "m.onnx")
    card = read_card(path)
    # Another card (version, evaluation) on the same network: the same hash, still verified.
    restamped = write_card_metadata(path, card.model_copy(update={"version": "9",
                                                                  "weights_sha256": "0" * 64}))
    assert restamped.weights_sha256 == card.weights_sha256 and restamped.version == "9"
    assert open_model_card(path).verified
    # Loading it leaves the proto as it was (the card is cleared only while hashing).
    proto = onnx.load(str(path))
    before = proto.SerializeToString(deterministic=True)
    network_sha256(proto)
    assert proto.SerializeToString(deterministic=True) == before


# -- engines ----------------------------------------------------------------------------------

def test_flipped_weight_bytes_are_refused_naming_the_file(tmp_path: Path) -> None:
    path = _tampered("denoise", tmp_path / "copy.onnx")
    recorded = read_card(path).weights_sha256
    assert recorded is not None
    with pytest.raises(ModelIntegrityError) as info:
        make_engine("model", model=str(path))
    message = str(info.value)
    assert str(path) in message and "does not match its model card" in message
    assert recorded[:16] in message and "--allow-unverified-model" in message
    assert "re-export" in message


def test_the_acceptance_recipe_is_refused_naming_the_file(tmp_path: Path) -> None:
    """64 bytes XOR-flipped at 2/3 of the file: refused, the file named (whichever check
    catches it: the hash, or the file no longer parsing)."""
    path = _copy("denoise", tmp_path / "flipped.onnx")
    data = bytearray(path.read_bytes())
    at = len(data) * 2 // 3
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(EngineError) as info:
        make_engine("model", model=str(path))
    assert str(path) in str(info.value)


def test_allow_unverified_loads_it_and_every_info_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _tampered("denoise", tmp_path / "copy.onnx")
    with caplog.at_level(logging.WARNING):
        engine = make_engine("model", model=str(path), runtime="onnxruntime",
                             allow_unverified=True)
    assert str(path) in caplog.text and "loaded anyway" in caplog.text
    assert engine.info.verified is False
    actual = network_sha256(onnx.load(str(path)))
    assert engine.info.model_sha256 == actual != read_card(path).weights_sha256
    engine.prepare((64, 64), np.dtype("uint16"), CAL)
    for frame in _frames():
        assert engine.process(frame).shape == (64, 64)
        assert engine.info.verified is False and engine.info.model_sha256 == actual
    engine.close()


def test_an_untampered_copy_is_verified_with_the_cards_hash(tmp_path: Path) -> None:
    path = _copy("denoise", tmp_path / "copy.onnx")
    engine = make_engine("model", model=str(path), runtime="onnxruntime")
    assert engine.info.verified is True
    assert engine.info.model_sha256 == read_card(path).weights_sha256
    engine.prepare((64, 64), np.dtype("uint16"), CAL)
    engine.process(_frames(1)[0])
    assert engine.info.verified is True
    assert engine.info.model_sha256 == read_card(path).weights_sha256
    engine.close()


def test_shipped_engines_report_their_hash() -> None:
    for name in ("denoise", "sr2"):
        engine = make_engine(name)
        assert engine.info.verified is True
        assert engine.info.model_sha256 == read_card(resolve_model(name)).weights_sha256
        engine.close()


def test_a_card_without_a_hash_is_refused_unless_allowed(tmp_path: Path) -> None:
    path = _copy("denoise_v2", tmp_path / "old.onnx")
    proto = onnx.load(str(path))
    card = read_card(path).model_copy(update={"weights_sha256": None})
    for entry in proto.metadata_props:
        if entry.key == CARD_KEY:
            entry.value = card.model_dump_json()
    onnx.save(proto, str(path))
    assert read_card(path).weights_sha256 is None
    with pytest.raises(ModelIntegrityError, match="records no weights SHA-256") as info:
        make_engine("model", model=str(path))
    assert str(path) in str(info.value)
    engine = make_engine("model", model=str(path), allow_unverified=True)
    assert engine.info.verified is False
    assert engine.info.model_sha256 == network_sha256(proto)
    engine.close()
    # `dimscope models --stamp` records the hash of the file as it is: verified from then on.
    assert main(["models", str(path)]) == 1
    assert main(["models", "--stamp", str(path)]) == 0
    assert main(["models", str(path)]) == 0
    assert make_engine("model", model=str(path)).info.verified is True
    assert read_card(path).model_copy(update={"weights_sha256": None}) == card
    assert main(["models", "--stamp", "denoise"]) == 2  # shipped models are not re-stamped


def test_hot_swap_checks_the_replacement_and_keeps_an_unverified_engine_unverified(
        tmp_path: Path) -> None:
    good = _copy("denoise", tmp_path / "good.onnx")
    bad = _tampered("denoise", tmp_path / "bad.onnx")
    # The same changed weights, stamped: a model of its own (as an adapted export would be).
    other = _tampered("denoise", tmp_path / "other.onnx")
    write_card_metadata(other, read_card(other).model_copy(update={"version": "3@adapted-1"}))
    engine = make_engine("model", model=str(good), runtime="onnxruntime")
    engine.prepare((64, 64), np.dtype("uint16"), CAL)
    with pytest.raises(ModelIntegrityError) as info:
        engine.load_replacement(bad)  # type: ignore[attr-defined]
    assert str(bad) in str(info.value)
    engine.swap_model(other)  # type: ignore[attr-defined]
    assert engine.info.verified is True
    assert engine.info.model_sha256 == read_card(other).weights_sha256
    assert engine.info.version.startswith("3@adapted-1+")
    engine.close()
    # An engine that started on an unverified model stays unverified after a swap.
    engine = make_engine("model", model=str(bad), runtime="onnxruntime", allow_unverified=True)
    engine.prepare((64, 64), np.dtype("uint16"), CAL)
    engine.swap_model(other)  # type: ignore[attr-defined]
    assert engine.info.verified is False
    assert engine.info.model_sha256 == read_card(other).weights_sha256
    engine.close()


# -- the interpolator ---------------------------------------------------------------------------

def test_the_interpolation_model_is_checked_likewise(tmp_path: Path) -> None:
    bad = _tampered("interp", tmp_path / "interp.onnx")
    with pytest.raises(ModelIntegrityError) as info:
        make_interpolator("model", model=str(bad))
    assert str(bad) in str(info.value)
    interp = make_interpolator("model", model=str(bad), runtime="onnxruntime",
                               allow_unverified=True)
    assert interp.info.verified is False
    interp.prepare((64, 64))
    a, b = _frames(2)
    assert interp.between(a, b, 0.5).shape == (64, 64)
    assert interp.info.verified is False
    assert interp.info.model_sha256 == network_sha256(onnx.load(str(bad)))
    interp.close()
    good = _copy("interp", tmp_path / "good.onnx")
    interp = make_interpolator("model", model=str(good), runtime="onnxruntime")
    interp.prepare((64, 64))
    assert interp.info.verified is True
    assert interp.info.model_sha256 == read_card(good).weights_sha256
    interp.close()


# -- the command line -------------------------------------------------------------------------

def test_check_config_refuses_a_tampered_model_with_exit_2(tmp_path: Path) -> None:
    bad = _tampered("denoise", tmp_path / "bad.onnx")
    config = _config(tmp_path, bad)
    check = _cli("check-config", str(config))
    assert check.returncode == 2, check.stderr
    assert str(bad) in check.stderr and "does not match its model card" in check.stderr
    assert "Traceback" not in check.stderr
    allowed = _cli("check-config", str(config), "--allow-unverified-model")
    assert allowed.returncode == 0, allowed.stderr
    assert "UNVERIFIED" in allowed.stdout and str(bad) in allowed.stderr


def test_check_config_checks_the_interpolation_model_too(tmp_path: Path) -> None:
    bad = _tampered("interp", tmp_path / "interp.onnx")
    config = tmp_path / "i.toml"
    config.write_text(f'[archive]\nout_dir = "{tmp_path / "runs"}"\n'
                      '[engine]\nname = "identity"\n'
                      f'[interpolate]\nfactor = 2\noptions = {{ model = "{bad}" }}\n')
    check = _cli("check-config", str(config))
    assert check.returncode == 2 and str(bad) in check.stderr, check.stderr
    assert _cli("check-config", str(config), "--allow-unverified-model").returncode == 0


def test_enhance_refuses_a_tampered_model_and_with_the_flag_says_so(tmp_path: Path) -> None:
    bad = _tampered("denoise_v2", tmp_path / "bad.onnx")
    stack = tmp_path / "in.tif"
    tifffile.imwrite(stack, np.stack(_frames(3, (32, 32))), photometric="minisblack")
    out = tmp_path / "out.tif"
    args = ["enhance", str(stack), str(out), "--engine", "model", "--model", str(bad),
            "--runtime", "onnxruntime", "--offset", "100", "--gain", "2", "-q"]
    assert main(args) == 2 and not out.exists()
    assert main([*args, "--allow-unverified-model"]) == 0
    provenance = json.loads(Path(str(out) + ".json").read_text())
    assert provenance["engine"]["verified"] is False
    assert provenance["engine"]["model_sha256"] == network_sha256(onnx.load(str(bad)))
    good = _copy("denoise_v2", tmp_path / "good.onnx")
    args[args.index(str(bad))] = str(good)
    assert main(args) == 0
    assert json.loads(Path(str(out) + ".json").read_text())["engine"]["verified"] is True


def test_training_and_adapting_from_a_tampered_model_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _tampered("denoise", tmp_path / "bad.onnx")
    assert main(["train", "denoise", "--init", str(bad), "--steps", "1",
                 "--out", str(tmp_path / "t.onnx"), "-q"]) == 2
    assert str(bad) in capsys.readouterr().err and not (tmp_path / "t.onnx").exists()
    stack = tmp_path / "movie.tif"
    tifffile.imwrite(stack, np.stack(_frames(16, (32, 32))))
    assert main(["adapt", str(stack), "--out", str(tmp_path / "a.onnx"), "--model", str(bad),
                 "--seconds", "1", "-q"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "takes no --allow-unverified-model" in err
