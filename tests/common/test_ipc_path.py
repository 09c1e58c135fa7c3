"""A long TMPDIR must not stop a producer from binding: a Unix socket path holds 107 bytes."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from libs.common.flow import FRAME, Inlet, Outlet
from libs.common.frames import Frame, decode


def test_outlet_binds_and_serves_under_a_tmpdir_too_long_for_a_unix_socket(tmp_path, monkeypatch):
    long_dir = tmp_path / ("d" * 60) / ("e" * 60)
    long_dir.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    context = zmq.Context()
    outlet = Outlet(context, host="127.0.0.1", on_delivered=lambda _: None)
    poller = zmq.Poller()
    inlet = Inlet(context, poller, identity=b"sink.1", stage="sink", credit=1)
    try:
        assert outlet.local_endpoint is not None
        path = Path(outlet.local_endpoint.removeprefix("ipc://"))
        assert len(str(path).encode()) <= zmq.IPC_PATH_MAX_LEN and path.exists()
        # A consumer on this host reaches the producer through that Unix socket.
        outlet.add_route("sink", latest=False, depth=2)
        inlet.connect("producer", outlet.local_endpoint)
        sent = Frame.from_arrays(scan_id="s", epoch=1, frame=7, origin="p",
                                 arrays={"data": np.zeros((4, 4), np.uint16)})
        outlet.send(sent.key, sent.encode())
        received = None
        deadline = time.monotonic() + 5
        while received is None and time.monotonic() < deadline:
            outlet.receive()
            for socket, _ in poller.poll(10):
                for tag, parts in inlet.receive(socket) or []:
                    if tag == FRAME:
                        received = decode(parts)
        assert received is not None and received.key == sent.key, "no frame through the Unix socket"
    finally:
        inlet.close()
        outlet.close()
        context.term()
    assert not path.exists()
