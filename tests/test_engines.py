"""Models, runtimes, tiling, training and model-file errors: real ONNX files, real runtimes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dimscope.drivers.camera_noise import CameraNoise
from dimscope.drivers.specimen import Specimen
from dimscope.engines import CameraCalibration, EngineError, make_engine
from dimscope.engines.evaluation.quality import score
from dimscope.engines.model_engine import ModelEngine
from dimscope.engines.model_file import (
    ModelCard,
    read_card,
    shipped_models,
    write_card_metadata,
)
from dimscope.engines.nets import build_network, multiple_of
from dimscope.engines.runtime import open_runtime
from dimscope.engines.runtime.plan_cache import load_plan, plan_key, store_plan
from dimscope.engines.runtime.pytorch import network_from_file
from dimscope.engines.tiling import input_shape, run_tiled, tile_geometry
from dimscope.engines.training.crappify import PhysicalCrappifier, PSSRCrappifier
from dimscope.engines.training.export import export_onnx


def _export_fresh(path: Path, scale: int = 1, channels: int = 8, levels: int = 2,
                  seed: int = 0) -> Path:
    torch.manual_seed(seed)
    hp = {"scale": scale, "channels": channels, "levels": levels}
    net = build_network("restore", **hp)
    card = ModelCard(name="fresh", task="sr2" if scale == 2 else "denoise", arch="restore",
                     hparams=hp, scale=scale, multiple=multiple_of("restore", hp))
    return export_onnx(net, card, path)


@pytest.fixture(scope="module")
def fresh_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export_fresh(tmp_path_factory.mktemp("models") / "fresh.onnx")


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("scale", [1, 2])
def test_exported_fresh_network_matches_torch_on_cpu_runtimes(tmp_path: Path, runtime: str,
                                                              scale: int) -> None:
    path = _export_fresh(tmp_path / "m.onnx", scale=scale, seed=scale)
    card = read_card(path)
    x = np.random.default_rng(1).random((1, 1, 64, 96), dtype=np.float32)
    rt = open_runtime(runtime, path, card, "fp32")
    rt.compile(x.shape)  # type: ignore[arg-type]
    got = rt.run(x)
    torch.manual_seed(scale)
    net = build_network("restore", **card.hparams).eval()
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert got.shape == (1, 1, 64 * scale, 96 * scale)
    assert np.abs(got - want).max() < 1e-4


def test_torch_runtime_rebuilds_the_network_from_the_onnx_file(fresh_model: Path) -> None:
    # The CUDA runtime builds its network this way; here it is checked on the CPU.
    card = read_card(fresh_model)
    net = network_from_file(fresh_model, card)
    x = np.random.default_rng(2).random((1, 1, 32, 48), dtype=np.float32)
    ort = open_runtime("onnxruntime", fresh_model, card)
    ort.compile(x.shape)  # type: ignore[arg-type]
    with torch.no_grad():
        rebuilt = net(torch.from_numpy(x)).numpy()
    assert np.abs(rebuilt - ort.run(x)).max() < 1e-4


def test_auto_runtime_on_a_machine_without_gpu_says_why(fresh_model: Path) -> None:
    if Path("/dev/nvidiactl").exists():
        pytest.skip("a GPU is present; auto picks a GPU runtime")
    rt = open_runtime("auto", fresh_model, read_card(fresh_model))
    assert rt.name == "openvino"
    assert "no NVIDIA GPU" in rt.fallback_note


def test_reduced_precision_is_reported_and_close_to_fp32(fresh_model: Path) -> None:
    card = read_card(fresh_model)
    x = np.random.default_rng(3).random((1, 1, 64, 64), dtype=np.float32)
    outs = {}
    for precision in ("fp32", "bf16"):
        rt = open_runtime("openvino", fresh_model, card, precision)
        rt.compile(x.shape)  # type: ignore[arg-type]
        outs[precision] = (rt.precision, rt.run(x))
    assert outs["fp32"][0] == "fp32"
    # bf16 is used only where the CPU has it; the runtime reports what it actually used.
    assert outs["bf16"][0] in ("bf16", "fp32")
    tol = 2e-2 if outs["bf16"][0] == "bf16" else 1e-5
    assert np.abs(outs["bf16"][1] - outs["fp32"][1]).max() < tol


def test_openvino_precision_is_read_from_its_type_objects() -> None:
    """OpenVINO reports precision as `ov.Type` (`<Type: 'bfloat16'>`), older releases as text."""
    import openvino as ov

    from dimscope.engines.runtime.openvino_cpu import precision_name

    assert precision_name(ov.Type.bf16) == "bf16"
    assert precision_name("<Type: 'bfloat16'>") == "bf16"
    assert precision_name("bf16") == "bf16"
    assert precision_name(ov.Type.f16) == "fp16"
    assert precision_name(ov.Type.f32) == "fp32"
    assert precision_name("f32") == "fp32"


def test_tiling_matches_untiled_away_from_borders(fresh_model: Path) -> None:
    card = read_card(fresh_model)
    rt = open_runtime("onnxruntime", fresh_model, card)
    image = np.random.default_rng(4).random((150, 170), dtype=np.float32)
    side = input_shape(150, 170, 64, card.multiple, 16)
    assert side == tile_geometry(150, 170, 64, 16, card.multiple)[0:1] * 2
    rt.compile((1, 1, *side))
    whole = run_tiled(image, rt.run, tile=512, halo=16, scale=1, multiple=card.multiple)
    tiled = run_tiled(image, rt.run, tile=64, halo=16, scale=1, multiple=card.multiple)
    assert whole.shape == tiled.shape == image.shape
    inner = (slice(16, -16), slice(16, -16))
    assert np.abs(whole[inner] - tiled[inner]).max() < 1e-3
    # ...and the tiles are really used: a 64-pixel tile cannot hold the frame.
    assert np.abs(whole - tiled).max() > 0


def test_balanced_tiles_waste_little_work() -> None:
    assert tile_geometry(2048, 2048, 1024, 32, 16) == (752, 688)
    assert input_shape(512, 512, 1024, 16, 32) == (512, 512)
    assert input_shape(500, 300, 1024, 16, 32) == (512, 304)


def test_sr2_tiling_output_is_twice_the_size(tmp_path: Path) -> None:
    path = _export_fresh(tmp_path / "sr.onnx", scale=2)
    card = read_card(path)
    rt = open_runtime("openvino", path, card)
    rt.compile((1, 1, *input_shape(100, 90, 64, card.multiple, 16)))
    image = np.random.default_rng(5).random((100, 90), dtype=np.float32)
    out = run_tiled(image, rt.run, tile=64, halo=16, scale=2, multiple=card.multiple)
    assert out.shape == (200, 180)


def _held_out_frame(photons: float, scale: int = 1, seed: int = 99
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A simulated frame the models never saw (seed), its noise, and its noiseless truth."""
    spec = Specimen(128, 128, seed=seed, n_tubules=40, n_puncta=20)
    state = spec.state_at(3.0, 1.0)
    truth = spec.render(state, scale) * np.float32(photons / scale**2)
    coarse = spec.render(state, 1) * np.float32(photons)
    raw = CameraNoise(seed=seed).expose(coarse, read_noise_e=1.6, gain_adu_per_e=2.0,
                                        offset_adu=100.0, bit_depth=16)
    return raw, truth


