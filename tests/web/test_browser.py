"""The page in a real browser: Debian's Chromium, headless, driven by Playwright (never a browser
download: the system's `chromium` binary), against `surveyor run` with its web front-end and a
virtual detector streaming a scan to it. The page is opened as `surveyor run` prints it
(`http://ADDR:PORT/#token=TOKEN`); what it draws is read back from its pixels and compared with
what the HTTP API serves. A screenshot of each page is kept in the test's temp dir.

The detector is started apart from the run (`surveyor simulate ... --handler`, as the operator's
scan would come), so the run outlives its scan and the page can be read after it. Skipped when
Playwright or Chromium is missing (`.ci/run` installs Chromium where apt-get is at hand)."""

from __future__ import annotations

import io
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from libs.common import client
from tests.conftest import REPO, free_endpoints, free_port, wait_for

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium")

PTYCHO = REPO / "pipelines" / "ptychography.toml"
SX = REPO / "pipelines" / "crystallography.toml"
PTYCHO_SMALL = ("stages.frame_worker.params.crop=256", "stages.frame_worker.params.size=64",
                "stages.image_worker.params.preview_interval_s=1",
                "stages.reconstruction_worker.params.preview_interval_s=1")
PTYCHO_PARAMS = ("n_dark=10", "size=64", "raw_shape=[320, 320]")
"""tests/ptychography/test_chain.py's SMALL scan (10 x 10 positions, 64 x 64 clean frames), with
previews each second."""

# What the page is asked, in its own JavaScript: an image's pixels as drawn, and whether they are
# the PNG the API serves now for the preview the image says it shows.
IMAGE_PIXELS = """(id) => {
  const img = document.getElementById(id);
  if (!img || !img.complete || !img.naturalWidth) return null;
  const canvas = document.createElement("canvas");
  [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  const colours = new Set();
  let opaque = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3]) { opaque++; colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]); }
  }
  return {width: canvas.width, height: canvas.height, opaque, colours: colours.size, time: img.dataset.time};
}"""

SAME_AS_API = """async ([id, stage, name, array]) => {
  const img = document.getElementById(id);
  const {previews} = await (await fetch("/api/previews")).json();
  const preview = previews.find((p) => p.stage === stage && p.name === name);
  if (!img.src.includes(`/api/previews/${stage}/${name}/${array}.png?`)) return `another image: ${img.src}`;
  if (!preview || String(preview.time) !== img.dataset.time) return "the page shows an older preview";
  const response = await fetch(img.src);  // with the page's own rendering options
  if (response.headers.get("X-Preview-Seq") !== String(preview.seq)) return "a newer preview came meanwhile";
  const served = new Image();  // decoded as the page's own <img> is
  served.src = URL.createObjectURL(await response.blob());
  await served.decode();
  const pixels = (source) => {
    const canvas = document.createElement("canvas");
    [canvas.width, canvas.height] = [source.naturalWidth, source.naturalHeight];
    const context = canvas.getContext("2d");
    context.drawImage(source, 0, 0);
    return context.getImageData(0, 0, canvas.width, canvas.height).data;
  };
  const [shown, api] = [pixels(img), pixels(served)];
  const [height, width] = preview.arrays.find((a) => a.name === array).shape;
  if (img.naturalWidth !== width || img.naturalHeight !== height) return `shape ${img.naturalWidth} x ${img.naturalHeight}`;
  const differ = shown.filter((v, i) => v !== api[i]).length;
  return shown.length === api.length && !differ ? "same" : `${differ} of ${shown.length} values differ`;
}"""

BOX_FRAMES_IN = """() => Object.fromEntries([...document.querySelectorAll('#graph .stage')]
  .map((box) => [box.dataset.stage, box.querySelector('.totals b').textContent]))"""

PLOT_PIXELS = """([id, rgb]) => {
  const canvas = document.querySelector(`#${id} canvas`);
  if (!canvas) return 0;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let count = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (Math.abs(data[i] - rgb[0]) < 8 && Math.abs(data[i + 1] - rgb[1]) < 8 && Math.abs(data[i + 2] - rgb[2]) < 8
        && data[i + 3] > 200) count++;
  }
  return count;
}"""
"""Pixels of a plot's canvas in its series' colour (the axes and grid are grey)."""

