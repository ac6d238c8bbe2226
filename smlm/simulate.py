"""An SMLM acquisition simulator with its ground truth.

**Structure** (`Structure`): fluorophore label positions in nm on the sample, from
- `filaments`: worm-like chains across the field (persistence length, labels along the
  contour with a linker jitter);
- `rings`: nuclear-pore-like rings, 8-fold, radius ~50 nm, a few labels per corner;
- `density_image`: a real high-resolution image (e.g. a plane of
  `../shared/data/singles/*.tif`, read only when a path is given) used as a density map.
`Structure.density(pixel_nm)` is the dense truth: every label, histogrammed on a fine grid.

**Kinetics** (`Kinetics`): each label is a three-state continuous-time Markov chain
(off ⇄ on → bleached) with rates per frame; off→on is `k_on_dark + k_on_per_power · P`,
where P is the activation-laser power, a property that can be changed between frames
(`SMLMSimulator.activation_power`), as a Micro-Manager property would be. The state at each
frame boundary is drawn from the exact transition matrix `expm(Q·1 frame)`. Within a frame an
emitter emits for the whole frame if it is on at both boundaries, for a uniform random part of
it if it switched on or off during the frame; off→off frames emit nothing (a blink shorter than
a frame and back is not modelled). Labels start in the chain's off/on balance, not all on.

**Camera** (`Camera`): Gaussian PSF integrated over square pixels (`psf.stamp`), photons per
on-emitter drawn per label from `photons_range` (1–5 k by default) times its on-part of the
frame, a flat background, Poisson shot noise, Gaussian read noise, gain and offset — or, with
`ScmosMaps`, per-pixel offset, read-noise variance and gain. Slow stage **drift** (`Drift`):
linear plus one slow sinusoid, in nm, moves every emitter.

**Widefield**: one frame of every non-bleached label at once, through the same camera, with a
PSF `widefield_psf_factor` (1.15) times the nominal one — the error map (not here) assumes the
nominal width, as a real one would be a little off.

**Ground truth** per frame (`FrameTruth`): the on emitters' ids, sample-plane positions (nm,
drift not included: add `drift_nm` for where the camera saw them) and photons.

Deterministic for a seed. All stamping is vectorised; >200 frames/s at 128×128 with ~30
emitters per frame is tested.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field
from scipy.linalg import expm

from .psf import stamp

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U16 = npt.NDArray[np.uint16]

OFF, ON, BLEACHED = 0, 1, 2


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Kinetics(_Frozen):
    """Rates per frame of one label's off ⇄ on → bleached chain."""

    k_on_dark: float = Field(0.0, ge=0, description="off→on without activation light")
    k_on_per_power: float = Field(0.002, ge=0, description="off→on per unit activation power")
    k_off: float = Field(0.35, gt=0, description="on→off (mean on-time 1/k_off frames)")
    k_bleach: float = Field(0.01, ge=0, description="on→bleached")

    def generator(self, power: float) -> F64:
        a = self.k_on_dark + self.k_on_per_power * power
        b, c = self.k_off, self.k_bleach
        return np.array([[-a, a, 0.0], [b, -(b + c), c], [0.0, 0.0, 0.0]])

    def on_fraction(self, power: float) -> float:
        """The on share of unbleached labels in the off⇄on balance (bleaching ignored)."""
        a = self.k_on_dark + self.k_on_per_power * power
        return a / (a + self.k_off)

    def emitting_fraction(self, power: float) -> float:
        """Share of unbleached labels that emit in a frame at balance: on at its start, or
        switched on during it."""
        a = self.k_on_dark + self.k_on_per_power * power
        p = a / (a + self.k_off)
        return p + (1 - p) * (1 - math.exp(-a))

    def power_for(self, n_labels: int, emitting_per_frame: float) -> float:
        """The activation power at which `emitting_per_frame` of `n_labels` emit (balance)."""
        target = emitting_per_frame / n_labels
        if not 0 < target < 1:
            raise ValueError(f"cannot have {emitting_per_frame} of {n_labels} labels emit")
        if self.k_on_per_power == 0:
            raise ValueError("k_on_per_power is 0: the activation power changes nothing")
        if self.emitting_fraction(0.0) >= target:
            return 0.0
        lo, hi = 0.0, 1.0
        while self.emitting_fraction(hi) < target:
            hi *= 2
        for _ in range(60):  # bisection: the fraction grows with the power
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.emitting_fraction(mid) < target else (lo, mid)
        return 0.5 * (lo + hi)


