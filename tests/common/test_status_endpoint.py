"""`surveyor status --watch` follows the status feed of the handler it is pointed at."""

from __future__ import annotations

import pytest

from libs.cli.main import _status_endpoint, parser
from tests.conftest import free_port


def args(*argv: str):
    return parser().parse_args(["status", "--watch", "--timeout", "0.2", *argv])


def test_status_is_taken_as_given():
    assert _status_endpoint(args("--handler", "tcp://127.0.0.1:7000", "--status", "tcp://h:9")) == "tcp://h:9"


def test_a_handler_that_does_not_say_is_assumed_to_publish_on_the_next_port(capsys):
    port = free_port()
    assert _status_endpoint(args("--handler", f"tcp://127.0.0.1:{port}")) == f"tcp://127.0.0.1:{port + 1}"
    assert "give --status ENDPOINT" in capsys.readouterr().err


def test_a_handler_endpoint_without_a_port_needs_status():
    with pytest.raises(SystemExit, match="give it with --status"):
        _status_endpoint(args("--handler", "ipc:///tmp/handler"))
