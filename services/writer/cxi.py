"""CXI 1.6 conventions the writer's files share: time stamps, units, the mask bits."""

from __future__ import annotations

from datetime import datetime, timezone

import h5py
import numpy as np

TIME = h5py.string_dtype("ascii", 40)

# CXI 1.6 mask bits for DECTRIS pixel-mask bits (gap, dead, cold, hot, noisy; others "bad").
CXI_INVALID, CXI_HOT, CXI_DEAD, CXI_BAD, CXI_MISSING, CXI_NOISY = 0x1, 0x4, 0x8, 0x80, 0x200, 0x400
EIGER_TO_CXI = ((0, CXI_MISSING), (1, CXI_DEAD), (2, CXI_BAD), (3, CXI_HOT), (4, CXI_NOISY))


def cxi_mask(pixel_mask: np.ndarray) -> np.ndarray:
    """A detector's pixel mask in CXI bits: every flagged pixel is also `invalid`."""
    pixel_mask = pixel_mask.astype(np.uint32)
    mask = np.where(pixel_mask != 0, CXI_INVALID, 0).astype(np.uint32)
    known = 0
    for bit, cxi in EIGER_TO_CXI:
        mask |= np.where(pixel_mask & (1 << bit), cxi, 0).astype(np.uint32)
        known |= 1 << bit
    mask |= np.where(pixel_mask & ~np.uint32(known), CXI_BAD, 0).astype(np.uint32)
    return mask


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def put(group: h5py.Group, name: str, value: float | np.ndarray, unit: str) -> None:
    group[name] = value
    group[name].attrs["units"] = unit