class Camera(_Frozen):
    """A camera: pixel size in the sample, gain, offset, read noise."""

    pixel_nm: float = Field(100.0, gt=0)
    gain_adu_per_e: float = Field(2.0, gt=0, description="ADU per photo-electron")
    offset_adu: float = Field(100.0, ge=0)
    read_noise_e: float = Field(1.5, ge=0, description="rms read noise, electrons")


class Drift(_Frozen):
    """Stage drift in nm: `velocity·t + amplitude·sin(2πt/period)`, t in frames."""

    velocity_nm: tuple[float, float] = (0.01, -0.006)
    amplitude_nm: tuple[float, float] = (12.0, 8.0)
    period_frames: float = Field(4000.0, gt=0)

    def at(self, frames: npt.ArrayLike) -> F64:
        """(n, 2) drift (x, y) in nm at these frames."""
        t = np.asarray(frames, np.float64)[:, None]
        s = np.sin(2 * math.pi * t / self.period_frames)
        return np.asarray(np.asarray(self.velocity_nm) * t + np.asarray(self.amplitude_nm) * s,
                          np.float64)


class SimSettings(_Frozen):
    """Everything but the structure and the seed."""

    shape: tuple[int, int] = (128, 128)
    camera: Camera = Camera()
    psf_sigma_nm: float = Field(130.0, gt=0)
    photons_range: tuple[float, float] = (1000.0, 5000.0)
    background_photons: float = Field(20.0, ge=0, description="per pixel per frame")
    kinetics: Kinetics = Kinetics()
    activation_power: float = Field(1.0, ge=0, description="initial activation power")
    drift: Drift = Drift()
    widefield_psf_factor: float = Field(1.15, gt=0)
    widefield_photons_per_label: float = Field(30.0, gt=0)
    widefield_background_photons: float = Field(200.0, ge=0)

    @property
    def extent_nm(self) -> tuple[float, float]:
        """(width, height) of the field in nm."""
        return (self.shape[1] * self.camera.pixel_nm, self.shape[0] * self.camera.pixel_nm)


@dataclass(frozen=True)
class ScmosMaps:
    """Per-pixel sCMOS calibration: offset (ADU), read-noise variance (ADU²), gain (ADU/e⁻)."""

    offset: F64
    variance: F64
    gain: F64

    @classmethod
    def from_tif(cls, path: str | Path) -> ScmosMaps:
        """A 3×H×W stack offset/variance/gain (as in `../shared/data/smlm/`)."""
        import tifffile

        arr = np.asarray(tifffile.imread(str(path)), np.float64)
        if arr.ndim != 3 or arr.shape[0] != 3:
            raise ValueError(f"{path}: expected a 3×H×W offset/variance/gain stack, "
                             f"got shape {arr.shape}")
        if np.any(arr[2] <= 0) or np.any(arr[1] < 0):
            raise ValueError(f"{path}: gains must be > 0 and variances >= 0")
        return cls(arr[0], arr[1], arr[2])

    def crop(self, shape: tuple[int, int], origin: tuple[int, int] = (0, 0)) -> ScmosMaps:
        r, c = origin
        h, w = shape
        if r + h > self.offset.shape[0] or c + w > self.offset.shape[1]:
            raise ValueError(f"a {h}×{w} crop at {origin} does not fit the "
                             f"{self.offset.shape} calibration")
        sl = (slice(r, r + h), slice(c, c + w))
        return ScmosMaps(self.offset[sl], self.variance[sl], self.gain[sl])


