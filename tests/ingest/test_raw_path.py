"""Detector ingest and raw writing, end to end with real processes: recorded Eiger streams land
byte-identical, the virtual detector round-trips pixel-exact in every protocol and encoding, and a
flood of corrupted messages costs no good frame."""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Callable

import bitshuffle
import cbor2
import h5py
import hdf5plugin  # noqa: F401 - registers the filters to read pixels back
import msgpack
import numpy as np
import pytest
import zmq

from libs.common import codecs
from libs.common.detector import PROTOCOLS, DetectorInfo, Image, SeriesEnd, SeriesStart
from libs.common.detector.stins import Numbering
from libs.common.frames import ArraySpec
from libs.simulation.synthetic import synthetic_frame
from tests.conftest import SHARED, free_port, ingest_pipeline
from tests.field_tools import hdf5_110_reads

RECORDED = SHARED / "data" / "recorded"
needs_recordings = pytest.mark.skipif(not RECORDED.is_dir(), reason="../shared/data/recorded is absent")
pytestmark = pytest.mark.slow


def recording(name: str) -> list[list[bytes]]:
    with gzip.open(RECORDED / f"eiger1m_{name}.msgpack.gz") as f:
        return [list(m) for m in msgpack.Unpacker(f, raw=False)]


def detector_blobs(name: str) -> list[bytes]:
    """The compressed pixels of each recorded image, dug out without our decoders."""
    if name == "stream1":
        return [m[2] for m in recording(name) if b'"dimage-1.0"' in m[0]]
    blobs = []
    for message in recording(name):
        body = cbor2.loads(message[0])
        if body["type"] == "image":
            blobs.append(body["data"]["threshold_1"].value[1].value.value[2])
    return blobs


