"""What a Processing class's dicts become between nodes (libs/common/processing.py): records
(processing node -> collector, on the data path) and feedback (collector -> processing nodes,
relayed by the handler as JSON). Never pickle: a record is a frame whose first buffer `values` is
msgpack of the dict with its arrays taken out, e.g.

    values   msgpack {"values": {"profile": None, "hit": True, "peaks": {"x": None, "n": 12}},
                      "paths": [["profile"], ["peaks", "x"]]}
    array_0  the float64 buffer of `profile`;  array_1  the buffer of `peaks.x`
    meta     {"kind": "processed", "rank": 2}

and it carries the input frame's identity (scan, epoch, frame number), so the collector drops a
record that comes twice (its frame was re-sent after a processing process died). Feedback is
base64 text of msgpack with the arrays' bytes inline (feedback is small).

What travels: dicts with string keys, lists, numbers, strings, booleans, None, and numeric numpy
arrays at any depth; tuples arrive as lists, numpy scalars as Python numbers. Arrays are copied
when a record is made, so a class may reuse its buffers.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

import msgpack
import numpy as np

from libs.common.contracts import ProcessingRecord
from libs.common.errors import ProcessingError
from libs.common.frames import Frame, decode
from libs.common.messages import MAX_COMMAND_BYTES

END_FRAME = 1 << 48
"""End records are numbered END_FRAME + rank: apart from every frame, one per node."""
FEEDBACK_CHARS = MAX_COMMAND_BYTES - 4096
"""Feedback travels in one command to the handler (with room for the rest of the command)."""


KeyPath = tuple[str | int, ...]


def _split(value: Any, path: KeyPath, arrays: list[tuple[KeyPath, np.ndarray]], where: str) -> Any:
    """`value` with its arrays taken out (None in their place, their paths in `arrays`), checked."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            raise ProcessingError(f"{where}: the array at {_name(path)} is {value.dtype}; only numeric arrays "
                                  "travel: convert it, or send a list of strings")
        arrays.append((path, np.array(value, copy=True, order="C")))
        return None
    if isinstance(value, np.generic):
        return _split(value.item(), path, arrays, where)
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ProcessingError(f"{where}: the dict at {_name(path)} has keys {bad[:3]} that are not strings; "
                                  "use string keys")
        return {k: _split(v, (*path, k), arrays, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, (*path, i), arrays, where) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ProcessingError(f"{where}: {type(value).__name__} at {_name(path)} cannot travel; use dicts, lists, "
                          "numbers, strings or numeric numpy arrays")


def _join(skeleton: Any, arrays: Iterable[tuple[list[str | int], np.ndarray]]) -> Any:
    for path, array in arrays:
        node = skeleton
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = array
    return skeleton


def _name(path: KeyPath) -> str:
    return "".join(f"[{key!r}]" for key in path) or "the top"


def _pack(value: Any, where: str) -> bytes:
    try:
        return msgpack.packb(value)
    except (OverflowError, TypeError, ValueError) as exc:
        raise ProcessingError(f"{where}: {exc}") from None


def to_record(values: Any, *, kind: str, rank: int, frame: int, scan_id: str, epoch: int, origin: str,
              where: str) -> Frame:
    """A dict for the collector as a frame: `values` (msgpack of the dict without its arrays and
    the arrays' paths), then one buffer per array; `meta` has the kind and the sender's rank."""
    if not isinstance(values, dict):
        raise ProcessingError(f"{where} returned {type(values).__name__} for the collector; return a dict")
    arrays: list[tuple[KeyPath, np.ndarray]] = []
    skeleton = _split(values, (), arrays, where)
    packed = _pack({"values": skeleton, "paths": [list(p) for p, _ in arrays]}, where)
    blobs = {"values": np.frombuffer(packed, np.uint8), **{f"array_{i}": a for i, (_, a) in enumerate(arrays)}}
    return Frame.from_arrays(scan_id=scan_id, epoch=epoch, frame=frame, origin=origin, arrays=blobs,
                             meta=ProcessingRecord(kind=kind, rank=rank).to_meta())


def record_values(record: Frame) -> dict[str, Any]:
    """The dict a record carries, its arrays as read-only views."""
    packed = msgpack.unpackb(record.raw("values"))
    arrays = ((path, record.array(f"array_{i}")) for i, path in enumerate(packed["paths"]))
    return _join(packed["values"], arrays)


def from_record(record: Frame) -> tuple[dict[str, Any], int]:
    """`processed_data` for collect_data: the dict (arrays as read-only views) and the sender's rank
    (FrameError if the record's meta is not a processing record's)."""
    return record_values(record), ProcessingRecord.of(record).rank


def to_feedback(values: Any, where: str) -> str:
    """Feedback for a processing node as text (the handler relays JSON): base64 of msgpack."""
    if not isinstance(values, dict):
        raise ProcessingError(f"{where}: feedback for a node is {type(values).__name__}; make it a dict")
    arrays: list[tuple[KeyPath, np.ndarray]] = []
    skeleton = _split(values, (), arrays, where)
    listed = [[list(p), a.dtype.str, list(a.shape), a.tobytes()] for p, a in arrays]
    text = base64.b64encode(_pack({"values": skeleton, "arrays": listed}, where)).decode()
    if len(text) > FEEDBACK_CHARS:
        raise ProcessingError(f"{where}: feedback of {len(text)} characters as sent; the handler relays at most "
                              f"{FEEDBACK_CHARS}: send less (a binned array, a parameter)")
    return text


def from_feedback(text: str) -> dict[str, Any]:
    packed = msgpack.unpackb(base64.b64decode(text))
    arrays = ((path, np.frombuffer(data, dtype).reshape(shape)) for path, dtype, shape, data in packed["arrays"])
    return _join(packed["values"], arrays)


def travel(record: Frame) -> Frame:
    """A record as the collector receives it (offline: through the bytes, as live)."""
    return decode(record.encode())