# ----------------------------------------------------------------------------- structures
@dataclass(frozen=True)
class Structure:
    """Label positions in nm (x, y) on a field of `extent_nm` (width, height)."""

    name: str
    labels_nm: F64
    extent_nm: tuple[float, float]

    def density(self, pixel_nm: float = 10.0) -> npt.NDArray[np.float32]:
        """The dense truth: labels per pixel on a `pixel_nm` grid (rows = y)."""
        w = math.ceil(self.extent_nm[0] / pixel_nm)
        h = math.ceil(self.extent_nm[1] / pixel_nm)
        img, _, _ = np.histogram2d(self.labels_nm[:, 1], self.labels_nm[:, 0], bins=(h, w),
                                   range=((0, h * pixel_nm), (0, w * pixel_nm)))
        return img.astype(np.float32)


def _inside(xy: F64, extent: tuple[float, float]) -> F64:
    keep = (xy[:, 0] >= 0) & (xy[:, 0] < extent[0]) & (xy[:, 1] >= 0) & (xy[:, 1] < extent[1])
    return xy[keep]


def filaments(extent_nm: tuple[float, float], rng: np.random.Generator, n: int = 8,
              labels_per_um: float = 60.0, persistence_nm: float = 5000.0,
              jitter_nm: float = 5.0, step_nm: float = 10.0) -> Structure:
    """`n` worm-like chains crossing the field, labelled at `labels_per_um` (Poisson)."""
    w, h = extent_nm
    length = 2.0 * math.hypot(w, h)
    steps = int(length / step_nm)
    all_labels = []
    for _ in range(n):
        start = rng.uniform((0, 0), (w, h))
        theta0 = rng.uniform(0, 2 * math.pi)
        # the tangent angle diffuses with variance step/persistence per step (worm-like chain)
        turns = rng.normal(0, math.sqrt(step_nm / persistence_nm), steps)
        theta = theta0 + np.cumsum(turns)
        # walk both ways from the start so the chain crosses the field
        path = np.cumsum(step_nm * np.stack([np.cos(theta), np.sin(theta)], 1), 0)
        path = np.concatenate([-path[: steps // 2][::-1], path[: steps // 2]]) + start
        seg = np.diff(path, axis=0)
        arc = np.concatenate([[0], np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))])
        n_labels = rng.poisson(labels_per_um * arc[-1] / 1000.0)
        s = rng.uniform(0, arc[-1], n_labels)
        xy = np.stack([np.interp(s, arc, path[:, 0]), np.interp(s, arc, path[:, 1])], 1)
        all_labels.append(xy + rng.normal(0, jitter_nm, xy.shape))
    labels = _inside(np.concatenate(all_labels), extent_nm)
    return Structure("filaments", labels, extent_nm)


def rings(extent_nm: tuple[float, float], rng: np.random.Generator, n: int = 200,
          radius_nm: float = 50.0, corners: int = 8, labels_per_corner: int = 4,
          corner_labelled: float = 0.8, jitter_nm: float = 3.0,
          margin_nm: float = 200.0) -> Structure:
    """`n` nuclear-pore-like rings: `corners`-fold, `radius_nm`, random rotation.

    Each corner is labelled with probability `corner_labelled` (incomplete labelling, as
    real NPC data), with `labels_per_corner` labels jittered by `jitter_nm`.
    """
    w, h = extent_nm
    centres = rng.uniform((margin_nm, margin_nm), (w - margin_nm, h - margin_nm), (n, 2))
    phase = rng.uniform(0, 2 * math.pi, (n, 1))
    ang = phase + 2 * math.pi * np.arange(corners)[None, :] / corners  # (n, corners)
    pos = centres[:, None, :] + radius_nm * np.stack([np.cos(ang), np.sin(ang)], -1)
    pos = pos[rng.random((n, corners)) < corner_labelled]  # (m, 2) labelled corners
    labels = np.repeat(pos, labels_per_corner, axis=0)
    labels = labels + rng.normal(0, jitter_nm, labels.shape)
    return Structure("rings", _inside(labels, extent_nm), extent_nm)


def load_plane(path: str | Path, channel: int = 0) -> npt.NDArray[np.float64]:
    """One 2-D plane of a TIFF: (Y,X) as is, (C,Y,X) or (Y,X,C) at `channel`."""
    import tifffile

    img = np.asarray(tifffile.imread(str(path)), np.float64)
    if img.ndim == 2:
        return img
    if img.ndim == 3:
        # channels are the short axis, first or last (the files in shared/data are both)
        return img[channel] if img.shape[0] <= img.shape[-1] else img[..., channel]
    raise ValueError(f"{path}: cannot take a 2-D plane of shape {img.shape}")


def density_image(plane: npt.NDArray[np.float64], extent_nm: tuple[float, float],
                  rng: np.random.Generator, image_pixel_nm: float = 20.0,
                  n_labels: int = 20_000, origin_px: tuple[int, int] = (0, 0),
                  background_percentile: float = 50.0, name: str = "image") -> Structure:
    """Labels drawn from an image used as a density map.

    The image is put on the sample at `image_pixel_nm` per image pixel (a real image at
    ~100 nm taken as ~20 nm: its structures become finer than the camera resolves, which is
    what SMLM is for), cropped at `origin_px` (row, column) to the field, its
    `background_percentile` subtracted, and `n_labels` drawn with probability ∝ intensity,
    uniformly within each image pixel.
    """
    w_px = math.ceil(extent_nm[0] / image_pixel_nm)
    h_px = math.ceil(extent_nm[1] / image_pixel_nm)
    r0, c0 = origin_px
    crop = plane[r0:r0 + h_px, c0:c0 + w_px]
    if crop.shape != (h_px, w_px):
        raise ValueError(f"the image ({plane.shape}) is too small for a {h_px}×{w_px} crop at "
                         f"{origin_px} ({image_pixel_nm} nm per image pixel)")
    dens = np.clip(crop - np.percentile(crop, background_percentile), 0, None).ravel()
    if dens.sum() <= 0:
        raise ValueError("the density map is empty after background subtraction")
    idx = rng.choice(dens.size, size=n_labels, p=dens / dens.sum())
    rows, cols = np.divmod(idx, w_px)
    xy = np.stack([cols + rng.random(n_labels), rows + rng.random(n_labels)], 1)
    return Structure(name, _inside(xy * image_pixel_nm, extent_nm), extent_nm)


# ----------------------------------------------------------------------------- simulator
@dataclass(frozen=True)
class FrameTruth:
    """The on emitters of one frame: ids, sample-plane x/y (nm), photons; the frame's drift."""

    frame: int
    ids: I64
    x_nm: F64
    y_nm: F64
    photons: F64
    drift_nm: tuple[float, float]


@dataclass(frozen=True)
class GroundTruth:
    """Every frame's on emitters, concatenated; `drift_nm[f]` is frame f's (x, y) drift."""

    frame: I64
    ids: I64
    x_nm: F64
    y_nm: F64
    photons: F64
    drift_nm: F64

    @classmethod
    def from_frames(cls, truths: Sequence[FrameTruth]) -> GroundTruth:
        return cls(
            frame=np.concatenate([np.full(len(t.ids), t.frame, np.int64) for t in truths]),
            ids=np.concatenate([t.ids for t in truths]),
            x_nm=np.concatenate([t.x_nm for t in truths]),
            y_nm=np.concatenate([t.y_nm for t in truths]),
            photons=np.concatenate([t.photons for t in truths]),
            drift_nm=np.array([t.drift_nm for t in truths], np.float64).reshape(-1, 2))

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, frame=self.frame, ids=self.ids, x_nm=self.x_nm,
                            y_nm=self.y_nm, photons=self.photons, drift_nm=self.drift_nm)

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        with np.load(path) as z:
            return cls(z["frame"], z["ids"], z["x_nm"], z["y_nm"], z["photons"],
                       z["drift_nm"])


