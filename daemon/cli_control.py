"""`dimscope ctl`: drive a running daemon through its control socket (docs/control.md).

    dimscope ctl [--address ADDR | --run RUN_DIR] [--timeout S] [--json]
                 [--server-key SERVER.key --client-key CLIENT.key_secret] COMMAND
    COMMAND: status [--watch [--interval S]] [--full] | get NAME | get DEVICE PROPERTY
             | set NAME VALUE | set DEVICE PROPERTY VALUE
             | engine [NAME] [--model M] [--runtime R] [--budget-ms X | --no-budget]
                      [--adapt | --no-adapt] [--option KEY=VALUE ...]
             | start | stop | snap | mda SEQUENCE.yaml

Exit codes: 0 the daemon did it; 1 it answered with an error (the message says why;
nothing changed); 2 bad usage, or no daemon answered within the timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .cli_keys import add_client_key_args

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

#: settings `get`/`set` know by name (everything else: DEVICE PROPERTY)
FRIENDLY = ("exposure", "laser_power")


class _Usage(ValueError):
    """A command line that cannot become a request (exit 2)."""


def add_control_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `ctl`."""
    c = sub.add_parser(
        "ctl", help="control a running daemon: status, exposure, laser, engine, start/stop",
        description="Send one request to a running daemon's control socket and print the "
        "reply. Exit 0: done; 1: the daemon refused it (nothing changed); 2: bad usage or "
        "no daemon answered.")
    where = c.add_mutually_exclusive_group()
    where.add_argument("--address", default=None,
                       help="the daemon's control socket (default tcp://127.0.0.1:5556)")
    where.add_argument("--run", type=Path, default=None, metavar="RUN_DIR",
                       help="the daemon writing this run folder (its control.json names the "
                            "address: use it when the default port was taken)")
    c.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds to wait for the reply (default 5; engine 60, stop 30)")
    add_client_key_args(c)
    c.add_argument("--json", action="store_true", help="print the reply's result as JSON")
    cs = c.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")

    st = cs.add_parser("status", help="state, frame counters, latency, engine, settings")
    st.add_argument("--watch", action="store_true",
                    help="refresh in place until Ctrl-C")
    st.add_argument("--interval", type=float, default=1.0, metavar="S",
                    help="seconds between refreshes with --watch (default 1)")
    st.add_argument("--full", action="store_true", help="include the whole run summary")
    st.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="print the status as JSON")

    g = cs.add_parser("get", help="read a setting: NAME (exposure, laser_power) or DEVICE "
                                  "PROPERTY")
    g.add_argument("target", nargs="+", metavar="NAME | DEVICE PROPERTY")

    s = cs.add_parser("set", help="change a setting between two frames: NAME VALUE or DEVICE "
                                  "PROPERTY VALUE")
    s.add_argument("target", nargs="+", metavar="NAME VALUE | DEVICE PROPERTY VALUE")

    e = cs.add_parser("engine", help="change the engine, model, budget or adaptation between "
                                     "two frames")
    e.add_argument("name", nargs="?", default=None,
                   help="engine name (default: the one in service)")
    e.add_argument("--model", default=None, help="model name or .onnx path (on the daemon's "
                                                 "machine)")
    e.add_argument("--runtime", default=None,
                   help="auto, cpu, openvino, onnxruntime, torch, cuda, tensorrt")
    budget = e.add_mutually_exclusive_group()
    budget.add_argument("--budget-ms", type=float, default=None, metavar="MS",
                        help="latency budget, acquisition to publication")
    budget.add_argument("--no-budget", action="store_true", help="remove the budget")
    e.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=None,
                   help="live adaptation on (--adapt) or off (--no-adapt)")
    e.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine option (repeatable); given options replace the current "
                        "ones")

    cs.add_parser("start", help="resume live streaming")
    cs.add_parser("stop", help="stop live streaming (the run goes on) or cancel an MDA "
                               "sequence")
    cs.add_parser("snap", help="take one frame (live streaming stopped): archived and "
                               "published")
    m = cs.add_parser("mda", help="run a useq MDA sequence (live streaming stopped)")
    m.add_argument("sequence", help="YAML/JSON useq MDASequence (read here and sent)")
    m.add_argument("--on-daemon", action="store_true",
                   help="the path is on the daemon's machine: let the daemon read it")
    c.set_defaults(func=cmd_ctl)


