"""`surveyor run`: the handler and every stage's processes as children of one launcher.

It restarts a child that crashes (a non-zero exit or a signal; with back-off when it keeps
dying), but not one that exits 0: our processes do that exactly when asked to stop (`shutdown`,
SIGTERM). It stops at once, with the reason from the child's log, when a child could not bind its
endpoint (restarting cannot help: another pipeline or program holds it), and refuses to run when a
handler of another pipeline answers at its endpoint. It shows the scan's progress, writes
summary.json, and on Ctrl-C or when the scans are done asks the handler to shut everything down,
then makes sure no child is left behind; when the handler itself stops (`surveyor ctl shutdown`),
the run ends the same way. Children run in their own session, so a Ctrl-C at the terminal reaches
only the launcher, which then stops them in order. Each run logs into a directory of its own
(libs/common/logs.py). The exit code is 1 exactly when something was lost (or the run failed), and
the run says what and why.

The web front-end (`surveyor web`) is one more child, unless `--no-web`: started once the handler
answers, on the address asked for (refused at start when taken), else 127.0.0.1:8080 or a free
port when that is taken; the page's URL is printed with the token as its fragment
(`http://127.0.0.1:8080/#token=TOKEN`: one click, and the page can send commands). It is restarted when it crashes like any
child, but it is no part of the pipeline: when it cannot listen, the run goes on without it, and it
is stopped first (SIGTERM) on the way out, since a handler's `shutdown` does not reach it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from libs.common import client, exposure, logs
from libs.common.detector import PROTOCOLS
from libs.common.logs import log_path
from libs.common.pipeline import Pipeline
from libs.web import access

logger = logging.getLogger(__name__)
console = Console(stderr=True)

RESTART_BACKOFF_MAX_S = 10.0
QUICK_EXIT_S = 5.0
"""A child that exits sooner than this after its start is failing to start, not crashing in work."""
BIND_FAILED = re.compile(r"address already in use|assign requested address|cannot bind|could not bind", re.I)
"""What a child's last error says when its endpoint is not to be had: restarting cannot help."""
PR_SET_PDEATHSIG = 1


class ShutDown(Exception):
    """The handler exited 0: it was asked to stop (`surveyor ctl shutdown`), so the run is over."""


