"""Ptychography quality on scans the defaults were not tuned on, through the whole pipeline.

Each scan of the matrix is simulated (`surveyor simulate ptycho`: the zone plate's untrimmed probe,
Poisson photons, a detector with offset, read noise, stray light and bad pixels) and reconstructed by
`surveyor run pipelines/ptychography.toml --simulate` with the pipeline's defaults: the geometry is
chosen from each scan. Per scan: the NRMSE against the truth next to the constant-object baseline
(what a reconstruction showing nothing scores), the geometry chosen, the wall time and the time
from the last frame to the written reconstruction. The bar the issue sets: NRMSE <= 0.035.

    python bench/ptycho_quality.py [--frames 400] [--only NAME ...] [--set KEY=VALUE ...]

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from libs.cli.scoring import score_reconstruction  # noqa: E402
from tests.conftest import free_endpoints  # noqa: E402

BAR = 0.035
MATRIX = {
    "raster_1024": {"raw_shape": [1024, 1024], "size": 128},
    "spiral_1024": {"raw_shape": [1024, 1024], "size": 128, "pattern": "spiral"},
    "upstream_focus": {"raw_shape": [1024, 1024], "size": 128, "defocus_factor": -1.0},
    "strongly_defocused": {"raw_shape": [512, 512], "size": 64, "defocus_factor": 3.0},
    "small_detector_256": {"raw_shape": [256, 256], "size": 48},
    "wide_zone_plate": {"raw_shape": [1024, 1024], "size": 128, "bright_field": 0.12},
    "low_photons_1e5": {"raw_shape": [512, 512], "size": 64, "photons": 1e5},
    "high_photons_1e8": {"raw_shape": [512, 512], "size": 64, "photons": 1e8, "adu_per_photon": 1.0},
    "no_read_noise": {"raw_shape": [512, 512], "size": 64, "read_noise_adu": 0.0, "background": 0.0},
    "detector_2048": {"raw_shape": [2048, 2048], "size": 128, "oversampling": 8},
}


def toml(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return repr(value)


def run(name: str, params: dict, frames: int, directory: Path, pins: list[str]) -> dict:
    simulation = {"n_dark": 10, **params}
    overrides = [*free_endpoints(), *pins,
                 "simulation.params={" + ", ".join(f"{k} = {toml(v)}" for k, v in simulation.items()) + "}"]
    env = {**os.environ, "SURVEYOR_LOG_DIR": str(directory / "logs")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "libs.cli.main", "run", str(REPO / "pipelines/ptychography.toml"),
                           "--simulate", "--frames", str(frames), "--no-web", "--out", str(directory / "out"),
                           *(arg for o in overrides for arg in ("--set", o))], env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode:
        output = (done.stdout + done.stderr)[-2000:]
        return {"scan": name, "failed": output or f"exit status {done.returncode}, no output"}
    [scan] = json.loads((directory / "out" / "summary.json").read_text())["scans"]
    cxi = next(p for p in scan["outputs"] if p.endswith(".cxi"))
    with h5py.File(cxi, "r") as f:
        if "entry_1/image_1" not in f:
            return {"scan": name, "params": params, "failed": "no reconstruction in the file; see the logs",
                    "log": done.stdout[-2000:]}
    score = score_reconstruction(Path(cxi), Path(scan["truth"]))
    with h5py.File(cxi, "r") as f:
        data = f["entry_1/instrument_1/detector_1/data"]
        after = float(f["entry_1/image_1/process_1/seconds_after_last_frame"][()])
        geometry = str(data.attrs.get("geometry", ""))
    return {"scan": name, "params": params, "frames": frames, "nrmse": round(score.nrmse, 4),
            "constant_object": round(score.baseline, 4), "meets_bar": score.nrmse <= BAR,
            "wall_s": round(wall, 1), "seconds_after_last_frame": round(after, 1), "geometry": geometry,
            "frames_lost": scan["frames_lost"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--only", nargs="*", choices=sorted(MATRIX))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a pipeline value in place of its default, as `surveyor run --set` takes it "
                             "(e.g. stages.frame_worker.params.max_size=256); the figures are then not the defaults'")
    args = parser.parse_args()
    results = []
    for name in args.only or MATRIX:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run(name, MATRIX[name], args.frames, Path(tmp), args.set))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    scored = [r for r in results if "nrmse" in r]
    print(json.dumps({"benchmark": "ptychography quality, pipeline defaults", "pins": args.set, "bar_nrmse": BAR,
                      "baseline": "the best constant object, per scan", "scans": results,
                      "meeting_the_bar": sum(r["meets_bar"] for r in scored), "of": len(results),
                      "worst_nrmse": max((r["nrmse"] for r in scored), default=None)}, indent=1))


if __name__ == "__main__":
    main()
