"""The field's own readers, run on our files: cxidb's CXI validator and Debian's HDF5 1.10 tools.

Each check skips when its reader is absent (`../shared/tools`, `hdf5-tools`), so the suite runs
anywhere; `.ci/run` installs `hdf5-tools`. HDF5_PLUGIN_PATH points the C tools at hdf5plugin's
filters, as a beamline would for bitshuffle/LZ4 data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import hdf5plugin
import h5py
import numpy as np
import pytest

from tests.conftest import SHARED

VALIDATOR = SHARED / "tools" / "validate_cxi.py"
TOOLS_ENV = {**os.environ, "HDF5_PLUGIN_PATH": hdf5plugin.PLUGIN_PATH}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is absent (Debian package hdf5-tools)")
    return path


def validate_cxi(path: str | Path) -> None:
    """cxidb's validator (CXI 1.6) passes the file."""
    if not VALIDATOR.is_file():
        pytest.skip("../shared/tools/validate_cxi.py is absent")
    done = subprocess.run([sys.executable, str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Validation successful" in done.stdout, done.stdout + done.stderr


def hdf5_110_reads(path: str | Path) -> None:
    """`h5dump -H` and `h5ls -r` of Debian's HDF5 (1.10 on bookworm) read every object of the file."""
    for command in ([_tool("h5dump"), "-H", str(path)], [_tool("h5ls"), "-r", str(path)]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=TOOLS_ENV)
        assert done.returncode == 0 and "error" not in done.stderr.lower(), (command, done.stderr[-2000:])


def hdf5_110_pixels(path: str | Path, dataset: str, index: int = 0) -> np.ndarray:
    """One frame of `dataset` as `h5dump -d` decodes it (its filters from HDF5_PLUGIN_PATH), checked
    against h5py's reading of the same frame."""
    with h5py.File(path, "r") as f:
        expected = f[dataset][index]
    start = ",".join([str(index)] + ["0"] * expected.ndim)
    count = ",".join(["1"] + [str(n) for n in expected.shape])
    done = subprocess.run([_tool("h5dump"), "-d", dataset, "-s", start, "-c", count, "-y", "-w", "0", "-m", "%d",
                           str(path)], capture_output=True, text=True, timeout=120, env=TOOLS_ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    body = done.stdout.split("DATA {", 1)[1].split("}", 1)[0]  # empty when a filter is missing
    values = np.array([int(v) for v in body.replace(",", " ").split()], dtype=np.int64)
    np.testing.assert_array_equal(values.reshape(expected.shape), expected.astype(np.int64))
    return expected


PTYPY_KEYS = {"intensities": "entry_1/data_1/data", "slow": "entry_1/sample_1/geometry_1/position_y",
              "fast": "entry_1/sample_1/geometry_1/position_x", "mask": "entry_1/instrument_1/detector_1/mask",
              "energy": "entry_1/instrument_1/source_1/energy", "distance": "entry_1/instrument_1/detector_1/distance",
              "psize": "entry_1/instrument_1/detector_1/x_pixel_size"}
"""The keys of the README's PtyPy `Hdf5Loader` parameters."""


def ptypy_view(path: str | Path) -> dict:
    """What PtyPy's Hdf5Loader takes from a ptychography CXI with the README's parameters: the
    intensities, positions [slow, fast] in metres, the mask inverted (1 = good), energy in keV
    (J times 1 / 1.602176634e-16), distance and detector pixel in metres."""
    with h5py.File(path, "r") as f:
        read = {name: f[key][()] for name, key in PTYPY_KEYS.items()}
    return {"intensities": read["intensities"], "positions": np.stack([read["slow"], read["fast"]], axis=1),
            "mask": ~read["mask"].astype(bool), "energy_kev": float(read["energy"]) / 1.602176634e-16,
            "distance_m": float(read["distance"]), "psize_m": float(read["psize"])}
