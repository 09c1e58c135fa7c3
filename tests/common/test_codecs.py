"""Compressed blobs: exact round trips, and damage found before any C decoder runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from libs.common import codecs
from libs.common.errors import FrameError

SHAPES = [((64, 48), "<u2"), ((33, 17), "<u4"), ((5, 7), "|u1"), ((128, 128), "<f4")]


@pytest.mark.parametrize("compression", ["bslz4", "lz4"])
@pytest.mark.parametrize(("shape", "dtype"), SHAPES)
def test_round_trip_is_exact_for_odd_sizes(compression, shape, dtype):
    pixels = np.random.default_rng(1).poisson(3, shape).astype(dtype)
    blob = codecs.compress(pixels, compression)
    assert np.array_equal(codecs.decompress(blob, compression, shape, dtype), pixels)


@pytest.mark.parametrize("compression", ["bslz4", "lz4"])
def test_damaged_blobs_are_refused_with_the_reason(compression):
    pixels = np.random.default_rng(2).poisson(1, (100, 90)).astype("<u2")
    blob = codecs.compress(pixels, compression)
    lying_size = (pixels.nbytes + 2).to_bytes(8, "big") + blob[8:]
    odd_block = blob[:8] + (8191).to_bytes(4, "big") + blob[12:]
    for damaged, reason in ((blob[:-1], "truncated"), (blob + b"\0", "trailing"), (blob[:7], "shorter"),
                            (lying_size, "header says"), (odd_block, "block size")):
        with pytest.raises(FrameError, match=reason):
            codecs.decompress(damaged, compression, (100, 90), "<u2")
    with pytest.raises(FrameError, match="header says"):
        codecs.check(blob, compression, (100, 91), "<u2")


def test_warm_compiles_the_block_walk_for_every_kind_of_blob_a_receiver_checks():
    """bytes (a replayed file's blobs) and writable buffers (received zmq.Frames) are two numba
    signatures: either one left for the first frame costs that frame half a second or more. In a
    fresh process, as a receiver starts (this one may have compiled both already)."""
    probe = ("from libs.common import codecs; codecs.warm(); from libs.common.block_walk import walk; "
             "print(sorted({s[0].mutable for s in walk.signatures}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[False, True]"
