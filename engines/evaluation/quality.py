"""Image-quality metrics as CARE/CSBDeep report them.

The ground truth is normalised by its 0.1 / 99.9 percentiles; each method's
output (and the raw input) is then mapped onto it by the least-squares affine
fit (`a*x + b`), so that a method is not penalised for a global intensity
scale or offset it cannot know (8-bit conversions, camera offset). PSNR and
SSIM are computed with a data range of 1 on that scale; NRMSE is the RMSE
divided by the range of the normalised ground truth.
"""

from __future__ import annotations

import numpy as np


def normalize_truth(truth: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(truth, [0.1, 99.9])
    return ((truth.astype(np.float32) - lo) / max(float(hi - lo), 1e-12)).astype(np.float32)


def fit_to(truth_n: np.ndarray, image: np.ndarray) -> np.ndarray:
    """`image` scaled and offset to best match the normalised truth (least squares)."""
    x = image.astype(np.float64).ravel()
    y = truth_n.astype(np.float64).ravel()
    xc = x - x.mean()
    var = float(xc @ xc)
    a = float(xc @ (y - y.mean())) / var if var > 0 else 0.0
    b = y.mean() - a * x.mean()
    return (a * image.astype(np.float64) + b).astype(np.float32)


def psnr(truth_n: np.ndarray, image_n: np.ndarray) -> float:
    mse = float(np.mean((truth_n.astype(np.float64) - image_n) ** 2))
    return float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf")


def nrmse(truth_n: np.ndarray, image_n: np.ndarray) -> float:
    rmse = float(np.sqrt(np.mean((truth_n.astype(np.float64) - image_n) ** 2)))
    return rmse / max(float(truth_n.max() - truth_n.min()), 1e-12)


def ssim(truth_n: np.ndarray, image_n: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(truth_n, image_n.astype(np.float32), data_range=1.0))


def score(truth: np.ndarray, image: np.ndarray, with_ssim: bool = True) -> dict[str, float]:
    """PSNR / SSIM / NRMSE of `image` against `truth` (same shape), as described above."""
    if truth.shape != image.shape:
        raise ValueError(f"shapes differ: truth {truth.shape} vs image {image.shape}")
    t = normalize_truth(truth)
    x = fit_to(t, image)
    out = {"psnr": psnr(t, x), "nrmse": nrmse(t, x)}
    if with_ssim:
        out["ssim"] = ssim(t, x)
    return out
