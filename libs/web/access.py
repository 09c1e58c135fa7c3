"""Where the web front-end listens and the token it takes: what `surveyor web` and `surveyor run`
settle before any server starts (so this module imports no web framework).

The address binds loopback unless told otherwise: the API steers the experiment. The token is
one per web process: from a file (kept across restarts, shared with the people allowed to steer),
or made at start and printed. A missing token file is created, readable by its owner only.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from urllib.parse import quote

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


class AccessError(ValueError):
    """An address or a token file that cannot be used, in words for the operator."""


def parse_address(text: str) -> tuple[str, int]:
    """'ADDR:PORT', ':PORT' or 'PORT' (loopback), '[::1]:PORT' -> (host, port)."""
    host, _, port = text.strip().rpartition(":")
    host = host.strip("[]") or DEFAULT_HOST
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise AccessError(f"web address {text!r}: expected ADDR:PORT with a port from 1 to 65535, "
                          f"e.g. {DEFAULT_HOST}:{DEFAULT_PORT}")
    return host, int(port)


def free(host: str, port: int) -> bool:
    """Whether a server could listen at (host, port) now (with SO_REUSEADDR, as uvicorn binds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def any_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def choose(requested: str | None) -> tuple[str, int]:
    """The address asked for (AccessError if it is taken), or else DEFAULT_PORT on loopback, or a
    free port when that is taken (another pipeline's web front-end, say)."""
    if requested is not None:
        host, port = parse_address(requested)
        if not free(host, port):
            raise AccessError(f"the web front-end cannot listen at {host}:{port}: the address is taken or not "
                              f"this host's; choose another with --web ADDR:PORT, or run with --no-web")
        return host, port
    if free(DEFAULT_HOST, DEFAULT_PORT):
        return DEFAULT_HOST, DEFAULT_PORT
    return DEFAULT_HOST, any_port(DEFAULT_HOST)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def read_or_create_token(path: Path) -> str:
    """The token in `path` (its first line), or a new one written there if the file is missing."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        token = new_token()
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
        return token
    except OSError as exc:
        raise AccessError(f"token file {path} cannot be read: {exc.strerror or exc}") from None
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < 8:
        raise AccessError(f"token file {path} holds no token of at least 8 characters on its first line; "
                          f"write one there, or delete the file to have one made")
    return token


def page_url(url: str, token: str) -> str:
    """The page's address with the token as its fragment (`URL#token=TOKEN`): one click opens the
    page able to send commands. A fragment never leaves the browser (no server log or proxy sees
    it), and the page takes it out of the address bar once read."""
    return f"{url}#token={quote(token, safe='')}"
