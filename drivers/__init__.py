"""dimscope.drivers — frame sources behind one protocol (`FrameSource`).

A new source is one module exposing a class constructed from its config
model, registered below by its config `kind`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .base import FrameSource, SourceError, release_core

if TYPE_CHECKING:
    from .config import SourceConfig

__all__ = ["FrameSource", "SourceError", "make_source", "release_core"]

_SOURCES = {
    "sim": "dimscope.drivers.sim:SimSource",
    "mm": "dimscope.drivers.mm:MMSource",
    "replay": "dimscope.drivers.replay:ReplaySource",
    "smlm_sim": "dimscope.drivers.smlm_sim:SMLMSimSource",
}


def make_source(cfg: SourceConfig) -> FrameSource:
    """Construct (not open) the source a config describes."""
    module_name, _, cls_name = _SOURCES[cfg.kind].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    source: FrameSource = cls(cfg)
    return source
