"""Model files: one ONNX file per model, with its model card inside and beside it.

The card (JSON) is stored in the ONNX file's metadata under `dimscope.card`
and written next to it as `NAME.json` for people to read. It records what the
runtimes need (architecture, hyper-parameters, scale, input multiple,
normalisation) and how the model was made (command, data, steps, metrics).
Shipped models live in `dimscope/engines/models/`; a model is named either by
a shipped name (`denoise`) or by a path to an `.onnx` file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .base import EngineError
from .normalize import PercentileNorm, VSTNorm, from_dict

SHIPPED_DIR = Path(__file__).resolve().parent / "models"
CARD_KEY = "dimscope.card"


class ModelCard(BaseModel):
    """What a model is and how it was made (frozen; round-trips through JSON)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    task: Literal["denoise", "sr2", "interp"]
    version: str = "1"
    arch: str
    hparams: dict[str, Any] = Field(default_factory=dict)
    scale: int = Field(1, ge=1, le=4)
    multiple: int = Field(1, ge=1, description="input height/width must be multiples of this")
    inputs: int = Field(1, ge=1, le=2, description="frames in (2 for interpolation)")
    window: int = Field(1, ge=1, le=16, description="frames of causal temporal context, "
                        "oldest first, stacked as channels of the one input")
    normalization: dict[str, Any] = Field(default_factory=lambda: PercentileNorm().as_dict())
    opset: int = 17
    training: dict[str, Any] = Field(default_factory=dict)
    #: how well it does on data it never saw (e.g. the leave-one-fold-out table of
    #: bench/generalization.py for the same recipe), copied in after training
    evaluation: dict[str, Any] = Field(default_factory=dict)

    def norm(self) -> PercentileNorm | VSTNorm:
        return from_dict(self.normalization)

    @property
    def channels(self) -> int:
        """Channels of the (first) model input: the window, plus the noise map with VST."""
        return self.window + int(self.normalization.get("kind") == "vst")


def shipped_models() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.onnx"))


def resolve_model(name_or_path: str | Path) -> Path:
    """A shipped model name or a path to an `.onnx` file -> the file; EngineError if absent."""
    text = str(name_or_path)
    if text in shipped_models():
        return SHIPPED_DIR / f"{text}.onnx"
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.suffix == ".onnx" or "/" in text:
        raise EngineError(f"model file not found: {path}")
    raise EngineError(f"unknown model {text!r}: not a shipped model "
                      f"({', '.join(shipped_models()) or 'none'}) and not an existing file")


def file_digest(path: Path) -> str:
    """First 12 hex digits of the file's SHA-256: the model's identity in headers and caches."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def read_card(path: Path) -> ModelCard:
    """The card inside an ONNX model file; EngineError naming the file if it is unusable."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise EngineError(f"model file not found: {path}") from None
    except Exception as exc:  # protobuf raises several types for a damaged file
        raise EngineError(f"model file {path} is not a valid ONNX model "
                          f"({type(exc).__name__}: {exc})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if CARD_KEY not in meta:
        raise EngineError(f"model file {path} has no dimscope model card "
                          f"(metadata key {CARD_KEY!r}); export it with `dimscope train`")
    try:
        return ModelCard.model_validate_json(meta[CARD_KEY])
    except ValidationError as exc:
        raise EngineError(f"model file {path}: invalid model card: {exc}") from None


def write_card_metadata(onnx_path: Path, card: ModelCard) -> None:
    """Store the card in the ONNX file (one file, no external data) and beside it as JSON."""
    import onnx

    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, card.model_dump_json()
    proto.producer_name = "dimscope"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(onnx_path), save_as_external_data=False)
    onnx_path.with_suffix(".json").write_text(json.dumps(card.model_dump(), indent=2) + "\n")


def onnx_weights(path: Path) -> dict[str, Any]:
    """The file's initializers as numpy arrays, by name (to rebuild the torch network)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def model_inputs(path: Path, frame_shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each model input for frames of `frame_shape` (N, C, H, W).

    Frame inputs take the frame shape; an input whose dimensions are all fixed
    at 1 (the interpolation time `t`) keeps them. In the file's input order, so
    a runtime can allocate and bind one buffer per input whatever the model.
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    inputs: list[tuple[str, tuple[int, ...]]] = []
    for inp in proto.graph.input:
        if inp.name in initializers:
            continue
        dims = [int(d.dim_value) if d.HasField("dim_value") else 0
                for d in inp.type.tensor_type.shape.dim]
        scalar = bool(dims) and all(d == 1 for d in dims)
        inputs.append((inp.name, tuple(dims) if scalar else tuple(frame_shape)))
    return inputs


def input_shapes(path: Path, frame_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes of `model_inputs`, in order."""
    return [shape for _, shape in model_inputs(path, frame_shape)]
