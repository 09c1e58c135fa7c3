"""The HTTP API of `surveyor web`. In-process (a PUB socket stands in for the handler's status
port, the app served by uvicorn on a thread): events resume by `seq`, a silent handler is a 504,
arrays render. Against a real `surveyor run` with its web front-end (httpx): status, scans, events,
previews and the last frame are what the handler published; commands need the token and pass the
handler's refusals through; a handler restarted at the same endpoint is followed again, with the
events kept."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
import zmq
from PIL import Image
from websockets.sync.client import connect

from libs.common import feeds
from libs.common.previews import Latency
from libs.web import access, images
from libs.web.app import create_app
from libs.web.feed import Feed
from tests.conftest import Run, free_port, synthetic_pipeline, wait_for

SHAPE = (300, 200)
"""Binned by 2 into the receiver's last_frame preview (at most 256 px per side)."""


# --- in-process --------------------------------------------------------------------------------

class Served:
    """An app served by uvicorn on a thread, on a free port, until the block ends."""

    def __init__(self, app) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]),
                                                    log_config=None, access_log=False, ws="websockets-sansio"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "uvicorn to start")
        self.http = httpx.Client(base_url=self.url, timeout=10)
        return self.http

    def __exit__(self, *exc) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(10)


def event(kind: str, n: int) -> list[bytes]:
    body = feeds.Event(time=time.time(), kind=kind, service="handler", message=f"{kind} {n}", n=n)
    return [b"event", feeds.dumps(body)]


def test_events_resume_by_seq_and_the_ring_says_what_a_late_client_missed():
    feed = Feed("tcp://127.0.0.1:1", events_kept=5)
    for n in range(1, 4):
        feed.take(event("thing", n))
    batch = feed.events_after(1)
    assert [e["seq"] for e in batch.events] == [2, 3] and batch.missed == 0 and batch.last == 3
    assert batch.events[0]["n"] == 2 and batch.events[0]["kind"] == "thing"
    for n in range(4, 10):
        feed.take(event("thing", n))
    late = feed.events_after(2)
    assert [e["seq"] for e in late.events] == [5, 6, 7, 8, 9] and late.missed == 2
    assert feed.events_after(9).events == []
    assert [e["seq"] for e in feed.events_after(42).events] == [5, 6, 7, 8, 9], "a seq of an earlier web process"
    feed.take([b"event", b"{not json"])
    feed.take([b"preview.x", b"{}"])
    assert feed.rejected == 2 and feed.last_seq() == 9


def test_the_latency_histogram_and_the_page_url_with_its_token():
    latency = Latency()
    now = time.time()
    latency.add([now - 0.010] * 90 + [now - 0.5] * 9 + [now + 0.002], now)  # one from a clock ahead
    arrays, meta = latency.preview()
    counts, edges = arrays["counts"], arrays["edges_s"]
    assert counts.sum() == 100 == meta["frames"] and meta["negative"] == 1 and counts[0] == 1
    assert edges[0] == pytest.approx(1e-4) and edges[-1] == pytest.approx(1e3) and len(edges) == len(counts) + 1
    assert meta["p50_s"] == pytest.approx(0.010, rel=0.13) and meta["p95_s"] == pytest.approx(0.5, rel=0.13)
    assert meta["max_s"] == pytest.approx(0.5) and not latency.changed
    latency.add([now - 5000.0], now)  # slower than the last edge: in the last bin
    assert latency.counts[-1] == 1 and latency.changed and latency.preview()[1]["p95_s"] <= 5000
    assert access.page_url("http://127.0.0.1:8080/", "a/b+c") == "http://127.0.0.1:8080/#token=a%2Fb%2Bc"


def test_the_address_is_loopback_by_default_and_a_taken_one_is_refused_or_avoided():
    import socket

    assert access.parse_address("8081") == ("127.0.0.1", 8081) and access.parse_address("[::1]:9") == ("::1", 9)
    with pytest.raises(access.AccessError, match="ADDR:PORT"):
        access.parse_address("localhost")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(access.AccessError, match="--no-web"):
            access.choose(f"127.0.0.1:{port}")
        host, chosen = access.choose(None)
    assert host == "127.0.0.1" and chosen != port


