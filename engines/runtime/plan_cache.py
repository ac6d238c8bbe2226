"""On-disk cache of compiled engines (TensorRT plans), keyed by everything that matters.

A plan is only valid for the same model bytes, GPU, TensorRT version, input
shape and precision, so all of these go into the key; a changed model file
or an upgraded TensorRT simply misses the cache and rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("DIMSCOPE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "dimscope" / "plans"


def plan_key(model_digest: str, gpu_name: str, backend_version: str,
             shape: tuple[int, ...], precision: str) -> str:
    text = json.dumps([model_digest, gpu_name, backend_version, list(shape), precision])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_plan(key: str) -> bytes | None:
    path = cache_dir() / f"{key}.plan"
    return path.read_bytes() if path.is_file() else None


def store_plan(key: str, plan: bytes) -> Path:
    """Write atomically so a crash mid-write never leaves a truncated plan to load."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.plan"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(plan)
    tmp.replace(path)
    return path
