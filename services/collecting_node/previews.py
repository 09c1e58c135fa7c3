"""What a Processing class's `preview` becomes for front-ends: a preview message to the handler
(messages.PreviewArgs), published as `preview.<stage>`. The message takes a few array types, names
of letters, digits and '_', and what fits one command: arrays are converted to the nearest type it
takes, and what cannot go is refused with what to change (the handler would drop it unseen).
"""

from __future__ import annotations

import re

import numpy as np

from libs.common import messages
from libs.common.errors import ProcessingError

PREVIEW_TYPES = {"b": "|u1", "u1": "|u1", "u2": "<u2", "u4": "<u4", "i1": "<i4", "i2": "<i4", "i4": "<i4",
                 "f2": "<f4", "f4": "<f4", "f8": "<f8", "c8": "<c8", "c16": "<c8"}
"""The array types a preview message carries (messages.PreviewArray), by numpy kind and size;
other integers travel as float64."""
PREVIEW_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
PREVIEW_BYTES = messages.MAX_COMMAND_BYTES * 3 // 4 - 4096
"""What a preview's arrays may hold: they travel base64 in one command to the handler."""


def name_of(class_name: str) -> str:
    """A preview's name from the class's (RadialMonitor: radial_monitor)."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", class_name).lower()
    return re.sub(r"[^a-z0-9_]", "_", snake if snake[:1].isalpha() else f"class_{snake}")[:64]


def previewable(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The class's preview arrays in the types a preview carries; ProcessingError says what to change."""
    bad = [name for name in arrays if not PREVIEW_NAME.match(str(name))]
    if bad or len(arrays) > 16:
        raise ProcessingError(f"preview names {bad} are not 1-64 letters, digits or '_' starting with a letter"
                              if bad else f"{len(arrays)} preview arrays; at most 16")
    shown = {}
    for name, array in arrays.items():
        kind = f"{array.dtype.kind}{array.dtype.itemsize}" if array.dtype.kind != "b" else "b"
        shown[name] = np.ascontiguousarray(array, dtype=PREVIEW_TYPES.get(kind, "<f8"))
    size = sum(a.nbytes for a in shown.values())
    if size > PREVIEW_BYTES:
        raise ProcessingError(f"previews of {size} bytes; at most {PREVIEW_BYTES} (bin the images down)")
    return shown