def test_a_handler_that_does_not_answer_is_a_504_and_arrays_render(tmp_path):
    context = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    token = access.read_or_create_token(tmp_path / "token")
    assert access.read_or_create_token(tmp_path / "token") == token and (tmp_path / "token").stat().st_mode & 0o077 == 0
    app = create_app(Feed(f"tcp://127.0.0.1:{port}"), token=token, handler=f"tcp://127.0.0.1:{free_port()}",
                     command_timeout_s={"abort": 0.3})
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    image[1, 1] = np.nan
    header = feeds.PreviewHeader(time=time.time(), service="image_worker.1", stage="image_worker", name="stxm",
                                 scan_id="s", meta={"frames": 3},
                                 arrays=[feeds.PreviewArraySpec(name="transmission", dtype="<f4", shape=(3, 4))])
    try:
        with Served(app) as http:
            def published():
                pub.send_multipart([b"preview.image_worker", feeds.dumps(header), image.tobytes()])
                return http.get("/api/previews").json()["previews"]
            listed = wait_for(published, 10, "the preview through the feed")[0]
            assert (listed["stage"], listed["name"], listed["meta"]) == ("image_worker", "stxm", {"frames": 3})
            assert listed["arrays"][0]["shape"] == [3, 4]
            png = http.get(listed["arrays"][0]["png"])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            pixels = np.asarray(Image.open(io.BytesIO(png.content)))
            assert pixels.shape == (3, 4, 4) and pixels[1, 1, 3] == 0 and pixels[0, 0, 3] == 255
            np.testing.assert_array_equal(pixels[0, 0, :3], images.LUTS["viridis"][0])  # the minimum
            np.testing.assert_array_equal(pixels[2, 3, :3], images.LUTS["viridis"][255])  # the maximum
            npy = np.load(io.BytesIO(http.get(listed["arrays"][0]["npy"]).content))
            np.testing.assert_array_equal(npy, image)
            assert http.get(listed["arrays"][0]["json"]).json()["data"][1][1] is None
            assert http.get("/api/previews/image_worker/stxm/nothing.png").status_code == 404
            assert http.get("/api/frames/last.png").status_code == 404
            silent = http.post("/api/commands/abort", headers={"Authorization": f"Bearer {token}"})
            assert silent.status_code == 504 and silent.json()["error"]["type"] == "NoReply"
            assert http.post("/api/commands/abort").status_code == 401
            docs = http.get("/docs")
            assert docs.status_code == 200 and "cdn" not in docs.text.lower()  # offline, as beamlines are
            assert all(http.get(asset).status_code == 200
                       for asset in ("/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/swagger-ui.css"))
            assert "/api/commands/{cmd}" in http.get("/openapi.json").json()["paths"]
    finally:
        pub.close(linger=0)


# --- a real run --------------------------------------------------------------------------------

class Live:
    """A `surveyor run` (synthetic pipeline) with its web front-end, and a subscriber of our own
    to the handler's previews, to compare with what the web process serves."""

    def __init__(self, directory: Path) -> None:
        self.path = synthetic_pipeline(directory, frames=200, rate_hz=400, shape=SHAPE)
        self.run = Run(self.path, cwd=directory, web=True)
        self.previews = zmq.Context.instance().socket(zmq.SUB)
        self.previews.setsockopt(zmq.LINGER, 0)
        self.previews.setsockopt(zmq.SUBSCRIBE, b"preview.")
        self.previews.connect(self.run.pipeline.handler.status)
        self.http = httpx.Client(base_url=self.run.web_url, timeout=10)
        self.run.wait_ready(4)
        wait_for(self._web_connected, 30, "the web front-end following the handler")
        self.token = self.run.token_file.read_text().strip()
        self.auth = {"Authorization": f"Bearer {self.token}"}

    def _web_connected(self) -> bool:
        try:
            response = self.http.get("/api/status")
        except httpx.TransportError:
            return False
        return response.status_code == 200 and response.json()["web"]["connected"]

    def last_preview(self, name: str) -> tuple[dict, list[bytes]] | None:
        found = None
        while self.previews.poll(0):
            topic, body, *buffers = self.previews.recv_multipart()
            header = json.loads(body)
            if header["name"] == name:
                found = (header, buffers)
        return found

    def close(self) -> None:
        self.http.close()
        self.previews.close(linger=0)
        self.run.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = Live(tmp_path_factory.mktemp("web_api"))
    yield live
    live.close()


