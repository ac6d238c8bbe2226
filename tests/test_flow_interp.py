"""The `flow` interpolator: classical optical flow against linear blending, its options, live."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, shift

from dimscope.daemon.config import ConfigError, parse_config
from dimscope.engines.base import EngineError
from dimscope.engines.evaluation.quality import score
from dimscope.engines.interpolators import FlowInterpolator, make_interpolator

from .conftest import make_config, run_and_record

N = 128
_YY, _XX = np.mgrid[0:N, 0:N].astype(np.float32)

Movie = Callable[[float], np.ndarray]


def _blob(cy: float, cx: float, sigma: float) -> np.ndarray:
    return np.exp(-((_YY - cy) ** 2 + (_XX - cx) ** 2) / (2 * sigma**2))


def _moving_blobs(seed: int) -> Movie:
    """Nine Gaussian blobs (sigma 2.5 px) on a jittered grid, each moving 3–6 px per
    frame interval in its own direction, on an offset: the frame at any time t."""
    rng = np.random.default_rng(seed)
    grid = np.array([(y, x) for y in (28, 64, 100) for x in (28, 64, 100)], np.float64)
    start = grid + rng.uniform(-4, 4, size=grid.shape)
    angle = rng.uniform(0, 2 * np.pi, len(grid))
    velocity = np.stack([np.sin(angle), np.cos(angle)], 1) * rng.uniform(3, 6, len(grid))[:, None]
    amp = rng.uniform(0.5, 1.5, len(grid))

    def frame(t: float) -> np.ndarray:
        img = np.full((N, N), 100.0, np.float32)
        for (cy, cx), a in zip(start + t * velocity, amp, strict=True):
            img += np.float32(1000 * a) * _blob(cy, cx, 2.5)
        return img

    return frame


def _texture(seed: int) -> np.ndarray:
    tex = gaussian_filter(np.random.default_rng(seed).normal(size=(N, N)), 2.0)
    return (200 + 400 * (tex - tex.min()) / (tex.max() - tex.min())).astype(np.float32)


def _psnr(truth: np.ndarray, image: np.ndarray) -> float:
    return score(truth, image, with_ssim=False)["psnr"]


@pytest.mark.parametrize("t", [0.5, 0.25])
def test_flow_beats_linear_blending_on_moving_blobs(t: float) -> None:
    flow, linear = make_interpolator("flow"), make_interpolator("linear")
    flow.prepare((N, N))
    for seed in range(3):
        movie = _moving_blobs(seed)
        a, b = movie(0.0), movie(1.0)
        out = flow.between(a, b, t)
        assert out.dtype == np.float32 and out.shape == a.shape
        gain = _psnr(movie(t), out) - _psnr(movie(t), linear.between(a, b, t))
        assert gain >= 10.0, (seed, gain)  # about 18-25 dB here
    flow.close()


def test_flow_beats_linear_blending_at_low_light() -> None:
    # Poisson noise at ~100-1100 photons: the truth is the noiseless middle frame.
    flow, linear = make_interpolator("flow"), make_interpolator("linear")
    flow.prepare((N, N))
    movie = _moving_blobs(7)
    rng = np.random.default_rng(7)
    a, b = (rng.poisson(movie(s)).astype(np.float32) for s in (0.0, 1.0))
    gain = _psnr(movie(0.5), flow.between(a, b, 0.5)) - _psnr(movie(0.5),
                                                              linear.between(a, b, 0.5))
    assert gain >= 6.0, gain  # about 13 dB here


def test_identical_frames_give_back_the_frame() -> None:
    flow = make_interpolator("flow")
    flow.prepare((N, N))
    frame = _texture(3) + 800 * _blob(50, 70, 3.0)
    for t in (0.25, 0.5, 0.75):
        out = flow.between(frame, frame.copy(), t)
        np.testing.assert_allclose(out, frame, rtol=1e-5, atol=1e-3)
    # Integer camera frames work too, and come back as float32 in the same units.
    raw = (frame * 10).astype(np.uint16)
    out = flow.between(raw, raw, 0.5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, raw, rtol=1e-5, atol=1e-2)


def _opaque_disk_over_texture(t: float) -> np.ndarray:
    """A bright disk (radius 14 px) moving 12 px over a static texture: it covers
    texture ahead of it and uncovers texture behind it."""
    cover = np.clip(14 - np.hypot(_YY - 64, _XX - (40 + 12 * t)), 0, 1)
    return _texture(1) * (1 - cover) + 900 * cover


def _blob_appearing_on_drifting_texture(t: float) -> np.ndarray:
    """A blob fades in (absent in a: no flow leads to it) while the texture drifts 4 px."""
    drifted = shift(np.pad(_texture(2), 8, mode="reflect"), (0, 4 * t), order=3)[8:-8, 8:-8]
    return np.asarray(drifted, np.float32) + np.float32(800 * t) * _blob(64, 64, 4.0)


def _blob_leaving_the_field(t: float) -> np.ndarray:
    """A blob moving 8 px out across the right edge, over a static texture."""
    return _texture(4) + 900 * _blob(60, 124 + 8 * t, 3.0)


@pytest.mark.parametrize("movie", [_opaque_disk_over_texture,
                                   _blob_appearing_on_drifting_texture,
                                   _blob_leaving_the_field])
def test_occlusions_are_not_worse_than_linear_blending(movie: Movie) -> None:
    flow, linear = make_interpolator("flow"), make_interpolator("linear")
    flow.prepare((N, N))
    a, b = movie(0.0), movie(1.0)
    for t in (0.25, 0.5):
        truth = movie(t)
        flow_err = float(np.sqrt(np.mean((flow.between(a, b, t) - truth) ** 2)))
        linear_err = float(np.sqrt(np.mean((linear.between(a, b, t) - truth) ** 2)))
        # RMSE, not PSNR: linear blending is exact where the truth is a fade.
        assert flow_err <= linear_err * 1.1 + 1.0, (t, flow_err, linear_err)


def test_a_pair_is_computed_once_for_all_its_fractions() -> None:
    flow = make_interpolator("flow")
    assert isinstance(flow, FlowInterpolator)
    flow.prepare((N, N))
    movie = _moving_blobs(1)
    a, b = movie(0.0), movie(1.0)
    a.flags.writeable = b.flags.writeable = False  # as the live stage's frames
    first = flow.between(a, b, 0.25)
    pair = flow._pair
    flow.between(a, b, 0.5)
    assert flow._pair is pair
    # Another pair, or writable frames (they may have changed in place): estimated again.
    c = movie(0.5)
    c.flags.writeable = False
    assert not np.allclose(flow.between(c, b, 0.25), first)
    a2 = a.copy()
    flow.between(a2, b, 0.5)
    a2[:] = movie(0.3)
    assert not np.allclose(flow.between(a2, b, 0.25), first)


def test_forward_backward_check_distrusts_what_gets_covered() -> None:
    flow = make_interpolator("flow")
    assert isinstance(flow, FlowInterpolator)
    flow.prepare((N, N))
    a, b = _opaque_disk_over_texture(0.0), _opaque_disk_over_texture(1.0)
    flow.between(a, b, 0.5)
    assert flow._pair is not None
    r0, r1 = flow._pair.r0, flow._pair.r1
    # Texture just ahead of the disk in a (x 56-64) is under it in b (a's disk spans
    # x 26-54, b's 38-66): its flow is not sent back. The disk itself, moving 12 px, and
    # the background far from it are tracked both ways.
    assert np.median(r0[58:71, 56:64]) < 0.3
    assert np.median(r0[58:71, 32:48]) > 0.8 and np.median(r1[58:71, 44:60]) > 0.8
    assert np.median(r0[:, 90:]) > 0.9 and np.median(r1[:, 90:]) > 0.9


def test_flow_info_options_and_bad_frames() -> None:
    flow = make_interpolator("flow", preset="ultrafast", presmooth=0, tau=2)
    assert flow.info.name == "flow" and flow.info.runtime == "opencv"
    assert flow.info.version.startswith("dis-ultrafast+presmooth0+tau2")
    with pytest.raises(EngineError, match="presmoth: unknown option"):
        make_interpolator("flow", presmoth=1.0)
    with pytest.raises(EngineError, match="preset"):
        make_interpolator("flow", preset="slow")
    with pytest.raises(EngineError, match="prepare"):
        flow.between(np.zeros((32, 32)), np.zeros((32, 32)), 0.5)
    with pytest.raises(EngineError, match="2-D frames of at least 16"):
        flow.prepare((8, 64))
    with pytest.raises(EngineError, match="2-D frames"):
        flow.prepare((3, 64, 64))
    flow.prepare((32, 32))
    with pytest.raises(EngineError, match="prepared for"):
        flow.between(np.zeros((32, 40)), np.zeros((32, 40)), 0.5)


@pytest.mark.parametrize("where", ["interpolate", "stages"])
def test_config_rejects_an_unknown_flow_option_naming_it(tmp_path: Path, where: str) -> None:
    options = {"preset": "fast", "presmoth": 1.0}
    data = ({"interpolate": {"factor": 2, "method": "flow", "options": options}}
            if where == "interpolate" else
            {"stages": [{"kind": "interpolate", "name": "interp_flow", "upstream": "engine",
                         "method": "flow", "options": options}]})
    with pytest.raises(ConfigError) as err:
        parse_config(data, origin="<test>", base_dir=tmp_path)
    assert "presmoth: unknown option" in str(err.value)
    assert "allowed: preset, presmooth, tau" in str(err.value)
    with pytest.raises(ConfigError, match="preset"):
        parse_config({"interpolate": {"method": "flow", "options": {"preset": "slow"}}})
    cfg = parse_config({"interpolate": {"factor": 4, "method": "flow",
                                        "options": {"preset": "medium", "tau": 0.5}}})
    assert cfg.interpolate.method == "flow"


def test_live_run_publishes_flow_interpolated_frames(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, engine={"name": "identity"},
                      interpolate={"factor": 2, "method": "flow"})
    summary, received = run_and_record(cfg, 1.5, ["enhanced", "interpolated"])
    assert summary["error"] is None and summary["interpolate_error"] is None
    enhanced = {h["frame_id"]: px for topic, h, px in received if topic == "enhanced"}
    interp = [(h, px) for topic, h, px in received if topic == "interpolated"]
    assert len(interp) > 10
    for h, px in interp:
        assert h["kind"] == "interpolated" and h["t"] == 0.5
        assert h["engine"]["name"] == "flow" and h["engine"]["runtime"] == "opencv"
        a, b = h["source_ids"]
        if a in enhanced and b in enhanced:
            assert px.shape == enhanced[a].shape and np.isfinite(px).all()
            lo = min(enhanced[a].min(), enhanced[b].min())
            hi = max(enhanced[a].max(), enhanced[b].max())
            assert lo - 1e-3 <= px.min() and px.max() <= hi + 1e-3  # a blend of warped frames
    assert summary["stages"]["interpolate"]["errors"] == 0
