"""Control socket under load: round-trip latency while the simulated camera streams at full
rate, and raw frames lost during 100 random `set` commands.

A real `dimscope run` process (sim camera, SIZE², EXPOSURE ms, identity engine, trust maps
off so the pipeline keeps the camera's pace, raw + enhanced published) and this process as
the client (`ControlClient`, a DEALER over loopback TCP):

1. N `status` requests, one after another: round-trip p50/p99/max;
2. 100 random `set` commands, half exposure (EXPOSURE x 0.5-2), half laser power
   (0.2-1.0): round-trip p50/p99/max of each kind;
3. stop the daemon (SIGINT) and read its summary: frames acquired, archived, lost
   (acquired - archived; must be 0); then check every frame in index.jsonl against
   events.jsonl: its exposure must be the one in force from the recorded `from_frame_id`,
   and its simulated photons per ms (the sim's own tag) must follow the laser power in
   force (frames exposing across a change are not judged); and the camera's dead time at
   each exposure change (stop, set, restart the sequence), from the frames' timestamps.

Writes results/control.{json,md}. Timings on a shared machine are noisy.

    python bench/control.py [--size 256] [--exposure-ms 1] [--status-requests 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dimscope.daemon.client import ControlClient, ControlUnreachable

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3)}


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({model}), no GPU, shared with other users"


def _check_archive(run_dir: Path) -> dict[str, Any]:
    """Every archived frame against the settings events.jsonl says were in force."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    index = [json.loads(line) for line in (run_dir / "index.jsonl").read_text().splitlines()]
    start = events[0]["args"]
    exposure_changes = [(0, start["exposure_ms"], 0)]
    power_changes = [(0, start["laser_power"], 0)]
    for e in events[1:]:
        if e["command"] != "set" or not e["ok"]:
            continue
        r = e["result"]
        change = (r["from_frame_id"], r["value"], r["next_frame_id"])
        (exposure_changes if r.get("name") == "exposure" else power_changes).append(change)

    def in_force(changes: list[tuple[int, float, int]], frame_id: int) -> tuple[float, bool]:
        """(the value in force, whether the frame exposed across a change)."""
        value, straddles = changes[0][1], False
        for start_id, v, next_id in changes:
            if frame_id >= start_id:
                value = v
            elif next_id <= frame_id < start_id:
                straddles = True
        return value, straddles

    exposure_wrong = 0
    photons_per_power: list[float] = []
    by_id = {rec["frame_id"]: rec for rec in index}
    for rec in index:
        expected, _ = in_force(exposure_changes, rec["frame_id"])
        exposure_wrong += int(abs(rec["exposure_ms"] - expected) > 1e-6)
        power, straddles = in_force(power_changes, rec["frame_id"])
        if not straddles and power > 0:
            per_ms = float(rec["metadata"]["SimPhotonsPeak"]) / rec["exposure_ms"]
            photons_per_power.append(per_ms / power)
    ratio = np.asarray(photons_per_power)
    # Bleaching lowers the signal slowly over the run (a few %): judge against a running
    # median; a frame credited with the wrong laser power is off by >= 20 %.
    window = 51
    padded = np.pad(ratio, window // 2, mode="edge")
    running = np.array([np.median(padded[i:i + window]) for i in range(ratio.size)])
    power_wrong = int(np.sum(np.abs(ratio / running - 1) > 0.1))
    dead_ms = []
    for start_id, value, _ in exposure_changes[1:]:
        if start_id in by_id and start_id - 1 in by_id:
            gap = (by_id[start_id]["acquired_unix_ns"] - by_id[start_id - 1][
                "acquired_unix_ns"]) / 1e6
            dead_ms.append(gap - value)
    return {"frames_checked": len(index), "exposure_changes": len(exposure_changes) - 1,
            "laser_changes": len(power_changes) - 1,
            "frames_with_wrong_exposure": exposure_wrong,
            "frames_with_wrong_laser_power": power_wrong,
            "frames_judged_for_laser_power": int(ratio.size),
            "extra_dead_time_at_exposure_change_ms": _stats(dead_ms) if dead_ms else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--exposure-ms", type=float, default=1.0)
    ap.add_argument("--status-requests", type=int, default=1000)
    ap.add_argument("--sets", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "results")
    ap.add_argument("--keep", action="store_true", help="keep the run folder (it is large)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="dimscope-bench-control-"))
    address = f"tcp://127.0.0.1:{_free_port()}"
    config = work / "bench.toml"
    config.write_text(
        f'[source]\nkind = "sim"\nwidth = {args.size}\nheight = {args.size}\n'
        f'exposure_ms = {args.exposure_ms}\n[engine]\nname = "identity"\n'
        f'[trust]\nenabled = false\n[archive]\nfsync_every_s = 0\n'
        f'[publish]\naddress = "tcp://127.0.0.1:{_free_port()}"\n'
        f'[control]\naddress = "{address}"\n')
    summary_path = work / "summary.json"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "dimscope.daemon.cli", "run", "-c", str(config), "--duration",
         "600", "--out", str(work / "runs"), "-q", "--summary-json", str(summary_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with ControlClient(address, timeout_s=2.0) as ctl:
            deadline = time.monotonic() + 60
            while True:
                try:
                    ctl.status()
                    break
                except ControlUnreachable:
                    if time.monotonic() > deadline or daemon.poll() is not None:
                        raise SystemExit("the daemon did not answer") from None
            time.sleep(2.0)  # let the pipeline reach its steady rate
            rate_before = ctl.status()
            status_ms = []
            for _ in range(args.status_requests):
                t0 = time.perf_counter()
                ctl.status()
                status_ms.append((time.perf_counter() - t0) * 1e3)
            set_ms: dict[str, list[float]] = {"exposure": [], "laser_power": []}
            restarts_ms = []
            for _ in range(args.sets):
                name = rng.choice(["exposure", "laser_power"])
                value = (round(args.exposure_ms * rng.uniform(0.5, 2.0), 3)
                         if name == "exposure" else round(rng.uniform(0.2, 1.0), 3))
                t0 = time.perf_counter()
                result = ctl.set(name, value)
                set_ms[name].append((time.perf_counter() - t0) * 1e3)
                if result.get("stopped_ms") is not None:
                    restarts_ms.append(result["stopped_ms"])
                time.sleep(rng.uniform(0.0, 0.05))  # a person or a script, not a flood
            time.sleep(0.5)
            status = ctl.status()
    finally:
        daemon.send_signal(signal.SIGINT)
        _, err = daemon.communicate(timeout=180)
    summary = json.loads(summary_path.read_text())
    run_dir = Path(summary["run_dir"])
    archive_check = _check_archive(run_dir)
    if args.keep:
        print(f"run folder kept: {run_dir}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    lost = summary["acquired"] - summary["archived"]
    result = {
        "machine": _machine(),
        "case": {"size": args.size, "exposure_ms": args.exposure_ms, "engine": "identity",
                 "trust": False, "published": ["raw", "enhanced"],
                 "client": "ControlClient in another process, loopback TCP"},
        "fps_while_streaming": round(rate_before["fps"], 1),
        "status_round_trip_ms": _stats(status_ms),
        "set_round_trip_ms": {k: _stats(v) for k, v in set_ms.items() if v},
        "camera_sequence_stopped_per_exposure_change_ms": _stats(restarts_ms)
        if restarts_ms else None,
        "sets": args.sets,
        "acquired": summary["acquired"], "archived": summary["archived"], "frames_lost": lost,
        "run_error": summary["error"], "daemon_exit_code": daemon.returncode,
        "events_recorded": status["events"],
        "archive_check": archive_check,
        "dropped_by_stage": summary["dropped"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "control.json").write_text(json.dumps(result, indent=2) + "\n")
    st, ex = result["status_round_trip_ms"], result["set_round_trip_ms"]
    lines = [
        "# Control socket under load (`python bench/control.py`)",
        "",
        f"Machine: {result['machine']}. Daemon: `dimscope run`, simulated camera "
        f"{args.size}² at {args.exposure_ms:g} ms exposure ({result['fps_while_streaming']} "
        "frames/s measured), identity engine, trust maps off, raw and enhanced published; "
        "client: `ControlClient` in a second process over loopback TCP.",
        "",
        "| what | n | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
        f"| `status` round trip | {st['n']} | {st['p50']} | {st['p99']} | {st['max']} |",
    ]
    for k, v in ex.items():
        lines.append(f"| `set {k}` round trip | {v['n']} | {v['p50']} | {v['p99']} | "
                     f"{v['max']} |")
    stopped = result["camera_sequence_stopped_per_exposure_change_ms"]
    if stopped:
        lines.append(f"| camera sequence stopped per exposure change (stop, drain, set, "
                     f"restart) | {stopped['n']} | {stopped['p50']} | {stopped['p99']} | "
                     f"{stopped['max']} |")
    dead = archive_check["extra_dead_time_at_exposure_change_ms"]
    if dead:
        lines.append(f"| extra camera dead time at an exposure change (frame gap minus the "
                     f"new exposure) | {dead['n']} | {dead['p50']} | {dead['p99']} | "
                     f"{dead['max']} |")
    lines += [
        "",
        f"**{args.sets} random `set` commands while streaming: {summary['acquired']} frames "
        f"acquired, {summary['archived']} archived, {lost} lost.** Run error: "
        f"{summary['error']}; daemon exit code {daemon.returncode}.",
        "",
        f"Archive against the event log: {archive_check['frames_checked']} frames, "
        f"{archive_check['exposure_changes']} exposure and {archive_check['laser_changes']} "
        f"laser changes; frames whose recorded exposure is not the one in force from the "
        f"event's `from_frame_id`: {archive_check['frames_with_wrong_exposure']}; frames whose "
        f"simulated signal does not follow the laser power in force: "
        f"{archive_check['frames_with_wrong_laser_power']} of "
        f"{archive_check['frames_judged_for_laser_power']} judged (a frame exposing across a "
        "laser change is not judged).",
        "",
        "Frames dropped by stage (never raw data: the engine and publishers drop by design): "
        + ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()),
    ]
    (args.out / "control.md").write_text("\n".join(lines) + "\n")
    print(f"control round trip while streaming {result['fps_while_streaming']} frames/s: "
          f"status p50 {st['p50']} ms p99 {st['p99']} ms; {args.sets} random sets: set p50 "
          f"{max(v['p50'] for v in ex.values())} ms p99 {max(v['p99'] for v in ex.values())} "
          f"ms; frames lost {lost}; wrong exposure {archive_check['frames_with_wrong_exposure']}"
          f", wrong laser {archive_check['frames_with_wrong_laser_power']}")
    if lost or daemon.returncode != 0:
        print(err[-2000:], file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
