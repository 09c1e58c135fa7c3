"""Compressed pixel blobs as detectors send them and HDF5 stores them.

Two framings, both valid HDF5 chunks, so a received blob goes to disk as it is:

- `bslz4`: bitshuffle + LZ4, HDF5 filter 32008 framing: uint64 BE total bytes, uint32 BE block
  size in bytes, then per block a uint32 BE compressed size and the LZ4 data; the last
  `elements % 8` elements follow uncompressed (reference/detector_streams.md section 3).
- `lz4`: plain LZ4 in HDF5 filter 32004 framing: uint64 BE total bytes, uint32 BE block size,
  then per block a uint32 BE compressed size and the data (a block stored as is when its
  compressed size equals its plain size).

`check` walks a blob's framing against the shape and dtype it claims before any C decoder sees
it: a lying header or a truncated blob is a `FrameError` here, not a crash in bitshuffle.
Decoding is single-threaded (`OMP_NUM_THREADS=1` unless set otherwise).
"""

from __future__ import annotations

import functools
import math
import os
import struct

# bitshuffle's OpenMP threads collapse under contention with the other processes (reference/
# detector_streams.md 10 A): one thread per process, and processes for scale. Read at library load.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import bitshuffle  # noqa: E402
import lz4.block  # noqa: E402
import numpy as np  # noqa: E402

from libs.common.errors import FrameError  # noqa: E402

HEADER = struct.Struct(">QI")
BLOCK_BYTES = 8192
"""Block size of our own bslz4 blobs, as a DECTRIS detector uses."""
BITSHUFFLE_FILTER = 32008
LZ4_FILTER = 32004


def _header(blob: np.ndarray, expected: int, itemsize: int, what: str) -> int:
    if blob.size < HEADER.size:
        raise FrameError(f"{what} blob of {blob.size} bytes is shorter than its 12-byte header")
    total, block = HEADER.unpack_from(blob)
    if total != expected:
        raise FrameError(f"{what} header says {total} bytes, the frame needs {expected}")
    if block <= 0 or block % itemsize or block > (1 << 30):
        raise FrameError(f"{what} header has an impossible block size {block} for {itemsize}-byte pixels")
    return block


def warm() -> None:
    """Load the compiled block walk now (about half a second from numba's cache, more to compile it
    where there is none), not at the first frame: for read-only blobs (bytes) and for writable ones
    (received `zmq.Frame`s), which numba compiles apart."""
    blob = compress(np.zeros((8, 8), np.uint16))
    for each in (blob, bytearray(blob)):
        check(each, "bslz4", (8, 8), "<u2")


@functools.lru_cache(maxsize=64)
def _layout(shape: tuple[int, ...], dtype: str) -> tuple[int, int]:
    """(bytes, bytes per element) of a frame of that shape and dtype: the same for every frame of a series."""
    itemsize = np.dtype(dtype).itemsize
    return math.prod(shape) * itemsize, itemsize


def check(blob: memoryview | bytes, compression: str, shape: tuple[int, ...], dtype: str) -> None:
    """Raise FrameError unless `blob` is a complete `compression` blob of that shape and dtype."""
    from libs.common.block_walk import walk  # numba, only in the processes that check blobs
    data = np.frombuffer(blob, np.uint8)
    expected, itemsize = _layout(tuple(shape), dtype)
    if compression == "bslz4":
        block = _header(data, expected, itemsize, "bslz4")
        elements, per_block = expected // itemsize, block // itemsize
        full, rest = divmod(elements, per_block)
        blocks = full + (1 if rest - rest % 8 else 0)
        # A block compresses into at most its size plus LZ4's worst-case overhead.
        bound = block + block // 255 + 16
        end = walk(data, HEADER.size, blocks, bound, (elements % 8) * itemsize)
    elif compression == "lz4":
        block = _header(data, expected, itemsize, "lz4")
        end = walk(data, HEADER.size, -(-expected // block), block + block // 255 + 16, 0)
    else:
        raise FrameError(f"unknown compression {compression!r}")
    if end != data.size:
        raise FrameError(f"{compression} blob of {data.size} bytes does not hold its blocks "
                         f"({'truncated' if end < 0 or end > data.size else 'trailing bytes'})")


def decompress(blob: memoryview | bytes, compression: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The pixels of a checked blob."""
    check(blob, compression, shape, dtype)
    data = np.frombuffer(blob, np.uint8)
    dt = np.dtype(dtype)
    if compression == "bslz4":
        block = HEADER.unpack_from(data)[1] // dt.itemsize
        return bitshuffle.decompress_lz4(data[HEADER.size:], tuple(shape), dt, block)
    total, block = HEADER.unpack_from(data)
    out = np.empty(total, np.uint8)
    pos, done = HEADER.size, 0
    while done < total:
        size = int.from_bytes(data[pos:pos + 4], "big")
        plain = min(block, total - done)
        chunk = data[pos + 4:pos + 4 + size]
        if size == plain:
            out[done:done + plain] = chunk
        else:
            try:
                out[done:done + plain] = np.frombuffer(
                    lz4.block.decompress(chunk, uncompressed_size=plain), np.uint8)
            except (lz4.block.LZ4BlockError, ValueError) as exc:
                raise FrameError(f"lz4 block at byte {pos} does not decode: {exc}") from None
        pos, done = pos + 4 + size, done + plain
    return out.view(dt).reshape(shape)


def compress(array: np.ndarray, compression: str = "bslz4") -> bytes:
    """A framed blob of `array`, as a detector would send it."""
    array = np.ascontiguousarray(array)
    if compression == "bslz4":
        per_block = BLOCK_BYTES // array.itemsize
        return HEADER.pack(array.nbytes, BLOCK_BYTES) + bitshuffle.compress_lz4(array, per_block).tobytes()
    if compression == "lz4":
        return frame_lz4(lz4.block.compress(array.tobytes(), store_size=False), array.nbytes)
    raise FrameError(f"unknown compression {compression!r}")


def frame_lz4(block: bytes | memoryview, nbytes: int) -> bytes:
    """One whole-image LZ4 block (Stream V1 `lz4<`) in HDF5 filter framing, without recompressing."""
    return HEADER.pack(nbytes, nbytes) + len(block).to_bytes(4, "big") + bytes(block)


def hdf5_filter(compression: str) -> dict:
    """h5py dataset keywords whose filter reads our direct-written chunks back."""
    import hdf5plugin

    if compression == "bslz4":
        return dict(hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
    if compression == "lz4":
        return dict(hdf5plugin.LZ4(nbytes=0))
    return {}
