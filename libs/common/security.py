"""CURVE on every Surveyor socket, when a pipeline names a key directory.

ZeroMQ's CURVE encrypts each link and proves who is at either end; a ZAP handler in each process
that binds (the `Gatekeeper`) lets in only the client keys of the allow-list. pyzmq's `zmq.auth`
makes and reads the key files. One directory per host, the same path on every host:

    KEYS/server.key, server.key_secret   this host's server pair: every port bound here
    KEYS/client.key, client.key_secret   this host's client pair: every process here that connects
    KEYS/handler.key                     the handler host's server public key (where the handler
                                         runs it is server.key)
    KEYS/allowed/NAME.key                client public keys that may connect to this host's ports
    KEYS/operators/NAME.key              keys that may also steer a service on its own command
                                         port (otherwise only its handler does)

An operator's workstation has a directory of its own (`surveyor keys init DIR --handler-key
FILE`), whose client.key the beamline's hosts let in (`surveyor keys allow KEYS FILE --operator`).

A process learns the server key of another host's service from the handler's topology (its
`server_key`), so only the handler's key is copied by hand. Without a key directory every socket
is plain, as before. The detector's stream and the re-publication for dranspose stay plain:
their peers speak no CURVE.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket as net
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from libs.common.errors import PipelineError

logger = logging.getLogger(__name__)

ENVIRONMENT = "SURVEYOR_KEYS"
"""The key directory for processes started by supervisord (or by hand); it overrides a pipeline's."""
DOMAIN = "surveyor"


@dataclass(frozen=True)
class Keys:
    """One host's keys (Z85): its server pair, its client pair, and the handler's public key."""

    directory: Path
    public: bytes
    secret: bytes
    client_public: bytes
    client_secret: bytes
    handler: bytes

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Keys:
        root = Path(directory)
        try:
            public, secret = zmq.auth.load_certificate(root / "server.key_secret")
            client_public, client_secret = zmq.auth.load_certificate(root / "client.key_secret")
            handler, _ = zmq.auth.load_certificate(root / "handler.key")
        except (OSError, ValueError) as exc:
            raise PipelineError(f"key directory {root}: {exc}; make it with `surveyor keys init {root}`") from None
        return cls(root, public, secret, client_public, client_secret, handler)

    def allowed(self) -> dict[bytes, str]:
        """Client public key -> name, for every key of the allow-list as the files are now."""
        return _public_keys(self.directory / "allowed")

    def operators(self) -> dict[bytes, str]:
        return _public_keys(self.directory / "operators")


def _public_keys(folder: Path) -> dict[bytes, str]:
    found = {}
    for path in sorted(folder.glob("*.key")):
        try:
            found[zmq.auth.load_certificate(path)[0]] = path.stem
        except (OSError, ValueError) as exc:
            logger.warning("skipped key file %s: %s", path, exc)
    return found


def configured(directory: str | os.PathLike | None = None) -> Keys | None:
    """The keys in force: $SURVEYOR_KEYS, else `directory` (a pipeline's `[security] keys`);
    None where neither names one (plain sockets)."""
    chosen = os.environ.get(ENVIRONMENT) or directory
    return _load(str(chosen)) if chosen else None


@functools.lru_cache(maxsize=8)
def _load(directory: str) -> Keys:
    return Keys.load(directory)


# --- sockets ------------------------------------------------------------------------------------

def serve(socket: zmq.Socket, keys: Keys | None) -> None:
    """Make `socket`, before it binds, a CURVE server that admits only the allow-list."""
    if keys is None:
        return
    Gatekeeper.for_context(socket.context, keys)
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True
    socket.zap_domain = DOMAIN.encode()


def connect_as_client(socket: zmq.Socket, keys: Keys | None, server_key: bytes | str | None = None) -> None:
    """Make `socket`, before it connects, a CURVE client of the server whose public key is
    `server_key` (the handler's when not given)."""
    if keys is None:
        return
    socket.curve_secretkey = keys.client_secret
    socket.curve_publickey = keys.client_public
    socket.curve_serverkey = server_key.encode() if isinstance(server_key, str) else (server_key or keys.handler)


