"""Command parsing at the port: every kind of bad input is refused with a message naming it."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from libs.common import messages
from libs.common.errors import MessageError, UnknownCommand
from libs.common.messages import HANDLER_REQUESTS, SERVICE_REQUESTS, StartScan, parse_request


def test_a_start_scan_parses_into_its_model():
    raw = json.dumps({"cmd": "start_scan", "id": 9, "args": {
        "scan_id": "s1", "technique": "ptychography", "n_dark": 5, "positions_m": [[0, 1e-6]],
        "probe_model": {"outer_zone_width_m": 4e-8, "diameter_m": 1e-4, "central_stop_diameter_m": 4e-5}}})
    request = parse_request(raw.encode(), HANDLER_REQUESTS)
    assert isinstance(request, StartScan) and request.id == 9
    assert request.args.positions_m == [(0.0, 1e-6)] and request.args.probe_model.defocus_m == 0.0


@pytest.mark.parametrize("raw, fragment", [
    (b"\xff\x00", "not a JSON document"),
    (b"[1, 2]", "must be a JSON object"),
    (b"{}", "missing 'cmd'"),
    (b'{"cmd": "ping", "args": {"x": 1}}', "args.x"),
    (b'{"cmd": "start_scan", "args": {"scan_id": "../etc"}}', "file names"),
    (b'{"cmd": "start_scan", "args": {"scan_id": "a", "n_frames": -1}}', "n_frames"),
    (b'{"cmd": "configure", "args": {"params": 3}}', "args.params"),
])
def test_bad_requests_are_refused_with_the_reason(raw, fragment):
    with pytest.raises(MessageError, match=fragment.replace(".", r"\.")):
        parse_request(raw, HANDLER_REQUESTS)


def test_unknown_and_foreign_commands_name_the_expected_ones():
    with pytest.raises(UnknownCommand, match="expected one of"):
        parse_request(b'{"cmd": "explode"}', HANDLER_REQUESTS)
    with pytest.raises(UnknownCommand):  # services do not take handler-only commands
        parse_request(b'{"cmd": "start_scan", "args": {"scan_id": "a"}}', SERVICE_REQUESTS)


def test_oversized_commands_are_refused_before_parsing():
    with pytest.raises(MessageError, match="bytes refused"):
        parse_request(b" " * (messages.MAX_COMMAND_BYTES + 1), HANDLER_REQUESTS)


def test_error_replies_echo_the_id_and_name_the_error_type():
    reply = json.loads(messages.error(messages.request_id(b'{"id": "x7", "cmd": 1}'), UnknownCommand("no")))
    assert reply == {"ok": False, "id": "x7", "error": {"type": "UnknownCommand", "message": "no"}}


def test_a_preview_carries_arrays_whose_bytes_match_their_shape():
    data = base64.b64encode(np.arange(6, dtype="<f4").tobytes()).decode()
    args = {"instance": "image_worker.1-ab", "name": "stxm", "scan_id": "s1",
            "arrays": [{"name": "transmission", "dtype": "<f4", "shape": [2, 3], "data": data}]}
    request = parse_request(json.dumps({"cmd": "preview", "args": args}).encode(), HANDLER_REQUESTS)
    assert np.frombuffer(request.args.arrays[0].data, "<f4").tolist() == [0, 1, 2, 3, 4, 5]
    args["arrays"][0]["shape"] = [3, 3]
    with pytest.raises(MessageError, match="24 bytes for shape"):
        parse_request(json.dumps({"cmd": "preview", "args": args}).encode(), HANDLER_REQUESTS)
