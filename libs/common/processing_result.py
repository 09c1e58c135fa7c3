"""`<output_dir>/<scan_id>.<stage>.h5`: what a Processing class's `end_processing_on_collecting_node`
returned, as plain HDF5 that any reader opens (h5py, h5dump, HDF5 1.10 and later).

The dict's layout is the file's: a dict is a group, an array or a list of numbers a dataset, a
number or a string a scalar dataset, None an empty dataset; a list that is no array (mixed, or of
dicts) is stored as its JSON text with the attribute `json = 1`, so nothing the class returned is
dropped (a '/' in a key becomes '_': HDF5 reads it as a path). The root's attributes say where the file came from (scan, stage, class, parameters).
Written beside its final name and renamed over it: a reader never sees half a result. Live (the
collecting node) and offline (`surveyor process`) write the same file with this module, which
opens no sockets and imports no service.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from libs.common.messages import VERSION

LIBVER = ("earliest", "v110")
"""As the writer's LIBVER_PLAIN (services/writer/disk.py, not imported: libs import no service):
no SWMR, so HDF5 1.10-1.14 read every object."""


def result_path(output_dir: str | Path, scan_id: str, stage: str) -> Path:
    return Path(output_dir) / f"{scan_id}.{stage}.h5"


def write(path: Path, result: dict[str, Any], *, scan_id: str, stage: str, processing: str,
          parameters: dict[str, Any], frames: int) -> Path:
    """Write `result` at `path` whole (OSError when the disk refuses; nothing is left behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with h5py.File(partial, "w", libver=LIBVER) as f:
            f.attrs.update({"scan_id": scan_id, "stage": stage, "processing": processing,
                            "parameters": json.dumps(parameters, default=str), "frames_collected": frames,
                            "program": f"surveyor {VERSION}"})
            _group(f, result)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _group(group: h5py.Group, values: dict[str, Any]) -> None:
    for key, value in values.items():
        name = str(key).replace("/", "_")  # HDF5 would read a slash as a path
        if isinstance(value, dict):
            _group(group.create_group(name), value)
        else:
            _dataset(group, name, value)


def _dataset(group: h5py.Group, name: str, value: Any) -> None:
    if value is None:
        group.create_dataset(name, data=h5py.Empty("f8"))
        return
    if isinstance(value, str):
        group.create_dataset(name, data=value, dtype=h5py.string_dtype())
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        group.create_dataset(name, data=list(value), dtype=h5py.string_dtype())
        return
    try:
        array = np.asarray(value)
    except ValueError:  # ragged lists
        array = np.asarray(None, dtype=object)
    if array.dtype.kind in "biufc":
        group.create_dataset(name, data=array)
        return
    group.create_dataset(name, data=json.dumps(value, default=_plain), dtype=h5py.string_dtype())
    group[name].attrs["json"] = 1


def _plain(value: Any) -> Any:
    """JSON for what json.dumps does not know: arrays and numpy numbers inside a list."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else str(value)
