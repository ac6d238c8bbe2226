"""CURVE on dimscope's sockets: ZeroMQ's own encryption and authentication (`zmq.auth`).

A daemon has one key pair (`dimscope keys DIR --name server`); every client —
`dimscope ctl`, a viewer, a relay — has its own, and the daemon accepts only the
clients whose public key files are in its allow-list folder (`[security]
allowed_clients`). A connection with any other key is refused during the handshake (the
client receives nothing) and logged with the key, so an administrator sees who tried.

Key files are ZeroMQ's certificate format (`zmq.auth.create_certificates`): `NAME.key`
(public, share it) and `NAME.key_secret` (secret, keep it; written mode 0600).

Exposure rules (`check_exposure`): a control socket bound beyond loopback without CURVE
refuses to start unless `--insecure`; a data stream bound to all interfaces without CURVE
starts with a warning.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

#: ZAP domains of dimscope's server sockets: "dimscope-N", one per CurveServer, so servers
#: with different allow-lists can share a process (a relay test, control + data)
ZAP_DOMAIN = "dimscope"
_domains = itertools.count(1)


class SecurityError(ValueError):
    """Keys missing or unreadable, or a socket would be exposed without protection."""


def create_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A new key pair in `folder`: (public `NAME.key`, secret `NAME.key_secret`, mode 0600).
    Refuses to overwrite an existing pair (a lost secret key cannot be recovered)."""
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise SecurityError(f"{path} exists; keys are not overwritten (delete it first, "
                                "or choose another --name)")
    made_public, made_secret = zmq.auth.create_certificates(str(folder), name)
    Path(made_secret).chmod(0o600)
    return Path(made_public), Path(made_secret)


def load_key_pair(secret_file: Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a `*.key_secret` file; SecurityError naming it."""
    try:
        public, secret = zmq.auth.load_certificate(str(secret_file))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read key file {secret_file}: {exc}") from None
    if secret is None:
        raise SecurityError(f"{secret_file} holds no secret key (that is a public `.key` "
                            "file; give the `.key_secret` one)")
    return public, secret


def load_public_key(public_file: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(str(public_file))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read public key file {public_file}: {exc}") from None
    return public


@dataclass
class AllowList:
    """The public keys allowed to connect (the `.key` files of a folder), as a ZAP
    credentials provider: refused keys are logged and counted."""

    folder: Path
    keys: set[bytes] = field(default_factory=set)
    refused: int = 0
    accepted: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.reload()

    def reload(self) -> None:
        if not self.folder.is_dir():
            raise SecurityError(f"allowed_clients {self.folder} is not a folder of client "
                                "public keys (`dimscope keys` writes them)")
        keys = set(zmq.auth.load_certificates(str(self.folder)))
        with self._lock:
            self.keys = keys
        log.info("CURVE: %d client key(s) allowed from %s", len(keys), self.folder)

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            ok = key in self.keys
            if ok:
                self.accepted += 1
            else:
                self.refused += 1
        if not ok:
            log.warning("CURVE: refused a client with an unknown public key %s (domain %s): "
                        "not in %s", key.decode(errors="replace"), domain, self.folder)
        return ok


#: one ZAP authenticator per ZeroMQ context (ZeroMQ allows only one handler per context),
#: shared by the CurveServers on that context and counted (dimscope gives each CURVE server
#: socket a context of its own, so in practice one each; a plugin may share one)
_AUTHENTICATORS: dict[int, tuple[ThreadAuthenticator, int]] = {}
_AUTH_LOCK = threading.Lock()


def _acquire_authenticator(context: zmq.Context[Any]) -> ThreadAuthenticator:
    with _AUTH_LOCK:
        auth, users = _AUTHENTICATORS.get(id(context), (None, 0))
        if auth is None:
            auth = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
            auth.start()
        _AUTHENTICATORS[id(context)] = (auth, users + 1)
        return auth


def _release_authenticator(context: zmq.Context[Any]) -> None:
    with _AUTH_LOCK:
        auth, users = _AUTHENTICATORS.get(id(context), (None, 0))
        if auth is None:
            return
        if users <= 1:
            del _AUTHENTICATORS[id(context)]
            auth.stop()
        else:
            _AUTHENTICATORS[id(context)] = (auth, users - 1)


@dataclass(frozen=True)
class CurveKeys:
    """What a CURVE server needs: its own secret key file and the allow-list folder."""

    server_secret_key: Path | None
    allowed_clients: Path | None


class CurveServer:
    """The daemon's side of CURVE: the ZAP authenticator of a ZeroMQ context (shared by
    every CurveServer on it) with the allow-list, and the server key pair applied to each
    server socket (`apply`) before it binds.

    Give each CURVE server socket a context of its own (as the control socket, the
    publisher and the relay do): a ZAP handler answers for every socket of its context, and
    one started and stopped on the process-wide context would stall the plain sockets
    that share it."""

    def __init__(self, server_secret_key: Path | None, allowed_clients: Path | None,
                 context: zmq.Context[Any]) -> None:
        if server_secret_key is None or allowed_clients is None:
            raise SecurityError("CURVE needs [security] server_secret_key (the daemon's "
                                "`.key_secret` file) and allowed_clients (a folder of client "
                                "`.key` files); create them with `dimscope keys`")
        self.public_key, self._secret_key = load_key_pair(server_secret_key)
        self.allow = AllowList(allowed_clients)
        self._context = context
        self.domain = f"{ZAP_DOMAIN}-{next(_domains)}"
        self._auth: ThreadAuthenticator | None = _acquire_authenticator(self._context)
        self._auth.configure_curve_callback(self.domain, credentials_provider=self.allow)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make `sock` a CURVE server (call before bind)."""
        sock.zap_domain = self.domain.encode()
        sock.curve_secretkey = self._secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True

    def close(self) -> None:
        if self._auth is not None:
            self._auth = None
            _release_authenticator(self._context)


