"""`surveyor web`: one uvicorn server over the app, until SIGINT or SIGTERM, then exit 0 (as every
Surveyor process does when asked to stop: uvicorn, once shut down, raises the signal again, which
would end the process by the signal; our handler takes it instead).

Only the web process itself imports this (FastAPI, uvicorn): the launcher settles the address
and the token with access.py and starts `surveyor web` as a child.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import uvicorn

from libs.common.pipeline import Pipeline
from libs.web import access
from libs.web.app import create_app
from libs.web.feed import Feed

logger = logging.getLogger(__name__)


def serve(*, status: str, handler: str | None, address: str, token_file: Path | None,
          pipeline: Pipeline | None = None) -> int:
    """Serve until stopped; the exit code. Raises access.AccessError for a bad address or token file."""
    host, port = access.parse_address(address)
    token = access.read_or_create_token(token_file) if token_file else access.new_token()
    app = create_app(Feed(status, command=handler), token=token, handler=handler, pipeline=pipeline)
    shown = f"[{host}]" if ":" in host else host
    logger.info("web front-end at http://%s:%d/ (API under /api, OpenAPI at /docs): status from %s, commands to %s",
                shown, port, status, handler)
    print(f"surveyor web: http://{shown}:{port}/  (API /api, OpenAPI /docs)", flush=True)
    if token_file:
        print(f"surveyor web: commands need the token in {token_file}", flush=True)
    else:
        print(f"surveyor web: commands need 'Authorization: Bearer {token}'", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, ws="websockets-sansio",
                            lifespan="on", timeout_graceful_shutdown=2)
    asked: list[int] = []
    previous = {number: signal.signal(number, lambda signum, frame: asked.append(signum))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    logger.info("web front-end stopped%s", f" ({signal.Signals(asked[0]).name})" if asked else "")
    return 0