def sender(frame: zmq.Frame) -> bytes | None:
    """The CURVE public key (Z85) that sent `frame` (received with copy=False), None on a plain socket."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user.encode() if user else None


class Gatekeeper(ThreadAuthenticator):
    """The ZAP handler of one process: admits the keys of the allow-list as the folder is now (read
    again when it changed, so a key added to or taken from allowed/ counts from the next
    connection, without a restart) and logs each refused (address, key) once."""

    _running: dict[int, Gatekeeper] = {}

    def __init__(self, context: zmq.Context, keys: Keys) -> None:
        super().__init__(context, log=logging.getLogger(f"{__name__}.zap"))
        self.keys = keys
        self._known: dict[bytes, str] = {}
        self._read_at: int | None = None
        """The allow-list folder's modification time when `_known` was read."""
        self._refused: set[tuple[str, bytes]] = set()
        self._address = ""

    @classmethod
    def for_context(cls, context: zmq.Context, keys: Keys) -> Gatekeeper:
        gate = cls._running.get(id(context))
        if gate is None:
            gate = cls._running[id(context)] = cls(context, keys)
            gate.start()
            gate.configure_curve_callback(DOMAIN, gate)
        return gate

    @classmethod
    def stop_for(cls, context: zmq.Context) -> None:
        """Before the context is terminated: the ZAP thread holds a socket in it."""
        gate = cls._running.pop(id(context), None)
        if gate is not None:
            gate.stop()

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's credentials provider: whether the client key `key` (Z85) may connect."""
        try:
            changed = (self.keys.directory / "allowed").stat().st_mtime_ns
        except OSError:
            changed = None
        if changed is None or changed != self._read_at:
            self._known, self._read_at = self.keys.allowed(), changed
        if key in self._known:
            return True
        if (self._address, key) not in self._refused:
            self._refused.add((self._address, key))
            logger.warning("refused a CURVE client at %s with key %s: not in %s; add its public key there "
                           "(`surveyor keys allow %s FILE`) if it belongs to this beamline",
                           self._address, key.decode(), self.keys.directory / "allowed", self.keys.directory)
        return False


# --- key files ----------------------------------------------------------------------------------

def create(directory: str | os.PathLike, *, handler_key: str | os.PathLike | None = None,
           name: str | None = None) -> Path:
    """A key directory for this host: its server and client pairs, the handler's key (this
    host's own unless `handler_key` names another host's), and its own client in the allow-list."""
    root = Path(directory)
    if (root / "server.key_secret").exists():
        raise FileExistsError(f"{root} already holds a server key; `surveyor keys list {root}` shows it")
    for folder in ("allowed", "operators"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(root, "server")
    zmq.auth.create_certificates(root, "client")
    shutil.copyfile(handler_key or root / "server.key", root / "handler.key")
    allow(root, root / "client.key", name=name or net.gethostname())
    for secret in root.glob("*.key_secret"):
        secret.chmod(0o600)
    return root


def allow(directory: str | os.PathLike, public_file: str | os.PathLike, *, name: str | None = None,
          operator: bool = False) -> None:
    """Let the client whose public key is in `public_file` connect (and steer services directly)."""
    _, secret = zmq.auth.load_certificate(public_file)  # ValueError unless it is a key file
    if secret is not None:
        raise ValueError(f"{public_file} holds a secret key: give its public .key file, which is safe to copy")
    name = name or Path(public_file).stem
    for folder in ("allowed", "operators") if operator else ("allowed",):
        target = Path(directory) / folder / f"{name}.key"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copyfile(public_file, partial)
        partial.replace(target)  # whole or not at all, and the folder's time says it changed


def listing(directory: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(role, name, public key) of every key in the directory."""
    root = Path(directory)
    rows = [(role, name, zmq.auth.load_certificate(root / f"{name}.key")[0].decode())
            for role, name in (("server", "server"), ("client", "client"), ("handler", "handler"))
            if (root / f"{name}.key").exists()]
    for role, folder in (("allowed", "allowed"), ("operator", "operators")):
        rows += [(role, name, key.decode()) for key, name in _public_keys(root / folder).items()]
    return rows