class SMLMSimulator:
    """Frames of blinking labels on a `Structure`, one at a time, with their truth."""

    def __init__(self, structure: Structure, settings: SimSettings | None = None,
                 seed: int = 0, scmos: ScmosMaps | None = None,
                 expose: Callable[[F64], U16] | None = None) -> None:
        """`expose`: the camera, expected photo-electrons per pixel → a frame in ADU; by
        default numpy's exact Poisson and Gaussian samplers with `settings.camera` (or
        `scmos`). A live source passes a faster one (`drivers.camera_noise.CameraNoise`)."""
        self.settings = s = settings or SimSettings()
        if expose is not None and scmos is not None:
            raise ValueError("give the camera as `expose` or as sCMOS maps, not both")
        self._expose = expose
        if scmos is not None and scmos.offset.shape != s.shape:
            raise ValueError(f"sCMOS maps {scmos.offset.shape} != frame shape {s.shape}")
        self.structure = structure
        self.scmos = scmos
        self.rng = np.random.default_rng(seed)
        n = len(structure.labels_nm)
        self._brightness = self.rng.uniform(*s.photons_range, n)
        self._power = s.activation_power
        self._transition = self._matrix(self._power)
        # start at the off/on balance of the initial power (not all on, not all off)
        p_on = s.kinetics.on_fraction(self._power)
        self._state = np.where(self.rng.random(n) < p_on, ON, OFF).astype(np.int8)
        self._frame = 0

    # the activation laser, as a device property
    @property
    def activation_power(self) -> float:
        return self._power

    @activation_power.setter
    def activation_power(self, value: float) -> None:
        if value < 0:
            raise ValueError("activation power must be >= 0")
        self._power = float(value)
        self._transition = self._matrix(self._power)

    def _matrix(self, power: float) -> F64:
        return np.asarray(expm(self.settings.kinetics.generator(power)), np.float64)

    @property
    def frame_index(self) -> int:
        return self._frame

    @property
    def n_unbleached(self) -> int:
        return int(np.count_nonzero(self._state != BLEACHED))

    def _step_states(self) -> F64:
        """Advance every label one frame; its on-part of that frame (0..1)."""
        before = self._state
        p = self._transition
        u = self.rng.random(before.size)
        after = before.copy()
        off, on = before == OFF, before == ON
        after[off & (u < p[0, 1])] = ON
        after[off & (u >= p[0, 1]) & (u < p[0, 1] + p[0, 2])] = BLEACHED
        after[on & (u < p[1, 0])] = OFF
        after[on & (u >= p[1, 0]) & (u < p[1, 0] + p[1, 2])] = BLEACHED
        part = np.zeros(before.size)
        part[on & (after == ON)] = 1.0
        switched = (before != after) & (on | (after == ON))
        part[switched] = self.rng.random(int(switched.sum()))
        self._state = after
        return part

    def _advance(self) -> FrameTruth:
        """One frame of the kinetics: who emits, where (sample plane), how much."""
        part = self._step_states()
        ids = np.flatnonzero(part > 0)
        drift = self.settings.drift.at([self._frame])[0]
        xy = self.structure.labels_nm[ids]
        truth = FrameTruth(self._frame, ids.astype(np.int64), xy[:, 0].copy(),
                           xy[:, 1].copy(), self._brightness[ids] * part[ids],
                           (float(drift[0]), float(drift[1])))
        self._frame += 1
        return truth

    def step(self) -> tuple[U16, FrameTruth]:
        """The next raw frame (ADU, uint16) and its ground truth."""
        s, cam = self.settings, self.settings.camera
        truth = self._advance()
        dx, dy = truth.drift_nm
        expected = stamp(s.shape, (truth.x_nm + dx) / cam.pixel_nm,
                         (truth.y_nm + dy) / cam.pixel_nm, truth.photons,
                         s.psf_sigma_nm / cam.pixel_nm)
        return self._camera(expected + s.background_photons), truth

    def truth_only(self, n: int) -> GroundTruth:
        """`n` frames of ground truth without rendering camera frames (fast: for training
        data made of localizations, or tests of what comes after the localizer)."""
        return GroundTruth.from_frames([self._advance() for _ in range(n)])

    def _camera(self, expected_e: F64) -> U16:
        cam = self.settings.camera
        if self._expose is not None:
            return self._expose(expected_e)
        electrons = self.rng.poisson(expected_e).astype(np.float64)
        noise = self.rng.standard_normal(expected_e.shape)
        if self.scmos is None:
            adu = (electrons * cam.gain_adu_per_e + cam.offset_adu
                   + noise * cam.read_noise_e * cam.gain_adu_per_e)
        else:
            m = self.scmos
            adu = electrons * m.gain + m.offset + noise * np.sqrt(m.variance)
        return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)

    def frames(self, n: int) -> Iterator[tuple[U16, FrameTruth]]:
        for _ in range(n):
            yield self.step()

    def run(self, n: int) -> tuple[U16, GroundTruth]:
        """`n` frames as one (n, H, W) stack and their ground truth."""
        stack = np.empty((n, *self.settings.shape), np.uint16)
        truths = []
        for i, (frame, truth) in enumerate(self.frames(n)):
            stack[i] = frame
            truths.append(truth)
        return stack, GroundTruth.from_frames(truths)

    def widefield(self) -> U16:
        """One widefield frame now: every unbleached label, PSF 15 % wider than nominal."""
        s, cam = self.settings, self.settings.camera
        xy = self.structure.labels_nm[self._state != BLEACHED]
        drift = s.drift.at([self._frame])[0]
        expected = stamp(s.shape, (xy[:, 0] + drift[0]) / cam.pixel_nm,
                         (xy[:, 1] + drift[1]) / cam.pixel_nm, s.widefield_photons_per_label,
                         s.psf_sigma_nm * s.widefield_psf_factor / cam.pixel_nm)
        return self._camera(expected + s.widefield_background_photons)


