"""Overlapping tiles: bounded memory on large frames, no visible seams.

Each tile is processed with `halo` extra pixels of context on every side
(mirrored at the frame edges) and only its centre is kept, so away from the
frame border the result equals the untiled one up to the network's receptive
field beyond the halo. All tiles have the same shape, so a runtime compiled
for one static shape serves them all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tile_geometry(height: int, width: int, tile: int, halo: int, multiple: int
                  ) -> tuple[int, int]:
    """(tile side, kept core side) for frames larger than `tile`.

    The frame is split into the fewest tiles of at most `tile` pixels, and the
    cores are balanced (2048 with tile 1024 -> 3 tiles of 752 with 688-pixel
    cores rather than 960 + 960 + 128), so little work is wasted on padding.
    """
    if tile <= 2 * halo or tile % multiple or halo % multiple:
        raise ValueError(f"tile {tile} must exceed 2*halo ({2 * halo}); both multiples of "
                         f"{multiple}")
    longest = max(height, width)
    n = -(-longest // (tile - 2 * halo))
    core = round_up(-(-longest // n), multiple)
    return core + 2 * halo, core


def input_shape(height: int, width: int, tile: int, multiple: int, halo: int = 0
                ) -> tuple[int, int]:
    """The (static) input shape a runtime sees for frames of this size."""
    if height <= tile and width <= tile:
        return round_up(height, multiple), round_up(width, multiple)
    side, _ = tile_geometry(height, width, tile, halo, multiple)
    return side, side


def run_tiled(image: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], *, tile: int,
              halo: int, scale: int, multiple: int) -> np.ndarray:
    """Apply `fn` ((1,C,h,w) float32 -> (1,1,h*scale,w*scale)) to a 2-D image or to a
    (C, H, W) stack of channels (a temporal window), tile by tile; returns 2-D."""
    stack = image if image.ndim == 3 else image[None]
    height, width = stack.shape[1:]
    if height <= tile and width <= tile:
        ph, pw = round_up(height, multiple), round_up(width, multiple)
        padded = stack if (ph, pw) == (height, width) else np.pad(
            stack, ((0, 0), (0, ph - height), (0, pw - width)), mode="reflect")
        out = fn(padded[None])
        return np.ascontiguousarray(out[0, 0, :height * scale, :width * scale])
    tile, core = tile_geometry(height, width, tile, halo, multiple)
    ny, nx = -(-height // core), -(-width // core)
    # Mirror-pad so that every tile, border ones included, has full context.
    padded = np.pad(stack, ((0, 0), (halo, ny * core - height + halo),
                            (halo, nx * core - width + halo)), mode="reflect")
    out = np.empty((ny * core * scale, nx * core * scale), dtype=np.float32)
    s_core, s_halo = core * scale, halo * scale
    for iy in range(ny):
        for ix in range(nx):
            y0, x0 = iy * core, ix * core
            result = fn(padded[None, :, y0:y0 + tile, x0:x0 + tile])
            out[iy * s_core:(iy + 1) * s_core, ix * s_core:(ix + 1) * s_core] = \
                result[0, 0, s_halo:s_halo + s_core, s_halo:s_halo + s_core]
    return out[:height * scale, :width * scale]
