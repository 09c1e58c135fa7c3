"""The writer on a disk that fails, real processes and real file systems: a small tmpfs the test
mounts (so root only), filled until frames do not fit, or remounted read-only. Nothing is
acknowledged that is not on disk, `write_failed` comes once, the pipeline waits, and once the
disk works again the scan finishes with every frame exactly once, in one file per writer process."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from libs.common import client
from libs.simulation.synthetic import frame_number_of
from tests.conftest import synthetic_pipeline, wait_for

pytestmark = pytest.mark.slow
MB = 1 << 20


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "8m"):
    """A tmpfs of `size` at `directory`, unmounted afterwards; the test is skipped where it cannot be had."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory.mkdir(parents=True, exist_ok=True)
    done = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def remount(directory: Path, mode: str, timeout_s: float = 10.0) -> None:
    """`mount -o remount,ro|rw`, again while a process that had files open there is still going away."""
    def done() -> bool:
        return _mount("-o", f"remount,{mode}", str(directory)).returncode == 0
    wait_for(done, timeout_s, f"{directory} remounted {mode}")


def fill(directory: Path, leave_mb: float) -> Path:
    """A filler file that leaves about `leave_mb` free (none: until the file system says it is full)."""
    stat = os.statvfs(directory)
    size = stat.f_bavail * stat.f_frsize - int(leave_mb * MB)
    filler = directory / "filler"
    block = b"\0" * MB
    with open(filler, "wb", buffering=0) as f:
        try:
            while size > 0:
                size -= f.write(block[:min(size, MB)])
            while leave_mb <= 0:
                f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def frames_on_disk(paths: list[Path]) -> list[int]:
    """Every frame number the files hold, repeats included, after checking each slot's pixels."""
    numbers: list[int] = []
    for path in paths:
        with h5py.File(path, "r", swmr=True) as f:
            slots = f["entry_1/data_1/frame_number"][()]
            data = f["entry_1/data_1/data"]
            for slot in np.flatnonzero(slots >= 0):
                assert slots[slot] == slot
                assert frame_number_of(data[slot]) == slot, f"{path.name}: slot {slot} holds other pixels"
                numbers.append(int(slot))
    return numbers


def cxi_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.cxi"))


def process_status(run, name: str, dead_pid: int | None = None) -> dict:
    """A process's own status; not that of `dead_pid`, which the handler may still list."""
    service = next(s for s in run.ctl("status").result["services"]
                   if s["name"] == name and s["state"] == "up" and s["pid"] != dead_pid)
    return client.call(service["command_endpoint"], "status", timeout_s=5).result


def acknowledged(run) -> int:
    """Frames the source no longer holds: every stage downstream acknowledged them."""
    scan = process_status(run, "receiver.1")["stats"]["scan"]
    return scan["frames_out"] - scan["unacknowledged"]


def events(run, kind: str) -> list[dict]:
    run.feed.pump()
    return [e for e in run.feed.events if e["kind"] == kind]