def make_structure(kind: str, settings: SimSettings, rng: np.random.Generator,
                   image: str | Path | None = None, channel: int = 0,
                   image_pixel_nm: float = 20.0) -> Structure:
    """`filaments`, `rings` or `image` (needs `image`, a TIFF path) for this field."""
    extent = settings.extent_nm
    if kind == "filaments":
        return filaments(extent, rng)
    if kind == "rings":
        return rings(extent, rng)
    if kind == "image":
        if image is None:
            raise ValueError("structure 'image' needs an image path")
        return density_image(load_plane(image, channel), extent, rng,
                             image_pixel_nm=image_pixel_nm, name=Path(image).stem)
    raise ValueError(f"unknown structure {kind!r} (filaments, rings, image)")


def write_simulation(out_dir: str | Path, sim: SMLMSimulator, n_frames: int,
                     structure_pixel_nm: float = 10.0) -> dict[str, str]:
    """Write `n_frames` raw frames and the ground truth into `out_dir`.

    Files: `raw.tif` (ADU, uint16, frames appended one at a time), `widefield.tif` (taken
    before the first frame), `truth.npz` (`GroundTruth`), `structure.tif` (labels per
    `structure_pixel_nm` pixel, float32), `simulation.json` (settings, pixel sizes, counts).
    """
    import tifffile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: str(out / v) for k, v in (("raw", "raw.tif"), ("widefield", "widefield.tif"),
                                          ("truth", "truth.npz"),
                                          ("structure", "structure.tif"),
                                          ("meta", "simulation.json"))}
    tifffile.imwrite(paths["widefield"], sim.widefield())
    truths = []
    with tifffile.TiffWriter(paths["raw"], bigtiff=True) as tw:
        for frame, truth in sim.frames(n_frames):
            tw.write(frame, contiguous=True)
            truths.append(truth)
    gt = GroundTruth.from_frames(truths)
    gt.save(paths["truth"])
    tifffile.imwrite(paths["structure"], sim.structure.density(structure_pixel_nm))
    meta = {"settings": sim.settings.model_dump(mode="json"), "structure": sim.structure.name,
            "n_labels": len(sim.structure.labels_nm), "frames": n_frames,
            "localizations_true": len(gt.frame), "structure_pixel_nm": structure_pixel_nm,
            "files": {k: Path(v).name for k, v in paths.items()}}
    Path(paths["meta"]).write_text(json.dumps(meta, indent=2))
    return paths
