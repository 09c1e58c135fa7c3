"""A pipeline over several hosts with CURVE, started as an operator would: network namespaces made
by the test stand in for hosts (each with a hostname of its own, on one bridge), one supervisord
per host from `surveyor supervisor-conf`. Host a runs the handler, the receiver and the writer;
hosts b and c a frame worker each; host d's worker joins mid-scan and c's is stopped mid-scan.
Every frame is written exactly once, and keys that are not let in, or that trust another handler,
get nothing. Needs root (`ip netns`); skipped otherwise."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libs.common import client, security
from tests.conftest import free_port, wait_for
from tests.e2e.test_delivery import frames_in_file

pytestmark = pytest.mark.slow

SUBNET = "10.231.77"
HOSTS = {"a": 1, "b": 2, "c": 3, "d": 4}
FRAMES = 1800  # 12 s at 150 Hz: time for a fourth supervisord to start and join on slow, busy cores


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Hosts:
    """Namespaces `<prefix>-a` ... on a bridge in `<prefix>-sw`; this process reaches them from
    `SUBNET.254`, as an operator's workstation would."""

    def __init__(self) -> None:
        self.prefix = f"sv{os.getpid() % 100000}"
        self.switch = f"{self.prefix}-sw"
        self.made: list[str] = []

    def make(self) -> None:
        ip("netns", "add", self.switch)
        self.made.append(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for host, number in HOSTS.items():
            ns = self.namespace(host)
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"port{number}", "netns", self.switch)
            ip("-n", ns, "addr", "add", f"{SUBNET}.{number}/24", "dev", "eth0")
            for link in ("eth0", "lo"):
                ip("-n", ns, "link", "set", link, "up")
            ip("-n", self.switch, "link", "set", f"port{number}", "master", "br0", "up")
        ip("link", "add", f"{self.prefix}-op", "type", "veth", "peer", "name", "port0", "netns", self.switch)
        ip("addr", "add", f"{SUBNET}.254/24", "dev", f"{self.prefix}-op")
        ip("link", "set", f"{self.prefix}-op", "up")
        ip("-n", self.switch, "link", "set", "port0", "master", "br0", "up")
        subprocess.run(["ip", "netns", "exec", self.namespace("a"), "unshare", "--uts", "true"],
                       check=True, capture_output=True, timeout=10)  # a hostname of its own is allowed here

    def reachable(self, host: str) -> bool:
        """Whether this process reaches a port opened on `host` over the bridge (a firewall on the
        machine may drop bridged traffic)."""
        port = free_port()
        listener = self.start(host, [sys.executable, "-c", "import socket; s = socket.create_server(("
                                     f"'{SUBNET}.{HOSTS[host]}', {port})); s.settimeout(10); s.accept()"])
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection((f"{SUBNET}.{HOSTS[host]}", port), timeout=1).close()
                    return True
                except OSError:
                    time.sleep(0.1)
            return False
        finally:
            listener.kill()
            listener.wait()

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def start(self, host: str, argv: list[str], env: dict[str, str] | None = None, log: Path | None = None):
        """`argv` on `host`: in its namespace, with its own hostname."""
        wrapped = ["ip", "netns", "exec", self.namespace(host), "unshare", "--uts", "sh", "-c",
                   f'hostname {host} && exec "$@"', "sh", *argv]
        out = open(log, "w") if log else subprocess.DEVNULL
        try:
            return subprocess.Popen(wrapped, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
        finally:
            if log:
                out.close()

    def remove(self) -> None:
        for ns in reversed(self.made):  # the veth pairs go with their namespaces
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
def hosts():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("network namespaces need root, ip (iproute2) and unshare")
    made = Hosts()
    try:
        made.make()
    except subprocess.CalledProcessError as exc:
        made.remove()
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.decode().strip()}")
    if not made.reachable("a"):
        made.remove()
        pytest.skip("the namespaces' bridge carries no traffic here (a firewall?)")
    yield made
    made.remove()


def keys_for_hosts(root: Path) -> dict[str, security.Keys]:
    """A key directory per host: a holds the handler; every host lets in every host's client."""
    a = security.create(root / "a", name="a")
    dirs = {"a": a, **{h: security.create(root / h, handler_key=a / "server.key", name=h) for h in "bcd"}}
    for host, directory in dirs.items():
        for other, theirs in dirs.items():
            if other != host:
                security.allow(directory, theirs / "client.key", name=other)
    return {host: security.Keys.load(directory) for host, directory in dirs.items()}