OVERLAY_AT = """([id, points]) => {
  const canvas = document.getElementById(id);
  if (!canvas || !canvas.width) return [];
  const context = canvas.getContext("2d");
  const ratio = canvas.width / canvas.clientWidth;
  const size = Math.max(1, Math.round(4 * ratio));
  return points.map(([x, y]) => {
    const data = context.getImageData(Math.round(x * ratio) - size, Math.round(y * ratio) - size, 2 * size + 1,
                                      2 * size + 1).data;
    let opaque = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 128) opaque++;
    return opaque;
  });
}"""
"""Per point (CSS px of an overlay canvas), the opaque pixels of the canvas within 4 px of it."""

OVERLAY_OPAQUE = """(id) => {
  const canvas = document.getElementById(id);
  if (!canvas || !canvas.width) return 0;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let opaque = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 128) opaque++;
  return opaque;
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


class Page:
    """One browser tab on a run's page. A script error in the page, or a request to anywhere but
    the web process, fails the test at the end."""

    def __init__(self, browser, run) -> None:
        self.run = run
        token_file = Path(run.token_file)
        self.token = wait_for(lambda: token_file.exists() and token_file.read_text().strip(), 60, "the web token")
        self.url = run.web_url
        wait_for(lambda: self.get("/api/status", quiet=True), 60, "the web front-end")
        self.printed = printed_page_url(run)
        assert self.printed == f"{self.url}/#token={self.token}", self.printed
        self.context = browser.new_context(viewport={"width": 1440, "height": 1000})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.outside: list[str] = []  # the page works offline: nothing but its own server is asked
        self.page.on("request", lambda request: None if request.url.startswith((self.url, "data:", "blob:"))
                     else self.outside.append(request.url))
        self.page.goto(self.printed)  # the line `surveyor run` prints

    def npy(self, path: str) -> np.ndarray:
        return self.served(path)[1]

    def served(self, path: str) -> tuple[int, np.ndarray]:
        """A preview array as the API serves it, with the seq of the preview it belongs to."""
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return int(response.headers["X-Preview-Seq"]), np.load(io.BytesIO(response.read()))

    def drawn_as_served(self, stage: str, name: str, arrays: tuple[str, ...],
                        drawn: str) -> tuple[dict[str, Any], list[np.ndarray], dict[str, Any]] | None:
        """The preview, its arrays as served and what the page drew from it (`drawn`: a script giving an
        object with the `seq` it was drawn from), once all three are of one preview; None meanwhile."""
        preview = self.preview(stage, name)
        served = [self.served(f"/api/previews/{stage}/{name}/{array}.npy") for array in arrays]
        shown = self.js(drawn)
        if preview and shown and {seq for seq, _ in served} | {shown["seq"]} == {preview["seq"]}:
            return preview, [array for _, array in served], shown
        return None

    def preview(self, stage: str, name: str) -> dict[str, Any] | None:
        return next((p for p in self.get("/api/previews")["previews"] if (p["stage"], p["name"]) == (stage, name)),
                    None)

    def get(self, path: str, quiet: bool = False) -> Any:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if quiet:
                return None
            raise

    def js(self, script: str, arg: Any = None) -> Any:
        return self.page.evaluate(script, arg)

    def drawn(self, image_id: str) -> dict[str, Any] | None:
        """The image's pixels once it shows a preview: most of them opaque, in many colours."""
        found = self.js(IMAGE_PIXELS, image_id)
        if found and found["time"] and found["opaque"] > found["width"] * found["height"] / 2 and found["colours"] > 8:
            return found
        return None

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()

    def close(self, screenshot: Path) -> None:
        self.page.screenshot(path=str(screenshot), full_page=True)
        self.context.close()
        assert not self.errors, f"errors in the page: {self.errors}"
        assert not self.outside, f"the page asked beyond its server: {self.outside}"