@pytest.mark.parametrize("hdf5", [False, True], ids=["reserve", "hdf5-enospc"])
def test_a_full_disk_holds_the_scan_and_it_finishes_exactly_once_when_space_is_freed(tmp_path, start_run, hdf5):
    """With a reserve (1 MB) the writer stops before the disk is full. Without one, and the disk
    filled behind its back between two flushes (it asks the file system at each), HDF5 itself
    meets ENOSPC mid-write: the file is opened anew and the frames since its last flush written again."""
    frames = 1000
    with tmpfs(tmp_path / "disk", "16m") as disk:
        writer = ("stages.writer.params.reserve_mb=0", "stages.writer.params.flush_interval_s=2") if hdf5 \
            else ("stages.writer.params.reserve_mb=1",)
        run = start_run(synthetic_pipeline(tmp_path, frames=frames, workers=1, rate_hz=200 if hdf5 else 0),
                        overrides=(f'stages.writer.params.output_dir="{disk}"', *writer))
        try:
            run.wait_ready(3)
            if not hdf5:
                filler = fill(disk, leave_mb=2.5)  # room for about 180 frames of 8 kB
            assert run.ctl("start_scan", {"scan_id": "full", "n_frames": frames}).ok
            if hdf5:
                wait_for(lambda: process_status(run, "writer.1")["stats"]["scan"]["written"] > 0, 20,
                         "a first flush")  # which asked the file system for its free space
                filler = fill(disk, leave_mb=0)
            failed = run.feed.wait("write_failed", timeout_s=30)
            assert failed["errno"] == errno.ENOSPC, failed
            assert failed["path"] == str(disk / "full_raw.cxi") if hdf5 else failed["path"] == str(disk), failed
            assert "free space" in failed["action"] and str(disk) in failed["message"]
            assert process_status(run, "writer.1")["stats"]["state"] == "paused"

            time.sleep(2.5)  # a few retries: the pipeline waits, nothing goes missing meanwhile
            held_back = acknowledged(run)
            [raw] = cxi_files(disk)
            on_disk = frames_on_disk([raw])
            assert len(set(on_disk)) == len(on_disk) and 0 < len(on_disk) < frames
            assert held_back <= len(on_disk), "frames acknowledged that are not on disk"
            assert run.ctl("status").result["scan"]["state"] == "running"
            assert run.ctl("status").result["scan"]["stages"]["writer"]["written"] == len(on_disk)
            assert run.feed.find("scan_finished", scan_id="full") is None
            assert len(events(run, "write_failed")) == 1, "write_failed is published once per cause"
            assert cxi_files(disk) == [raw], "no file per failed attempt"

            filler.unlink()
            resumed = run.feed.wait("write_resumed", timeout_s=15)
            assert resumed["path"] == str(raw)
            summary = run.wait_scan("full", timeout_s=40)["summary"]
            assert summary["frames_written"] == frames and summary["frames_lost"] == 0, summary
            assert cxi_files(disk) == [raw]
            assert sorted(frames_on_disk([raw])) == list(range(frames))
            assert process_status(run, "writer.1")["stats"]["state"] != "paused"
        finally:
            run.stop()


def test_a_read_only_or_too_small_output_directory_refuses_the_scan(tmp_path, start_run):
    with tmpfs(tmp_path / "disk") as disk:
        run = start_run(synthetic_pipeline(tmp_path, frames=50, workers=1),
                        overrides=(f'stages.writer.params.output_dir="{disk}"', "stages.writer.params.reserve_mb=1"))
        try:
            run.wait_ready(3)
            remount(disk, "ro")
            reply = run.ctl("start_scan", {"scan_id": "ro", "n_frames": 50})
            assert not reply.ok
            assert str(disk) in reply.error["message"] and "read-only" in reply.error["message"], reply.error
            remount(disk, "rw")
            # 1000 frames of 100 kB announced: 8 MB do not hold them.
            reply = run.ctl("start_scan", {"scan_id": "big", "n_frames": 1000, "metadata": {"frame_bytes": 100_000}})
            assert not reply.ok and str(disk) in reply.error["message"], reply.error
            assert "MB free" in reply.error["message"] and "needs" in reply.error["message"]
            assert run.feed.wait("scan_refused", timeout_s=5, scan_id="big")
            assert cxi_files(disk) == []
            # A scan that fits runs.
            assert run.ctl("start_scan", {"scan_id": "fits", "n_frames": 50}).ok
            assert run.wait_scan("fits")["summary"]["frames_written"] == 50
        finally:
            run.stop()


