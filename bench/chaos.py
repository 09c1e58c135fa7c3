"""Chaos benchmark: a long seeded schedule of SIGKILLs and 10 s SIGSTOPs over every process of a
running pipeline, the handler included, during one long scan.

Baseline in the same run: the same scan undisturbed (same pipeline, same seed of the simulator),
so the result is compared with what the pipeline gives when nothing goes wrong: the frames on
disk, the peaks found (crystallography: recall and precision against the truth) and the
reconstruction's error against the truth (ptychography).

    python bench/chaos.py [--pipeline synthetic|crystallography|ptychography] [--kills 30] [--minutes 3] [--seed 1]

Prints one JSON document: faults inflicted, frames lost (must be 0), the summary's own counts
next to the files', and the times from a kill to its detection (the handler's service_down) and
to the recovery (the successor registered, or the restarted handler carried the scan on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from libs.common import client  # noqa: E402
from libs.common.pipeline import load  # noqa: E402
from tests import chaos  # noqa: E402
from tests.conftest import free_endpoints, free_port, synthetic_pipeline  # noqa: E402
from tests.e2e.test_chaos import frames_on_disk  # noqa: E402

PTYCHO_SMALL = ("simulation.params={n_dark=10, size=64, raw_shape=[256, 256]}",
                "stages.frame_worker.params.crop=256", "stages.frame_worker.params.size=64")


def scenario(kind: str, directory: Path, minutes: float) -> tuple[Path, tuple[str, ...], list[str], int, str]:
    """(pipeline file, overrides, targets, frames, file stem) of a scan lasting about `minutes`."""
    if kind == "synthetic":
        frames = int(200 * 60 * minutes)
        path = synthetic_pipeline(directory, frames=frames, rate_hz=200, shape=(32, 32))
        return path, (), ["handler", "receiver.1", "worker.1", "worker.2", "writer.1"], \
            frames, "t_0001_raw"
    frames = int(20 * 60 * minutes)
    if kind == "crystallography":
        return (REPO / "pipelines" / "crystallography.toml",
                (*free_endpoints(), f'stages.hit_server.params.endpoint="tcp://127.0.0.1:{free_port()}"',
                 "simulation.params={layout='1m', hit_fraction=0.3}", "simulation.rate_hz=20",
                 f"simulation.frames={frames}"),
                ["handler", "peak_worker.1", "peak_worker.2", "writer.1", "hit_server.1"], frames, "sx_0001")
    side = int(frames ** 0.5)
    return (REPO / "pipelines" / "ptychography.toml",
            (*free_endpoints(), *PTYCHO_SMALL, "simulation.rate_hz=20", f"simulation.frames={side * side}"),
            ["handler", "dark_worker.1", "frame_worker.1", "frame_worker.2", "image_worker.1",
             "reconstruction_worker.1", "writer.1"], side * side, "ptycho_0001")


def run_once(kind: str, directory: Path, minutes: float, faults: int, seed: int) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    path, overrides, targets, frames, stem = scenario(kind, directory, minutes)
    pipeline = load(path, overrides)
    feed = client.StatusFeed(pipeline.handler.status, topics=(b"event",))
    sets = [arg for o in overrides for arg in ("--set", o)]
    launcher = subprocess.Popen([sys.executable, "-m", "libs.cli.main", "run", str(path), "--simulate",
                                 "--out", str(directory / "out"), *sets], cwd=directory,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plan = chaos.schedule(seed, targets, faults, (2.0, 60 * minutes * 0.8)) if faults else []
    started = time.monotonic()
    done: list[chaos.Inflicted] = []
    worker = threading.Thread(target=lambda: done.extend(chaos.inflict(launcher.pid, plan)))
    time.sleep(3.0)  # the processes start
    worker.start()
    while launcher.poll() is None:
        feed.pump(0.5)
    worker.join()
    feed.pump(0.5)
    summary = json.loads((directory / "out" / "summary.json").read_text())
    [scan] = summary["scans"] or [{}]
    on_disk = frames_on_disk(directory / "out", stem) if kind == "synthetic" else None
    result = {"exit_code": launcher.returncode, "seconds": round(time.monotonic() - started, 1),
              "frames": frames, "frames_lost": scan.get("frames_lost"), "losses": scan.get("losses"),
              "frames_written": scan.get("frames_written"), "nrmse": scan.get("nrmse"),
              "recall": scan.get("recall"), "precision": scan.get("precision"),
              "faults": [{"at_s": d.fault.at_s, "target": d.fault.target, "kind": d.fault.kind, "hit": d.pid is not None}
                         for d in done]}
    if on_disk is not None:
        result["on_disk"] = {"entries": len(on_disk), "distinct": len(set(on_disk)),
                             "missing": frames - len(set(on_disk) & set(range(frames)))}
    detection, recovery = [], []
    for d in done:
        if d.pid is None or d.fault.kind != "kill":
            continue
        after = [e for e in feed.events if e["time"] >= d.wall]
        down = next((e for e in after if e["kind"] == "service_down" and e["service"] == d.fault.target), None)
        up_kind = "handler_recovered" if d.fault.target == "handler" else "service_up"
        up = next((e for e in after if e["kind"] == up_kind and (up_kind == "handler_recovered"
                                                                 or e["service"] == d.fault.target)), None)
        if down:
            detection.append(down["time"] - d.wall)
        if up:
            recovery.append(up["time"] - d.wall)
    result["detection_s"] = _spread(detection)
    result["recovery_s"] = _spread(recovery)
    feed.close()
    return result


def _spread(values: list[float]) -> dict:
    if not values:
        return {}
    return {"n": len(values), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", choices=["synthetic", "crystallography", "ptychography"], default="synthetic")
    parser.add_argument("--kills", type=int, default=30, help="faults in the schedule")
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the scan")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = run_once(args.pipeline, Path(tmp) / "undisturbed", args.minutes, 0, args.seed)
        disturbed = run_once(args.pipeline, Path(tmp) / "chaos", args.minutes, args.kills, args.seed)
    hits = [f for f in disturbed["faults"] if f["hit"]]
    print(json.dumps({
        "benchmark": "chaos", "pipeline": args.pipeline, "seed": args.seed, "minutes": args.minutes,
        "kills_survived": sum(f["kind"] == "kill" for f in hits), "stops_survived": sum(f["kind"] == "stop" for f in hits),
        "frames_lost": disturbed["frames_lost"], "detection_s": disturbed["detection_s"],
        "recovery_s": disturbed["recovery_s"], "chaos": disturbed, "baseline_undisturbed": baseline,
    }, indent=2))


if __name__ == "__main__":
    main()