@pytest.mark.slow
def test_status_is_the_handlers_snapshot(live):
    ours = live.http.get("/api/status").json()
    theirs = live.run.ctl("status").result
    assert ours["pipeline"] == theirs["pipeline"] and ours["epoch"] == theirs["epoch"]
    assert {(s["name"], s["pid"], s["state"]) for s in ours["services"]} == \
        {(s["name"], s["pid"], s["state"]) for s in theirs["services"]}
    assert ours["stages"].keys() == theirs["stages"].keys() == {"receiver", "worker", "writer"}
    assert ours["web"]["connected"] and ours["web"]["age_s"] < 3
    assert ours["web"]["status_endpoint"] == live.run.pipeline.handler.status
    assert live.http.get("/api/pipeline").json()["stages"]["writer"]["inputs"] == ["worker"]
    assert live.http.get("/").status_code == 200


@pytest.mark.slow
def test_commands_need_the_token_and_the_scan_shows_in_scans_events_and_previews(live):
    args = {"scan_id": "webscan", "n_frames": 200}
    assert live.http.post("/api/commands/start_scan", json=args).status_code == 401
    assert live.http.post("/api/commands/start_scan", json=args,
                          headers={"Authorization": "Bearer wrong-token"}).status_code == 403
    assert live.http.post("/api/commands/shutdown", json={}, headers=live.auth).status_code == 422
    started = live.http.post("/api/commands/start_scan", json=args, headers=live.auth)
    assert started.status_code == 200 and started.json()["ok"] and started.json()["result"]["scan_id"] == "webscan"
    finished = live.run.wait_scan("webscan")

    # scans: the summary as the handler has it (from its next snapshot, within a second)
    def listed():
        return next((s for s in live.http.get("/api/scans").json()["scans"] if s["scan_id"] == "webscan"), None)
    ours = wait_for(listed, 5, "the finished scan in /api/scans")
    handler_scans = {s["scan_id"]: s for s in live.run.ctl("status").result["scans"]}
    assert ours == handler_scans["webscan"] == finished["summary"] and ours["frames_written"] == 200

    # events: resumable by seq, over HTTP and the websocket alike
    everything = live.http.get("/api/events").json()
    kinds = [e["kind"] for e in everything["events"]]
    assert "scan_started" in kinds and "scan_finished" in kinds
    seqs = [e["seq"] for e in everything["events"]]
    assert seqs == sorted(seqs) and everything["last"] == seqs[-1]
    start = next(e for e in everything["events"] if e["kind"] == "scan_started" and e["scan_id"] == "webscan")
    after = live.http.get("/api/events", params={"since": start["seq"]}).json()
    assert [e["seq"] for e in after["events"]] == [s for s in seqs if s > start["seq"]]
    assert any(e["kind"] == "scan_finished" and e["summary"] == finished["summary"] for e in after["events"])
    ws_url = live.run.web_url.replace("http", "ws")
    with connect(f"{ws_url}/api/events/ws?since={start['seq']}", open_timeout=10) as socket:
        first = json.loads(socket.recv(timeout=10))
    assert first["events"] == after["events"] and first["stream"] == everything["stream"]
    with connect(f"{ws_url}/api/status/ws", open_timeout=10) as socket:
        status = json.loads(socket.recv(timeout=10))
    assert status["pipeline"] == "pipeline" and status["web"]["connected"]

    # the last frame: the receiver's preview, as the handler published it
    published = wait_for(lambda: live.last_preview("last_frame"), 10, "last_frame on the status port")
    header, buffers = published
    listed = {(p["stage"], p["name"]): p for p in live.http.get("/api/previews").json()["previews"]}
    preview = listed[("receiver", "last_frame")]
    assert preview["time"] == header["time"] and preview["scan_id"] == "webscan"
    assert preview["meta"]["shape"] == list(SHAPE) and preview["meta"]["binning"] == 2
    assert preview["meta"]["frame"] == 199, "the last frame of the scan is shown"
    sent = np.frombuffer(buffers[0], dtype="<f4").reshape(header["arrays"][0]["shape"])
    served = np.load(io.BytesIO(live.http.get("/api/frames/last.npy").content))
    np.testing.assert_array_equal(served, sent)
    assert served.shape == (150, 100) and np.all(served[1:, 1:] == 199 % 251)  # synthetic pixels: frame % 251
    np.testing.assert_array_equal(np.load(io.BytesIO(live.http.get(preview["arrays"][0]["npy"]).content)), sent)
    frame_png = Image.open(io.BytesIO(live.http.get("/api/frames/last.png").content))
    assert frame_png.size == (100, 150) and frame_png.mode == "RGBA"
    assert live.http.get("/api/frames/last").json()["meta"]["frame"] == 199

    # latency: the writer's histogram of the scan (every frame once, from the receiver's stamp to
    # the flush that made it safe), its quantiles in the bins the counts put them in
    def latency():
        found = next((p for p in live.http.get("/api/previews").json()["previews"]
                      if (p["stage"], p["name"]) == ("writer", "latency")), None)
        return found if found and found["scan_id"] == "webscan" and found["meta"]["frames"] == 200 else None
    preview = wait_for(latency, 5, "the writer's latency preview of the whole scan")
    counts, edges = (np.load(io.BytesIO(live.http.get(f"/api/previews/writer/latency/{name}.npy").content))
                     for name in ("counts", "edges_s"))
    assert counts.sum() == 200 and len(edges) == len(counts) + 1 and np.all(np.diff(edges) > 0)
    meta = preview["meta"]
    cumulative = np.cumsum(counts)
    for q, key in ((0.5, "p50_s"), (0.95, "p95_s")):
        index = int(np.searchsorted(cumulative, q * 200))
        assert edges[index] <= meta[key] <= edges[index + 1], (key, meta, counts.nonzero())
    assert meta["negative"] == 0 and 0 < meta["p50_s"] <= meta["p95_s"] and edges[counts.nonzero()[0][-1]] <= meta["max_s"] < 30


