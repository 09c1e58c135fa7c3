"""Shared test tools: pipelines on free ports in a temp dir, `surveyor run` as a real process,
a subscriber to the handler's status feed. Every wait polls a condition to a deadline."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from libs.common import client, security
from libs.common.security import Keys
from libs.common.logs import newest_run

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999) and ZeroMQ's random ports (49152
    up): between now and its bind, no outgoing connection or `bind_to_random_port` can take it."""
    while True:
        port = _ports.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


_ports = random.Random()


def cpu_seconds(pid: int | str = "self") -> float:
    """User and system CPU seconds a process has spent so far, every thread of it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def synthetic_pipeline(directory: Path, *, frames: int = 200, rate_hz: float = 0, shape=(64, 64),
                       workers: int = 2, worker_params: str = "{}", sink: str = "writer",
                       keys: Path | None = None) -> Path:
    """A receiver -> worker (pass-through) -> sink pipeline file on free ports; the sink stage is
    called `writer` and runs the writer service, or another (`passthrough`) to measure transport.
    With `keys`, a key directory: CURVE on every socket."""
    path = directory / "pipeline.toml"
    sink_params = f'{{ output_dir = "{directory / "out"}" }}' if sink == "writer" else "{}"
    security = f'[security]\nkeys = "{keys}"\n' if keys else ""
    path.write_text(f"""{security}
[handler]
command = "tcp://127.0.0.1:{free_port()}"
status = "tcp://127.0.0.1:{free_port()}"

[simulation]
frames = {frames}
rate_hz = {rate_hz}
scan_id = "t"
shape = {list(shape)}
dtype = "uint16"

[stages.receiver]
service = "receiver"

[stages.worker]
service = "passthrough"
processes = {workers}
inputs = ["receiver"]
params = {worker_params}

[stages.writer]
service = "{sink}"
inputs = ["worker"]
params = {sink_params}
""")
    return path


def curve_keys(directory: Path) -> tuple[Keys, Keys]:
    """A host's key directory (`directory`/host) and an operator's (`directory`/operator), whose
    client key the host lets in as an operator's."""
    host = security.create(directory / "host")
    operator = security.create(directory / "operator", handler_key=host / "server.key")
    security.allow(host, operator / "client.key", name="operator", operator=True)
    return security.Keys.load(host), security.Keys.load(operator)


def free_endpoints() -> tuple[str, ...]:
    """`--set` overrides that put a shipped pipeline's handler and detector on free ports."""
    return (f'handler.command="tcp://127.0.0.1:{free_port()}"', f'handler.status="tcp://127.0.0.1:{free_port()}"',
            f'stages.receiver.params.source="tcp://127.0.0.1:{free_port()}"')


def ingest_pipeline(directory: Path, *, protocol: str, source: str, receiver: str = "",
                    writer: str = "", credit: int = 2) -> Path:
    """receiver -> writer on free ports: the raw path. `receiver`/`writer`: extra TOML params."""
    path = directory / "ingest.toml"
    extra_receiver = f", {receiver}" if receiver else ""
    extra_writer = f", {writer}" if writer else ""
    path.write_text(f"""
[handler]
command = "tcp://127.0.0.1:{free_port()}"
status = "tcp://127.0.0.1:{free_port()}"

[stages.receiver]
service = "receiver"
params = {{ protocol = "{protocol}", source = "{source}"{extra_receiver} }}

[stages.writer]
service = "writer"
inputs = ["receiver"]
credit = {credit}
params = {{ output_dir = "{directory / "out"}"{extra_writer} }}
""")
    return path


class Feed(client.StatusFeed):
    def wait(self, kind: str, timeout_s: float = 30.0, **match: Any) -> dict[str, Any]:
        return wait_for(lambda: self.find(kind, **match), timeout_s, f"event {kind} {match}")


