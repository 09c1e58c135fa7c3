"""The HTTP API of `surveyor web` (FastAPI; its OpenAPI page at /docs) and the page at /.

Everything it serves comes from two places: the handler's status port, read by one `Feed`, and
the handler's command port, one request per command (`client.call`). It never joins the data
plane. Reading needs nothing; a command that changes the experiment needs the token
(`Authorization: Bearer TOKEN`, auth.py). A handler's reply is passed through as it came:

    200 {"ok": true, "id": ..., "result": {...}}
    4xx {"ok": false, "id": ..., "error": {"type": "ParameterError", "message": "..."}}
        (422 for ParameterError, 404 UnknownCommand, 400 for any other refusal)
    504 {"ok": false, "error": {"type": "NoReply", "message": "..."}} when the handler does not answer

Websocket messages are the JSON bodies of the matching GET (`/api/status/ws`: the status body on
each new snapshot, or after STATUS_IDLE_S without one; `/api/events/ws`: event batches), see live.py
for why a slow client costs nothing but its own messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from libs.common import client
from libs.common.pipeline import Pipeline
from libs.web import auth, live, previews
from libs.web.feed import EVENTS_KEPT, Feed

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STATUS_IDLE_S = 2.0
"""The status websocket sends the body again after this long without a snapshot (then saying
`connected: false` once the feed is stale), so that a page sees the handler go away."""
EVENTS_PER_MESSAGE = 200
COMMAND_TIMEOUT_S = {"start_scan": 10.0, "abort": 30.0, "configure": 15.0}
"""`abort` answers once every stage has dropped the scan's data; `configure` once every process took it."""
ERROR_STATUS = {"ParameterError": 422, "UnknownCommand": 404}
"""HTTP status of a refusal by its error type; any other is 400."""


class Command(str, Enum):
    start_scan = "start_scan"
    abort = "abort"
    configure = "configure"


COMMAND_EXAMPLES = {
    "start_scan": {"value": {"scan_id": "scan_0001", "technique": "raw", "n_frames": 100}},
    "abort": {"value": {}},
    "configure": {"value": {"stage": "peak_worker", "params": {"minimum_snr": 6.0}}},
}


