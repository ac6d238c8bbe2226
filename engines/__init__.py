"""dimscope.engines — enhancement methods behind one protocol (`Engine`).

A new engine is one module with a class taking its options as keyword
arguments, registered below by name.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import CameraCalibration, Engine, EngineError, EngineInfo

__all__ = ["CameraCalibration", "Engine", "EngineError", "EngineInfo", "available_engines",
           "make_engine"]

_ENGINES = {
    "identity": "dimscope.engines.identity:IdentityEngine",
    "vst_gaussian": "dimscope.engines.vst_gaussian:VSTGaussianEngine",
}


def available_engines() -> list[str]:
    return list(_ENGINES)


def make_engine(name: str, **options: Any) -> Engine:
    """Construct an engine by name; unknown names and bad options raise `EngineError`."""
    if name not in _ENGINES:
        raise EngineError(f"unknown engine {name!r}; available: {', '.join(sorted(_ENGINES))}")
    module_name, _, cls_name = _ENGINES[name].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    try:
        engine: Engine = cls(**options)
    except TypeError as exc:
        raise EngineError(str(exc)) from None
    return engine
