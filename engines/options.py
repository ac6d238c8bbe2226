"""Each engine's options as a typed model (one per engine, CAREamics-style).

A config's `engine.options` (and a tier's, or a `[[stages]]` engine's) is
validated against the model of the engine it names, so a misspelt or
mistyped option is a config error naming the key — not a TypeError at start.
Camera calibration is not an engine option: it lives in `[camera]`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Runtime = Literal["auto", "cpu", "openvino", "onnxruntime", "torch", "cuda", "tensorrt"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class EngineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IdentityOptions(EngineOptions):
    """`identity` takes no options."""


class VSTGaussianOptions(EngineOptions):
    sigma: float = Field(1.5, gt=0, description="Gaussian sigma (pixels) in the VST domain")


class BM3DOptions(EngineOptions):
    """`bm3d` (one frame) takes no options; the noise model comes from `[camera]` or the data."""


class BM4DOptions(EngineOptions):
    """`bm4d`: the causal window (frames, the newest last) filtered as one volume."""

    window: int = Field(5, ge=2, le=16, description="frames of causal temporal context")


class ModelOptions(EngineOptions):
    """`denoise`, `sr2`, `transfer`, `model`: a trained model file run by a runtime."""

    model: str | None = Field(None, description="shipped model name or .onnx path")
    runtime: Runtime = "auto"
    precision: Precision = "auto"
    tile: int = Field(2048, ge=64, description="frames larger than this run in tiles")
    halo: int = Field(32, ge=0, description="pixels of context around each tile")
    allow_unverified: bool = Field(
        False, description="load the model even when its weights do not match the SHA-256 "
        "its card records (every frame then says verified: false); --allow-unverified-model")
    ensemble: bool = Field(
        False, description="average the network over rotations/flips of its input (8x its "
        "time; on by default for the offline quality model denoise_hq)")
    guide_window: int | None = Field(
        None, ge=1, le=16, description="guided models: the classical guide sees this many "
        "frames (BM4D over the causal window); denoise_hq_t5 sets 5")


class InterpolatorOptions(EngineOptions):
    """`interpolate.method = "model"`: the interpolation model and its runtime."""

    model: str = "interp"
    runtime: Runtime = "auto"
    precision: Precision = "auto"
    allow_unverified: bool = Field(
        False, description="load the model even when its weights do not match its card")


class FlowInterpolatorOptions(EngineOptions):
    """`interpolate.method = "flow"`: classical optical flow (OpenCV DIS), no model file."""

    preset: Literal["ultrafast", "fast", "medium"] = Field(
        "fast", description="DIS speed/accuracy preset (512², one core here: about 1.5 / 3 / "
        "15 ms per flow direction)")
    presmooth: float = Field(
        1.0, ge=0, le=10, description="Gaussian sigma (pixels) applied to the copies the flow "
        "is estimated on, not to the output; 0 = off (at low light noise dominates flow error)")
    tau: float = Field(
        1.0, gt=0, description="forward-backward flow disagreement (pixels) at which a source "
        "frame's weight falls to 1/e (occlusions)")


#: engine name -> its options model (plugins registered without one take any options)
ENGINE_OPTIONS: dict[str, type[EngineOptions]] = {
    "identity": IdentityOptions,
    "vst_gaussian": VSTGaussianOptions,
    "bm3d": BM3DOptions,
    "bm4d": BM4DOptions,
    "denoise": ModelOptions,
    "sr2": ModelOptions,
    "transfer": ModelOptions,
    "denoise_hq": ModelOptions,
    "denoise_hq_t5": ModelOptions,
    "sr2_hq": ModelOptions,
    "transfer_hq": ModelOptions,
    "model": ModelOptions,
}

_CALIBRATION_KEYS = ("gain_adu_per_e", "offset_adu", "read_noise_e")


def option_problems(exc: ValidationError, prefix: str = "") -> str:
    """Each problem of an options model's validation: where (the key) and what."""
    return "; ".join(
        (f"{prefix}{'.'.join(str(p) for p in e['loc'])}" if e["loc"] else "options") + ": "
        + ("unknown option" if e["type"] == "extra_forbidden" else e["msg"])
        for e in exc.errors())


def validate_options(engine: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options, checked against the engine's model; ValueError names each problem."""
    moved = [k for k in _CALIBRATION_KEYS if k in options]
    if moved:
        raise ValueError(f"{', '.join(moved)}: camera calibration is not an engine option; "
                         "set it in [camera]")
    model = ENGINE_OPTIONS.get(engine)
    if model is None:
        return dict(options)
    try:
        return model.model_validate(options).model_dump(exclude_unset=True)
    except ValidationError as exc:
        raise ValueError(f"engine {engine!r} options: {option_problems(exc)} (allowed: "
                         f"{', '.join(model.model_fields) or 'none'})") from None
