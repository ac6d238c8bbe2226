"""dimscope.engines.pairs — registration of LOW/HIGH image pairs of the same fields
(cross-modality training data, Wang et al. 2019).

`register.py` registers one pair of arrays (scale, coarse NCC, affine by mutual information
with SimpleITK, block-wise shift maps); `io.py` finds the pairs among files or folders,
writes the registered images, transforms, montages and report, and applies saved
transforms to another channel. `dimscope pairs register|apply` is the command line.
"""

from __future__ import annotations

from .io import PairsError, apply_transforms, find_pairs, register_pairs
from .register import Registration, RegistrationOptions, register, resample_low

__all__ = ["PairsError", "Registration", "RegistrationOptions", "apply_transforms",
           "find_pairs", "register", "register_pairs", "resample_low"]
