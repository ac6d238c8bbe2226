"""Picasso's CPU localizer on a raw stack, for `bench/smlm.py`'s comparison.

Run with an interpreter that has `picassosr` (it cannot share dimscope's environment: it
requires pandas < 3 and ~40 more packages, see results/smlm.md):

    PY -m venv /tmp/picasso-venv && /tmp/picasso-venv/bin/pip install picassosr
    /tmp/picasso-venv/bin/python bench/smlm_picasso.py RAW.tif OUT.npz --pixel-nm 100 \
        --gain 2 --offset 100 --min-ng 2000 --box 7 --method gaussmle

Writes OUT.npz: frame, x_px, y_px (Picasso's pixel coordinates), photons, bg, lpx, lpy (px),
sx, sy, and `seconds` (identify, fit: wall time of each on the whole stack, movie loading
excluded, after an untimed warm-up on the first `--warmup` frames).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("raw")
    p.add_argument("out")
    p.add_argument("--pixel-nm", type=float, default=100.0)
    p.add_argument("--gain", type=float, default=2.0, help="ADU per e-")
    p.add_argument("--offset", type=float, default=100.0)
    p.add_argument("--min-ng", type=float, default=2000.0, help="minimum net gradient")
    p.add_argument("--box", type=int, default=7)
    p.add_argument("--method", default="gaussmle")
    p.add_argument("--warmup", type=int, default=20,
                   help="frames localized first, untimed (numba compiles on first use)")
    a = p.parse_args()

    from picasso import io, localize

    movie, _ = io.load_movie(a.raw)
    np.asarray(movie[0])  # the first read opens the file
    camera = {"Baseline": a.offset, "Sensitivity": 1.0 / a.gain, "Gain": 1,
              "Pixelsize": a.pixel_nm}
    if a.warmup:
        ids = localize.identify(movie, a.min_ng, a.box, frame_bounds=(0, a.warmup - 1),
                                threaded=True, return_info=False)
        localize.fit(movie, camera_info=camera, identifications=ids, box=a.box,
                     fitting_method=a.method)
    t0 = time.perf_counter()
    ids = localize.identify(movie, a.min_ng, a.box, threaded=True, return_info=False)
    t1 = time.perf_counter()
    locs, _ = localize.fit(movie, camera_info=camera, identifications=ids, box=a.box,
                           fitting_method=a.method)
    t2 = time.perf_counter()
    cols = {k: np.asarray(locs[k]) for k in ("frame", "photons", "bg", "lpx", "lpy", "sx",
                                             "sy")}
    np.savez(a.out, x_px=np.asarray(locs["x"]), y_px=np.asarray(locs["y"]),
             seconds=np.array([t1 - t0, t2 - t1]), frames=np.array(len(movie)), **cols)
    print(f"picasso: {len(locs)} localizations, identify {t1 - t0:.2f} s, fit {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