def _die_with_parent() -> None:
    """Linux: a child gets SIGTERM if the launcher dies, so no orphan outlives a killed launcher."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = 0.5
    not_before: float = 0.0
    log_from: int = 0
    """Where this start's output begins in the (appended) log."""
    stopped: bool = False
    """It exited 0, as asked to (a `shutdown`, a SIGTERM): not restarted."""

    def start(self, *extra: str) -> None:
        path = log_path(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as log:
            self.log_from = log.tell()
            self.process = subprocess.Popen([*self.argv, *extra], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        self.started = time.monotonic()

    def reason(self) -> str:
        """Why the child stopped, as its log says: the last error line it wrote since its start
        (a traceback's last line, a refusal, an ERROR record), else its last line."""
        try:
            with open(log_path(self.name), "rb") as log:
                log.seek(self.log_from)
                text = log.read().decode(errors="replace")
        except OSError as exc:
            return f"its log could not be read: {exc}"
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line[0].isspace()]
        errors = [line for line in lines if re.search(r"error|exception|cannot|refus|failed|critical", line, re.I)]
        return (errors or lines or ["it wrote nothing to its log"])[-1]


@dataclass
class Launcher:
    pipeline_file: str
    pipeline: Pipeline
    overrides: list[str]
    children: dict[str, Child] = field(default_factory=dict)
    stopping: bool = False
    detector: Child | None = None
    """The virtual detector of `--simulate`, when the receiver listens to a detector: not restarted."""
    handler_is_ours: bool = False
    """Our handler answered at the endpoint: only then may `shutdown` go there (never to another
    pipeline's handler)."""
    web: Child | None = None
    """The web front-end (`surveyor web`), when the run has one: not a pipeline process."""

    def __post_init__(self) -> None:
        cli = [sys.executable, "-m", "libs.cli.main"]
        sets = [arg for override in self.overrides for arg in ("--set", override)]
        self.children["handler"] = Child("handler", [*cli, "handler", self.pipeline_file, *sets])
        endpoint = self.pipeline.handler.command
        for stage_name in self.pipeline.topological_order:
            for index in range(1, self.pipeline.stages[stage_name].processes + 1):
                name = f"{stage_name}.{index}"
                self.children[name] = Child(name, [*cli, "service", stage_name, "--pipeline", self.pipeline_file,
                                                   "--handler", endpoint, "--name", name, *sets])

    @property
    def endpoint(self) -> str:
        return self.pipeline.handler.command

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the handler and the services together (a service registers once the handler is
        up: its requests wait in its socket), wait for the handler, then for every registration."""
        self._refuse_taken_endpoint()
        # A new run: a scan the handler's journal has as running belongs to an earlier run. A
        # restarted handler (supervise) carries the scan on.
        self.children["handler"].start("--fresh")
        for child in self.children.values():
            if child.process is None:
                child.start()
        self._wait(self._own_handler_answers, timeout_s, "the handler did not answer ping")
        if self.web is not None:
            self.web.start()
        expected = sum(stage.processes for stage in self.pipeline.stages.values())
        self._wait(lambda: self.services_up() >= expected, timeout_s,
                   f"not all {expected} service processes registered with the handler")

    def _refuse_taken_endpoint(self) -> None:
        """A handler that answers before ours has started is someone else's: ours could not bind
        there, and our services would register with it."""
        try:
            reply = client.call(self.endpoint, "ping", timeout_s=0.5)
        except client.NoReply:
            return
        self._check_identity(reply.result or {})
        name = (reply.result or {}).get("pipeline") or "unknown"
        raise RuntimeError(f"a handler (pipeline {name}) already answers at {self.endpoint}: another `surveyor "
                           f"run` or `surveyor handler` is running there; stop it, or choose other endpoints with "
                           f"--set handler.command=... handler.status=...")

    def _own_handler_answers(self) -> bool:
        reply = client.call(self.endpoint, "ping", timeout_s=1.0)
        self._check_identity(reply.result or {})
        self.handler_is_ours = reply.ok
        return reply.ok

    def _check_identity(self, pong: dict[str, Any]) -> None:
        theirs = pong.get("identity")
        if theirs and theirs != self.pipeline.identity:
            raise RuntimeError(f"the handler at {self.endpoint} belongs to another pipeline "
                               f"({pong.get('pipeline') or 'unknown'}); choose other endpoints with "
                               f"--set handler.command=... handler.status=...")

    def services_up(self) -> int:
        reply = client.call(self.endpoint, "status", timeout_s=2.0)
        return sum(1 for s in reply.result["services"] if s["state"] == "up")

    def _wait(self, condition: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.supervise()
            try:
                if condition():
                    return
            except client.NoReply:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{what} within {timeout_s:.0f} s; see the logs in {log_path('handler').parent}")

    def add_web(self, address: tuple[str, int], token_file: Path) -> str:
        """Have `start` start the web front-end at `address`; its URL."""
        host, port = address
        sets = [arg for override in self.overrides for arg in ("--set", override)]
        self.web = Child("web", [sys.executable, "-m", "libs.cli.main", "web", "--pipeline", self.pipeline_file,
                                 *sets, "--bind", f"{host}:{port}", "--token-file", str(token_file)])
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start_detector(self, argv: list[str]) -> None:
        self.detector = Child("simulator", [sys.executable, "-m", "libs.cli.main", *argv])
        self.detector.start()

    def supervise(self) -> None:
        """Restart every child that has crashed, unless we are stopping; stop the run when one
        could not bind its endpoint, end it (ShutDown) when the handler was asked to stop."""
        if self.detector is not None and self.detector.process.poll() not in (None, 0):
            raise RuntimeError(f"the virtual detector failed (exit code {self.detector.process.returncode}): "
                               f"{self.detector.reason()}; see {log_path('simulator')}")
        now = time.monotonic()
        for child in [*self.children.values(), *([self.web] if self.web is not None else [])]:
            if self.stopping or child.stopped or child.process is None or child.process.poll() is None:
                continue
            if child.process.returncode == 0:
                if child.name == "handler":
                    raise ShutDown("the handler was asked to stop (`surveyor ctl shutdown` or a SIGTERM) and "
                                   "exited 0; stopping the pipeline")
                child.stopped = True
                console.log(f"{child.name} exited with code 0: it was asked to stop; not restarted")
                continue
            if child.not_before == 0.0:
                code = child.process.returncode
                quick = now - child.started < QUICK_EXIT_S
                reason = child.reason()
                if quick and BIND_FAILED.search(reason) and child is self.web:
                    child.stopped = True
                    console.log(f"[red]the web front-end could not listen: {reason}; the pipeline runs on "
                                f"without it (log: {log_path(child.name)})")
                    continue
                if quick and BIND_FAILED.search(reason):
                    hint = ("choose other endpoints with --set handler.command=... handler.status=..."
                            if child.name == "handler" else "another pipeline or program holds its endpoint")
                    raise RuntimeError(f"{child.name} could not bind: {reason}; {hint} (log: {log_path(child.name)})")
                child.backoff = min(child.backoff * 2, RESTART_BACKOFF_MAX_S) if quick else 0.5
                child.not_before = now + (child.backoff if quick else 0.0)
                console.log(f"[yellow]{child.name} exited with code {code} ({reason}); restarting")
            if now >= child.not_before:
                child.not_before = 0.0
                child.restarts += 1
                child.start()

    def restarts(self) -> dict[str, int]:
        return {name: child.restarts for name, child in self.children.items()}

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.stopping = True
        if self.web is not None and self.web.process is not None and self.web.process.poll() is None:
            self.web.process.terminate()
            try:
                self.web.process.wait(5.0)
            except subprocess.TimeoutExpired:
                self.web.process.kill()
                self.web.process.wait()
        if self.detector is not None and self.detector.process.poll() is None:
            self.detector.process.terminate()
        handler = self.children["handler"].process
        asked = False
        if self.handler_is_ours and handler is not None and handler.poll() is None:
            try:
                client.call(self.endpoint, "shutdown", timeout_s=timeout_s)
                asked = True
            except client.NoReply:
                console.log("[yellow]the handler did not answer shutdown; stopping the processes directly")
        deadline = time.monotonic() + (timeout_s if asked else 0.0)
        for child in self.children.values():
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.terminate()
        for child in self.children.values():
            if child.process is not None and child.process.poll() is None:
                try:
                    child.process.wait(3.0)
                except subprocess.TimeoutExpired:
                    child.process.kill()


def unique_scan_id(prefix: str, out: Path) -> str:
    """The first `<prefix>_NNNN` with no file in `out`, so a new run never overwrites an old one."""
    for number in range(1, 100000):
        scan_id = f"{prefix}_{number:04d}"
        if not any(out.glob(f"{scan_id}*")):
            return scan_id
    raise RuntimeError(f"no free scan id {prefix}_NNNN left in {out}")


def run(*, pipeline_file: str, pipeline: Pipeline, overrides: list[str], simulate: bool, scans: int | None,
        out: Path, summary_path: Path, web: bool = True, web_address: str | None = None,
        web_token_file: Path | None = None) -> int:
    """`web_address` None: 127.0.0.1:8080, or a free port when that is taken; `web_token_file`
    None: a new token in the run's log directory."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # The children inherit the run's own log directory; the launcher's log_path() follows it too.
    os.environ["SURVEYOR_LOG_DIR"] = str(logs.run_dir(pipeline.name))
    console.log(f"logs in {logs.log_dir()}")
    launcher = Launcher(pipeline_file, pipeline, overrides)
    web_at = None
    if web:
        try:
            token_file = web_token_file or logs.log_dir() / "web.token"
            token = access.read_or_create_token(token_file)
            web_at = access.choose(web_address)
            url = launcher.add_web(web_at, token_file)
        except access.AccessError as exc:
            console.log(f"[red]{exc}")
            return 1
        console.log(f"web front-end at {url} (API {url}api, OpenAPI {url}docs); commands need the token, "
                    f"kept in {token_file}; the page, with the token:", markup=False, highlight=False)
        # On a line of its own and never wrapped, so that it is one click in a terminal.
        console.print(f"  {access.page_url(url, token)}", soft_wrap=True, markup=False, highlight=False)
    if (exposed := exposure.warning(pipeline, web_at)) is not None:
        console.log(f"[yellow]warning: {exposed}", highlight=False)
    watcher = client.StatusFeed(pipeline.handler.status, command=pipeline.handler.command)
    finished: list[dict[str, Any]] = []
    code = 0
    try:
        with console.status("starting the handler and services"):
            launcher.start()
        console.log(f"pipeline {pipeline.name}: {len(launcher.children) - 1} service processes up")
        wanted = 1 if simulate else scans
        truth = None
        if simulate:
            scan_id = unique_scan_id(pipeline.simulation.scan_id, out)
            truth = _simulate(launcher, scan_id, out)
        code = _follow(launcher, watcher, finished, wanted, simulate=simulate)
        if truth is not None and finished:
            finished[-1]["truth"] = str(truth)
            _score(finished[-1], truth)
    except ShutDown as exc:
        console.log(f"[yellow]{exc}")
    except KeyboardInterrupt:
        console.log("[yellow]interrupted; stopping the pipeline")
        code = 130
    except RuntimeError as exc:
        console.log(f"[red]{exc}")
        code = 1
    finally:
        launcher.shutdown()
        watcher.close()
        write_summary(summary_path, {"pipeline": pipeline.name, "scans": finished,
                                     "stages": stage_totals(pipeline, finished), "restarts": launcher.restarts()})
    return code


def write_summary(path: Path, summary: dict[str, Any]) -> bool:
    """Write the summary whole or not at all (a temporary file beside it, synced, then renamed over
    it): a full disk or a read-only directory is reported, never fatal, and never leaves a
    truncated summary.json behind."""
    temporary: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False) as handle:
            temporary = Path(handle.name)
            json.dump(summary, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        name = errno.errorcode.get(exc.errno, "?") if exc.errno is not None else "?"
        console.log(f"[red]summary not written to {path}: {exc.strerror or exc} (errno {exc.errno}, {name}); "
                    f"the run's results are in its output files and logs; free space or choose another "
                    f"--summary path")
        return False
    console.log(f"summary written to {path}")
    return True


def _simulate(launcher: Launcher, scan_id: str, out: Path) -> Path | None:
    """Start the simulated scan. A receiver that listens to a detector gets a virtual detector of
    the simulation's kind bound where it connects, in its protocol, so the scan takes the real
    ingest path (numbered `synthetic` frames carry no scan description: the launcher announces the
    scan first, as an operator would); any other receiver makes the frames itself. Returns the
    ground-truth file, if any."""
    pipeline, simulation = launcher.pipeline, launcher.pipeline.simulation
    receiver = pipeline.stages.get("receiver")
    protocol = receiver.params.get("protocol") if receiver else None
    if simulation.kind == "synthetic" or protocol not in PROTOCOLS:
        reply = client.call(launcher.endpoint, "start_scan", {
            "scan_id": scan_id, "technique": simulation.technique, "n_frames": simulation.frames})
        if not reply.ok:
            raise RuntimeError(f"start_scan refused: {reply.error}")
    if protocol not in PROTOCOLS:
        return None
    out.mkdir(parents=True, exist_ok=True)
    truth = out / f"{scan_id}_truth.h5"
    values = dict(simulation.params)
    if simulation.kind == "synthetic":
        values = {"shape": list(simulation.shape), "dtype": np.dtype(simulation.dtype).str, **values}
    params = [arg for key, value in values.items() for arg in ("--param", f"{key}={json.dumps(value)}")]
    launcher.start_detector(["simulate", simulation.kind, "--protocol", protocol, "--bind", receiver.params["source"],
                             "--frames", str(simulation.frames), "--rate", str(simulation.rate_hz),
                             "--truth", str(truth), "--scan-id", scan_id, "--series-id", scan_id,
                             "--handler", launcher.endpoint, *params])
    return truth


def _score(record: dict[str, Any], truth: Path) -> None:
    """Print (and record) how close the result came to the simulated truth."""
    from libs.cli.scoring import against_truth

    results = [Path(p) for p in record.get("outputs", []) if p.endswith(".cxi") and not p.endswith("_raw.cxi")]
    # The last part (of a writer restarted mid-scan) holds what the scan ended with.
    result = max(results, key=lambda p: int(m.group(1)) if (m := re.search(r"\.part(\d+)\.cxi$", p.name)) else 1,
                 default=None)
    if result is None or not truth.exists():
        return
    try:
        figures, line, good = against_truth(result, truth)
    except (OSError, KeyError) as exc:
        console.log(f"[yellow]nothing to score in {result}: {exc}")
        return
    record.update(figures)
    colour = "green" if good else "red"
    console.log(f"[{colour}]{line}[/]: {result}")


def _report_scan(record: dict[str, Any]) -> bool:
    """Print how a finished scan went; True when something was lost (each loss with its reason)."""
    lost = record.get("frames_lost") or 0
    losses = record.get("losses", [])
    colour = "red" if lost or losses else "green"
    console.log(f"[{colour}]scan {record['scan_id']}: {record['frames_received']} frames received, "
                f"{record.get('frames_written', 0)} written, {lost} lost, {record['rate_hz']} Hz")
    if lost and not losses:
        losses = [f"{lost} frames reached no output and no stage said why; see the logs in {logs.log_dir()}"]
    for reason in losses:
        console.log(f"[red]scan {record['scan_id']} lost: {reason}")
    return bool(lost or losses)


def stage_totals(pipeline: Pipeline, scans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stage, what its processes did over every scan of the run."""
    totals = {}
    for name, stage in pipeline.stages.items():
        per_scan = [scan["stages"][name] for scan in scans if "stages" in scan]
        totals[name] = {"processes": stage.processes,
                        "frames_in": sum(s["frames_in"] for s in per_scan),
                        "frames_out": sum(s["frames_out"] for s in per_scan),
                        "busy_s": round(sum(s["busy_s"] for s in per_scan), 3)}
    return totals


def _follow(launcher: Launcher, watcher: client.StatusFeed, finished: list[dict[str, Any]], wanted: int | None,
            *, simulate: bool = False) -> int:
    """Supervise and show progress until `wanted` scans have finished (forever if None) or the
    handler is shut down: 1 when a scan lost something, else 0. An aborted scan is not counted and
    the run goes on (the operator dropped it); with `simulate` it ends the run, since no other scan
    is coming."""
    code = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("waiting for a scan", total=None)
        while wanted is None or sum(done.get("state") != "aborted" for done in finished) < wanted:
            try:
                launcher.supervise()
            except ShutDown as exc:
                console.log(f"[yellow]{exc}")
                return code
            events = watcher.pump(0.2)
            # The snapshot first: the scan_finished event after it has the final count.
            scan = (watcher.status or {}).get("scan")
            if scan and scan.get("state") not in ("finished", "aborted"):
                sources = launcher.pipeline.sources()
                received = sum(scan["stages"][s]["frames_out"] for s in sources)
                total = scan["n_frames"] + scan.get("n_dark", 0) if scan.get("n_frames") else None
                progress.update(task, description=f"scan {scan['scan_id']}", total=total, completed=received)
            for event in events:
                kind = event.get("kind")
                if kind in ("service_down", "service_up", "scan_started"):
                    console.log(f"{event['service']}: {event['message']}")
                if kind == "scan_finished":
                    record = event["summary"]
                    finished.append(record)
                    progress.update(task, total=record["frames_received"], completed=record["frames_received"])
                    if _report_scan(record):
                        code = 1
                elif kind == "scan_aborted" and event.get("scan_id"):
                    dropped = event.get("dropped", 0)
                    finished.append({"scan_id": event["scan_id"], "state": "aborted", "dropped": dropped})
                    if simulate:
                        raise RuntimeError(f"the simulated scan {event['scan_id']} was aborted "
                                           f"({dropped} frames dropped); nothing more is coming")
                    console.log(f"[yellow]scan {event['scan_id']} aborted ({dropped} frames dropped); "
                                f"not counted as done, waiting for the next scan")
    return code