def test_a_directory_that_turns_read_only_mid_scan_holds_the_frames_until_it_is_writable(tmp_path, start_run):
    """A file system cannot go read-only under a file open for writing (EBUSY), so the writer is
    killed mid-scan and the file system remounted read-only before its successor opens its part:
    that open fails (EROFS) until the file system is writable again; then every frame is on
    disk exactly once, over the two parts."""
    frames = 1200
    with tmpfs(tmp_path / "disk", "32m") as disk:
        run = start_run(synthetic_pipeline(tmp_path, frames=frames, rate_hz=150, workers=1),
                        overrides=(f'stages.writer.params.output_dir="{disk}"', "stages.writer.params.reserve_mb=1"))
        try:
            run.wait_ready(3)
            assert run.ctl("start_scan", {"scan_id": "ro", "n_frames": frames}).ok
            wait_for(lambda: process_status(run, "writer.1")["stats"]["scan"]["written"] >= 150, 20,
                     "frames on disk")
            pid = run.service("writer.1")["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in _proc_state(pid), 10, "the writer gone")
            remount(disk, "ro")
            failed = run.feed.wait("write_failed", timeout_s=30, errno=errno.EROFS)
            assert "read-only" in failed["message"] and failed["path"] == str(disk / "ro_raw.part2.cxi"), failed
            assert process_status(run, "writer.1", dead_pid=pid)["stats"]["state"] == "paused"
            time.sleep(2)
            [first] = cxi_files(disk)
            kept = frames_on_disk([first])
            assert acknowledged(run) <= len(kept), "frames acknowledged that are not on disk"
            assert run.feed.find("scan_finished", scan_id="ro") is None
            remount(disk, "rw")
            run.feed.wait("write_resumed", timeout_s=15)
            summary = run.wait_scan("ro", timeout_s=40)["summary"]
            assert summary["frames_lost"] == 0 and summary["frames_written"] == frames, summary
            files = cxi_files(disk)
            assert [p.name for p in files] == ["ro_raw.cxi", "ro_raw.part2.cxi"]
            numbers = frames_on_disk(files)
            assert sorted(numbers) == list(range(frames)), "every frame exactly once over the parts"
            with h5py.File(files[1], "r") as f:
                assert list(f["entry_1/previous_parts"].asstr()) == ["ro_raw.cxi"]
        finally:
            run.stop()


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return "Z"


# --- the files alone: what a writer does after HDF5 met ENOSPC, for each kind of file ---------

SX_SHAPE, SX_WIDTH = (64, 64), 8


def _sx_record(n: int, frames: dict[int, np.ndarray]):
    """A peak stage's record of frame n (a hit when n % 3 == 0), with the class sums of the last
    5 frames on every fifth."""
    from libs.common.frames import ArraySpec, Frame
    from libs.common.contracts import PEAKS

    hit = n % 3 == 0
    rng = np.random.default_rng(n)
    k = 3 if hit else 1
    peaks = {"fs": rng.random(k, np.float32) * 63, "ss": rng.random(k, np.float32) * 63,
             "intensity": rng.random(k, np.float32) * 100, "max_pixel_intensity": np.ones(k, np.float32),
             "num_pixels": np.ones(k, np.float32), "snr": np.ones(k, np.float32), "sigma": np.ones(k, np.float32)}
    blobs = [(ArraySpec(name=name, dtype="<f4", shape=a.shape), a) for name, a in peaks.items()]
    if hit:
        blobs.append((ArraySpec(name="data", dtype="<u2", shape=SX_SHAPE), np.full(SX_SHAPE, n, "<u2")))
    meta = {"kind": PEAKS, "n_peaks": k, "found": k, "hit": hit, "max_num_peaks": SX_WIDTH,
            "frame": {"shape": list(SX_SHAPE), "dtype": "<u2", "compression": "none"}}
    if n % 5 == 4:
        numbers = list(range(n - 4, n + 1))
        counts = [sum(m % 3 != 0 for m in numbers), sum(m % 3 == 0 for m in numbers)]
        for cls, name in enumerate(("misses", "hits")):
            if counts[cls]:
                total = sum(frames[m] for m in numbers if (m % 3 == 0) == bool(cls))
                blobs.append((ArraySpec(name=f"{name}_sum", dtype="<f8", shape=SX_SHAPE), total))
        meta.update(sum_frames=counts, summed=numbers)
    return Frame.from_blobs(scan_id="sx", epoch=1, frame=n, origin="peak_worker.1", blobs=blobs, meta=meta)


def _meta(record):
    """A record's meta as the writer parses it when it comes."""
    from libs.common.contracts import CleanFrame, parse_record

    return parse_record(record) if "kind" in record.header.meta else CleanFrame.of(record)


def _feed(file, records, flush_every: int, filler_dir: Path) -> int:
    """Write records as the writer does; on the first OSError free the disk and `recover`, then go
    on. Returns how many times HDF5 failed."""
    failures = 0
    for i, record in enumerate(records):
        for attempt in range(2):
            try:
                file.write(record, _meta(record))
                if (i + 1) % flush_every == 0:
                    file.flush()
                break
            except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError for a failed flush
                assert "errno = 28" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC, exc
                failures += 1
                (filler_dir / "filler").unlink()
                file.recover()
                if (i + 1) % flush_every == 0:
                    file.flush()
                if attempt == 0 and file.written and record.header.frame in file.written:
                    break
    return failures


def test_the_crystallography_file_opened_anew_after_enospc_has_every_record_and_sum_once(tmp_path):
    from libs.crystallography.hits import add_to_powder
    from services.writer.disk import Parts
    from services.writer.sx_file import SxFile

    count = 90
    frames = {n: np.random.default_rng(1000 + n).random(SX_SHAPE) for n in range(count)}
    records = [_sx_record(n, frames) for n in range(count)]
    with tmpfs(tmp_path / "disk", "8m") as disk:
        parts = Parts.find(disk, "sx", "sx", 1)
        file = SxFile(parts.path, scan=None, header=None, record=records[0], peaks=_meta(records[0]), window=20,
                      epoch=1, parts=parts)
        file.write(records[0], _meta(records[0]))
        file.flush()
        fill(disk, leave_mb=0)
        assert _feed(file, records[1:], flush_every=4, filler_dir=disk) >= 1, "HDF5 never met a full disk"
        file.close()
        with h5py.File(parts.path, "r") as f:
            entry = f["entry_1"]
            assert sorted(entry["result_2/frame_number"][()].tolist()) == list(range(count))
            hits = [n for n in range(count) if n % 3 == 0]
            assert sorted(entry["result_1/frame_number"][()].tolist()) == hits
            for row, number in enumerate(entry["result_1/frame_number"][()]):
                assert (entry["data_1/data"][row] == number).all()
            summed = list(range(count))
            assert sorted(entry["aggregates/summed_frames"][()].tolist()) == summed
            np.testing.assert_allclose(entry["image_1/data"][()], sum(frames[n] for n in hits), rtol=1e-12)
            np.testing.assert_allclose(entry["image_2/data"][()],
                                       sum(frames[n] for n in range(count) if n % 3), rtol=1e-12)
            assert entry["image_1/n_frames"][()] == len(hits)
            powder = np.zeros(SX_SHAPE)
            for n in hits:
                p = {k: records[n].array(k) for k in ("fs", "ss", "intensity")}
                add_to_powder(powder, p["fs"], p["ss"], p["intensity"])
            np.testing.assert_allclose(entry["image_3/data"][()], powder, rtol=1e-9)


def test_the_ptychography_file_opened_anew_after_enospc_has_every_frame_once(tmp_path):
    from libs.common.frames import Frame
    from libs.common.messages import ScanDescription
    from services.writer.ptycho_file import PtychoFile

    count, size = 120, 64
    scan = ScanDescription(scan_id="p", technique="ptychography", positions_m=[(i * 1e-7, 0.0) for i in range(count)])
    clean = [Frame.from_arrays(scan_id="p", epoch=1, frame=i, origin="frame_worker.1",
                               arrays={"data": np.full((size, size), i, np.float32)}, meta={"index": i})
             for i in range(count)]
    with tmpfs(tmp_path / "disk", "4m") as disk:
        file = PtychoFile(disk / "p.cxi", scan=scan, headers={}, size=size, epoch=1)
        file.write(clean[0], _meta(clean[0]))
        file.flush()
        fill(disk, leave_mb=0)
        assert _feed(file, clean[1:], flush_every=5, filler_dir=disk) >= 1, "HDF5 never met a full disk"
        file.close()
        with h5py.File(disk / "p.cxi", "r") as f:
            np.testing.assert_array_equal(f["entry_1/data_1/frame_number"][()], np.arange(count))
            data = f["entry_1/instrument_1/detector_1/data"][()]
            np.testing.assert_array_equal(data[:, 0, 0], np.arange(count))
