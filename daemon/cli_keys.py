"""`dimscope keys` (CURVE key pairs) and `dimscope relay` (the fan-out relay)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def cmd_keys(args: argparse.Namespace) -> int:
    from .security import SecurityError, create_keys

    try:
        public, secret = create_keys(args.folder, args.name)
    except (SecurityError, OSError) as exc:
        print(f"dimscope: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"public key (share it: a daemon's goes to its clients, a client's into the "
          f"daemon's allowed_clients folder): {public}")
    print(f"secret key (keep it; mode 0600): {secret}")
    return EXIT_OK


def cmd_relay(args: argparse.Namespace) -> int:
    from .relay import Relay, UpstreamKeys
    from .security import CurveKeys, SecurityError

    if (args.server_key is None) != (args.client_key is None):
        print("dimscope: --server-key and --client-key go together (CURVE to the daemon)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if (args.secret_key is None) != (args.allowed_clients is None):
        print("dimscope: --secret-key and --allowed-clients go together (CURVE to viewers)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        upstream = (UpstreamKeys(args.server_key, args.client_key)
                    if args.server_key is not None else None)
        curve = (CurveKeys(args.secret_key, args.allowed_clients)
                 if args.secret_key is not None else None)
        relay = Relay(args.upstream, args.bind, send_hwm=args.send_hwm,
                      upstream_keys=upstream, curve=curve).start()
    except (SecurityError, OSError) as exc:
        print(f"dimscope: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    print(f"dimscope relay: {args.upstream} -> {relay.endpoint}"
          + (" (CURVE to the daemon)" if upstream else "")
          + (" (CURVE to viewers)" if curve else ""), flush=True)
    last = time.monotonic()
    while not stop.wait(0.2):
        if args.stats_every > 0 and time.monotonic() - last >= args.stats_every:
            last = time.monotonic()
            s = relay.stats()
            print(f"relay: {s['upstream_msgs_in']} messages from the daemon, "
                  f"{s['viewers_msgs_out']} sent on to viewers "
                  f"({s['viewers_bytes_out'] / 2**20:.1f} MiB)", flush=True)
    relay.stop()
    return EXIT_OK


def add_client_key_args(parser: argparse.ArgumentParser, of: str = "the daemon") -> None:
    """`--server-key FILE.key --client-key FILE.key_secret`: a client's CURVE keys (`ctl`,
    `subscribe`, `view`, `relay` towards the daemon)."""
    parser.add_argument("--server-key", type=Path, default=None, metavar="FILE.key",
                        help=f"CURVE: {of}'s public key file")
    parser.add_argument("--client-key", type=Path, default=None, metavar="FILE.key_secret",
                        help=f"CURVE: this client's secret key file (its public key must be "
                             f"in {of}'s allow-list)")


def add_security_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    k = sub.add_parser("keys", help="create a CURVE key pair (for the daemon or a client)")
    k.add_argument("folder", type=Path, help="where to write NAME.key and NAME.key_secret")
    k.add_argument("--name", default="dimscope",
                   help="file name stem, e.g. the host or user it is for")
    k.set_defaults(func=cmd_keys)

    r = sub.add_parser("relay", help="re-publish a daemon's streams to many viewers "
                                     "(ZeroMQ XSUB/XPUB proxy)")
    r.add_argument("--from", dest="upstream", required=True,
                   help="the daemon's publish address, e.g. tcp://scope-pc:5555")
    r.add_argument("--bind", required=True, help="where viewers connect, e.g. tcp://*:6555")
    add_client_key_args(r)
    r.add_argument("--secret-key", type=Path, default=None,
                   help="this relay's own server .key_secret (CURVE towards viewers)")
    r.add_argument("--allowed-clients", type=Path, default=None,
                   help="folder of the viewers' public .key files")
    r.add_argument("--send-hwm", type=int, default=32,
                   help="messages buffered per viewer before that viewer loses some")
    r.add_argument("--stats-every", type=float, default=10.0,
                   help="print message counts every S seconds (0 = never)")
    r.set_defaults(func=cmd_relay)
