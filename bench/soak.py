"""Soak: run the daemon for minutes and check that nothing is lost and memory stays flat.

Starts `dimscope run` as a real process (default: the simulated microscope at
256², 10 ms exposure, the shipped `denoise` engine, raw + enhanced published, a
subscriber process reading both, archive files rotated every 0.5 GB so that
file rotation is part of the steady state), samples the daemon's resident memory every
few seconds, and prints:

    frames acquired, archived, lost (must be 0)
    RSS slope in MB/min after the warm-up (target < 0.5), by least squares

The archive goes to a temporary folder that is deleted afterwards (pass
`--keep` to keep it). Usage:

    python bench/soak.py [--minutes 5] [--config CONFIG.toml] [--warmup-s 60]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "dimscope.daemon.cli"]
TARGET_MB_PER_MIN = 0.5


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--config", type=Path, default=None,
                    help="a dimscope config (its [publish] address is replaced)")
    ap.add_argument("--warmup-s", type=float, default=60.0,
                    help="samples before this are not used for the slope")
    ap.add_argument("--every-s", type=float, default=5.0, help="RSS sampling interval")
    ap.add_argument("--keep", action="store_true", help="keep the archive")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dimscope-soak-"))
    address = _free_address()
    config = work / "soak.toml"
    base = args.config.read_text() if args.config else (
        '[source]\nkind = "sim"\nwidth = 256\nheight = 256\nexposure_ms = 10.0\n'
        '[engine]\nname = "denoise"\n[archive]\nrotate_gb = 0.5\n')
    base = base.split("[publish]")[0]  # our own address, so nothing else is disturbed
    config.write_text(base + f'\n[publish]\naddress = "{address}"\n')
    summary_path = work / "summary.json"
    duration = args.minutes * 60
    daemon = subprocess.Popen([*CLI, "run", "-c", str(config), "--duration", str(duration),
                               "--out", str(work / "runs"), "-q", "--summary-json",
                               str(summary_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    viewer = subprocess.Popen([*CLI, "subscribe", "--address", address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[float, float]] = []
    start = time.monotonic()
    try:
        while daemon.poll() is None:
            t = time.monotonic() - start
            try:
                samples.append((t, _rss_mb(daemon.pid)))
            except (OSError, RuntimeError):
                break
            print(f"\r{t:6.0f} s  RSS {samples[-1][1]:7.1f} MB", end="", file=sys.stderr,
                  flush=True)
            time.sleep(args.every_s)
        _, stderr = daemon.communicate(timeout=300)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(300)
        viewer.send_signal(signal.SIGTERM)
        viewer.wait(30)
    print(file=sys.stderr)
    summary = json.loads(summary_path.read_text())
    acquired, archived = int(summary["acquired"]), int(summary["archived"])
    lost = acquired - archived + len(summary.get("not_archived") or [])
    steady = np.array([(t, rss) for t, rss in samples if t >= args.warmup_s])
    slope = float(np.polyfit(steady[:, 0] / 60.0, steady[:, 1], 1)[0]) if len(steady) > 2 \
        else float("nan")
    drops = {k: v for k, v in summary["dropped"].items() if v}
    print(f"soak {args.minutes:g} min, exit {daemon.returncode}, "
          f"{summary['fps']:.1f} frames/s, engine {summary['engine']}")
    print(f"frames acquired {acquired}  archived {archived}  lost {lost}")
    print(f"dropped by policy (counted, not raw): {drops or 'none'}")
    print(f"RSS {samples[0][1]:.0f} MB at start, {samples[-1][1]:.0f} MB at end; "
          f"slope after {args.warmup_s:g} s warm-up: {slope:+.3f} MB/min "
          f"(target < {TARGET_MB_PER_MIN})")
    if summary.get("error"):
        print(f"ERROR: {summary['error']}\n{stderr[-2000:]}")
    if args.keep:
        print(f"archive kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    ok = lost == 0 and daemon.returncode == 0 and slope < TARGET_MB_PER_MIN
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
