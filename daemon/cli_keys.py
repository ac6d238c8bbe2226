"""`dimscope keys` and `dimscope relay`: CURVE key pairs and the fan-out relay."""

from __future__ import annotations

import argparse


def add_security_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `keys` and `relay` (not built yet)."""
