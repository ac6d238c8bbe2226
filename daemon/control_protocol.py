"""The control socket's messages (schema `dimscope.control/1`, docs/control.md).

A request is one JSON object: the schema version, an optional `id` the reply echoes, the
`command` and that command's own fields. Each command is one frozen pydantic model told
apart by its `command` tag (a discriminated union, CAREamics-style); unknown fields are
errors, so a misspelt argument is refused instead of silently ignored. A reply is always
`{"schema", "id", "ok", "result"}` or `{"schema", "id", "ok": false, "error": {"code",
"message"}}`.

This module only parses and checks the shape of messages; what a command does to the
running daemon is in `control.py`.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

__all__ = [
    "FRIENDLY_NAMES", "SCHEMA", "ErrorCode", "ProtocolError", "Reply", "Request",
    "error_reply", "ok_reply", "parse_request",
]

SchemaVersion = Literal["dimscope.control/1"]
#: the schema version every request must name and every reply carries
SCHEMA: SchemaVersion = "dimscope.control/1"

#: settings with a friendly name: `exposure` (ms, the core's camera exposure) and
#: `laser_power` (a device property the source maps the name to)
FRIENDLY_NAMES = ("exposure", "laser_power")
FriendlyName = Literal["exposure", "laser_power"]

#: why a request was refused; scripts branch on the code, people read the message
ErrorCode = Literal[
    "malformed",        # not one UTF-8 JSON object, or not one message part
    "too_large",        # over control.max_message_bytes
    "schema",           # missing or unsupported schema version
    "unknown_command",  # `command` missing or not one of the commands
    "invalid",          # a field missing, of the wrong type, or out of range
    "busy",             # the daemon is in a state where the command cannot run now
    "failed",           # the command was valid but applying it failed (nothing changed)
    "unsupported",      # the run or source cannot do this (e.g. no mapping for a name)
    "timeout",          # the change did not complete in time (state unknown: see status)
]

#: a property value as JSON gives it; Micro-Manager properties are typed by the device
PropertyValue = StrictFloat | StrictInt | StrictStr | StrictBool


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # `schema` would shadow BaseModel.schema(), so the attribute is `schema_version`.
    schema_version: SchemaVersion = Field(alias="schema")
    id: StrictStr | StrictInt | None = Field(
        None, description="any string or integer; echoed in the reply so a client can match "
        "replies to requests")


class StatusRequest(_Message):
    command: Literal["status"]
    full: StrictBool = Field(False, description="also return the whole run summary (the "
                             "object summary.json holds)")


class _Target(_Message):
    """A setting: a friendly `name`, or a Micro-Manager `device` and `property`."""

    name: FriendlyName | None = None
    device: StrictStr | None = Field(None, min_length=1, max_length=256)
    property: StrictStr | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one_target(self) -> _Target:
        by_name = self.name is not None
        by_device = self.device is not None or self.property is not None
        if by_name == by_device:
            raise ValueError("give either `name` (exposure, laser_power) or both `device` and "
                             "`property`")
        if by_device and (self.device is None or self.property is None):
            raise ValueError("`device` and `property` go together")
        return self

    def describe(self) -> str:
        return self.name if self.name is not None else f"{self.device}/{self.property}"


class GetRequest(_Target):
    command: Literal["get"]


class SetRequest(_Target):
    command: Literal["set"]
    value: PropertyValue

    @model_validator(mode="after")
    def _number_for_friendly_names(self) -> SetRequest:
        if self.name is not None:
            v = self.value
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{self.name} needs a finite number"
                                 + (" of milliseconds" if self.name == "exposure" else "")
                                 + f", got {v!r}")
            if self.name == "exposure" and v <= 0:
                raise ValueError(f"exposure must be > 0 ms, got {v!r}")
        return self


EngineOption = StrictFloat | StrictInt | StrictStr | StrictBool


class TierSpec(BaseModel):
    """A faster fallback for the latency budget (as `[[engine.tiers]]` in the config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr
    options: dict[str, EngineOption] = Field(default_factory=dict)


class EngineSetRequest(_Message):
    """Change the main engine between two frames. Fields left out keep their value."""

    command: Literal["engine.set"]
    name: StrictStr | None = Field(None, description="engine name (see `dimscope run "
                                   "--engine`); default: the engine in service")
    model: StrictStr | None = Field(None, description="model name or .onnx path (on the "
                                    "daemon's machine) for model engines")
    runtime: StrictStr | None = Field(None, description="auto, cpu, openvino, onnxruntime, "
                                      "torch, cuda, tensorrt")
    options: dict[str, EngineOption] | None = Field(
        None, description="engine options (replace the current ones when given)")
    budget_ms: StrictFloat | StrictInt | None = Field(
        None, ge=0, description="latency budget in ms; 0 = no budget")
    tiers: tuple[TierSpec, ...] | None = Field(None, description="faster fallbacks, in order")
    adapt: StrictBool | None = Field(None, description="live adaptation on or off")

    @model_validator(mode="after")
    def _something_to_change(self) -> EngineSetRequest:
        if all(getattr(self, f) is None for f in ("name", "model", "runtime", "options",
                                                  "budget_ms", "tiers", "adapt")):
            raise ValueError("nothing to change: give name, model, runtime, options, "
                             "budget_ms, tiers or adapt")
        return self

    @property
    def rebuilds_engine(self) -> bool:
        """True when a new engine must be built (not only the budget, tiers or adaptation)."""
        return any(v is not None for v in (self.name, self.model, self.runtime, self.options))


class AcquisitionStartRequest(_Message):
    command: Literal["acquisition.start"]


class AcquisitionStopRequest(_Message):
    command: Literal["acquisition.stop"]


class MDARunRequest(_Message):
    """Run a useq-schema MDA sequence; live streaming must be stopped first."""

    command: Literal["mda.run"]
    sequence: dict[str, Any] | None = Field(None, description="a useq MDASequence as JSON")
    path: StrictStr | None = Field(None, description="a YAML/JSON sequence file on the "
                                   "daemon's machine")

    @model_validator(mode="after")
    def _one_source(self) -> MDARunRequest:
        if (self.sequence is None) == (self.path is None):
            raise ValueError("give either `sequence` (a useq MDASequence object) or `path`")
        return self


class SnapRequest(_Message):
    command: Literal["snap"]


#: every request, told apart by `command`
Request = Annotated[
    StatusRequest | GetRequest | SetRequest | EngineSetRequest | AcquisitionStartRequest
    | AcquisitionStopRequest | MDARunRequest | SnapRequest,
    Field(discriminator="command")]

COMMANDS = ("status", "get", "set", "engine.set", "acquisition.start", "acquisition.stop",
            "mda.run", "snap")

#: commands that change the daemon: applied in order, each one logged in events.jsonl
CHANGING_COMMANDS = frozenset(COMMANDS) - {"status", "get"}

_REQUEST: TypeAdapter[Request] = TypeAdapter(Request)


class ProtocolError(ValueError):
    """A request that cannot be acted on; `code` says which kind of problem."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


def _problems(exc: ValidationError) -> str:
    """Each problem as `field: what` (the command tag and union branches left out)."""
    by_field: dict[tuple[str, ...], list[Any]] = {}
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"][1:])  # [0] is the command tag
        by_field.setdefault(loc[:1], []).append(err)
    out = []
    for field, errs in by_field.items():
        where = ".".join(field)
        given = errs[0].get("input")
        shown = "" if errs[0]["type"] in ("missing", "extra_forbidden") or isinstance(
            given, dict) else f" (got {given!r:.60})"
        # `field.<type>` for each member of a union the value did not fit
        union = len(errs) > 1 and all(len(e["loc"]) == 3 for e in errs)
        if union:
            # One error per member of a union (str | int ...): a wrong type, unless one
            # member took the type and refused the value (then that is the problem).
            value_errors = [e for e in errs if not e["type"].endswith("_type")]
            if value_errors:
                errs = value_errors[:1]
            else:
                kinds = " or ".join(dict.fromkeys(str(e["loc"][2]) for e in errs))
                out.append(f"{where}: expected {kinds}{shown}")
                continue
        for err in errs:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            if not union:  # the whole path: tiers.0.name
                where = ".".join(str(p) for p in err["loc"][1:])
            out.append(f"{where}: {msg}{shown}" if where else f"{msg}{shown}")
    return "; ".join(out)


def request_id(data: Any) -> str | int | None:
    """The request's `id` when it is one a reply can echo, else None."""
    rid = data.get("id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None


def parse_request(payload: bytes) -> tuple[Request, str | int | None]:
    """(the validated request, its id) from one message part; ProtocolError otherwise.

    The id is returned separately so a refusal can still echo it (`request_id`)."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("malformed", f"not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("malformed", f"a request is a JSON object, got "
                                         f"{type(data).__name__}")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise ProtocolError("schema", f"schema must be {SCHEMA!r}, got {schema!r}")
    command = data.get("command")
    if command not in COMMANDS:
        raise ProtocolError("unknown_command", f"unknown command {command!r}; commands: "
                                               f"{', '.join(COMMANDS)}")
    try:
        request = _REQUEST.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError("invalid", f"{command}: {_problems(exc)}") from None
    return request, request.id


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code: ErrorCode
    message: str


class Reply(BaseModel):
    """What the daemon answers (clients validate replies with this model too)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_version: SchemaVersion = Field(SCHEMA, alias="schema")
    id: str | int | None = None
    ok: bool
    result: dict[str, Any] | None = None
    error: ErrorBody | None = None

    @model_validator(mode="after")
    def _result_or_error(self) -> Reply:
        if self.ok != (self.error is None):
            raise ValueError("a reply has `result` when ok and `error` when not")
        return self


def ok_reply(rid: str | int | None, result: dict[str, Any]) -> bytes:
    return _dump({"schema": SCHEMA, "id": rid, "ok": True, "result": result})


def error_reply(rid: str | int | None, code: ErrorCode, message: str) -> bytes:
    return _dump({"schema": SCHEMA, "id": rid, "ok": False,
                  "error": {"code": code, "message": message}})


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _dump(obj: dict[str, Any]) -> bytes:
    # default=str: a value the daemon reports that JSON lacks (a Path, an enum) is text
    return json.dumps(json_safe(obj), separators=(",", ":"), default=str,
                      allow_nan=False).encode()