def test_a_pipeline_over_four_hosts_with_curve(tmp_path, hosts):
    keys = keys_for_hosts(tmp_path / "keys")
    stranger = security.Keys.load(security.create(tmp_path / "stranger", handler_key=keys["a"].directory / "server.key"))
    impostor = security.Keys.load(security.create(tmp_path / "impostor"))
    security.allow(keys["a"].directory, impostor.directory / "client.key", name="impostor")
    handler = f"tcp://{SUBNET}.1:{free_port()}"
    pipeline = tmp_path / "beamline.toml"
    pipeline.write_text(f"""
[handler]
command = "{handler}"
status = "tcp://{SUBNET}.1:{free_port()}"
state_dir = "{tmp_path / 'state'}"

[simulation]
rate_hz = 150
shape = [64, 64]

[stages.receiver]
service = "receiver"

[stages.worker]
service = "passthrough"
inputs = ["receiver"]

[stages.writer]
service = "writer"
inputs = ["worker"]
params = {{ output_dir = "{tmp_path / 'out'}" }}
""")
    processes: list[subprocess.Popen] = []

    def supervise(host: str, *options: str) -> None:
        log_dir = tmp_path / "logs" / host
        log_dir.mkdir(parents=True)
        conf = subprocess.run([sys.executable, "-m", "libs.cli.main", "supervisor-conf", str(pipeline), "--no-web",
                               "--log-dir", str(log_dir), "--bind", f"{SUBNET}.{HOSTS[host]}",
                               "--keys", str(keys[host].directory), *options],
                              capture_output=True, text=True, timeout=30, check=True).stdout
        (log_dir / "supervisord.conf").write_text(conf)
        processes.append(hosts.start(host, [sys.executable, "-m", "supervisor.supervisord", "-n",
                                            "-c", str(log_dir / "supervisord.conf")]))

    def status() -> dict:
        return client.call(handler, "status", timeout_s=2, keys=keys["a"]).result

    def up(name: str) -> dict | None:
        try:
            return next((s for s in status()["services"] if s["name"] == name and s["state"] == "up"), None)
        except client.NoReply:
            return None

    try:
        supervise("a", "--stages", "receiver,writer")
        for host in "bc":
            supervise(host, "--stages", "worker", "--handler", handler)
        for name in ("receiver.1", "writer.1", "worker.b.1", "worker.c.1"):
            wait_for(lambda name=name: up(name), 90, f"{name} registered")
        assert up("worker.b.1")["host"] == "b" and up("worker.b.1")["command_endpoint"].startswith(f"tcp://{SUBNET}.2:")

        for outsider in (stranger, impostor):  # not let in; trusting another handler's key
            with pytest.raises(client.NoReply):
                client.call(handler, "ping", timeout_s=1, keys=outsider)
        intruder = hosts.start("b", [sys.executable, "-m", "libs.cli.main", "service", "worker", "--pipeline",
                                     str(pipeline), "--name", "intruder", "--bind", f"{SUBNET}.2"],
                               env={security.ENVIRONMENT: str(stranger.directory),
                                    "SURVEYOR_LOG_DIR": str(tmp_path / "logs" / "intruder")})
        processes.append(intruder)

        assert client.call(handler, "start_scan", {"scan_id": "hosts", "n_frames": FRAMES}, keys=keys["a"]).ok
        wait_for(lambda: status()["scan"]["stages"]["writer"]["written"] > 150, 30, "frames written")
        supervise("d", "--stages", "worker", "--handler", handler)
        wait_for(lambda: (up("worker.d.1") or {}).get("frames_in", 0) > 0, 60, "host d's worker taking frames")
        taken_by_c = up("worker.c.1")["frames_in"]
        assert taken_by_c > 0
        subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c",
                        str(tmp_path / "logs" / "c" / "supervisord.conf"), "stop", "worker:*"],
                       check=True, capture_output=True, timeout=30)
        scan = status()["scan"]
        assert scan and scan["stages"]["writer"]["written"] < FRAMES, "the scan ended before c's worker left"

        finished = wait_for(lambda: next((s for s in status()["scans"] if s["scan_id"] == "hosts"
                                          and s["state"] != "running"), None), 60, "the scan to end")
        assert finished["frames_written"] == FRAMES and finished["frames_lost"] == 0, finished
        assert len(frames_in_file(tmp_path / "out" / "hosts_raw.cxi")) == FRAMES  # each frame once, in its slot
        assert all(s["name"] != "intruder" for s in status()["services"])
        handler_log = (tmp_path / "logs" / "a" / "handler.log").read_text()
        assert handler_log.count(f"refused a CURVE client at {SUBNET}.2 with key "
                                 f"{stranger.client_public.decode()}") == 1
        intruder_log = tmp_path / "logs" / "intruder" / "intruder.log"
        wait_for(lambda: intruder_log.exists() and "is this host's" in intruder_log.read_text(), 30,
                 "the intruder's log to say what to check")
        client.call(handler, "shutdown", timeout_s=10, keys=keys["a"])
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
