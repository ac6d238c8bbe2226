"""Crappifiers: turn good images into what a low-light acquisition looks like.

Two recipes, selectable in `dimscope train --crappifier`:

- `physical`: the camera model of the simulated microscope. Scale the clean
  image to a photon budget (photoelectrons at its brightest structure, drawn
  log-uniformly from a range), optionally blur (defocus / a worse PSF) and bin
  ×2 or ×4 (for super-resolution), draw Poisson shot noise, add Gaussian read
  noise, then apply gain and offset and round to integers like an ADC.
- `pssr`: the recipe of Fang et al. (PSSR, Nat Methods 2021): salt-and-pepper
  noise plus Gaussian noise whose variance follows the local intensity, then
  downsampling.

Both return the degraded image and the clean target mapped into the same
intensity units as the degraded one (ADU for `physical`), so training pairs
can be normalised with the input's own percentiles exactly as at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter


def bin_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Average `factor`×`factor` blocks (a camera with pixels `factor` times larger)."""
    if factor == 1:
        return image
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    v = image[:h, :w].reshape(h // factor, factor, w // factor, factor)
    return v.mean(axis=(1, 3), dtype=np.float32)


@dataclass(frozen=True, slots=True)
class PhysicalCrappifier:
    """Photon-budget camera model (see module docstring)."""

    photons: tuple[float, float] = (2.0, 200.0)
    read_noise_e: tuple[float, float] = (0.5, 3.0)
    gain_adu_per_e: tuple[float, float] = (0.5, 4.0)
    offset_adu: tuple[float, float] = (0.0, 400.0)
    background: tuple[float, float] = (0.0, 0.05)
    blur_sigma: tuple[float, float] = (0.0, 0.0)
    downsample: int = 1

    def __call__(self, clean: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        """clean: relative intensity (≈1 at the brightest structure), at target sampling."""
        photons = float(np.exp(rng.uniform(*np.log(self.photons))))
        read = rng.uniform(*self.read_noise_e)
        gain = rng.uniform(*self.gain_adu_per_e)
        offset = rng.uniform(*self.offset_adu)
        bg = rng.uniform(*self.background)
        relative = np.clip(clean, 0, None).astype(np.float32) + np.float32(bg)
        sigma = rng.uniform(*self.blur_sigma)
        seen = gaussian_filter(relative, sigma) if sigma > 0 else relative
        seen = bin_mean(seen, self.downsample)
        electrons = rng.poisson(seen * photons).astype(np.float32)
        electrons += rng.normal(0.0, read, electrons.shape).astype(np.float32)
        low = np.round(electrons * gain + offset).astype(np.float32)
        # The target: the expected signal in the same ADU units, at target sampling.
        target = relative * np.float32(photons * gain) + np.float32(offset)
        return low, target


@dataclass(frozen=True, slots=True)
class PSSRCrappifier:
    """Salt-and-pepper + locally scaled Gaussian noise, then downsampling (PSSR)."""

    salt_pepper: tuple[float, float] = (0.0, 0.005)
    local_var_scale: tuple[float, float] = (0.01, 0.1)
    downsample: int = 1

    def __call__(self, clean: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        target = np.clip(clean, 0, 1).astype(np.float32)
        noisy = target.copy()
        amount = rng.uniform(*self.salt_pepper)
        flips = rng.random(noisy.shape) < amount
        noisy[flips] = (rng.random(int(flips.sum())) < 0.5).astype(np.float32)
        scale = rng.uniform(*self.local_var_scale)
        noisy += rng.normal(size=noisy.shape).astype(np.float32) * np.sqrt(
            np.float32(scale) * np.maximum(noisy, 1e-4))
        return bin_mean(np.clip(noisy, 0, 1), self.downsample), target


def make_crappifier(kind: str, downsample: int = 1) -> PhysicalCrappifier | PSSRCrappifier:
    if kind == "physical":
        return PhysicalCrappifier(downsample=downsample)
    if kind == "pssr":
        return PSSRCrappifier(downsample=downsample)
    raise ValueError(f"unknown crappifier {kind!r}; known: physical, pssr")
