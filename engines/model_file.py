"""Model files: one ONNX file per model, with its model card inside and beside it.

The card (JSON) is stored in the ONNX file's metadata under `dimscope.card`
and written next to it as `NAME.json` for people to read. It records what the
runtimes need (architecture, hyper-parameters, scale, input multiple,
normalisation) and how the model was made (command, data, steps, metrics).
Shipped models live in `dimscope/engines/models/`; a model is named either by
a shipped name (`denoise`) or by a path to an `.onnx` file.

Integrity: the card records `weights_sha256`, the SHA-256 of the network — the
ONNX model with its metadata (the card itself) removed, serialised
deterministically: graph and every weight. `write_card_metadata` computes it, so
every export carries it; `open_model_card` recomputes it on load and refuses a
file whose network differs (or whose card records none) with `ModelIntegrityError`
naming the file, unless the caller allows unverified models
(`--allow-unverified-model`): then it warns and reports `verified=False`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .base import EngineError
from .normalize import PercentileNorm, VSTNorm, from_dict

SHIPPED_DIR = Path(__file__).resolve().parent / "models"
CARD_KEY = "dimscope.card"

log = logging.getLogger(__name__)


class ModelIntegrityError(EngineError):
    """A model file's network (graph + weights) does not match the SHA-256 its card
    records, or its card records none."""


class TransferProvenance(BaseModel):
    """What a cross-modality transfer model maps between and what it learned from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: e.g. "widefield" -> "confocal"
    low_modality: str
    high_modality: str
    low_pixel_um: float = Field(gt=0)
    high_pixel_um: float = Field(gt=0)
    #: registered pairs used (name, and the planes for stacks), from `pairs register` folders
    pairs: list[dict[str, Any]] = Field(default_factory=list)
    #: each pair's registration statistics (report.json of `dimscope pairs register`)
    registration: list[dict[str, Any]] = Field(default_factory=list)
    #: simulated pairs mixed in (structure classes, PSFs, photon range), empty if none
    simulated: dict[str, Any] = Field(default_factory=dict)
    #: the Gaussian blur (sigma, in output pixels) that, with binning by `scale` and an
    #: affine intensity fit, maps a HIGH image onto its LOW image: fitted to the training
    #: pairs, used by the trust check as the forward model
    forward_psf_sigma_px: float = Field(0.0, ge=0)
    loss: str = "l1+ssim"
    #: an adversarial or perceptual loss sharpens by inventing detail: always stated
    adversarial_loss: bool = False


class DeconvolutionGuide(BaseModel):
    """A guided transfer model's base: Richardson–Lucy of its classical estimate, one more
    input channel, the one the network's residual is added to (`ModelCard.deconvolution`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["richardson_lucy"] = "richardson_lucy"
    #: the Gaussian PSF's sigma in input pixels
    psf_sigma_px: float = Field(gt=0)
    iterations: int = Field(ge=1, le=1000)
    #: subtracted before deconvolving (percentile of the estimate), added back after
    background_percentile: float = Field(1.0, ge=0, le=50)


class DenseProvenance(BaseModel):
    """What a sparse-to-dense (localization microscopy) model takes and learned from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: the render grid and input widths (`smlm.dense.DenseGrid.as_dict`)
    grid: dict[str, Any]
    #: structure classes and real density maps trained on; held out ones are not listed
    structures: list[str] = Field(default_factory=list)
    #: frames of a full (target) acquisition, and the range of input fractions of it
    frames_full: int = Field(1, ge=1)
    fractions: tuple[float, float] = (0.005, 0.15)
    #: the widefield channel in training: a widefield frame, the raw-frame mean, or both
    widefield: str = "frame or raw mean"
    loss: str = "l1+ssim"
    #: an adversarial loss sharpens by inventing detail: always stated
    adversarial_loss: bool = False
    #: ANNA-PALM's patent (smlm.dense.PATENT_NOTICE)
    notice: str = ""
    #: (localizations per µm², Gaussian σ in render pixels) by density: the smoothing of the
    #: output calibrated on the training fields (`smlm.dense.output_smoothing_px`); empty: none
    output_smoothing: list[tuple[float, float]] = Field(default_factory=list)

    @field_validator("output_smoothing")
    @classmethod
    def _increasing_density(cls, rows: list[tuple[float, float]]
                            ) -> list[tuple[float, float]]:
        densities = [d for d, _ in rows]
        if any(d <= 0 for d in densities) or densities != sorted(set(densities)):
            raise ValueError("output_smoothing: densities must be > 0 and increasing")
        if any(blur < 0 for _, blur in rows):
            raise ValueError("output_smoothing: blurs must be >= 0")
        return rows


class ModelCard(BaseModel):
    """What a model is and how it was made (frozen; round-trips through JSON)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    task: Literal["denoise", "sr2", "interp", "transfer", "dense"]
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
    #: SHA-256 (hex) of the network: the ONNX model without its metadata (this card),
    #: serialised deterministically, so graph and weights (`network_sha256`); written by
    #: `write_card_metadata`, None in cards written before dimscope recorded it
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    #: transfer models: the two modalities, the pairs and the forward model (None otherwise)
    transfer: TransferProvenance | None = None
    #: guided (offline quality) models: the classical estimate the network refines, one
    #: more input channel (BM3D+VST of the newest frame, or BM4D+VST over the window)
    guide: Literal["bm3d", "bm4d"] | None = None
    #: guided transfer models: the estimate deconvolved (Richardson–Lucy), the base the
    #: network refines (None: the network refines the estimate itself)
    deconvolution: DeconvolutionGuide | None = None
    #: sparse-to-dense models (localization microscopy): grid, data, loss (None otherwise)
    dense: DenseProvenance | None = None

    def norm(self) -> PercentileNorm | VSTNorm:
        return from_dict(self.normalization)

    @property
    def channels(self) -> int:
        """Channels of the (first) model input: the window, the guide and its deconvolution
        if any, plus the noise map with VST; a dense model's two: widefield and sparse
        render."""
        if self.task == "dense":
            return 2
        return (self.window + int(self.guide is not None) + int(self.deconvolution is not None)
                + int(self.normalization.get("kind") == "vst"))


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


def _load_proto(path: Path) -> Any:
    """The ONNX model in `path` (no external data); EngineError naming the file if unusable."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise EngineError(f"model file not found: {path}") from None
    except Exception as exc:  # protobuf raises several types for a damaged file
        raise EngineError(f"model file {path} is not a valid ONNX model "
                          f"({type(exc).__name__}: {exc})") from None


