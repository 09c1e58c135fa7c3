"""Ptychography benchmark: the Nanosurveyor scenario through the whole pipeline.

1600 frames (40 x 40 raster), raw 1024 x 1024 uint16, the geometry chosen from the scan (128 x 128
clean frames), streamed as fast as the pipeline takes them: `surveyor run
pipelines/ptychography.toml --simulate` with `presimulate`: the virtual detector makes and
compresses every frame before the stream starts (not timed), so that what is measured is the
pipeline, not the simulator.

Reported: the end-to-end rate (frames / time from the scan's start to the written
reconstruction), the frames' rate into the solver (frames / the scan's time before the last one
joined), the time from the last frame to the final reconstruction, the final NRMSE
against the truth (with the constant-object baseline), and the reconstruction's time per
iteration per frame, both inside the pipeline and in one process on the same frames in this run
(the baseline), next to the paper's figures (2 Hz, about 5 minutes) and PtyPy's DM in NumPy
(1.3 ms per 128 x 128 frame-iteration, reference/ptychography.md 3.2). The solver runs on the GPU
where CuPy finds one (`--device` pins it); the one-process figures (a RAAR iteration and an ML
step per frame) are given for the CPU and, where there is one, the GPU.

    python bench/ptychography.py [--frames 1600] [--size 128] [--ml N] [--device auto|cpu|gpu]

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from libs.cli.scoring import score_reconstruction  # noqa: E402
from libs.common.messages import ScanDescription  # noqa: E402
from libs.ptychography import optics  # noqa: E402
from services.reconstruction_worker import device  # noqa: E402
from services.reconstruction_worker.ml import MaximumLikelihood  # noqa: E402
from services.reconstruction_worker.raar import StreamingRaar  # noqa: E402
from tests.conftest import free_endpoints  # noqa: E402

PAPER = {"rate_hz": 2.0, "scan_start_to_image_s": 300, "source": "Daurer et al. 2017 (Nanosurveyor)"}
PTYPY_DM_S_PER_FRAME_ITERATION_128 = 1.3e-3


def run_pipeline(frames: int, size: int, directory: Path, ml: int | None, where: str) -> dict:
    pins = [f'stages.reconstruction_worker.params.device="{where}"']
    pins += [] if ml is None else [f"stages.reconstruction_worker.params.ml_iterations={ml}"]
    overrides = [*free_endpoints(), *pins,
                 f"simulation.params={{n_dark=20, size={size}, oversampling=4, raw_shape=[{8 * size}, {8 * size}], "
                 "presimulate=true}"]
    sets = [arg for o in overrides for arg in ("--set", o)]
    env = {**os.environ, "SURVEYOR_LOG_DIR": str(directory / "logs")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "libs.cli.main", "run", str(REPO / "pipelines/ptychography.toml"),
                           "--simulate", "--frames", str(frames), "--no-web", "--out", str(directory / "out"), *sets],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the pipeline failed:\n{done.stdout[-3000:]}")
    summary = json.loads((directory / "out" / "summary.json").read_text())
    scan = summary["scans"][0]
    cxi = Path(next(p for p in scan["outputs"] if not p.endswith("_raw.cxi")))
    with h5py.File(cxi, "r") as f:
        process = {k: v.asstr()[()] if v.dtype.kind in "OS" else v[()]
                   for k, v in f["entry_1/image_1/process_1"].items() if v.shape == ()}
        geometry = str(f["entry_1/instrument_1/detector_1/data"].attrs.get("geometry", ""))
    score = score_reconstruction(cxi, Path(scan["truth"]))
    after = float(process["seconds_after_last_frame"])
    return {"device": process.get("device", "cpu"), "frames": frames, "darks": 20,
            "raw_shape": [8 * size, 8 * size], "geometry": geometry,
            "scan_start_to_image_s": scan["wall_s"],
            "end_to_end_rate_hz": round(frames / scan["wall_s"], 2),
            "frames_into_solver_hz": round(frames / max(scan["wall_s"] - after, 1e-9), 1),
            "last_frame_to_image_s": after, "ml_iterations": int(process.get("ml_iterations", 0)),
            "iterations": int(process["iterations"]),
            "iterations_after_last_frame": int(process["iterations_after_last_frame"]),
            "pipeline_s_per_iteration_per_frame": float(process["seconds_per_iteration_after_last_frame"]) / frames,
            "nrmse": round(score.nrmse, 4), "constant_object_nrmse": round(score.baseline, 4),
            "command_wall_s": round(time.monotonic() - started, 1), "cxi": str(cxi)}


def single_process_iteration(cxi: Path, where: device.Device, iterations: int = 5) -> dict[str, float]:
    """Seconds per RAAR iteration and per ML step, per frame, of the same solver in this process on
    `where`, on the written frames."""
    with h5py.File(cxi, "r") as f:
        scan = ScanDescription.model_validate_json(f["entry_1/scan_description"][()])
        data = f["entry_1/instrument_1/detector_1/data"][()]
        pixel = f["entry_1/image_1/x_pixel_size"][()]
    size = data.shape[1]
    probe = optics.zone_plate_probe(scan.probe_model, energy_ev=scan.energy_ev, size=size, pixel_m=pixel)
    solver = StreamingRaar(centres_px=np.asarray(scan.positions_m) / pixel, probe=probe, device=where,
                           workers=os.cpu_count() or 1)
    for index, frame in enumerate(data):
        solver.add(index, frame)
    solver.scale_probe()
    refinement = MaximumLikelihood(solver)
    times = {}
    for name, step in (("raar", solver.iterate), ("ml", refinement.iterate)):
        step(1)  # compiled and planned before timing
        started = time.perf_counter()
        step(iterations)
        float(abs(solver.object).sum())  # the GPU's queue drained
        times[name] = (time.perf_counter() - started) / iterations / len(data)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1600)
    parser.add_argument("--size", type=int, default=128, help="the simulated optics' scale (see libs/simulation)")
    parser.add_argument("--ml", type=int, help="maximum-likelihood steps after RAAR (default: the pipeline's)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="where the pipeline's solver runs")
    args = parser.parse_args()
    found = device.select("auto")
    devices = [device.CPU] if found is device.CPU else [device.CPU, found]
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = run_pipeline(args.frames, args.size, Path(tmp), args.ml, args.device)
        cxi = Path(pipeline.pop("cxi"))
        single = {d.name: single_process_iteration(cxi, d) for d in devices}
    alone = single.get(pipeline["device"], single["cpu"])["raar"]
    pipeline["single_process_s_per_iteration_per_frame"] = alone
    pipeline["single_process_s_per_frame"] = single
    result = {
        "benchmark": "ptychography", "pipeline": pipeline,
        "baselines": {"paper": PAPER,
                      "ptypy_dm_numpy_s_per_iteration_per_frame_128": PTYPY_DM_S_PER_FRAME_ITERATION_128},
        "ratios": {"rate_vs_paper": round(pipeline["end_to_end_rate_hz"] / PAPER["rate_hz"], 1),
                   "iteration_vs_ptypy_dm": round(PTYPY_DM_S_PER_FRAME_ITERATION_128 / alone, 2)
                   if args.size == 128 else None,
                   "pipeline_iteration_vs_single_process": round(
                       pipeline["pipeline_s_per_iteration_per_frame"] / alone, 2)},
        "targets": {"end_to_end_rate_hz": 60, "frames_into_solver_hz": 200, "last_frame_to_image_s": 15,
                    "nrmse": 0.025},
        "met": {"end_to_end_rate": pipeline["end_to_end_rate_hz"] >= 60,
                "into_solver": pipeline["frames_into_solver_hz"] >= 200,
                "latency": pipeline["last_frame_to_image_s"] <= 15,
                "nrmse": pipeline["nrmse"] <= 0.025 and not math.isnan(pipeline["nrmse"])},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
