"""`dimscope view [ADDRESS | RUN_DIR]`: napari with dimscope's widget (the `viewer` extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def cmd_view(args: argparse.Namespace) -> int:
    try:
        import napari

        from dimscope.viewer.review import RunReviewWidget
        from dimscope.viewer.widget import DimscopeWidget
    except ImportError as exc:
        print(f"dimscope: the viewer needs napari and Qt ({exc}); install the viewer extra: "
              "pip install 'dimscope[viewer]'", file=sys.stderr)
        return EXIT_BAD_INPUT
    target = args.target
    viewer = napari.Viewer(title="dimscope")
    if Path(target).is_dir():
        viewer.window.add_dock_widget(RunReviewWidget(viewer, Path(target)),
                                      name="dimscope run review", area="right")
    else:
        widget = DimscopeWidget(viewer, address=target, control_address=args.control,
                                server_key=args.server_key, client_key=args.client_key)
        viewer.window.add_dock_widget(widget, name="dimscope live", area="right")
        widget.connect_stream()
    napari.run()
    return EXIT_OK


def add_view_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = sub.add_parser("view", help="open napari on a live stream or a finished run folder")
    v.add_argument("target", nargs="?", default="tcp://127.0.0.1:5555",
                   help="a daemon's publish address (default tcp://127.0.0.1:5555) or a run "
                        "folder to review")
    v.add_argument("--control", default="tcp://127.0.0.1:5556",
                   help="the daemon's control address (controls are disabled without one)")
    from .cli_keys import add_client_key_args

    add_client_key_args(v)  # a daemon using CURVE
    v.set_defaults(func=cmd_view)