class Run:
    """`surveyor run` as a child process, with its handler endpoints. No web front-end unless
    `web`: then on a free port (`web_url`), its token in `token_file`."""

    def __init__(self, pipeline: Path, *args: str, cwd: Path, overrides: tuple[str, ...] = (),
                 web: bool = False) -> None:
        from libs.common.pipeline import load

        self.token_file = cwd / "web.token"
        self.web_url = f"http://127.0.0.1:{free_port()}" if web else None
        args = (*args, "--web", self.web_url.removeprefix("http://"), "--web-token-file", str(self.token_file)) \
            if web else (*args, "--no-web")

        self.pipeline = load(pipeline, overrides)
        self.keys = self.pipeline.keys()
        self.endpoint = self.pipeline.handler.command
        self.feed = Feed(self.pipeline.handler.status, command=self.endpoint, keys=self.keys)
        self.out = cwd / "out"
        self.log_root = cwd / "logs"
        env = {**os.environ, "SURVEYOR_LOG_DIR": str(self.log_root)}
        sets = [arg for override in overrides for arg in ("--set", override)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "libs.cli.main", "run", str(pipeline), "--out", str(self.out), *args, *sets],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    @property
    def logs(self) -> Path:
        """This run's own log directory (`surveyor run` makes one under the log root)."""
        return newest_run(self.log_root) or self.log_root

    def ctl(self, cmd: str, args: dict[str, Any] | None = None, timeout_s: float = 10.0) -> Any:
        return client.call(self.endpoint, cmd, args, timeout_s=timeout_s, keys=self.keys)

    def wait_ready(self, services: int, timeout_s: float = 60.0) -> None:
        def ready() -> bool:
            try:
                status = self.ctl("status", timeout_s=1.0).result
            except client.NoReply:
                return False
            return sum(s["state"] == "up" for s in status["services"]) >= services
        wait_for(ready, timeout_s, f"{services} services up")

    def service(self, name: str) -> dict[str, Any]:
        status = self.ctl("status").result
        return next(s for s in status["services"] if s["name"] == name and s["state"] == "up")

    def wait_scan(self, scan_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The scan_finished event of `scan_id`; on timeout, what every service holds."""
        try:
            return self.feed.wait("scan_finished", timeout_s=timeout_s, scan_id=scan_id)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; services: {self.diagnose()}") from None

    def diagnose(self) -> list[dict[str, Any]]:
        found = []
        for service in self.ctl("status").result["services"]:
            if service["state"] == "up":
                try:
                    found.append(client.call(service["command_endpoint"], "status", timeout_s=2, keys=self.keys,
                                             server_key=service.get("server_key")).result)
                except client.NoReply:
                    found.append({"service": service["name"], "status": "no reply"})
        return found

    def finish(self, timeout_s: float = 120.0) -> tuple[int, str]:
        try:
            output, _ = self.process.communicate(timeout=timeout_s)
        finally:
            self.feed.close()
        return self.process.returncode, output

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.communicate()  # reaps it and closes its pipe
        if self.process.stdout is not None:
            self.process.stdout.close()  # a run that ended by itself and was never finished
        self.feed.close()

    def summary(self) -> dict[str, Any]:
        return json.loads((self.out / "summary.json").read_text())


@pytest.fixture
def start_run(tmp_path: Path):
    runs: list[Run] = []

    def start(pipeline: Path, *args: str, overrides: tuple[str, ...] = (), web: bool = False) -> Run:
        run = Run(pipeline, *args, cwd=tmp_path, overrides=overrides, web=web)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop()


@pytest.fixture
def subscriber():
    """SUB sockets on a status port (all topics unless named), closed at teardown however the test ended."""
    import zmq

    opened = []

    def connect(endpoint: str, *topics: bytes):
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        for topic in topics or (b"",):
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.connect(endpoint)
        opened.append(sub)
        return sub

    yield connect
    for sub in opened:
        sub.close(linger=0)


FALSE_DOWN = "false service_down:"
"""What the handler logs when a process it declared dead turns out to be alive (`service_back`)."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stalls: the test stops processes (SIGSTOP) on purpose, so a process "
                                       "declared dead while alive is expected")
    config.stash[_false_downs] = []


_false_downs = pytest.StashKey[list]()


@pytest.fixture(autouse=True)
def no_false_service_down(request: pytest.FixtureRequest, tmp_path: Path):
    """Every test: no process of any pipeline it ran was declared dead while it was alive (the
    liveness is 3 heartbeats; heavy work runs off the event loop, so a busy process still beats)."""
    yield
    found = [f"{log.relative_to(tmp_path)}: {line.strip()}" for log in tmp_path.rglob("handler*.log")
             for line in log.read_text(errors="replace").splitlines() if FALSE_DOWN in line]
    if request.node.get_closest_marker("stalls"):
        return
    request.config.stash[_false_downs].extend(found)
    assert not found, "processes declared dead while alive:\n" + "\n".join(found)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    found = config.stash.get(_false_downs, [])
    terminalreporter.write_line(f"false service_down events outside tests that stall processes: {len(found)}")
