from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dimscope.daemon.config import Config, parse_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def make_config(tmp_path: Path, **sections: Any) -> Config:
    """A config for tests: small fast sim frames, wildcard port, archive under tmp_path."""
    data: dict[str, Any] = {
        "source": {"kind": "sim", "width": 128, "height": 96, "exposure_ms": 5.0,
                   "photons_per_ms": 4.0},
        "archive": {"out_dir": str(tmp_path / "runs"), "fsync_every_s": 0},
        "publish": {"address": "tcp://127.0.0.1:*"},
        # a free port: the default 5556 would let a test's ctl reach another test's daemon
        "control": {"address": "tcp://127.0.0.1:*"},
    }
    for name, values in sections.items():
        if name in ("source", "stages"):
            data[name] = values
        else:
            data.setdefault(name, {}).update(values)
    return parse_config(data, origin="<test>", base_dir=tmp_path)


def run_and_record(cfg: Config, seconds: float, topics: list[str], **pipeline_kw: Any
                   ) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any], Any]]]:
    """Run a pipeline for `seconds` with a live subscriber; (summary, received messages)."""
    from dimscope.daemon.client import Recorder
    from dimscope.daemon.pipeline import Pipeline

    pipeline = Pipeline(cfg, **pipeline_kw)
    pipeline.start()
    recorder = Recorder(pipeline.publish_endpoint or "", topics)
    pipeline.wait(duration_s=seconds)
    summary = pipeline.stop().to_dict()
    return summary, recorder.close()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real microscopy data not present at {SHARED_DATA} (see README: Real data)")
    return SHARED_DATA
