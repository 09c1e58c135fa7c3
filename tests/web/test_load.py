"""Twenty browsers' worth of clients do not slow the pipeline: a scan's rate with 20 clients on
the web front-end (each a status and an events websocket, and polling the previews list and the
last frame's PNG every second, as the page does) against the same scan with none, side by side
in one run, in ROUNDS rounds of a scan without and a scan with them. Timings on shared cores are
noisy: each round's two rates are compared as a ratio (the two scans run seconds apart, under
much the same load from elsewhere), and the median of the rounds' ratios is what counts. What the
web process itself takes is measured too (its CPU time)."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.conftest import Run, cpu_seconds, synthetic_pipeline, wait_for

pytestmark = pytest.mark.slow

CLIENTS = 20
FRAMES = 1000
"""Under a second a scan on two cores, with 64 x 64 frames."""
ROUNDS = 3
WEB_CPU_MAX = 0.2
"""Cores the web process may take while it serves the clients (it takes a few hundredths)."""


class Browser:
    """One page's worth of traffic until stopped, and what it received."""

    def __init__(self) -> None:
        self.status = 0
        self.events: list[dict] = []
        self.polls = 0

    async def run(self, url: str, stop: asyncio.Event) -> None:
        ws = url.replace("http", "ws")
        async with connect(f"{ws}/api/status/ws", open_timeout=10) as status, \
                connect(f"{ws}/api/events/ws", open_timeout=10) as events, \
                httpx.AsyncClient(base_url=url, timeout=10) as http:
            async def read_status() -> None:
                async for _ in status:
                    self.status += 1

            async def read_events() -> None:
                async for message in events:
                    self.events.extend(json.loads(message)["events"])

            async def poll() -> None:
                while True:
                    (await http.get("/api/previews")).raise_for_status()
                    await http.get("/api/frames/last.png")  # 404 until the first frame
                    self.polls += 1
                    await asyncio.sleep(1.0)

            tasks = [asyncio.create_task(job()) for job in (read_status, read_events, poll)]
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
            for task in [*tasks, stopped]:
                task.cancel()
            for task in done - {stopped}:
                task.result()  # a client that failed fails the test


class Crowd:
    """CLIENTS browsers on one event loop of their own (a thread), so that the clients themselves
    cost the shared cores as little as they can: real browsers run elsewhere."""

    def __init__(self, url: str) -> None:
        self.browsers = [Browser() for _ in range(CLIENTS)]
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()

    def _run(self, url: str) -> None:
        async def main() -> None:
            await asyncio.gather(*(b.run(url, self.stop) for b in self.browsers))
        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # reported by the test
            self.failure = exc
        finally:
            self.loop.close()

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


def test_twenty_clients_do_not_change_the_pipelines_rate(tmp_path):
    run = Run(synthetic_pipeline(tmp_path, frames=FRAMES, shape=(64, 64)), cwd=tmp_path, web=True)
    rates: dict[str, list[float]] = {"alone": [], "crowded": []}
    crowds: list[Crowd] = []
    try:
        run.wait_ready(4)
        wait_for(lambda: _answers(run.web_url), 30, "the web front-end")

        web_pid = next(pid for pid, argv in _processes() if b"web" in argv and str(run.token_file).encode() in argv)
        web_cpu: dict[str, float] = {}
        our_cpu: dict[str, float] = {}

        def rate(scan_id: str) -> float:
            cpu, ours = cpu_seconds(web_pid), time.process_time()
            assert run.ctl("start_scan", {"scan_id": scan_id, "n_frames": FRAMES}).ok
            summary = run.wait_scan(scan_id, timeout_s=60)["summary"]
            assert summary["frames_lost"] == 0 and summary["frames_written"] == FRAMES
            web_cpu[scan_id] = round((cpu_seconds(web_pid) - cpu) / summary["wall_s"], 3)
            our_cpu[scan_id] = round((time.process_time() - ours) / summary["wall_s"], 3)
            return summary["rate_hz"]

        rate("warm")  # the first scan opens files and fills caches: not compared
        for turn in range(1, ROUNDS + 1):  # side by side: other load on the host only ever slows a scan down
            rates["alone"].append(rate(f"alone_{turn}"))
            crowd = Crowd(run.web_url)
            crowds.append(crowd)
            wait_for(lambda: all(b.status and b.polls for b in crowd.browsers) or crowd.failure, 30,
                     "every client served")
            rates["crowded"].append(rate(f"crowded_{turn}"))
            # A scan is under a second and a status comes at least every 2 s: a second one is waited for.
            wait_for(lambda: all(_saw_finished(b, f"crowded_{turn}") and b.status >= 2 for b in crowd.browsers)
                     or crowd.failure, 10, "every client told the scan finished and sent a status again")
            crowd.close()
    finally:
        for crowd in crowds:
            crowd.close()
        run.stop()
    assert not any(c.failure for c in crowds), [c.failure for c in crowds]
    browsers = [b for crowd in crowds for b in crowd.browsers]
    assert all(b.status >= 2 and b.polls >= 1 for b in browsers), [(b.status, b.polls) for b in browsers]
    ratios = [crowded / alone for alone, crowded in zip(rates["alone"], rates["crowded"])]
    ratio = statistics.median(ratios)
    print(f"\nscan rate alone {rates['alone']} Hz, with {CLIENTS} clients {rates['crowded']} Hz: ratios "
          f"{[round(r, 2) for r in ratios]}, median {ratio:.2f}; CPU (cores) of the web process per scan {web_cpu}, "
          f"of this test's process (the clients) {our_cpu}")
    assert ratio >= 0.8, f"with {CLIENTS} clients the scans ran at {rates['crowded']} Hz, alone at {rates['alone']} Hz"
    assert max(web_cpu.values()) < WEB_CPU_MAX, web_cpu


def _saw_finished(browser: Browser, scan_id: str) -> bool:
    return any(e["kind"] == "scan_finished" and e["scan_id"] == scan_id for e in list(browser.events))


def _processes():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                pass


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/status", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
