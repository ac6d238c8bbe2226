"""Helpers for tests that drive `dimscope` as a real process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "dimscope.daemon.cli"]


def free_tcp_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def write_config(path: Path, text: str, *, address: str | None = None) -> Path:
    """A TOML config; a `[publish]` section on a free port is added unless the text has one."""
    if "[publish]" not in text:
        text += f'\n[publish]\naddress = "{address or free_tcp_address()}"\n'
    path.write_text(text)
    return path


def dimscope(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def run_summary(tmp_path: Path, config: Path, *args: str, timeout: float = 120
                ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`dimscope run` in a subprocess; (the process, its --summary-json)."""
    summary_path = tmp_path / f"summary-{config.stem}.json"
    result = dimscope("run", "-c", config, "-q", "--summary-json", summary_path, *args,
                      timeout=timeout)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return result, summary


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
