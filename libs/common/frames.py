"""The frame envelope: a small msgpack header, then each array's bytes as its own ZeroMQ part.

    part 0   msgpack header, e.g. {"scan_id": "s1", "epoch": 3, "frame": 17, "origin": "receiver.1",
             "arrays": [{"name": "data", "dtype": "<u2", "shape": [512, 512], "compression": "none"}],
             "meta": {"index": 3}, "received": 1764590000.123456}
    part 1+  one buffer per entry of `arrays`, in order

`meta`, `arrays` and `received` are left out when empty (none, {}, None) and read back as such.

`received` is when the receiver took the frame in (`time.time()`, seconds since the epoch, on the
receiver's host); every frame and record made from it carries it on (`Frame.replace`, and the
`received` of `from_arrays`/`from_blobs`), so the output stage can tell how long a frame took from
its arrival to its result on disk (the writer's `latency` preview). Across hosts that difference
relies on their clocks being synchronized (NTP or PTP): a skew shows as latency, or below zero.
A frame without it (a header, a record not made from one frame, a stage of an earlier version)
travels exactly as before, without the key. A reader of a version before it refuses a frame that
carries it (the header, like every contract here, forbids keys it does not know): the processes of
one pipeline run one version.

Buffers are never pickled or copied into the header: they go out with `copy=False` and come back as
`zmq.Frame`s whose memory numpy views directly. Compressed blobs (`bslz4`, `lz4`) travel as they
arrived; only a stage that needs pixels decodes them. (epoch, frame) is the identity of a frame
everywhere: ledgers, acknowledgements and duplicate detection all key on it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Sequence

import msgspec
import numpy as np

from libs.common import codecs
from libs.common.errors import FrameError

Compression = Literal["none", "bslz4", "lz4"]
FrameKey = tuple[int, int]


@functools.lru_cache(maxsize=256)
def _itemsize(dtype: str) -> int:
    """The bytes of one element of a numeric dtype (ValueError for any other)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"{dtype!r} is not a numpy dtype") from None
    if dt.kind not in "biufc":
        raise ValueError(f"{dtype!r} is not a numeric dtype")
    return dt.itemsize


class ArraySpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    dtype: str
    shape: tuple[int, ...]
    compression: Compression = "none"

    def __post_init__(self) -> None:
        _itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


class FrameHeader(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A msgspec struct, not a pydantic model: it is made, encoded and decoded for every frame,
    where msgspec takes about a microsecond and pydantic ten to twenty."""

    scan_id: str
    epoch: int
    frame: Annotated[int, msgspec.Meta(ge=0)]
    origin: str
    arrays: tuple[ArraySpec, ...] = ()
    meta: dict[str, Any] = {}
    received: float | None = None
    """When the receiver took the frame in (time.time() on its host); None: not known."""


_encode = msgspec.msgpack.Encoder().encode
_decode_header = msgspec.msgpack.Decoder(FrameHeader).decode


def view(part: Any) -> memoryview:
    """The bytes of a received part (zmq.Frame) or of any buffer, without copying."""
    buffer = getattr(part, "buffer", None)
    return buffer if buffer is not None else memoryview(part).cast("B")


@dataclass
class Frame:
    """A header plus its buffers; arrays are views into the received message memory."""

    header: FrameHeader
    buffers: Sequence[Any] = field(default_factory=list)
    _decoded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def key(self) -> FrameKey:
        return (self.header.epoch, self.header.frame)

    @classmethod
    def from_arrays(cls, *, scan_id: str, epoch: int, frame: int, origin: str,
                    arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None,
                    received: float | None = None) -> Frame:
        contiguous = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
        specs = [ArraySpec(name=name, dtype=a.dtype.str, shape=a.shape) for name, a in contiguous.items()]
        return cls.from_blobs(scan_id=scan_id, epoch=epoch, frame=frame, origin=origin,
                              blobs=list(zip(specs, contiguous.values(), strict=True)), meta=meta,
                              received=received)

    @classmethod
    def from_blobs(cls, *, scan_id: str, epoch: int, frame: int, origin: str,
                   blobs: Sequence[tuple[ArraySpec, Any]], meta: dict[str, Any] | None = None,
                   received: float | None = None) -> Frame:
        """A frame of buffers that travel as they are (compressed blobs from a detector).
        `received`: when the receiver took in the frame this one is made from (the module's docstring)."""
        header = FrameHeader(scan_id=scan_id, epoch=epoch, frame=frame, origin=origin,
                             arrays=tuple(spec for spec, _ in blobs), meta=meta or {}, received=received)
        return cls(header, [buffer for _, buffer in blobs])

    def spec(self, name: str = "data") -> ArraySpec:
        for spec in self.header.arrays:
            if spec.name == name:
                return spec
        raise KeyError(f"frame {self.header.frame} has no array {name!r}")

    def raw(self, name: str = "data") -> memoryview:
        """The named array's bytes as they travel (compressed or not)."""
        for spec, buffer in zip(self.header.arrays, self.buffers, strict=True):
            if spec.name == name:
                return view(buffer)
        raise KeyError(f"frame {self.header.frame} has no array {name!r}")

    def array(self, name: str = "data") -> np.ndarray:
        """The named array's pixels: a read-only view of the message memory when it travels
        uncompressed, else decoded once (FrameError if the blob is damaged)."""
        spec = self.spec(name)
        if spec.compression == "none":
            return np.frombuffer(self.raw(name), dtype=spec.dtype).reshape(spec.shape)
        if name not in self._decoded:
            self._decoded[name] = codecs.decompress(self.raw(name), spec.compression, spec.shape, spec.dtype)
        return self._decoded[name]

    def replace(self, *, origin: str | None = None, arrays: dict[str, np.ndarray] | None = None,
                meta: dict[str, Any] | None = None) -> Frame:
        """The same frame identity with new content: what a worker emits for the frame it got (its
        `received` kept)."""
        if arrays is None:
            header = msgspec.structs.replace(self.header, origin=origin or self.header.origin,
                                             meta=meta if meta is not None else self.header.meta)
            return Frame(header, self.buffers)
        return Frame.from_arrays(scan_id=self.header.scan_id, epoch=self.header.epoch,
                                 frame=self.header.frame, origin=origin or self.header.origin,
                                 arrays=arrays, meta=meta if meta is not None else self.header.meta,
                                 received=self.header.received)

    def encode(self) -> list[Any]:
        return [_encode(self.header), *self.buffers]


def decode(parts: Sequence[Any]) -> Frame:
    """Check and wrap a received multipart message; FrameError says what is wrong with it."""
    if not parts:
        raise FrameError("empty data message")
    try:
        header = _decode_header(view(parts[0]))
    except msgspec.ValidationError as exc:
        raise FrameError(f"bad frame header: {exc}") from None
    except msgspec.DecodeError as exc:
        raise FrameError(f"frame header is not msgpack: {exc}") from None
    buffers = list(parts[1:])
    if len(buffers) != len(header.arrays):
        raise FrameError(f"frame {header.frame}: header lists {len(header.arrays)} arrays, "
                         f"message carries {len(buffers)} buffers")
    for spec, buffer in zip(header.arrays, buffers, strict=True):
        size = len(view(buffer))
        if spec.compression == "none" and size != spec.nbytes:
            raise FrameError(f"frame {header.frame}: array {spec.name!r} {spec.dtype}{list(spec.shape)} "
                             f"needs {spec.nbytes} bytes, got {size}")
    return Frame(header, buffers)