@pytest.mark.parametrize("name", ["denoise", "sr2"])
def test_shipped_models_load_and_improve_psnr_on_a_held_out_simulated_frame(name: str) -> None:
    assert name in shipped_models()
    engine = make_engine(name)
    raw, truth = _held_out_frame(photons=10.0, scale=engine.scale)
    engine.prepare(raw.shape, raw.dtype, CameraCalibration(2.0, 100.0, 1.6))
    out = engine.process(raw)
    assert out.shape == truth.shape and out.dtype == np.float32
    baseline = raw.astype(np.float32) if engine.scale == 1 else np.kron(
        raw.astype(np.float32), np.ones((2, 2), np.float32))
    gain = score(truth, out, with_ssim=False)["psnr"] - score(truth, baseline,
                                                              with_ssim=False)["psnr"]
    assert gain > 3.0, f"{name}: PSNR gain over raw only {gain:.2f} dB"
    card = read_card(engine.path)  # type: ignore[attr-defined]
    assert card.training["steps"] > 0 and card.training["command"].startswith("dimscope train")
    assert json.loads(engine.path.with_suffix(".json").read_text())["name"] == name  # type: ignore[attr-defined]


def test_missing_and_corrupt_model_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="model file not found"):
        make_engine("model", model=str(tmp_path / "nope.onnx"))
    with pytest.raises(EngineError, match="unknown model 'nosuchmodel'"):
        make_engine("model", model="nosuchmodel")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage-that-is-not-protobuf" * 10)
    with pytest.raises(EngineError, match=r"bad\.onnx is not a valid ONNX model"):
        make_engine("model", model=str(bad))


