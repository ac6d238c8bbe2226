"""`dimscope ctl`: the control socket's command line (docs/control.md)."""

from __future__ import annotations

import argparse


def add_control_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `ctl` (not built yet)."""