class Web:
    """What the routes share: the feed, the handler's command endpoint, the websockets open."""

    def __init__(self, feed: Feed, *, handler: str | None, pipeline: Pipeline | None,
                 command_timeout_s: dict[str, float] | None = None) -> None:
        self.feed = feed
        self.handler = handler
        self.pipeline = pipeline
        self.timeouts = {**COMMAND_TIMEOUT_S, **(command_timeout_s or {})}
        self.clients = live.Clients()
        self.changes: dict[str, live.Changes] = {}
        self._status_text: tuple[int, str] | None = None

    def web_state(self) -> dict[str, Any]:
        age = self.feed.age_s()
        return {"connected": self.feed.connected(), "age_s": None if age is None else round(age, 3),
                "status_endpoint": self.feed.endpoint, "handler_endpoint": self.handler,
                "stream": self.feed.stream, "last_seq": self.feed.last_seq(), "rejected": self.feed.rejected,
                "clients": dict(self.clients.open)}

    def status_body(self, snapshot: dict[str, Any] | None = None) -> dict[str, Any]:
        snapshot = snapshot if snapshot is not None else self.feed.snapshot()[0]
        return {**(snapshot or {}), "web": self.web_state()}

    def status_text(self) -> tuple[int, str]:
        """The status body of the newest snapshot as JSON, made once per snapshot for every client."""
        _, version = self.feed.snapshot()
        if self._status_text is None or self._status_text[0] != version:
            self._status_text = (version, json.dumps(self.status_body()))
        return self._status_text

    async def snapshot(self) -> dict[str, Any]:
        """The newest snapshot; before the feed has one, the handler's `status` reply (the same
        body); 503 when neither is to be had."""
        snapshot, _ = self.feed.snapshot()
        if snapshot is not None:
            return snapshot
        if self.handler is not None:
            try:
                reply = await asyncio.to_thread(client.call, self.handler, "status", timeout_s=1.0)
                if reply.ok:
                    return reply.result
            except client.NoReply:
                pass
        raise HTTPException(503, {"message": f"no status from the handler yet (status port {self.feed.endpoint}, "
                                             f"command port {self.handler}): is it running?",
                                  "web": self.web_state()})

    def events_body(self, since: int, limit: int) -> dict[str, Any]:
        batch = self.feed.events_after(since, limit)
        return {"stream": self.feed.stream, "events": batch.events, "missed": batch.missed, "last": batch.last}

    async def command(self, cmd: str, args: dict[str, Any]) -> JSONResponse:
        if self.handler is None:
            raise HTTPException(503, "this web process was started without the handler's command endpoint")
        try:
            reply = await asyncio.to_thread(client.call, self.handler, cmd, args, timeout_s=self.timeouts[cmd])
        except client.NoReply as exc:
            return JSONResponse({"ok": False, "id": None, "error": {"type": "NoReply", "message": str(exc)}}, 504)
        body = reply.model_dump(mode="json")
        if reply.ok:
            return JSONResponse(body)
        kind = (reply.error or {}).get("type", "")
        logger.info("%s refused by the handler: %s", cmd, reply.error)
        return JSONResponse(body, ERROR_STATUS.get(kind, 400))

    # --- websockets ---------------------------------------------------------------------------

    async def send_status(self, websocket: WebSocket) -> None:
        sent = None
        while True:
            ticket = self.changes["status"].ticket()
            version, text = self.status_text()
            if version != sent:
                await live.send(websocket, text)
                sent = version
            if not await live.wait(ticket, STATUS_IDLE_S):
                await live.send(websocket, json.dumps(self.status_body()))

    async def send_events(self, websocket: WebSocket, since: int) -> None:
        cursor, first = since, True
        while True:
            ticket = self.changes["event"].ticket()
            batch = self.feed.events_after(cursor, EVENTS_PER_MESSAGE)
            if batch.events or batch.missed or first:
                await live.send(websocket, json.dumps({"stream": self.feed.stream, "events": batch.events,
                                                       "missed": batch.missed, "last": batch.last}))
                first = False
            cursor = batch.events[-1]["seq"] if batch.events else batch.last
            if len(batch.events) < EVENTS_PER_MESSAGE:
                await ticket.wait()