def _card_of(path: Path, proto: Any) -> ModelCard:
    meta = {p.key: p.value for p in proto.metadata_props}
    if CARD_KEY not in meta:
        raise EngineError(f"model file {path} has no dimscope model card "
                          f"(metadata key {CARD_KEY!r}); export it with `dimscope train`")
    try:
        return ModelCard.model_validate_json(meta[CARD_KEY])
    except ValidationError as exc:
        raise EngineError(f"model file {path}: invalid model card: {exc}") from None


def read_card(path: Path) -> ModelCard:
    """The card inside an ONNX model file; EngineError naming the file if it is unusable.
    Does not check the weights against the card: loading a model for use goes through
    `open_model_card`."""
    return _card_of(path, _load_proto(path))


def network_sha256(proto: Any) -> str:
    """SHA-256 (hex) of a loaded ONNX model's network: the model with its `metadata_props`
    (where the card lives) cleared, serialised deterministically — graph and initializers,
    not the card. `proto` is left as it was."""
    saved = [(p.key, p.value) for p in proto.metadata_props]
    del proto.metadata_props[:]
    try:
        data = proto.SerializeToString(deterministic=True)
    finally:
        for key, value in saved:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
    return hashlib.sha256(data).hexdigest()


class OpenedModel(NamedTuple):
    """A model file's card, checked against the file (see `open_model_card`)."""

    card: ModelCard
    #: SHA-256 of the network actually in the file (equal to the card's when verified)
    sha256: str
    #: False only when the network does not match the card (or the card records no hash)
    #: and the caller allowed it
    verified: bool
    #: `file_digest` of the file (model versions in headers, runtime caches)
    digest: str


#: how to get past a ModelIntegrityError, appended to its message
INTEGRITY_REMEDY = (
    "re-export it (`dimscope train`), or, if you trust the file as it is, record its hash "
    "(`dimscope models --stamp FILE`), or load it anyway with --allow-unverified-model "
    "(option `allow_unverified = true`; every frame it makes then says verified: false)")


def integrity_problem(path: Path, card: ModelCard, sha256: str) -> str | None:
    """Why the network hashing to `sha256` does not match `card`, or None if it does."""
    if card.weights_sha256 is None:
        return (f"model file {path}: its model card records no weights SHA-256 (it was "
                f"written before dimscope recorded one), so its weights cannot be verified")
    if card.weights_sha256 != sha256:
        return (f"model file {path} does not match its model card: the card records weights "
                f"SHA-256 {card.weights_sha256[:16]}…, the file's network (graph and "
                f"weights) hashes to {sha256[:16]}…, so it was changed or damaged after "
                f"export")
    return None


def inspect_model(path: Path) -> tuple[OpenedModel, str | None]:
    """A model file's card and network hash (one read of the file), and why the network does
    not match the card (None if it does). EngineError if the file is missing or unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EngineError(f"model file not found: {path}") from None
    except OSError as exc:
        raise EngineError(f"model file {path} cannot be read: {exc.strerror or exc}"
                          ) from None
    import onnx

    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises several types for a damaged file
        raise EngineError(f"model file {path} is not a valid ONNX model "
                          f"({type(exc).__name__}: {exc})") from None
    card = _card_of(path, proto)
    sha256 = network_sha256(proto)
    problem = integrity_problem(path, card, sha256)
    return (OpenedModel(card, sha256, problem is None, hashlib.sha256(data).hexdigest()[:12]),
            problem)


def open_model_card(path: Path, allow_unverified: bool = False) -> OpenedModel:
    """The card of a model file to be used, with the network checked against it (one read
    of the file). ModelIntegrityError naming the file and the hashes if they differ or the
    card records none — unless `allow_unverified`: then a warning, and `verified` False."""
    opened, problem = inspect_model(path)
    if problem is not None:
        if not allow_unverified:
            raise ModelIntegrityError(f"{problem}; refusing to load it: {INTEGRITY_REMEDY}")
        log.warning("%s; loaded anyway (--allow-unverified-model): every frame it makes says "
                    "verified: false", problem)
    return opened


def write_card_metadata(onnx_path: Path, card: ModelCard) -> ModelCard:
    """Store the card in the ONNX file (one file, no external data) and beside it as JSON,
    with `weights_sha256` set to the file's network (whatever `card` said); returns the
    card as stored."""
    import onnx

    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]
    proto.producer_name = "dimscope"
    card = card.model_copy(update={"weights_sha256": network_sha256(proto)})
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, card.model_dump_json()
    onnx.checker.check_model(proto)
    onnx.save(proto, str(onnx_path), save_as_external_data=False)
    onnx_path.with_suffix(".json").write_text(json.dumps(card.model_dump(), indent=2) + "\n")
    return card


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
