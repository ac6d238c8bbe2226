"""dimscope.engines — enhancement methods behind one protocol (`Engine`).

A new engine is one module with a class taking its options as keyword
arguments, registered below by name.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import CameraCalibration, Engine, EngineError, EngineInfo

__all__ = ["CameraCalibration", "Engine", "EngineError", "EngineInfo", "available_engines",
           "is_model_engine", "make_engine", "register_engine"]

_ENGINES: dict[str, tuple[str, dict[str, Any]]] = {
    "identity": ("dimscope.engines.identity:IdentityEngine", {}),
    "vst_gaussian": ("dimscope.engines.vst_gaussian:VSTGaussianEngine", {}),
    # Classical references (slow; the `eval` extra): BM3D+VST, BM4D+VST on a causal window.
    "bm3d": ("dimscope.engines.bm3d_engine:BM3DEngine", {"window": 1}),
    "bm4d": ("dimscope.engines.bm3d_engine:BM3DEngine", {"window": 5}),
    # Trained models: same engine, different shipped model file (option `model`).
    "denoise": ("dimscope.engines.model_engine:ModelEngine", {"model": "denoise"}),
    "sr2": ("dimscope.engines.model_engine:ModelEngine", {"model": "sr2"}),
    # The offline quality model (seconds per frame: `enhance`, evaluation): a network
    # refining BM3D+VST of each frame, averaged over rotations/flips; for time-lapses the
    # same network refines BM4D+VST over the causal window of the last 5 frames.
    "denoise_hq": ("dimscope.engines.model_engine:ModelEngine",
                   {"model": "denoise_hq", "ensemble": True}),
    "denoise_hq_t5": ("dimscope.engines.model_engine:ModelEngine",
                      {"model": "denoise_hq", "ensemble": True, "guide_window": 5}),
    # The offline quality ×2 super-resolver: a network refining BM3D+VST of each frame at
    # the camera's sampling, upsampled (averaged over rotations/flips).
    "sr2_hq": ("dimscope.engines.model_engine:ModelEngine",
               {"model": "sr2_hq", "ensemble": True}),
    # Cross-modality transfer (widefield -> confocal-like by default; options.model names
    # one trained with `dimscope train transfer`).
    "transfer": ("dimscope.engines.model_engine:ModelEngine", {"model": "transfer"}),
    # The offline quality transfer model: a network refining BM3D+VST deconvolved by
    # Richardson–Lucy (averaged over rotations/flips; seconds per frame).
    "transfer_hq": ("dimscope.engines.model_engine:ModelEngine",
                    {"model": "transfer_hq", "ensemble": True}),
    "model": ("dimscope.engines.model_engine:ModelEngine", {}),
}


def register_engine(name: str, target: str, defaults: dict[str, Any] | None = None) -> None:
    """Add an engine from outside this package (a plugin): `target` is "module:Class"."""
    if ":" not in target:
        raise ValueError(f"engine target must be 'module:Class', got {target!r}")
    _ENGINES[name] = (target, dict(defaults or {}))


def unregister_engine(name: str) -> None:
    _ENGINES.pop(name, None)


def available_engines() -> list[str]:
    return list(_ENGINES)


def is_model_engine(name: str) -> bool:
    """Whether engine `name` runs a model file (`ModelEngine`, with its options)."""
    return name in _ENGINES and _ENGINES[name][0].endswith(":ModelEngine")


def make_engine(name: str, **options: Any) -> Engine:
    """Construct an engine by name; unknown names and bad options raise `EngineError`."""
    if name not in _ENGINES:
        raise EngineError(f"unknown engine {name!r}; available: {', '.join(sorted(_ENGINES))}")
    target, defaults = _ENGINES[name]
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    try:
        engine: Engine = cls(**{**defaults, **options})
    except TypeError as exc:
        raise EngineError(str(exc)) from None
    return engine
