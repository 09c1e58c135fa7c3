"""The previews routes: what the stages published last (`preview.<stage>` on the status port), as
a list, and each array as a PNG, `.npy` or JSON; the receiver's `last_frame` under /api/frames.

A rendered PNG is kept per (preview, array, options) until a newer preview of that (stage, name)
comes, so that any number of browsers polling the same image cost one rendering per preview.
Rendering runs in the server's thread pool, not on its event loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse, Response

from libs.web import images
from libs.web.feed import Feed, Preview

LAST_FRAME = "last_frame"
"""The receiver's preview of the newest frame it received, binned to at most 256 px per side."""
RENDERS_KEPT = 128
NO_STORE = {"Cache-Control": "no-store"}


def describe(preview: Preview) -> dict[str, Any]:
    h = preview.header
    base = f"/api/previews/{h.stage}/{h.name}"
    return {"stage": h.stage, "name": h.name, "service": h.service, "scan_id": h.scan_id, "time": h.time,
            "seq": preview.seq, "meta": h.meta,
            "arrays": [{"name": a.name, "dtype": a.dtype, "shape": list(a.shape),
                        "png": f"{base}/{a.name}.png", "npy": f"{base}/{a.name}.npy",
                        "json": f"{base}/{a.name}.json"} for a in h.arrays]}


class Renders:
    """PNGs made already, newest last; bounded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: OrderedDict[tuple, bytes] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            found = self._made.get(key)
        if found is not None:
            return found
        made = make()
        with self._lock:
            self._made[key] = made
            while len(self._made) > RENDERS_KEPT:
                self._made.popitem(last=False)
        return made


def router(feed: Feed) -> APIRouter:
    api = APIRouter(prefix="/api")
    renders = Renders()

    def find(stage: str, name: str, array: str) -> tuple[Preview, np.ndarray]:
        preview = feed.preview(stage, name)
        if preview is None:
            known = sorted(f"{s}/{n}" for s, n in (p.key for p in feed.previews()))
            raise HTTPException(404, f"no preview {stage}/{name} yet; there are: {', '.join(known) or 'none'}")
        if array not in preview.arrays:
            raise HTTPException(404, f"preview {stage}/{name} has no array {array!r}; it has {sorted(preview.arrays)}")
        return preview, preview.arrays[array]

    def last_frame() -> Preview:
        preview = feed.latest_named(LAST_FRAME)
        if preview is None:
            raise HTTPException(404, "no frame received yet (the receiver shows the newest once a second)")
        return preview

    def png(preview: Preview, array: str, *, vmin: float | None, vmax: float | None, scale: images.Scale,
            log: bool, cmap: images.Colormap, part: images.Part) -> Response:
        key = (preview.key, preview.seq, array, vmin, vmax, scale, log, cmap, part)
        try:
            body = renders.get(key, lambda: images.to_png(preview.arrays[array], vmin=vmin, vmax=vmax,
                                                          scale=scale, log=log, cmap=cmap, part=part))
        except images.NotAnImage as exc:
            raise HTTPException(422, str(exc)) from None
        return Response(body, media_type="image/png", headers={**NO_STORE, "X-Preview-Seq": str(preview.seq)})

    def npy(preview: Preview, array: str) -> Response:
        return Response(images.to_npy(preview.arrays[array]), media_type="application/octet-stream",
                        headers={**NO_STORE, "X-Preview-Seq": str(preview.seq),
                                 "Content-Disposition": f'attachment; filename="{preview.header.name}.{array}.npy"'})

    vmin_q = Query(None, description="value shown as the colormap's bottom (default: from `scale`)")
    vmax_q = Query(None, description="value shown as the colormap's top (default: from `scale`)")
    scale_q = Query("minmax", description="default range: min to max of the finite values, or `robust` "
                                          f"({images.ROBUST_PERCENTILES[0]} to {images.ROBUST_PERCENTILES[1]} "
                                          "percentiles)")
    log_q = Query(False, description="log10 of the values (<= 0 transparent)")
    cmap_q = Query("viridis")
    part_q = Query("abs", description="of a complex array")

    @api.get("/previews", summary="the newest preview of each stage and name: meta, arrays (dtype, shape, URLs)")
    def list_previews() -> dict[str, Any]:
        return {"previews": [describe(p) for p in sorted(feed.previews(), key=lambda p: p.key)]}

    @api.get("/previews/{stage}/{name}", summary="one preview's description")
    def one_preview(stage: str, name: str) -> dict[str, Any]:
        preview = feed.preview(stage, name)
        if preview is None:
            raise HTTPException(404, f"no preview {stage}/{name} yet")
        return describe(preview)

    @api.get("/previews/{stage}/{name}/{array}.png", response_class=Response,
             responses={200: {"content": {"image/png": {}}}}, summary="a 2-D preview array as a PNG")
    def preview_png(stage: str, name: str, array: str, vmin: float | None = vmin_q, vmax: float | None = vmax_q,
                    scale: images.Scale = scale_q, log: bool = log_q, cmap: images.Colormap = cmap_q,
                    part: images.Part = part_q) -> Response:
        preview, _ = find(stage, name, array)
        return png(preview, array, vmin=vmin, vmax=vmax, scale=scale, log=log, cmap=cmap, part=part)

    @api.get("/previews/{stage}/{name}/{array}.npy", response_class=Response,
             summary="a preview array as np.save writes it")
    def preview_npy(stage: str, name: str, array: str) -> Response:
        preview, _ = find(stage, name, array)
        return npy(preview, array)

    @api.get("/previews/{stage}/{name}/{array}.json", summary="a preview array as JSON (NaN as null)")
    def preview_json(stage: str, name: str, array: str,
                     part: images.Part | None = Query(None, description="of a complex array (default: "
                                                                         "[real, imag] pairs)")) -> JSONResponse:
        preview, values = find(stage, name, array)
        return JSONResponse({"seq": preview.seq, **images.to_json(values, part)}, headers=NO_STORE)

    @api.get("/frames/last", summary="the last received frame's description: frame number, shape, binning")
    def frame_last() -> dict[str, Any]:
        return describe(last_frame())

    @api.get("/frames/last.png", response_class=Response, responses={200: {"content": {"image/png": {}}}},
             summary="the last received frame, binned to at most 256 px per side, as a PNG (robust scale)")
    def frame_png(vmin: float | None = vmin_q, vmax: float | None = vmax_q, scale: images.Scale = Query("robust"),
                  log: bool = log_q, cmap: images.Colormap = cmap_q) -> Response:
        return png(last_frame(), "data", vmin=vmin, vmax=vmax, scale=scale, log=log, cmap=cmap, part="abs")

    @api.get("/frames/last.npy", response_class=Response, summary="the last received frame, binned, as .npy")
    def frame_npy() -> Response:
        return npy(last_frame(), "data")

    return api
