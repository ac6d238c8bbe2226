"""dimscope.viewer — a napari plugin that subscribes to dimscope (the `viewer` extra).

`stream.py` receives (no Qt), `widget.py` is the live dock widget, `review.py` opens a
finished run folder, `plot.py` the small live plot; `napari.yaml` is the npe2 manifest
(entry point `napari.manifest` in pyproject.toml). `dimscope view` opens napari with them.
"""