def create_app(feed: Feed, *, token: str, handler: str | None = None, pipeline: Pipeline | None = None,
               command_timeout_s: dict[str, float] | None = None) -> FastAPI:
    """The app over a feed (started and closed with the app); commands go to `handler`."""
    web = Web(feed, handler=handler, pipeline=pipeline, command_timeout_s=command_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        web.changes = {kind: live.Changes() for kind in ("status", "event", "preview")}

        def wake(kind: str) -> None:
            try:
                loop.call_soon_threadsafe(web.changes[kind].notify)
            except RuntimeError:
                pass  # the loop is closing

        feed.on_change(wake)
        feed.start()
        try:
            yield
        finally:
            feed.close()

    # The OpenAPI page's scripts and styles from the package, not a CDN: beamlines run offline.
    app = FastAPIOffline(title="Surveyor", lifespan=lifespan, version="1",
                  description="Live status, events, previews and commands of a Surveyor pipeline. GETs need "
                              "nothing; commands need `Authorization: Bearer TOKEN`. See README, 'Web front-end "
                              "and HTTP API'.")
    app.state.web = web
    needs_token = [Depends(auth.requires(token))]

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        index = STATIC / "index.html"
        if not index.exists():
            raise HTTPException(404, f"no page installed ({index} is missing); the API is under /api, see /docs")
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")

    @app.get("/api/status", summary="the newest status snapshot, plus `web`: this process's link to the handler")
    async def status() -> JSONResponse:
        return JSONResponse(web.status_body(await web.snapshot()))

    @app.get("/api/scans", summary="summaries of the finished scans (`scans`) and the one in progress (`current`)")
    async def scans() -> dict[str, Any]:
        snapshot = await web.snapshot()
        return {"scans": snapshot.get("scans", []), "current": snapshot.get("scan")}

    @app.get("/api/pipeline", summary="the pipeline as loaded: its stages with their inputs and parameters")
    def pipeline_graph() -> dict[str, Any]:
        if web.pipeline is None:
            raise HTTPException(404, "this web process was started without the pipeline file (--pipeline)")
        p = web.pipeline
        return {"name": p.name, "handler": p.handler.model_dump(mode="json"),
                "stages": {name: stage.model_dump(mode="json") for name, stage in p.stages.items()},
                "order": p.topological_order}

    @app.get("/api/stages/{stage}/params", summary="the parameters in force in a process of the stage, as it says")
    async def stage_params(stage: str) -> dict[str, Any]:
        snapshot = await web.snapshot()
        if stage not in snapshot.get("stages", {}):
            raise HTTPException(404, f"no stage {stage!r}; stages are {sorted(snapshot.get('stages', {}))}")
        up = [s for s in snapshot["services"] if s["stage"] == stage and s["state"] == "up"]
        if not up:
            raise HTTPException(503, f"no process of stage {stage} is up")
        try:
            reply = await asyncio.to_thread(client.call, up[0]["command_endpoint"], "status", timeout_s=3.0,
                                            server_key=up[0].get("server_key"))
        except client.NoReply as exc:
            raise HTTPException(504, str(exc)) from None
        return {"stage": stage, "service": up[0]["name"], "params": reply.result.get("params", {})}

    @app.get("/api/events", summary="events after `since` (their `seq`), oldest first; resume with since=last")
    def events(since: int = Query(0, description="the last seq seen; 0: every event kept"),
               limit: int = Query(EVENTS_KEPT, ge=0, le=EVENTS_KEPT)) -> dict[str, Any]:
        return web.events_body(since, limit)

    @app.websocket("/api/events/ws")
    async def events_ws(websocket: WebSocket, since: int = 0) -> None:
        """Batches as GET /api/events gives them: first what came after `since`, then each new event."""
        await web.clients.serve(websocket, "events", lambda ws: web.send_events(ws, since))

    @app.websocket("/api/status/ws")
    async def status_ws(websocket: WebSocket) -> None:
        """The GET /api/status body on each new snapshot (before the first: only `web`)."""
        await web.clients.serve(websocket, "status", web.send_status)

    @app.post("/api/commands/{cmd}", dependencies=needs_token,
              summary="send start_scan, abort or configure to the handler; its reply passed through",
              openapi_extra={"requestBody": {"description": "the command's args as the handler takes them "
                                                            "(INTERFACES.md); empty: none",
                                             "content": {"application/json": {"schema": {"type": "object"},
                                                                              "examples": COMMAND_EXAMPLES}}}},
              responses={200: {"description": "the handler's reply, ok"},
                         400: {"description": "refused by the handler (its error type and message), or a body "
                                              "that is not a JSON object"},
                         401: {"description": "no token"}, 403: {"description": "wrong token"},
                         422: {"description": "a parameter value refused (ParameterError)"},
                         504: {"description": "the handler did not answer"}})
    async def command(cmd: Command, request: Request) -> JSONResponse:
        # The body is read as JSON whatever its Content-Type (a browser's fetch sends text/plain).
        raw = await request.body()
        try:
            args = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            args = exc
        if not isinstance(args, dict):
            problem = f"not JSON: {args}" if isinstance(args, ValueError) else f"a JSON {type(args).__name__}"
            return JSONResponse({"ok": False, "id": None, "error": {
                "type": "MessageError", "message": f"the body of {cmd.value} is {problem}; send its args as a "
                                                   f"JSON object, e.g. {json.dumps(COMMAND_EXAMPLES[cmd.value]['value'])}"}},
                                400)
        return await web.command(cmd.value, args)

    app.include_router(previews.router(feed))
    return app