@pytest.mark.slow
def test_a_refused_configure_passes_the_handlers_error_through(live):
    bad = {"stage": "worker", "params": {"delay_s": -1}}
    direct = live.run.ctl("configure", bad)
    assert not direct.ok
    refused = live.http.post("/api/commands/configure", json=bad, headers=live.auth)
    assert refused.status_code == 422
    assert refused.json()["error"] == direct.error and direct.error["type"] == "ParameterError"
    unknown = live.http.post("/api/commands/configure", json={"stage": "nowhere", "params": {}}, headers=live.auth)
    assert unknown.status_code == 400 and unknown.json()["error"]["type"] == "MessageError"
    assert "nowhere" in unknown.json()["error"]["message"]
    not_json = live.http.post("/api/commands/configure", content=b"[1, 2]", headers=live.auth)
    assert not_json.status_code == 400 and "JSON object" in not_json.json()["error"]["message"]
    assert live.http.get("/api/stages/worker/params").json()["params"]["delay_s"] == 0.0
    fine = live.http.post("/api/commands/configure", json={"stage": "worker", "params": {"offset": 3}},
                          headers=live.auth)
    assert fine.status_code == 200 and fine.json()["result"]["params"]["offset"] == 3
    assert live.http.get("/api/stages/worker/params").json()["params"]["offset"] == 3


def handler_pid(pipeline: Path) -> int | None:
    """Our run's handler process (the launcher's child), by its command line."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"handler" in argv and str(pipeline).encode() in argv:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_restarted_handler_is_followed_again_and_the_events_stay(live):
    before = live.http.get("/api/events").json()
    old = handler_pid(live.path)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: handler_pid(live.path) not in (old, None), 30, "the launcher to restart the handler")
    live.run.wait_ready(4)
    restarted_at = time.time()
    wait_for(lambda: live.http.get("/api/status").json()["time"] > restarted_at, 15, "a new handler's snapshot")
    assert live.http.get("/api/status").json()["web"]["connected"]
    kept = live.http.get("/api/events").json()
    assert kept["stream"] == before["stream"] and kept["events"][:len(before["events"])] == before["events"]
    assert live.http.post("/api/commands/start_scan", json={"scan_id": "after", "n_frames": 20},
                          headers=live.auth).status_code == 200
    live.run.wait_scan("after")
    after = live.http.get("/api/events", params={"since": before["last"]}).json()["events"]
    assert any(e["kind"] == "scan_finished" and e["scan_id"] == "after" for e in after)
    assert all(e["seq"] > before["last"] for e in after)
