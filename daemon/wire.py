"""The ZeroMQ wire format (see docs/wire-format.md): `[topic, header, payload]`.

topic   ASCII bytes: `raw`, `enhanced`, `interpolated` or `trust`
header  UTF-8 JSON object, schema `dimscope.frame/2`
payload the pixel buffer, C order, shape and dtype as the header says (on `trust`: the
        trust map of the enhanced frame with the same `frame_id`)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from dimscope.engines.base import EngineInfo

from .frame import Frame

SCHEMA = "dimscope.frame/2"
TOPICS = ("raw", "enhanced", "interpolated", "trust")
#: frames whose header carries their `smlm` metadata (docs/wire-format.md)
SMLM_KINDS = ("localizations", "render", "mean", "dense", "error_map", "ready")


def engine_header(e: EngineInfo) -> dict[str, Any]:
    """What made the pixels, typed: model identity, adaptation, noise model, verification."""
    # A card version "3@adapted-2" is model version 3 after 2 live adaptation swaps.
    base, _, adapted = e.version.partition("+")[0].partition("@")
    engine: dict[str, Any] = {
        "name": e.name, "version": e.version, "runtime": e.runtime, "precision": e.precision,
        "scale": e.scale, "model_version": base, "adaptation": adapted or None,
        "model_sha256": e.model_sha256 or None, "verified": e.verified}
    if e.noise:  # noise-aware engines: the camera noise model they used, and its origin
        engine["noise"] = e.noise
    return engine


def trust_frame(frame: Frame) -> Frame | None:
    """The frame published on topic `trust` for an enhanced frame: its trust map, with the
    same ids, engine and score (None for frames without one: raw, passthrough)."""
    report = frame.trust
    if report is None:
        return None
    # The map is at half the camera's resolution: its pixel size follows from the shapes
    # (an interpolated sr2 frame's interpolator does not know the frame's scale).
    map_pixel_um = frame.pixel_size_um * frame.shape[-1] / report.map.shape[-1]
    return frame.replace(pixels=report.map, kind="trust", pixel_size_um=map_pixel_um)


def encode_header(frame: Frame, *, topic: str, seq: int, published_unix_ns: int,
                  published_mono_ns: int) -> bytes:
    engine = engine_header(frame.engine) if frame.engine is not None else None
    header: dict[str, Any] = {
        "schema": SCHEMA,
        "topic": topic,
        "seq": seq,
        "frame_id": frame.frame_id,
        "kind": frame.kind,
        "shape": list(frame.shape),
        "dtype": frame.dtype.str,
        "order": "C",
        "acquired_unix_ns": frame.acquired_unix_ns,
        "published_unix_ns": published_unix_ns,
        "exposure_ms": frame.exposure_ms,
        "pixel_size_um": frame.pixel_size_um,
        # A trust map is at half the camera's sampling.
        "scale": 0.5 if frame.kind == "trust" else (
            frame.engine.scale if frame.engine is not None else 1),
        "source": frame.source,
        "source_ids": list(frame.source_ids) or [frame.frame_id],
        "engine": engine,
        "latency_ms": frame.latency_ms(until_ns=published_mono_ns),
        "mda_index": dict(frame.mda_index),
    }
    if frame.t is not None:
        header["t"] = frame.t
    if frame.budget is not None:  # the engine stage's budget decision for this frame
        header["budget"] = frame.budget
    if frame.tier is not None:
        header["tier"] = frame.tier
    if frame.trust is not None:
        header["trust"] = frame.trust.score.as_dict()
    if frame.kind in SMLM_KINDS:  # what the block, render or prediction covers
        header["smlm"] = dict(frame.metadata)
    return json.dumps(header, separators=(",", ":")).encode()


def decode(parts: list[bytes] | list[Any]) -> tuple[dict[str, Any], np.ndarray]:
    """Header and a (read-only, zero-copy) pixel array from a received multipart message."""
    if len(parts) != 3:
        raise ValueError(f"expected 3 message parts [topic, header, payload], got {len(parts)}")
    header = json.loads(bytes(parts[1]))
    if header.get("schema") != SCHEMA:
        raise ValueError(f"unsupported header schema {header.get('schema')!r}; expected {SCHEMA}")
    buf = parts[2].buffer if hasattr(parts[2], "buffer") else parts[2]
    pixels = np.frombuffer(buf, dtype=np.dtype(header["dtype"])).reshape(header["shape"])
    return header, pixels
