"""Structured logs: one JSON object per line on stderr (`--log-json`, `logging.json_logs`).

Each line holds `ts` (ISO 8601, UTC, milliseconds), `level`, `logger`, `message`, `exc_info`
(the formatted traceback) when there is one, and any extra fields the call passed
(`log.info("...", extra={"archived": 12})`), so journald, Loki or ELK can filter on them
without parsing prose. Without it, the human format `main()` sets up stays.

`use_json_logs` switches the root logger's handlers in place (the config reload may turn
it on or off), routes Python warnings and uncaught exceptions — on any thread — through
logging, so nothing but JSON reaches stderr while it is on.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

__all__ = ["HUMAN_FORMAT", "JsonFormatter", "json_logs_enabled", "use_json_logs"]

#: what `dimscope.daemon.cli.main` configures (logging.basicConfig)
HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: attributes every LogRecord has; anything else on a record came from `extra=`
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON (never a newline inside: tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        return json.dumps(out, default=str, ensure_ascii=False)


_saved: dict[str, Any] = {}
_enabled = [False]


def json_logs_enabled() -> bool:
    """Whether `use_json_logs(True)` is in force (the CLI then logs what it would print)."""
    return _enabled[0]


def _log_uncaught(exc_type: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    logging.getLogger("dimscope").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("dimscope").critical(
        "uncaught exception in thread %s", name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def use_json_logs(enabled: bool) -> None:
    """JSON lines on (True) or the human format back (False), on every root handler.

    Adds a stderr handler if logging has none yet. Idempotent."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    formatter: logging.Formatter = (JsonFormatter() if enabled
                                    else logging.Formatter(HUMAN_FORMAT))
    for handler in root.handlers:
        handler.setFormatter(formatter)
    logging.captureWarnings(enabled)
    _enabled[0] = enabled
    if enabled and not _saved:
        _saved.update(excepthook=sys.excepthook, threading_excepthook=threading.excepthook)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    elif not enabled and _saved:
        sys.excepthook = _saved.pop("excepthook")
        threading.excepthook = _saved.pop("threading_excepthook")