def printed_page_url(run, timeout_s: float = 60) -> str:
    """The page's URL with its token as `surveyor run` prints it (a line of its own, never wrapped).
    Read from the pipe's descriptor: lines that come together must not wait in a reader's buffer."""
    deadline = time.monotonic() + timeout_s
    fd, seen = run.process.stdout.fileno(), ""
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 0.5)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        seen += chunk.decode(errors="replace")
        found = next((line.strip() for line in seen.splitlines() if "#token=" in line), None)
        if found:
            return found
    raise AssertionError(f"surveyor run printed no page URL with its token: {seen[-2000:]}")


def stream(run, kind: str, *, frames: int, rate: float, scan_id: str, params: tuple[str, ...] = ()) -> subprocess.Popen:
    """A virtual detector bound where the run's receiver connects, announcing its scan to the handler."""
    source = run.pipeline.stages["receiver"].params["source"]
    return subprocess.Popen(
        [sys.executable, "-m", "libs.cli.main", "simulate", kind, "--bind", source, "--frames", str(frames),
         "--rate", str(rate), "--scan-id", scan_id, "--handler", run.endpoint,
         *(arg for param in params for arg in ("--param", param))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def child_pid(run, command: str) -> int:
    """The pid of `surveyor run`'s child `surveyor COMMAND ...` (the handler, the web front-end)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == run.process.pid and argv[1:4] == [b"-m", b"libs.cli.main", command.encode()]:
            return int(stat.parent.name)
    raise AssertionError(f"surveyor run has no child `surveyor {command}`")


@pytest.fixture
def detectors():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
        process.wait(10)


def test_ptychography_page_shows_the_live_reconstruction_and_keeps_it_over_a_reload(start_run, browser, detectors,
                                                                                    tmp_path):
    run = start_run(PTYCHO, overrides=(*free_endpoints(), *PTYCHO_SMALL), web=True)
    page = Page(browser, run)
    run.wait_ready(services=7)
    detectors.append(stream(run, "ptycho", frames=100, rate=25, scan_id="web_ptycho", params=PTYCHO_PARAMS))

    for image in ("img-object_phase", "img-object_amplitude", "img-probe_amplitude", "img-transmission",
                  "img-dpc_phase", "img-stxm_probe"):
        wait_for(lambda: page.drawn(image), 90, f"{image} drawn")
    # The graph: a box per stage, each process in it, and the edges the pipeline file names.
    stages = page.js("() => [...document.querySelectorAll('#graph .stage')].map((box) => box.dataset.stage)")
    assert sorted(stages) == sorted(run.pipeline.stages)
    assert page.js("() => document.querySelectorAll('#edges path[marker-end]').length") == \
        sum(len(stage.inputs) for stage in run.pipeline.stages.values())
    assert page.js("""() => [...document.querySelectorAll('#graph .stage[data-stage="frame_worker"] tr[data-process]')]
                            .map((row) => row.dataset.process)""") == ["frame_worker.1", "frame_worker.2"]

    run.wait_scan("web_ptycho", timeout_s=90)
    # Each box's frames in are the API's, once they stop changing.
    totals = page.get("/api/status")["stages"]
    wait_for(lambda: page.js(BOX_FRAMES_IN) == {name: f"{int(t['frames_in']):,}" for name, t in totals.items()}, 10,
             f"the boxes' frames in as the API's {totals}")
    # Once no newer preview comes, the images are the API's PNGs, pixel for pixel.
    for image, stage, array in (("img-object_phase", "reconstruction_worker", "object_phase"),
                                ("img-transmission", "image_worker", "transmission")):
        name = "reconstruction" if stage == "reconstruction_worker" else "stxm"
        answers = []
        try:
            wait_for(lambda: answers.append(page.js(SAME_AS_API, [image, stage, name, array])) or answers[-1] == "same",
                     30, f"{image} as the API serves it")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {answers[-1]}") from None
    # The solver's error against iterations: the points the previews carried, the last the API's.
    meta = next(p["meta"] for p in page.get("/api/previews")["previews"] if p["name"] == "reconstruction")
    wait_for(lambda: page.js("() => surveyor.state.errors.web_ptycho?.at(-1)") == [meta["iterations"], meta["error"]],
             10, "the newest error point")
    assert page.js(PLOT_PIXELS, ["plot-error", [192, 57, 43]]) > 50
    points = page.js("() => surveyor.state.errors.web_ptycho.length")
    # The latency histogram: the writer's counts as the API serves them, drawn, with its p50 and p95.
    latency = wait_for(lambda: (found := page.preview("writer", "latency")) and found["scan_id"] == "web_ptycho"
                       and found["meta"]["frames"] == 100 and found, 10, "the writer's latency of the whole scan")
    counts = page.npy("/api/previews/writer/latency/counts.npy")
    assert counts.sum() == 100  # every clean frame once (the darks make none)
    wait_for(lambda: page.js("() => surveyor.state.latency.get('writer')?.seq") == latency["seq"], 10,
             "the page on the newest latency preview")
    assert page.js("() => surveyor.state.latency.get('writer').counts") == counts.tolist()
    assert page.js(PLOT_PIXELS, ["plot-latency", [35, 100, 170]]) > 50
    marks = page.js("() => surveyor.state.latencyMarks")
    assert [m["stage"] for m in marks] == ["writer"] and {"p50", "p95"} <= marks[0].keys(), marks
    assert marks[0]["p50"] <= marks[0]["p95"]
    assert "p50" in page.text("#latency-meta") and "100 frames" in page.text("#latency-meta")
    wait_for(lambda: "finished" in page.text("#scans-body"), 10, "the finished scan in the scans table")
    wait_for(lambda: "scan_finished" in page.text("#events-body"), 10, "scan_finished in the event log")
    page.page.screenshot(path=str(tmp_path / "ptychography.png"), full_page=True)

    # A reload: the series kept by the page, the rest from the API again.
    page.page.reload()
    wait_for(lambda: page.drawn("img-object_phase"), 20, "the reconstruction after a reload")
    wait_for(lambda: page.js(PLOT_PIXELS, ["plot-error", [192, 57, 43]]) > 50, 10, "the error plot redrawn")
    assert page.js("() => surveyor.state.errors.web_ptycho.length") >= points
    assert "token" not in page.page.url and page.page.locator("#token").get_attribute("placeholder") == "token set"
    wait_for(lambda: "scan_started" in page.text("#events-body"), 10, "the event log after a reload")
    page.close(tmp_path / "ptychography_reloaded.png")


def test_crystallography_page_plots_the_hit_rate_reconfigures_the_peak_finder_and_aborts(start_run, browser,
                                                                                        detectors, tmp_path):
    overrides = (*free_endpoints(), f'stages.hit_server.params.endpoint="tcp://127.0.0.1:{free_port()}"')
    run = start_run(SX, overrides=overrides, web=True)
    page = Page(browser, run)
    run.wait_ready(services=6)
    detectors.append(stream(run, "sx", frames=2000, rate=20, scan_id="web_sx",
                            params=("layout='1m'", "hit_fraction=0.5")))

    # The hit rate against time, as the writer's previews give it.
    wait_for(lambda: page.js("() => surveyor.state.hitRate.y.length") >= 2, 60, "two hit-rate samples")
    wait_for(lambda: page.js(PLOT_PIXELS, ["plot-hitrate", [30, 132, 73]]) > 50, 10, "the hit-rate line drawn")
    wait_for(lambda: page.drawn("img-virtual_powder"), 10, "the virtual powder drawn")
    assert page.js("() => surveyor.state.hitRate.y.every((v) => v >= 0 && v <= 100)")
    # An array the API says is a newer preview's than the notice the page acts on is not drawn under
    # that notice's meta (the newer one's own notice draws it).
    claim_newer = [True]

    def as_newer(route) -> None:
        if not claim_newer[0]:
            route.continue_()
            return
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "x-preview-seq": str(10**9)})

    noticed = "() => surveyor.state.previews.get('writer/crystallography').seq"
    page.page.route("**/api/previews/writer/crystallography/hit_rate.npy", as_newer)
    before = page.js(noticed)  # a fetch already under way may still draw one of these
    # Previews are shown one after another: once a second new one is noticed, the first was handled.
    first = wait_for(lambda: (seq := page.js(noticed)) > before and seq, 15, "a new preview noticed")
    wait_for(lambda: page.js(noticed) > first, 15, "another new preview noticed")
    assert page.js("() => surveyor.state.hitRate.seq") <= before
    claim_newer[0] = False
    wait_for(lambda: page.js("() => surveyor.state.hitRate.seq") > before, 15, "the hit rate drawn again")
    # Resolution rings on the powder, where the writer's geometry puts them.
    rings = wait_for(lambda: page.js("() => surveyor.state.rings"), 10, "resolution rings drawn")
    geometry = page.preview("writer", "crystallography")["meta"]["geometry"]
    scale = page.js("() => { const i = document.getElementById('img-virtual_powder'); "
                    "return Math.min(i.clientWidth / i.naturalWidth, i.clientHeight / i.naturalHeight); }")
    for ring in rings:
        metres = geometry["distance_m"] * math.tan(2 * math.asin(geometry["wavelength_a"] / (2 * ring["d"])))
        assert ring["rx"] == pytest.approx(metres / geometry["pixel_size_m"][1] / geometry["binning"] * scale, rel=1e-6)
    assert {10, 4} <= {ring["d"] for ring in rings}, rings
    assert page.js(OVERLAY_OPAQUE, "overlay-virtual_powder") > 200
    # The latest hit, its peaks circled on the overlay.
    wait_for(lambda: page.drawn("img-latest_hit"), 10, "the latest hit drawn")
    wait_for(lambda: page.js("() => surveyor.state.latestHit?.circles.length"), 10, "the latest hit's peaks circled")
    # Peaks per frame, and a latency series per writer (the hits' writer first, then the raw one).
    wait_for(lambda: page.js(PLOT_PIXELS, ["plot-peaks", [142, 68, 173]]) > 20, 10, "peaks per frame drawn")
    wait_for(lambda: page.js("() => surveyor.state.latencyMarks.map((m) => m.stage)") == ["writer", "raw_writer"], 10,
             "the two writers' latencies")
    assert page.js(PLOT_PIXELS, ["plot-latency", [35, 100, 170]]) > 50

    # A new minimum_snr from the panel is what the peak finder's processes run with.
    def in_force() -> set[float]:
        status = run.ctl("status").result
        return {client.call(s["command_endpoint"], "status").result["params"]["minimum_snr"]
                for s in status["services"] if s["stage"] == "peak_worker" and s["state"] == "up"}

    assert page.page.locator("#params-stage").input_value() == "peak_worker"
    wait_for(lambda: page.page.locator('#params-fields input[name="minimum_snr"]').input_value() == "6", 10,
             "the value in force shown")
    page.page.fill('#params-fields input[name="minimum_snr"]', "7")
    page.page.click("#params-form button[type=submit]")
    wait_for(lambda: "minimum_snr = 7" in page.text("#params-reply"), 10, "the handler's answer shown")
    assert in_force() == {7}
    wait_for(lambda: page.text('[data-for="minimum_snr"]') == "in force: 7", 10, "the process's value shown")
    assert page.get("/api/stages/peak_worker/params")["params"]["minimum_snr"] == 7

    # A value the peak finder cannot take: the handler's refusal shown, nothing changed.
    page.page.fill('#params-fields input[name="minimum_snr"]', "-1")
    page.page.click("#params-form button[type=submit]")
    wait_for(lambda: "refused" in page.text("#params-reply"), 10, "the refusal shown")
    refusal = page.text("#params-reply")
    assert "minimum_snr" in refusal and "did not change" in refusal, refusal
    assert page.page.locator("#params-reply").get_attribute("class") == "reply bad"
    assert in_force() == {7}

    # The handler killed and restarted by `surveyor run`, then the web process: the page follows
    # both by itself (its websockets reopen, the event log goes on from the new process's events).
    os.kill(child_pid(run, "handler"), signal.SIGKILL)
    wait_for(lambda: "handler_recovered" in page.text("#events-body"), 30, "handler_recovered in the event log")
    stream_id = page.js("() => surveyor.state.stream")
    os.kill(child_pid(run, "web"), signal.SIGKILL)
    wait_for(lambda: page.text("#page-state").startswith("reconnecting"), 10, "the page reconnecting")
    wait_for(lambda: page.text("#page-state") == "live" and page.js("() => surveyor.state.stream") != stream_id, 30,
             "the page on the new web process")
    wait_for(lambda: page.text("#handler-state") == "handler live", 10, "the handler's status again")

    # The new web process has heard the writer's preview again before the scan is aborted.
    wait_for(lambda: any(p["name"] == "crystallography" for p in page.get("/api/previews")["previews"]), 15,
             "the writer's preview on the new web process")
    # Abort: the scan aborted, in the reply, the scans table, the event log and the API.
    page.page.click("#abort")
    wait_for(lambda: "aborted" in page.text("#command-reply"), 20, "the abort's reply")
    wait_for(lambda: "scan_aborted" in page.text("#events-body"), 10, "scan_aborted in the event log")
    wait_for(lambda: any(s["scan_id"] == "web_sx" and s["state"] == "aborted" for s in page.get("/api/scans")["scans"]),
             10, "the scan aborted in the API")
    wait_for(lambda: "aborted" in page.text('#scans-body tr[data-scan="web_sx"]'), 10, "aborted in the scans table")
    # The plotted hit rate is the writer's history as the API serves it.
    preview, (history,), drawn = wait_for(
        lambda: page.drawn_as_served("writer", "crystallography", ("hit_rate",), "() => surveyor.state.hitRate"),
        10, "the page on the newest preview's hit rate")
    assert drawn["y"] == pytest.approx(list(100 * history.astype(float)), abs=1e-3)
    assert drawn["y"][-1] == pytest.approx(100 * preview["meta"]["hit_rate"], abs=0.01)
    # Peaks per frame: the writer's, by frame number.
    _, (frames, peaks), drawn = wait_for(
        lambda: page.drawn_as_served("writer", "crystallography", ("n_peaks_frames", "n_peaks"),
                                     "() => surveyor.state.peaks"), 10, "the page on the newest peaks per frame")
    assert [drawn["x"], drawn["y"]] == [list(pair) for pair in zip(*sorted(zip(frames.tolist(), peaks.tolist())))]
    # The latest hit's circles: one per peak the API serves, where the peak is, drawn on the overlay.
    hit, (positions,), shown = wait_for(
        lambda: page.drawn_as_served("writer", "latest_hit", ("peaks",),
                                     "() => surveyor.state.latestHit?.rect && surveyor.state.latestHit"),
        10, "the page on the newest hit")
    assert len(shown["circles"]) == len(positions) == hit["meta"]["n_peaks"] > 0
    rect, binning = shown["rect"], hit["meta"]["binning"]
    for (x, y, _), (ss, fs) in zip(shown["circles"], positions.tolist(), strict=True):
        assert x == pytest.approx(rect["left"] + (fs + 0.5) / binning * rect["scale"], abs=1e-3)
        assert y == pytest.approx(rect["top"] + (ss + 0.5) / binning * rect["scale"], abs=1e-3)
    middle = rect["left"] + rect["width"] / 2  # a point of each circle on the side towards the middle
    on_circles = page.js(OVERLAY_AT, ["overlay-latest_hit", [[x + r if x < middle else x - r, y]
                                                            for x, y, r in shown["circles"]]])
    assert all(n > 0 for n in on_circles), on_circles
    page.page.screenshot(path=str(tmp_path / "crystallography.png"), full_page=True)

    # Start from the form (no detector streams to it) and abort that one too.
    detectors[0].terminate()
    page.page.fill('#start-form input[name="scan_id"]', "from_page")
    page.page.select_option('#start-form select[name="technique"]', "crystallography")
    page.page.fill('#start-form input[name="n_frames"]', "10")
    page.page.click("#start")
    wait_for(lambda: "from_page started" in page.text("#command-reply"), 20, "the start's reply")
    wait_for(lambda: "from_page" in page.text("#scan-now"), 10, "the new scan in the scan panel")
    page.page.click("#abort")
    wait_for(lambda: "scan from_page aborted" in page.text("#command-reply"), 20, "the second abort's reply")
    page.close(tmp_path / "crystallography_end.png")