def curve_server_on(context: zmq.Context[Any], keys: CurveKeys | None) -> CurveServer | None:
    """A CurveServer for `keys` on `context`, a context made for this server's socket(s)
    (None without keys); if the keys are unusable the context is destroyed and the
    SecurityError raised."""
    if keys is None:
        return None
    try:
        return CurveServer(keys.server_secret_key, keys.allowed_clients, context=context)
    except BaseException:
        context.destroy(linger=0)
        raise


def curve_client(sock: zmq.Socket[Any], server_public_key: Path,
                 client_secret_key: Path) -> None:
    """Make `sock` a CURVE client of the server whose public key file is given (before
    connect)."""
    public, secret = load_key_pair(client_secret_key)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = load_public_key(server_public_key)


def _host(address: str) -> tuple[str, str]:
    scheme, _, rest = address.partition("://")
    return scheme, rest.rpartition(":")[0].strip("[]")


def is_loopback(address: str) -> bool:
    """A bind that only this machine can reach: tcp on 127.0.0.0/8, ::1 or localhost;
    ipc and inproc."""
    scheme, host = _host(address)
    if scheme in ("ipc", "inproc"):
        return True
    return host in ("localhost", "::1") or host.startswith("127.")


def is_all_interfaces(address: str) -> bool:
    scheme, host = _host(address)
    return scheme == "tcp" and host in ("*", "0.0.0.0", "::")


def check_exposure(address: str, *, what: str, curve: bool, insecure: bool = False) -> None:
    """The exposure rules: SecurityError for a control socket beyond loopback without
    CURVE (unless `insecure`); a warning for a data stream on every interface without it."""
    if curve:
        return
    if what == "control":
        if not is_loopback(address):
            if not insecure:
                raise SecurityError(
                    f"control socket {address}: bound beyond loopback without CURVE, anyone who "
                    "reaches this machine could drive the microscope; set [control] curve = "
                    "true with [security] keys (`dimscope keys`), bind 127.0.0.1, or pass "
                    "--insecure")
            log.warning("control socket %s is open beyond loopback WITHOUT authentication "
                        "(--insecure)", address)
    elif is_all_interfaces(address):
        log.warning("%s on %s: open to every host that can reach this machine, unencrypted "
                    "and unauthenticated (set publish.curve = true with [security] keys, or "
                    "bind 127.0.0.1)", what, address)
