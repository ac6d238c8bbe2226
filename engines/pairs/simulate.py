"""Simulated two-instrument pairs: one specimen seen through two optical models.

A pair (widefield-like LOW, confocal-like HIGH) of the same field, with known
ground truth, for training and judging cross-modality transfer where real pairs
are scarce. The specimen is a fluorophore density on HIGH's pixel grid, drawn
from one of a few structure classes; LOW and HIGH differ in PSF (Gaussian sigma,
in HIGH pixels), pixel size (LOW pixels are `scale` HIGH pixels, binned),
contrast (LOW has a diffuse background, HIGH none, and they have different
gains) and noise (each its own Poisson shot noise and read noise). Because
Gaussian blurs compose, LOW's optics are exactly HIGH's followed by a Gaussian of
sigma sqrt(low² − high²) — the forward model the trust check fits.

Structure classes: `filaments`, `puncta`, `nuclei`, `shapes` (a generic
vocabulary: strokes of random width, ellipses, dots) and `images` (real
high-resolution images as density maps) are the training classes; `rings`
(nuclear-pore-like) and `mitochondria` (short bent tubes with bright membranes)
are held out for evaluation, so a quality claim is made on structures the model
never saw. A network trained on one biological class's look learns that look as
its prior and fails on the next (filaments, puncta and nuclei alone: 2 dB below
BM3D + Richardson–Lucy on the held-out classes); structure of every size is what
lets it generalise.

`warped_pair` makes a registration test instead: a field seen through other optics and
contrast, warped by a known affine + smooth elastic map (the acceptance check's recipe).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from ..training.crappify import bin_mean

TRAIN_CLASSES = ("filaments", "puncta", "nuclei", "shapes", "images")
HELD_OUT_CLASSES = ("rings", "mitochondria")


@dataclass(frozen=True, slots=True)
class PairOptics:
    """The two optical models (sigmas in HIGH pixels)."""

    low_psf_sigma_px: float = 2.0
    high_psf_sigma_px: float = 0.8
    #: LOW's pixel is `scale` HIGH pixels wide
    scale: int = 1
    #: LOW's diffuse background, relative to its brightest structure
    low_background: float = 0.05

    @property
    def relative_sigma_px(self) -> float:
        """The blur that turns HIGH's optics into LOW's (before binning)."""
        return float(np.sqrt(max(self.low_psf_sigma_px**2 - self.high_psf_sigma_px**2, 0.0)))


@dataclass(frozen=True, slots=True)
class SimulatedPair:
    #: LOW in camera ADU (noisy), `scale` times smaller than HIGH
    low: np.ndarray
    #: HIGH, noisy when `high_photons` was given, else its noise-free image (relative units)
    high: np.ndarray
    #: ground truth of the HIGH modality: noise-free, relative (1 = brightest structure)
    high_clean: np.ndarray
    #: LOW's expected signal in ADU (what the camera averages to)
    low_expected: np.ndarray
    #: HIGH's noise-free image in LOW's relative units (LOW = this blurred and binned, plus
    #: background): the optics conserve the light, so a thin structure's peak is higher in
    #: HIGH than in LOW — the consistent training target
    high_in_low_units: np.ndarray
    #: ADU per photo-electron, offset (ADU), read noise (e-), photons at the brightest structure
    gain: float
    offset: float
    read_noise_e: float
    photons: float


# -- structure classes (densities on HIGH's grid, about 0..1) ---------------------------
def _splat(shape: tuple[int, int], yx: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Bilinear deposit of point weights onto a grid (sub-pixel, no aliasing steps)."""
    h, w = shape
    y, x = yx[:, 0], yx[:, 1]
    keep = (y >= 0) & (y < h - 1) & (x >= 0) & (x < w - 1)
    y, x, weight = y[keep], x[keep], weight[keep]
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    out = np.zeros(h * w, np.float64)
    for dy, dx, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                       (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        out += np.bincount((y0 + dy) * w + x0 + dx, weights=weight * wt, minlength=h * w)
    return out.reshape(h, w).astype(np.float32)


def _curves(rng: np.random.Generator, shape: tuple[int, int], n: int, length: tuple[int, int],
            curvature: float) -> tuple[np.ndarray, np.ndarray]:
    """Points every 0.25 px along `n` smooth random curves, and each point's brightness."""
    h, w = shape
    points, weights = [], []
    for _ in range(n):
        steps = int(rng.integers(*length)) * 4
        turn = gaussian_filter(rng.normal(0, curvature, steps), 8.0) * 8.0
        angle = rng.uniform(0, 2 * np.pi) + np.cumsum(turn)
        start = rng.uniform([0, 0], [h, w])
        yx = start + np.cumsum(0.25 * np.stack([np.sin(angle), np.cos(angle)], 1), axis=0)
        points.append(yx)
        weights.append(np.full(steps, rng.uniform(0.4, 1.0) * 0.25))
    return np.concatenate(points), np.concatenate(weights)


def _normalised(density: np.ndarray) -> np.ndarray:
    top = float(np.percentile(density, 99.9))
    return (density / top if top > 0 else density).astype(np.float32)


def filaments(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    area = shape[0] * shape[1]
    yx, wt = _curves(rng, shape, max(3, int(area / 2500 * rng.uniform(0.5, 2.0))),
                     (40, 200), 0.012)
    return _normalised(gaussian_filter(_splat(shape, yx, wt), 0.35))


def puncta(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    n = int(shape[0] * shape[1] / 400 * rng.uniform(0.3, 1.5))
    yx = rng.uniform([0, 0], shape, size=(n, 2))
    image = _splat(shape, yx, rng.uniform(0.3, 1.0, n))
    # Mixed sizes: half the spots sub-resolution, half up to 1.5 px.
    return _normalised(gaussian_filter(image, 0.3) + gaussian_filter(
        _splat(shape, rng.uniform([0, 0], shape, size=(n // 2, 2)), rng.uniform(0.3, 1.0,
                                                                                n // 2)), 1.2) * 4)


def nuclei(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(2, 7))):
        cy, cx = rng.uniform([0, 0], shape)
        ry, rx = rng.uniform(10, 35, 2)
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dy * np.cos(theta) + dx * np.sin(theta)) / ry
        v = (-dy * np.sin(theta) + dx * np.cos(theta)) / rx
        inside = (u**2 + v**2 < 1).astype(np.float32)
        texture = gaussian_filter(rng.random(shape).astype(np.float32), rng.uniform(1.0, 2.5))
        texture = (texture - texture.min()) / max(float(np.ptp(texture)), 1e-6)
        out += gaussian_filter(inside, 0.7) * (0.3 + texture) * rng.uniform(0.5, 1.0)
    spots = _splat(shape, rng.uniform([0, 0], shape, size=(int(h * w / 800), 2)),
                   rng.uniform(0.5, 2.0, int(h * w / 800)))
    return _normalised(out + gaussian_filter(spots, 1.0) * 3 * (out > 0.05))


def rings(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Nuclear-pore-like: 8 subunits on a circle (radius 1.5–4 px), many rings."""
    n = int(shape[0] * shape[1] / 150 * rng.uniform(0.3, 1.0))
    centres = rng.uniform([0, 0], shape, size=(n, 1, 2))
    radius = rng.uniform(1.5, 4.0, (n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    angles = phase + np.arange(8)[None, :] * (np.pi / 4)
    yx = centres + radius * np.stack([np.sin(angles), np.cos(angles)], -1)
    weight = np.repeat(rng.uniform(0.5, 1.0, n), 8) * (rng.random(8 * n) < 0.85)
    return _normalised(gaussian_filter(_splat(shape, yx.reshape(-1, 2), weight), 0.3))


def mitochondria(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Thick, short, bent tubes with brighter membranes."""
    area = shape[0] * shape[1]
    yx, wt = _curves(rng, shape, max(3, int(area / 1500 * rng.uniform(0.5, 1.5))), (15, 60), 0.03)
    core = gaussian_filter(_splat(shape, yx, wt), rng.uniform(1.0, 2.0))
    return _normalised(core + 0.5 * gaussian_filter(np.abs(np.gradient(core)[0]) + np.abs(
        np.gradient(core)[1]), 0.5))


def image_density(images: Sequence[np.ndarray]) -> Callable[[np.random.Generator,
                                                            tuple[int, int]], np.ndarray]:
    """A class drawing random crops of real images (each about 0..1) as densities."""
    def draw(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        fits = [im for im in images if im.shape[0] >= shape[0] and im.shape[1] >= shape[1]]
        if not fits:
            raise ValueError(f"no density image is at least {shape[0]}x{shape[1]}")
        im = fits[int(rng.integers(len(fits)))]
        y0 = int(rng.integers(0, im.shape[0] - shape[0] + 1))
        x0 = int(rng.integers(0, im.shape[1] - shape[1] + 1))
        crop = np.rot90(im[y0:y0 + shape[0], x0:x0 + shape[1]], int(rng.integers(4)))
        return _normalised(np.clip(np.ascontiguousarray(crop), 0, None))
    return draw


def shapes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A generic vocabulary rather than a biological class: strokes of random width
    (0.3–3 px), filled ellipses of random size and dots, at random brightness — so the
    network learns to deconvolve structure of any size instead of one class's look."""
    h, w = shape
    area = h * w
    out = np.zeros(shape, np.float32)
    for _ in range(max(2, int(area / 3000 * rng.uniform(0.5, 2.0)))):
        yx, wt = _curves(rng, shape, 1, (10, 120), rng.uniform(0.005, 0.06))
        width = float(np.exp(rng.uniform(np.log(0.3), np.log(3.0))))
        stroke = gaussian_filter(_splat(shape, yx, wt), width)
        out += stroke / max(float(stroke.max()), 1e-6) * rng.uniform(0.2, 1.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(0, 6))):
        cy, cx = rng.uniform([0, 0], shape)
        ry, rx = np.exp(rng.uniform(np.log(1.0), np.log(15.0), 2))
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        out += gaussian_filter(inside.astype(np.float32), 0.5) * rng.uniform(0.2, 1.0)
    n = int(area / 600 * rng.uniform(0.0, 1.0))
    dots = _splat(shape, rng.uniform([0, 0], shape, size=(n, 2)), rng.uniform(0.2, 1.0, n))
    return _normalised(out + gaussian_filter(dots, 0.3) * 4)


_CLASSES: dict[str, Callable[[np.random.Generator, tuple[int, int]], np.ndarray]] = {
    "filaments": filaments, "puncta": puncta, "nuclei": nuclei, "shapes": shapes,
    "rings": rings, "mitochondria": mitochondria}


def density(kind: str, rng: np.random.Generator, shape: tuple[int, int],
            images: Sequence[np.ndarray] = ()) -> np.ndarray:
    """A specimen of structure class `kind` on HIGH's grid."""
    if kind == "images":
        return image_density(images)(rng, shape)
    if kind not in _CLASSES:
        raise ValueError(f"unknown structure class {kind!r}; known: "
                         f"{', '.join([*_CLASSES, 'images'])}")
    return _CLASSES[kind](rng, shape)


# -- the two optical models --------------------------------------------------------------
def render_pair(truth: np.ndarray, optics: PairOptics, rng: np.random.Generator,
                photons: float, high_photons: float | None = None, gain: float = 1.3,
                offset: float = 100.0, read_noise_e: float = 1.6) -> SimulatedPair:
    """`truth` (a density on HIGH's grid, sides multiples of `scale`) seen by both instruments.

    `photons`: LOW's photo-electrons at its brightest structure; `high_photons`: HIGH's,
    or None for a noise-free HIGH.
    """
    s = optics.scale
    if truth.shape[0] % s or truth.shape[1] % s:
        raise ValueError(f"specimen {truth.shape} is not a multiple of scale {s}")
    high_clean = gaussian_filter(truth.astype(np.float32), optics.high_psf_sigma_px)
    high_clean /= max(float(high_clean.max()), 1e-6)
    low_signal = bin_mean(gaussian_filter(high_clean, optics.relative_sigma_px), s)
    # `photons` is set at LOW's brightest structure; the same factor carries HIGH over.
    to_low = np.float32(1.0 / max(float(low_signal.max()), 1e-6))
    low_rel = low_signal * to_low + np.float32(optics.low_background)
    low_expected = (low_rel * np.float32(photons * gain) + np.float32(offset)).astype(np.float32)
    electrons = rng.poisson(low_rel * photons).astype(np.float32)
    electrons += rng.normal(0.0, read_noise_e, electrons.shape).astype(np.float32)
    low = np.round(electrons * gain + offset).astype(np.float32)
    high = high_clean
    if high_photons is not None:
        high = (rng.poisson(high_clean * high_photons) / high_photons).astype(np.float32)
    return SimulatedPair(low=low, high=high, high_clean=high_clean,
                         high_in_low_units=high_clean * to_low,
                         low_expected=low_expected, gain=gain, offset=offset,
                         read_noise_e=read_noise_e, photons=photons)


def _unit_range(img: np.ndarray) -> np.ndarray:
    img = img - np.percentile(img, 1)
    return np.asarray(np.clip(img / max(float(np.percentile(img, 99.8)), 1e-9), 0, 1.2))


def warped_pair(field: np.ndarray, rng: np.random.Generator, scale: int = 1,
                warp: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(high, low, truth) for registration tests, from a square `field` (n × n).

    HIGH is the field blurred by 0.7 px; LOW is it blurred by 2.2 px with gamma 0.7 (other
    optics, other contrast), seen on pixels `scale`× HIGH's, warped by a random rotation
    (±3°), scale (±2 %), shift (±5 px) and a sinusoidal field (0.5–1.2 px), plus noise
    (σ 0.02 of its range). `truth` (2, n, n) holds LOW's (row, col) for each HIGH pixel, in
    LOW's own pixels. `warp=False` leaves the geometry alone. Values are in 0–1.2."""
    from scipy.ndimage import map_coordinates

    n = field.shape[0]
    high = _unit_range(gaussian_filter(field, 0.7))
    low_true = _unit_range(gaussian_filter(field, 2.2)) ** 0.7
    th = np.deg2rad(rng.uniform(-3, 3)) if warp else 0.0
    s = rng.uniform(0.98, 1.02) if warp else 1.0
    t = rng.uniform(-5, 5, 2) if warp else np.zeros(2)
    amp = rng.uniform(0.5, 1.2, 2) if warp else np.zeros(2)
    ph = rng.uniform(0, 2 * np.pi, 2)
    c = (n - 1) / 2

    def fwd(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # a point (y, x) of LOW's field, in HIGH's pixels, shows HIGH's field at fwd(y, x)
        yy = (c + s * (np.cos(th) * (y - c) - np.sin(th) * (x - c)) + t[0]
              + amp[0] * np.sin(2 * np.pi * x / n + ph[0]))
        xx = (c + s * (np.sin(th) * (y - c) + np.cos(th) * (x - c)) + t[1]
              + amp[1] * np.cos(2 * np.pi * y / n + ph[1]))
        return yy, xx

    nl = n // scale
    iy, ix = np.mgrid[0:nl, 0:nl].astype(float)
    uy, ux = (iy + 0.5) * scale - 0.5, (ix + 0.5) * scale - 0.5  # LOW pixel centres
    low = (map_coordinates(low_true, fwd(uy, ux), order=3, mode="reflect")
           + rng.normal(0, 0.02, (nl, nl)))
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    qy, qx = yy.copy(), xx.copy()
    for _ in range(60):  # invert fwd by fixed-point iteration: fwd(q) = each HIGH pixel
        fy, fx = fwd(qy, qx)
        qy -= fy - yy
        qx -= fx - xx
    truth = np.stack([(qy + 0.5) / scale - 0.5, (qx + 0.5) / scale - 0.5])
    return high, low, truth
