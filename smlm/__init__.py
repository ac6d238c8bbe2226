"""Single-molecule localization microscopy (issue 17): the foundation.

One module, one job:

- `block`     the typed localization block (a frame range + named column arrays, units stated)
              that every other module hands around; the column schema
- `psf`       integrated-Gaussian stamping of point sources onto a pixel grid (vectorised)
- `simulate`  blinking emitters on filaments, rings or a density image, camera, drift,
              one widefield frame, and the ground truth
- `localize`  the `Localizer` protocol (push frames, get blocks; batch) and its smappy backend
- `table`     the crash-safe append-only table (Arrow IPC stream), molecule merging,
              ThunderSTORM CSV and Picasso HDF5 import/export
- `render`    histogram and Gaussian renders at a pixel size in nm
- `drift`     redundant cross-correlation drift estimation
- `frc`       Fourier ring correlation of the plain render (alternating frame blocks)
- `metrics`   matching to ground truth, Jaccard/RMSE/efficiency, the Cramér–Rao bound

Not here yet: the daemon pipeline stage, ZeroMQ topics, the sparse-to-dense network, the error
map and the ready rule.
"""