def cmd_ctl(args: argparse.Namespace) -> int:
    from .client import ControlError, ControlUnreachable

    try:
        call = _request_for(args)
        client = _client(args)
    except _Usage as exc:
        print(f"dimscope ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with client:
            if args.ctl_command == "status" and args.watch:
                return _watch(client, args)
            try:
                result = call(client)
            except ValueError as exc:  # a sequence file that cannot be read, here
                print(f"dimscope ctl: {exc}", file=sys.stderr)
                return EXIT_USAGE
    except ControlUnreachable as exc:
        print(f"dimscope ctl: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:
        print(f"dimscope ctl: {args.ctl_command} refused ({exc.code}): {exc.message}",
              file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for line in _describe(args.ctl_command, result):
            print(line)
    return EXIT_OK


def _client(args: argparse.Namespace) -> Any:
    from .client import DEFAULT_CONTROL_ADDRESS, ControlClient
    from .config import check_endpoint

    if args.timeout is not None and not args.timeout > 0:
        raise _Usage(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if (args.server_key is None) != (args.client_key is None):
        raise _Usage("CURVE needs both --server-key (the daemon's .key file) and --client-key "
                     "(this client's .key_secret file)")
    for flag, path in (("--server-key", args.server_key), ("--client-key", args.client_key)):
        if path is not None and not path.is_file():
            raise _Usage(f"{flag} {path}: no such file")
    address = args.address
    if args.run is not None:
        try:
            address = json.loads((args.run / "control.json").read_text())["address"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _Usage(f"--run {args.run}: cannot read the control address from its "
                         f"control.json ({exc})") from None
    address = address or DEFAULT_CONTROL_ADDRESS
    try:
        check_endpoint(address, bind=False)
    except ValueError as exc:
        raise _Usage(f"--address {address!r}: {exc}") from None
    from .security import SecurityError

    try:
        return ControlClient(address, timeout_s=args.timeout or 5.0,
                             server_key=args.server_key, client_key=args.client_key)
    except SecurityError as exc:
        raise _Usage(str(exc)) from None


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _Usage(f"{what} needs a number, got {text!r}") from None


def _request_for(args: argparse.Namespace) -> Any:
    """The client call the command line asks for; _Usage when it cannot be one."""
    cmd = args.ctl_command
    if cmd == "status":
        if args.interval <= 0:
            raise _Usage(f"--interval must be > 0 seconds, got {args.interval:g}")
        full = args.full
        return lambda c: c.status(full=full)
    if cmd == "get":
        t = args.target
        if len(t) == 1:
            if t[0] not in FRIENDLY:
                raise _Usage(f"unknown setting {t[0]!r}: give {' or '.join(FRIENDLY)}, or a "
                             "DEVICE and a PROPERTY")
            return lambda c: c.get(t[0])
        if len(t) == 2:
            return lambda c: c.get(device=t[0], property=t[1])
        raise _Usage("get takes NAME or DEVICE PROPERTY")
    if cmd == "set":
        t = args.target
        if len(t) == 2:
            if t[0] not in FRIENDLY:
                raise _Usage(f"unknown setting {t[0]!r}: give {' or '.join(FRIENDLY)}, or "
                             "DEVICE PROPERTY VALUE")
            value = _number(t[1], t[0])
            return lambda c: c.set(t[0], value)
        if len(t) == 3:
            # Sent as text: the daemon converts it to the property's own type and checks it.
            return lambda c: c.set(device=t[0], property=t[1], value=t[2])
        raise _Usage("set takes NAME VALUE or DEVICE PROPERTY VALUE")
    if cmd == "engine":
        options = _options(args.option) if args.option else None
        budget = 0.0 if args.no_budget else args.budget_ms
        if budget is not None and budget < 0:
            raise _Usage(f"--budget-ms must be >= 0, got {budget:g}")
        if (args.name, args.model, args.runtime, options, budget, args.adapt) == (
                None, None, None, None, None, None):
            raise _Usage("engine: nothing to change (give NAME, --model, --runtime, --option, "
                         "--budget-ms, --no-budget or --adapt/--no-adapt)")
        timeout = args.timeout
        return lambda c: c.engine(args.name, model=args.model, runtime=args.runtime,
                                  options=options, budget_ms=budget, adapt=args.adapt,
                                  timeout_s=timeout)
    if cmd == "mda":
        return lambda c: c.mda(args.sequence, on_daemon=args.on_daemon)
    return {"start": lambda c: c.start(), "stop": lambda c: c.stop(),
            "snap": lambda c: c.snap()}[cmd]


def _options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values become numbers or booleans where they read as such."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise _Usage(f"--option takes KEY=VALUE, got {pair!r}")
        value: Any = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    continue
        out[key] = value
    return out


# -- output --------------------------------------------------------------------------------
def _fmt(value: Any, unit: str = "") -> str:
    if isinstance(value, float):
        return f"{value:g}{unit}"
    return f"{value}{unit}" if value is not None else "-"


def _where(r: dict[str, Any]) -> str:
    text = f"from frame {r['from_frame_id']}" if "from_frame_id" in r else ""
    if r.get("sequence_restarted"):
        text += f" (camera sequence stopped {r.get('stopped_ms') or 0:.1f} ms for it)"
    return text


def _describe(command: str, r: dict[str, Any]) -> list[str]:
    if command == "status":
        return format_status(r)
    if command == "get":
        name = r.get("name") or f"{r['device']}/{r['property']}"
        line = f"{name} = {_fmt(r['value'], ' ms' if r.get('unit') == 'ms' else '')}"
        details = [r[k] for k in ("type",) if r.get(k)]
        if r.get("read_only"):
            details.append("read-only")
        if r.get("limits"):
            details.append(f"limits {_fmt(r['limits'][0])}-{_fmt(r['limits'][1])}")
        if r.get("allowed"):
            details.append("allowed " + ", ".join(map(str, r["allowed"])))
        return [line + (f"  ({'; '.join(map(str, details))})" if details else "")]
    if command == "set":
        name = r.get("name") or f"{r['device']}/{r['property']}"
        unit = " ms" if r.get("unit") == "ms" else ""
        return [f"{name} = {_fmt(r['value'], unit)} (was {_fmt(r.get('previous'), unit)}) "
                + _where(r)]
    if command == "engine":
        lines = []
        if "engine" in r:
            lines.append(f"engine {r['engine']} {r.get('version', '')} on {r.get('runtime')} "
                         f"(replaced {r.get('replaced')}) from frame {r['from_frame_id']}")
        budget = r.get("budget_ms")
        lines.append(f"budget {_fmt(budget, ' ms') if budget else 'none'}; adaptation "
                     f"{'on' if r.get('adapting') else 'off'}"
                     + ("" if "engine" in r else f"; from frame {r['from_frame_id']}"))
        if r.get("adapt_error"):
            lines.append(f"adaptation did not start: {r['adapt_error']}")
        return lines
    if command == "stop":
        if r.get("cancelled_mda"):
            return [f"MDA sequence cancelled; acquisition {r.get('acquisition')}"]
        return [f"live streaming stopped; the next frame will be {r.get('next_frame_id')}"]
    if command == "start":
        return [f"live streaming from frame {r.get('from_frame_id')}"]
    if command == "snap":
        return [f"snapped frame {r['frame_id']} ({'x'.join(map(str, r['shape']))}, "
                f"{_fmt(r.get('exposure_ms'), ' ms')}): archived and published"]
    if command == "mda":
        return [f"MDA sequence started: {r['planned']} frame(s) from frame "
                f"{r['from_frame_id']} (`ctl status` follows it; `ctl stop` cancels it)"]
    return [json.dumps(r)]


def format_status(s: dict[str, Any]) -> list[str]:
    """The status reply as a few lines for people (what `ctl status` prints)."""
    f = s.get("frames", {})
    lines = [
        f"dimscope {s.get('state')} · acquisition {s.get('acquisition')} · up "
        f"{s.get('uptime_s', 0):.1f} s · {s.get('source')} · {s.get('run_dir')}",
        f"frames acquired {f.get('acquired')} ({s.get('fps', 0):.1f}/s) archived "
        f"{f.get('archived')} enhanced {f.get('enhanced')} published {f.get('published')} "
        f"dropped {f.get('dropped')}" + (f" NOT ARCHIVED {f['not_archived']}"
                                         if f.get("not_archived") else ""),
    ]
    e = s.get("engine")
    if e:
        adapt = e.get("adaptation") or {}
        budget = e.get("budget_ms")
        lines.append(
            f"engine {e.get('name')} {e.get('version')} ({e.get('runtime')}, "
            f"{e.get('precision')}) tier {e.get('tier')}"
            + (f" · budget {budget:g} ms, {e.get('skipped')} skipped" if budget else "")
            + (f" · trust alerts {e['trust_alerts']}" if e.get("trust_alerts") is not None
               else "")
            + f" · adaptation {'on ' + str(adapt.get('version')) if adapt.get('on') else 'off'}"
            + ("" if e.get("verified", True) else " · UNVERIFIED MODEL"))
    else:
        lines.append("engine: none (raw only)" + (f": {s['engine_error']}"
                                                  if s.get("engine_error") else ""))
    lat = s.get("latency_ms") or {}
    shown = [f"{k} {v.get('p50') or 0:.1f}/{v.get('p99') or 0:.1f}" for k, v in lat.items()
             if k in ("enhanced", "raw", "engine")]
    settings = s.get("settings") or {}
    lines.append(
        ("latency p50/p99 ms: " + " ".join(shown) + " · " if shown else "")
        + f"exposure {_fmt(settings.get('exposure_ms'), ' ms')} · laser "
        f"{_fmt(settings.get('laser_power'))} · events {s.get('events')}")
    mda = s.get("mda")
    if s.get("acquisition") == "mda" or (mda and mda.get("error")):
        lines.append(f"MDA: {mda}" if mda else "MDA sequence running")
    if s.get("error"):
        lines.append(f"ERROR: {s['error']}")
    return lines


def _watch(client: Any, args: argparse.Namespace) -> int:
    """Redraw the status in place every `--interval` s until Ctrl-C (ANSI: cursor up,
    clear line; with --json one JSON line per refresh instead). The first request must
    succeed; later silences are shown, not fatal."""
    from .client import ControlUnreachable

    first = client.status(full=args.full)  # no daemon: ControlUnreachable, exit 2
    drawn = 0
    last_ok, status = time.monotonic(), first
    try:
        while True:
            if args.json:  # for programs: one JSON line per refresh, nothing redrawn
                print(json.dumps(status), flush=True)
                time.sleep(args.interval)
                with contextlib.suppress(ControlUnreachable):
                    status = client.status(full=args.full)
                continue
            width = shutil.get_terminal_size((100, 20)).columns - 1
            lines = format_status(status)
            if time.monotonic() - last_ok > args.interval * 1.5:
                lines.append(f"(no answer for {time.monotonic() - last_ok:.0f} s)")
            out = "".join(f"\x1b[{drawn}F" if drawn else "")
            out += "".join(f"\x1b[2K{line[:width]}\n" for line in lines)
            if drawn > len(lines):  # the block shrank: clear what is left below it
                out += "\x1b[2K\n" * (drawn - len(lines)) + f"\x1b[{drawn - len(lines)}F"
            sys.stdout.write(out)
            sys.stdout.flush()
            drawn = len(lines)
            time.sleep(args.interval)
            try:
                status = client.status(full=args.full)
                last_ok = time.monotonic()
            except ControlUnreachable:
                pass  # keep the last status; the line above says how long it has been
    except KeyboardInterrupt:
        return EXIT_OK
