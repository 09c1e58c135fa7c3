"""Transport benchmark: source -> 2 pass-through workers -> sink, next to raw pyzmq PUSH/PULL.

The baselines are measured in the same run, on the same machine, with frames from the same
generator, so the ratios mean something on a noisy machine: plain PUSH/PULL between two processes
(tcp and ipc), and the pipeline's own topology (one source, two forwarding processes, one sink)
in bare pyzmq, without ledger, credit or acknowledgements. Surveyor links processes on one host
over ipc. While the pipeline runs at full speed, `ping` round trips to
the handler and to a worker measure how responsive the control plane stays. The pipeline runs
twice: plain, and with CURVE on every socket (a key directory; every byte encrypted), so the
cost of CURVE is the ratio of the two in the same run.

    python bench/transport.py [--frames-1mib 3000] [--frames-8mib 300]

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from libs.common import client, security  # noqa: E402
from libs.simulation.synthetic import synthetic_frame  # noqa: E402
from tests.conftest import free_port, synthetic_pipeline  # noqa: E402

SIZES = {"1MiB": (512, 1024), "8MiB": (2048, 2048)}


def _sender(endpoint: str, shape: tuple[int, int], frames: int) -> None:
    """Binds PUSH and sends frames made by the same generator the synthetic receiver uses."""
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 4)
    push.bind(endpoint)
    header = json.dumps({"dtype": "<u2", "shape": list(shape)}).encode()
    for number in range(frames):
        push.send_multipart([header, synthetic_frame(number, shape, "uint16")], copy=False)
    push.close(linger=-1)
    context.term()


def _forwarder(source: str, sink: str) -> None:
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 4)
    pull.connect(source)
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 4)
    push.connect(sink)
    while pull.poll(3000):
        push.send_multipart(pull.recv_multipart(copy=False), copy=False)
    push.close(linger=-1)
    pull.close(linger=0)
    context.term()


def raw_pyzmq(shape: tuple[int, int], frames: int, *, transport: str, forwarders: int) -> dict[str, float]:
    """Baselines with no framework: PUSH -> PULL (forwarders = 0), or PUSH -> n forwarding
    processes -> PULL, the same topology as the pipeline without its reliability."""
    tmp = tempfile.mkdtemp()
    source = f"ipc://{tmp}/source" if transport == "ipc" else f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 4)
    spawn = mp.get_context("spawn")
    processes = [spawn.Process(target=_sender, args=(source, shape, frames))]
    if forwarders:
        sink = f"ipc://{tmp}/sink" if transport == "ipc" else f"tcp://127.0.0.1:{free_port()}"
        pull.bind(sink)
        processes += [spawn.Process(target=_forwarder, args=(source, sink)) for _ in range(forwarders)]
    for process in processes:
        process.start()
    if not forwarders:
        pull.connect(source)
    pull.recv_multipart(copy=False)
    started = time.perf_counter()
    for _ in range(frames - 1):
        header, data = pull.recv_multipart(copy=False)
        np.frombuffer(data.buffer, np.uint16)
    elapsed = time.perf_counter() - started
    for process in processes:
        process.join()
    pull.close(linger=0)
    context.term()
    rate = (frames - 1) / elapsed
    return {"frames_per_s": round(rate, 1), "MB_per_s": round(rate * np.prod(shape) * 2 / 1e6, 1)}


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else float("nan")


def surveyor_pipeline(shape: tuple[int, int], frames: int, *, curve: bool = False) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        if curve:  # the run and this process's own calls take the keys from the environment
            os.environ[security.ENVIRONMENT] = str(security.create(directory / "keys"))
        path = synthetic_pipeline(directory, frames=frames, shape=shape, sink="passthrough")
        run, handler, feed = harness.start(path, directory)
        try:
            services = harness.wait_up(handler, 4)
            worker = next(s["command_endpoint"] for s in services if s["stage"] == "worker")
            assert client.call(handler.command, "start_scan", {"scan_id": "bench", "n_frames": frames}).ok
            rtt: dict[str, list[float]] = {"handler": [], "worker": []}
            finished = None
            unanswered = 0
            while finished is None:
                for name, endpoint in (("handler", handler.command), ("worker", worker)):
                    started = time.perf_counter()
                    try:
                        client.call(endpoint, "ping", timeout_s=2)
                    except client.NoReply:  # the run shuts down once the scan is over
                        unanswered += 1
                        continue
                    rtt[name].append(time.perf_counter() - started)
                finished = feed.find("scan_finished")
                time.sleep(0.02)
        finally:
            feed.close()
            run.wait(60)
            os.environ.pop(security.ENVIRONMENT, None)
        summary = finished["summary"]
        rate = summary["stages"]["writer"]["frames_in"] / summary["wall_s"]
        return {"frames_per_s": round(rate, 1), "MB_per_s": round(rate * np.prod(shape) * 2 / 1e6, 1),
                "frames_at_sink": summary["stages"]["writer"]["frames_in"], "frames_lost": summary["frames_lost"],
                "pings_unanswered": unanswered,
                "ping_ms": {name: {"median": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)}
                            for name, v in rtt.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames-1mib", type=int, default=3000)
    parser.add_argument("--frames-8mib", type=int, default=300)
    args = parser.parse_args()
    counts = {"1MiB": args.frames_1mib, "8MiB": args.frames_8mib}
    results = {}
    for size, shape in SIZES.items():
        n = counts[size]
        baselines = {"pushpull_tcp": raw_pyzmq(shape, n, transport="tcp", forwarders=0),
                     "pushpull_ipc": raw_pyzmq(shape, n, transport="ipc", forwarders=0),
                     "two_forwarders_ipc": raw_pyzmq(shape, n, transport="ipc", forwarders=2)}
        pipeline = surveyor_pipeline(shape, n)
        curve = surveyor_pipeline(shape, n, curve=True)
        results[size] = {"frames": n, "raw_pyzmq": baselines, "surveyor": pipeline, "surveyor_curve": curve,
                         "ratio": {name: round(pipeline["frames_per_s"] / b["frames_per_s"], 3)
                                   for name, b in baselines.items()},
                         "curve_over_plain": {
                             "frames_per_s": round(curve["frames_per_s"] / pipeline["frames_per_s"], 3),
                             **{f"ping_p99_{name}": round(curve["ping_ms"][name]["p99"] / pipeline["ping_ms"][name]["p99"], 2)
                                for name in ("handler", "worker")}}}
    print(json.dumps({"benchmark": "transport", "topology": "receiver -> 2 passthrough -> sink, ipc on one host",
                      "cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
