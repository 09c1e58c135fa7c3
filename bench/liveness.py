"""Liveness benchmark: the shipped demos at full size (`surveyor run pipelines/X.toml --simulate`)
on cores kept busy by one spinning process each, against the same demos on idle cores, in the
same run. Counts the processes the handler declared dead for missed heartbeats (liveness 3 x 1 s)
and those that came back from the dead (alive all along): both must be 0; the scan times show
what the load cost.

    python bench/liveness.py [--demos crystallography ptychography]

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import os
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from libs.common.logs import newest_run  # noqa: E402
from tests.conftest import free_endpoints, free_port  # noqa: E402
from tests.e2e.test_liveness import busy_cores, declared_dead  # noqa: E402


def demo(name: str, directory: Path) -> dict:
    sets = [*free_endpoints(), f'stages.hit_server.params.endpoint="tcp://127.0.0.1:{free_port()}"'] \
        if name == "crystallography" else list(free_endpoints())
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "libs.cli.main", "run", str(REPO / "pipelines" / f"{name}.toml"),
                           "--simulate", "--out", str(directory / "out"), *(a for s in sets for a in ("--set", s))],
                          env={**os.environ, "SURVEYOR_LOG_DIR": str(directory / "logs")},
                          capture_output=True, text=True)
    dead = declared_dead(newest_run(directory / "logs") / "handler.log")
    summary = json.loads((directory / "out" / "summary.json").read_text())
    return {"exit_code": done.returncode, "seconds": round(time.monotonic() - started, 1),
            "frames_lost": summary["scans"][0]["frames_lost"], "declared_dead": len(dead), "lines": dead[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demos", nargs="+", default=["crystallography", "ptychography"])
    args = parser.parse_args()
    report: dict = {"liveness_heartbeats": 3}
    for name in args.demos:
        with tempfile.TemporaryDirectory() as idle, tempfile.TemporaryDirectory() as loaded:
            baseline = demo(name, Path(idle))
            burners = busy_cores()
            try:
                result = demo(name, Path(loaded))
            finally:
                for burner in burners:
                    burner.kill()
                    burner.wait()
        report[name] = {"loaded": result, "baseline_idle_cores": baseline,
                        "slowdown": round(result["seconds"] / baseline["seconds"], 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