def test_model_with_fixed_input_shape_that_cannot_fit_the_camera(tmp_path: Path) -> None:
    import onnx

    path = _export_fresh(tmp_path / "fixed.onnx")
    proto = onnx.load(str(path))
    for dim, value in zip(proto.graph.input[0].type.tensor_type.shape.dim[2:], (64, 64),
                          strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = value
    onnx.save(proto, str(path))
    write_card_metadata(path, read_card(path))  # the changed graph gets its own hash
    engine = make_engine("model", model=str(path), runtime="onnxruntime")
    with pytest.raises(EngineError, match=r"fixed 64x64 inputs, but camera frames of 96x128"):
        engine.prepare((96, 128), np.dtype("uint16"), CameraCalibration())


def test_model_card_round_trips_through_json() -> None:
    card = ModelCard(name="x", task="sr2", arch="restore", hparams={"scale": 2}, scale=2,
                     multiple=16, training={"steps": 3})
    assert ModelCard.model_validate_json(card.model_dump_json()) == card
    with pytest.raises(Exception, match="frozen"):
        card.name = "y"  # type: ignore[misc]


def test_physical_crappifier_noise_matches_the_camera_model() -> None:
    crap = PhysicalCrappifier(photons=(50.0, 50.0), read_noise_e=(2.0, 2.0),
                              gain_adu_per_e=(3.0, 3.0), offset_adu=(100.0, 100.0),
                              background=(0.0, 0.0))
    clean = np.full((256, 256), 0.5, dtype=np.float32)
    low, target = crap(clean, np.random.default_rng(0))
    # mean 25 e- -> 175 ADU; variance (25 + 2²) e² x 3² = 261 ADU² (+1/12 rounding)
    assert abs(float(target.mean()) - 175.0) < 1e-3
    assert abs(float(low.mean()) - 175.0) < 0.5
    assert 261 * 0.9 < float(low.var()) < 261 * 1.1
    down = PhysicalCrappifier(downsample=2)(clean, np.random.default_rng(1))
    assert down[0].shape == (128, 128) and down[1].shape == (256, 256)


def test_pssr_crappifier_adds_salt_pepper_and_downsamples() -> None:
    crap = PSSRCrappifier(salt_pepper=(0.01, 0.01), local_var_scale=(0.01, 0.01), downsample=2)
    clean = np.full((128, 128), 0.3, dtype=np.float32)
    low, target = crap(clean, np.random.default_rng(0))
    assert low.shape == (64, 64) and target.shape == (128, 128)
    assert float(low.std()) > 0.01
    assert np.allclose(target, 0.3)


def test_plan_cache_key_covers_everything_and_writes_atomically(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIMSCOPE_CACHE", str(tmp_path))
    base = ("abc", "H100", "10.9", (1, 1, 512, 512), "fp16")
    keys = {plan_key(*base)}
    for i, other in enumerate(("abd", "H200", "10.10", (1, 1, 1024, 1024), "fp32")):
        changed = list(base)
        changed[i] = other
        keys.add(plan_key(*changed))  # type: ignore[arg-type]
    assert len(keys) == 6
    key = plan_key(*base)
    assert load_plan(key) is None
    store_plan(key, b"plan-bytes")
    assert load_plan(key) == b"plan-bytes"
    assert not list(tmp_path.rglob("*.tmp"))


def test_engine_options_are_validated() -> None:
    with pytest.raises(EngineError, match="unknown runtime 'quantum'"):
        make_engine("denoise", runtime="quantum")
    with pytest.raises(EngineError, match="unknown"):
        make_engine("denoise", colour="blue")
    with pytest.raises(EngineError, match="multiples of 16"):
        make_engine("denoise", tile=100)
    engine = ModelEngine(model="denoise", runtime="onnxruntime")
    with pytest.raises(EngineError, match="2-D grey frames"):
        engine.prepare((3, 64, 64), np.dtype("uint8"), CameraCalibration())