def bitshuffle_decode(blob: bytes, shape: tuple[int, int], dtype: str) -> np.ndarray:
    total, block = struct.unpack(">QI", blob[:12])
    return bitshuffle.decompress_lz4(np.frombuffer(blob, np.uint8)[12:], shape, np.dtype(dtype),
                                     block // np.dtype(dtype).itemsize)


def only_scan(run) -> dict:
    code, output = run.finish(timeout_s=120)
    assert code == 0, output[-3000:]
    return run.summary()["scans"]


@needs_recordings
@pytest.mark.parametrize(("name", "series"), [("stream1", "14"), ("stream2", "16")])
def test_recorded_eiger_stream_is_written_byte_identical(tmp_path, start_run, name, series):
    source = f"tcp://127.0.0.1:{free_port()}"
    run = start_run(ingest_pipeline(tmp_path, protocol=name, source=source), "--scans", "1")
    run.wait_ready(2)
    replay = SHARED / "tools" / "replay_stream.py"
    subprocess.run([sys.executable, str(replay), str(RECORDED / f"eiger1m_{name}.msgpack.gz"), "--bind", source,
                    "--wait-peer", "30"], check=True, capture_output=True, timeout=60)
    [scan] = only_scan(run)
    blobs = detector_blobs(name)
    assert scan["scan_id"] == f"series_{series}"
    assert scan["frames_received"] == scan["frames_written"] == len(blobs) and scan["frames_rejected"] == 0
    with h5py.File(tmp_path / "out" / f"series_{series}_raw.cxi", "r") as f:
        data = f["entry_1/data_1/data"]
        assert data.shape == (len(blobs), 1065, 1030) and data.dtype == np.uint32
        assert list(f["entry_1/data_1/frame_number"]) == list(range(len(blobs)))
        for number, blob in enumerate(blobs):
            mask, chunk = data.id.read_direct_chunk((number, 0, 0))
            assert mask == 0 and chunk == blob
            assert np.array_equal(data[number], bitshuffle_decode(blob, (1065, 1030), "<u4"))
        detector = f["entry_1/instrument_1/detector_1"]
        assert detector["x_pixel_size"][()] == 75e-6 and detector["mask"].shape == (1065, 1030)
        assert f["entry_1/instrument_1/source_1/energy"][()] == pytest.approx(8000 * 1.602176634e-19)
        assert f["entry_1/instrument_1/source_1/energy"].attrs["units"] == "J"


def replay(tmp_path, messages: list[list[bytes]], source: str) -> None:
    """Play `messages` to the receiver with the shared replay tool, from a recording of our own."""
    path = tmp_path / "edited.msgpack.gz"
    with gzip.open(path, "wb") as f:
        for message in messages:
            f.write(msgpack.packb(message))
    subprocess.run([sys.executable, str(SHARED / "tools" / "replay_stream.py"), str(path), "--bind", source,
                    "--wait-peer", "30"], check=True, capture_output=True, timeout=60)


def assert_every_recorded_frame_written(scan: dict, path, name: str) -> None:
    """The file holds every recorded image, byte for byte in its slot, and the counts say so."""
    blobs = detector_blobs(name)
    with h5py.File(path, "r") as f:
        data = f["entry_1/data_1/data"]
        numbers = list(f["entry_1/data_1/frame_number"])
        assert data.shape == (len(blobs), 1065, 1030) and data.dtype == np.uint32
        assert numbers == list(range(len(blobs)))
        assert [data.id.read_direct_chunk((n, 0, 0))[1] for n in numbers] == blobs
        assert np.array_equal(data[len(blobs) - 1], bitshuffle_decode(blobs[-1], (1065, 1030), "<u4"))
        assert "mask" not in f["entry_1/instrument_1/detector_1"]
        held = sum(n >= 0 for n in numbers)
    assert scan["frames_received"] == scan["frames_written"] == held == len(blobs)
    assert scan["frames_rejected"] == 0 and scan["frames_lost"] == 0


def replayed(tmp_path, start_run, name: str, messages: list, event: str) -> tuple[dict, dict]:
    """Play `messages` (a recording, changed) to a raw pipeline: the `event` it reports and its scan."""
    source = f"tcp://127.0.0.1:{free_port()}"
    run = start_run(ingest_pipeline(tmp_path, protocol=name, source=source), "--scans", "1")
    run.wait_ready(2)
    replay(tmp_path, messages, source)
    warning = run.feed.wait(event)
    [scan] = only_scan(run)
    return warning, scan


@needs_recordings
@pytest.mark.parametrize(("name", "series"), [("stream1", "14"), ("stream2", "16")])
def test_recorded_series_with_empty_flatfield_and_mask_is_received_whole(tmp_path, start_run, name, series):
    """The Eiger 4M case: a header_detail "all" header whose flatfield and pixel-mask blobs are empty."""
    messages = recording(name)
    if name == "stream1":
        messages[0][3] = messages[0][5] = b""
        parts = {"dflatfield-1.0", "dpixelmask-1.0"}
    else:
        start = cbor2.loads(messages[0][0])
        empty = {key: {"threshold_1": cbor2.CBORTag(40, [[1065, 1030], cbor2.CBORTag(tag, b"")])}
                 for key, tag in (("flatfield", 85), ("pixel_mask", 70))}
        messages[0] = [cbor2.dumps({**start, **empty})]
        parts = {"flatfield[threshold_1]", "pixel_mask[threshold_1]"}
    warning, scan = replayed(tmp_path, start_run, name, messages, "header_incomplete")
    assert warning["service"] == "receiver.1" and set(warning["parts"]) == parts and warning["series"] == series
    assert "0 bytes" in warning["message"]
    assert scan["scan_id"] == f"series_{series}"
    path = tmp_path / "out" / f"series_{series}_raw.cxi"
    assert_every_recorded_frame_written(scan, path, name)
    with h5py.File(path, "r") as f:  # what the header still said is kept
        assert f["entry_1/instrument_1/detector_1/x_pixel_size"][()] == 75e-6


@needs_recordings
@pytest.mark.parametrize(("name", "series"), [("stream1", "14"), ("stream2", "16")])
def test_recorded_series_whose_header_the_receiver_missed_is_written_as_a_raw_scan(tmp_path, start_run, name,
                                                                                    series):
    """A receiver started after the detector was armed: images (and the end), no header."""
    messages = recording(name)[1:]
    if name == "stream1":
        messages.append([json.dumps({"htype": "dseries_end-1.0", "series": int(series)}).encode()])
    warning, scan = replayed(tmp_path, start_run, name, messages, "header_missing")
    assert warning["service"] == "receiver.1" and warning["series"] == series
    assert (warning["shape"], warning["dtype"], warning["compression"]) == ([1065, 1030], "<u4", "bslz4")
    assert scan["scan_id"] == warning["scan_id"] == f"series_{series}"
    path = tmp_path / "out" / f"series_{series}_raw.cxi"
    assert_every_recorded_frame_written(scan, path, name)
    with h5py.File(path, "r") as f:  # no header, no geometry: nothing is made up
        assert "x_pixel_size" not in f["entry_1/instrument_1/detector_1"]


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_virtual_detector_round_trips_pixel_exact(tmp_path, start_run, protocol):
    source = f"tcp://127.0.0.1:{free_port()}"
    encodings = {"1": "none", "2": "bslz4", "3": "lz4"}
    run = start_run(ingest_pipeline(tmp_path, protocol=protocol, source=source), "--scans", str(len(encodings)))
    run.wait_ready(2)
    for series, compression in encodings.items():
        subprocess.run([sys.executable, "-m", "libs.cli.main", "simulate", "synthetic", "--protocol", protocol,
                        "--bind", source, "--frames", "120", "--compression", compression, "--series-id", series],
                       check=True, capture_output=True, timeout=60)
    scans = only_scan(run)
    assert [s["frames_written"] for s in scans] == [120] * 3
    filters = {"none": [], "bslz4": [codecs.BITSHUFFLE_FILTER], "lz4": [codecs.LZ4_FILTER]}
    for scan, compression in zip(scans, encodings.values(), strict=True):
        with h5py.File(scan["outputs"][0], "r") as f:
            data = f["entry_1/data_1/data"]
            plist = data.id.get_create_plist()
            assert [plist.get_filter(i)[0] for i in range(plist.get_nfilters())] == filters[compression]
            for number in range(120):
                assert np.array_equal(data[number], synthetic_frame(number, (256, 256), "<u2")), (compression, number)


def test_series_without_its_end_is_closed_after_the_timeout(tmp_path, start_run):
    source = f"tcp://127.0.0.1:{free_port()}"
    run = start_run(ingest_pipeline(tmp_path, protocol="stream1", source=source, receiver="series_timeout_s = 1.5"),
                    "--scans", "1")
    run.wait_ready(2)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.bind(source)
    encode = PROTOCOLS["stream1"].encode
    spec = ArraySpec(name="data", dtype="<u2", shape=(32, 32), compression="bslz4")
    push.send_multipart(encode(SeriesStart(series="9", info=DetectorInfo(shape=(32, 32), dtype="<u2", n_images=20))))
    for number in range(12):
        blob = codecs.compress(synthetic_frame(number, (32, 32), "<u2"))
        push.send_multipart(encode(Image(series="9", frame=number, blobs=[(spec, blob)])))
    warning = run.feed.wait("series_timeout", timeout_s=30)
    [scan] = only_scan(run)
    push.close(linger=0)
    assert warning["service"] == "receiver.1" and warning["frames"] == 12 and "series 9 silent" in warning["message"]
    assert scan["scan_id"] == "series_9" and scan["frames_written"] == 12 and scan["frames_lost"] == 0


# --- fuzz ------------------------------------------------------------------------------------------------


def corruptions(protocol: str, good: list, rng: np.random.Generator) -> list[list[bytes]]:
    """Messages that are wrong in ways a receiver must notice, built from a good image message."""
    def garbage() -> bytes:
        return b"\x00\xff" + rng.bytes(int(rng.integers(1, 64)))

    if protocol == "stream1":
        head, described, blob, config = good
        meta = json.loads(described)
        lying = (struct.unpack(">Q", blob[:8])[0] + 4).to_bytes(8, "big") + blob[8:]
        return [
            [head, described, blob[:-int(rng.integers(1, len(blob) - 12))]],                # truncated blob
            [head, json.dumps({**meta, "size": meta["size"] + 3}).encode(), blob + b"abc"],  # wrong size
            [head, json.dumps({**meta, "size": len(lying)}).encode(), lying],               # lying header
            [head],                                                                          # missing parts
            [head, described],
            [garbage(), described, blob],                                                    # garbage
            [head, garbage(), blob],
            [head, json.dumps({**meta, "shape": [meta["shape"][0] + 1, meta["shape"][1]]}).encode(), blob],
            [head, json.dumps({**meta, "encoding": "bs32-lz4<"}).encode(), blob, config],
            [b'{"htype": "dimage-1.0", "series": 1}', described, blob],                     # no frame number
        ]
    if protocol == "stream2":
        [message] = good
        body = cbor2.loads(message)
        blob = body["data"]["threshold_1"].value[1].value.value[2]

        def with_blob(new: bytes, element: int = 2) -> list[bytes]:
            array = cbor2.CBORTag(40, [[64, 64], cbor2.CBORTag(69, cbor2.CBORTag(56500, ["bslz4", element, new]))])
            return [cbor2.dumps({**body, "data": {"threshold_1": array}})]

        return [
            [message[:-int(rng.integers(1, len(message) - 1))]],                             # truncated CBOR
            with_blob(blob[:-int(rng.integers(1, len(blob) - 12))]),                         # truncated blob
            with_blob((64 * 64 * 2 + 8).to_bytes(8, "big") + blob[8:]),                      # lying header
            with_blob(blob, element=4),                                                      # wrong element size
            [message, message],                                                              # extra part
            [garbage()],
            [cbor2.dumps({**body, "data": {}})],                                             # no channels
            [cbor2.dumps({**body, "image_id": -3})],
        ]
    head, blob = good
    meta = json.loads(head)
    return [
        [head, blob[:-int(rng.integers(1, len(blob) - 12))]],                                # truncated blob
        [head],                                                                              # missing part
        [json.dumps({**meta, "shape": [65, 64]}).encode(), blob],                            # lying shape
        [json.dumps({**meta, "compression": "zstd"}).encode(), blob],
        [json.dumps({k: v for k, v in meta.items() if k != "msg_number"}).encode(), blob],
        [garbage(), blob],
        [head, (64 * 64 * 2 - 2).to_bytes(8, "big") + blob[8:]],                             # lying header
    ]


def series_header(protocol: str, encode: Callable, mode: str) -> tuple[list[bytes], set[str]]:
    """The header the fuzz series starts with, and the parts the receiver must name as left out:
    `whole`, `parts left out` (empty or misfitting flatfield and pixel mask, an unknown htype, a
    bad value) or `rejected` (unusable as a whole: the images must make their own)."""
    info = DetectorInfo(shape=(64, 64), dtype="<u2")
    if mode == "whole":
        return encode(SeriesStart(series="5", info=info)), set()
    full = SeriesStart(series="5", info=info, flatfield={"data": np.ones((64, 64), np.float32)},
                       pixel_mask={"data": np.zeros((64, 64), np.uint32)})
    if protocol == "stream1":
        parts = encode(full)
        if mode == "rejected":
            head = json.dumps({"htype": "dheader-1.0", "series": [5], "header_detail": "all"}).encode()
            return [head, *parts[1:]], set()
        misfit = json.dumps({"htype": "dpixelmask-1.0", "shape": [63, 64], "type": "uint32"}).encode()
        return ([*parts[:3], b"", misfit, bytes(63 * 64 * 4), b'{"htype": "dmystery-1.0"}', b"\x00\x01"],
                {"dflatfield-1.0", "dpixelmask-1.0", "dmystery-1.0"})
    if protocol == "stream2":
        [message] = encode(full)
        if mode == "rejected":
            return [message[:-9]], set()
        empty = cbor2.CBORTag(40, [[64, 64], cbor2.CBORTag(85, b"")])
        misfit = cbor2.CBORTag(40, [[64, 63], cbor2.CBORTag(70, bytes(64 * 63 * 4))])
        body = {**cbor2.loads(message), "flatfield": {"threshold_1": empty}, "pixel_mask": {"threshold_1": misfit}}
        return [cbor2.dumps(body)], {"flatfield[threshold_1]", "pixel_mask[threshold_1]"}
    head, _ = encode(full)
    if mode == "rejected":
        return [json.dumps({"htype": "header", "filename": ""}).encode()], set()
    return [head, json.dumps({"shape": [64, "x"], "dtype": "<u2"}).encode()], {"header meta shape"}


@pytest.mark.parametrize(("protocol", "bad_per_good", "header"),
                         [("stream1", 12, "whole"), ("stream1", 12, "parts left out"), ("stream1", 12, "rejected"),
                          ("stream2", 12, "parts left out"), ("stins", 12, "rejected")])
def test_corrupted_messages_are_counted_and_cost_no_good_frame(tmp_path, start_run, protocol, bad_per_good, header):
    """3 x 290 x 12 = 10,440 corrupted messages, mixed with 870 good ones, per kind of header: a
    header part that cannot be used is left out and named, a header that cannot be used at all
    costs no image either (the images make their own), and only what cannot be kept is rejected."""
    source = f"tcp://127.0.0.1:{free_port()}"
    run = start_run(ingest_pipeline(tmp_path, protocol=protocol, source=source), "--scans", "1")
    run.wait_ready(2)
    rng = np.random.default_rng(7)
    encode = Numbering().encode if protocol == "stins" else PROTOCOLS[protocol].encode
    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    push.bind(source)
    good_frames, bad = 290, 0
    first, left_out = series_header(protocol, encode, header)
    push.send_multipart(first)
    for number in range(good_frames):
        pixels = synthetic_frame(number, (64, 64), "<u2")
        spec = ArraySpec(name="data", dtype="<u2", shape=(64, 64), compression="bslz4")
        message = [bytes(p) for p in encode(Image(series="5", frame=number, blobs=[(spec, codecs.compress(pixels))]))]
        push.send_multipart(message)
        kinds = corruptions(protocol, message, rng)
        for index in rng.integers(0, len(kinds), bad_per_good):
            push.send_multipart(kinds[index])
            bad += 1
    push.send_multipart(encode(SeriesEnd(series="5")))
    reported = run.feed.wait("frame_rejected", timeout_s=30)
    incomplete, missing = run.feed.find("header_incomplete"), run.feed.find("header_missing")
    if header == "parts left out":
        incomplete = run.feed.wait("header_incomplete")
        assert set(incomplete["parts"]) == left_out and all(name in incomplete["message"] for name in left_out)
    if header == "rejected":
        missing = run.feed.wait("header_missing")
        assert (missing["shape"], missing["dtype"], missing["compression"]) == ([64, 64], "<u2", "bslz4")
        # Refused before its scan began, the header is reported, not counted in the scan.
        why = {"stream1": "series [5] is not a number", "stream2": "not CBOR",
               "stins": "header message without an integer msg_number"}[protocol]
        assert reported["count"] == 1 and why in reported["reason"]
    [scan] = only_scan(run)
    push.close(linger=0)
    assert (incomplete is not None, missing is not None) == (header == "parts left out", header == "rejected")
    assert scan["frames_written"] == good_frames
    assert scan["frames_rejected"] == bad == good_frames * bad_per_good
    assert reported["service"] == "receiver.1" and reported["count"] >= 1 and reported["reason"]
    if protocol == "stins" and header == "rejected":
        assert scan["scan_id"].startswith("series_headerless_") and missing["scan_id"] == scan["scan_id"]
    else:
        assert scan["scan_id"] == ("series_0" if protocol == "stins" else "series_5")
    with h5py.File(scan["outputs"][0], "r") as f:
        data = f["entry_1/data_1/data"]
        assert list(f["entry_1/data_1/frame_number"]) == list(range(good_frames))
        assert all(np.array_equal(data[n], synthetic_frame(n, (64, 64), "<u2")) for n in range(good_frames))
        assert ("mask" in f["entry_1/instrument_1/detector_1"]) is False


def test_killed_writer_leaves_a_readable_file_and_the_scan_goes_on(tmp_path, start_run):
    from tests.conftest import synthetic_pipeline, wait_for
    from tests.e2e.test_delivery import frame_number_of

    frames = 3000
    run = start_run(synthetic_pipeline(tmp_path, frames=frames, rate_hz=300, workers=1), "--simulate",
                    "--set", "stages.writer.params.flush_interval_s=0.2")
    run.wait_ready(3)
    victim = wait_for(lambda: (s := run.service("writer.1"))["frames_in"] >= 600 and s, 30, "writer.1 to write")
    first = wait_for(lambda: next((tmp_path / "out").glob("t_0001_raw.cxi"), None), 10, "the raw file")
    master = first.with_name("t_0001_master.h5")
    assert master.exists(), "the NXmx master is written with the raw file"
    with h5py.File(first, "r", swmr=True) as f:
        flushed = int((f["entry_1/data_1/frame_number"][...] >= 0).sum())
    os.kill(victim["pid"], signal.SIGKILL)
    code, output = run.finish()
    assert code == 0, output[-3000:]
    summary = run.summary()
    [scan] = summary["scans"]
    assert summary["restarts"]["writer.1"] >= 1 and scan["frames_lost"] == 0
    second = first.with_name("t_0001_raw.part2.cxi")
    assert sorted(scan["outputs"]) == sorted([str(first), str(second), str(master)])
    numbers = set()
    for path in (first, second):
        with h5py.File(path, "r", swmr=True) as f:
            slots = f["entry_1/data_1/frame_number"][...]
            data = f["entry_1/data_1/data"]
            held = np.flatnonzero(slots >= 0)
            assert all(frame_number_of(data[i]) == i for i in held[:: max(1, len(held) // 50)])
            numbers |= set(held.tolist())
            if path == first:
                assert len(held) >= flushed > 0
            else:
                assert list(f["entry_1/previous_parts"].asstr()) == [first.name]
                # The scan header reached the restarted writer, through the worker stage.
                assert "detector_config" in f["entry_1/instrument_1/detector_1"]
    assert numbers == set(range(frames))
    # The master reads both parts as one series (the first still flagged "open for writing":
    # read as a live reader does), and HDF5 1.10 reads it.
    with h5py.File(master, "r", swmr=True) as f:
        data = f["entry/data/data_000001"]
        assert data.is_virtual and {s.file_name for s in data.virtual_sources()} == {first.name, second.name}
        assert data.shape[0] == f["entry/instrument/detector/detectorSpecific/nimages"][()] == frames
        np.testing.assert_array_equal(f["entry/data/frame_number"][()], np.arange(frames))
        assert all(frame_number_of(data[n]) == n for n in range(0, frames, 7))
    hdf5_110_reads(master)


def test_replayed_file_is_rewritten_as_is_and_republished_for_maxiv_consumers(tmp_path, start_run):
    """`replay` streams another program's HDF5 file; a MAX IV secondary-port consumer gets it too,
    with the raw file's path in the header."""
    frames, shape = 40, (48, 64)
    source = tmp_path / "scan7.h5"
    blobs = [codecs.compress(synthetic_frame(n, shape, "<u2")) for n in range(frames)]
    with h5py.File(source, "w") as f:
        data = f.create_dataset("entry/data/data", shape=(frames, *shape), chunks=(1, *shape), dtype="<u2",
                                **codecs.hdf5_filter("bslz4"))
        for number, blob in enumerate(blobs):
            data.id.write_direct_chunk((number, 0, 0), blob)
    republish = f"tcp://127.0.0.1:{free_port()}"
    consumer = zmq.Context.instance().socket(zmq.PULL)
    consumer.connect(republish)
    pipeline = ingest_pipeline(tmp_path, protocol="replay", source=str(source),
                               receiver=f'republish = "{republish}", rate_hz = 20')
    run = start_run(pipeline, "--scans", "1")
    received = []
    while not received or json.loads(received[-1][0])["htype"] != "series_end":
        assert consumer.poll(30_000), f"re-publication stopped after {len(received)} messages"
        received.append(consumer.recv_multipart())
    [scan] = only_scan(run)
    consumer.close(linger=0)
    assert scan["scan_id"] == "scan7" and scan["frames_written"] == frames
    with h5py.File(scan["outputs"][0], "r") as f:
        data = f["entry_1/data_1/data"]
        assert [data.id.read_direct_chunk((n, 0, 0))[1] for n in range(frames)] == blobs
    heads = [json.loads(parts[0]) for parts in received]
    # The header names the raw file, where a consumer (dranspose) finds what was written.
    assert heads[0]["filename"] == str(tmp_path / "out" / "scan7_raw.cxi") == scan["outputs"][0]
    # A consumer that connects late misses the first images, never the header.
    images = len(heads) - 2
    assert [h["htype"] for h in heads] == ["header"] + ["image"] * images + ["series_end"] and images > frames // 2
    assert [h["frame"] for h in heads[1:-1]] == list(range(frames - images, frames))
    assert all(a["msg_number"] < b["msg_number"] for a, b in zip(heads, heads[1:], strict=False))
    for head, parts in zip(heads[1:-1], received[1:-1], strict=True):
        assert head["shape"] == list(shape) and head["type"] == "uint16" and head["compression"] == "bslz4"
        assert parts[1] == blobs[head["frame"]]
