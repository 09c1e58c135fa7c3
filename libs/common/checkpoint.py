"""Atomic checkpoints of arrays: what a stage's successor restores after a crash.

`save` writes a `.npz` (numpy arrays, plus a small JSON-able `meta` dict) to a temporary file in
the same folder, fsyncs it, renames it over the target (os.replace is atomic on POSIX) and fsyncs
the folder, so a reader sees either the previous complete file or the new complete one, never a
torn one, whenever the writer is killed. `load` returns None for a file that is absent or cannot
be read; temporary files left by a killed writer are never read (`files` skips them).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

META = "__meta__"
TMP = ".tmp-"


def save(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> Path:
    """Write `arrays` (and `meta`) to `path` atomically and durably; returns `path`."""
    path = Path(path)
    tmp = path.with_name(f"{TMP}{uuid.uuid4().hex[:8]}-{path.name}")
    payload = {name: np.asarray(a) for name, a in arrays.items()}
    payload[META] = np.frombuffer(json.dumps(meta or {}).encode(), np.uint8)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays and meta of a checkpoint written by `save`, or None (absent or unreadable)."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files if name != META}
            meta = json.loads(data[META].tobytes()) if META in data.files else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError) as exc:
        logger.warning("checkpoint %s cannot be read (%s); ignored", path, exc)
        return None
    return arrays, meta


def files(folder: Path, pattern: str = "*.npz") -> list[Path]:
    """The complete checkpoints in `folder` matching `pattern`, sorted by name."""
    return sorted(p for p in Path(folder).glob(pattern) if not p.name.startswith(TMP))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
