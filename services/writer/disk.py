"""What the writer's files share about the disk under them: free space, failures, and the parts of a scan.

- `LIBVER`: HDF5 format bounds for the SWMR files (raw, crystallography). SWMR needs the v110
  formats at the low bound; the high bound v110 keeps every object decodable by HDF5 1.10-1.14
  (the h5py wheel is HDF5 2.0, whose `latest` objects nothing older reads). `LIBVER_PLAIN`: the
  file that is not in SWMR mode (ptychography) keeps the earliest formats at the low bound, so
  its superblock carries no "open for writing" flag and the file of a killed writer still opens.
- `Space`: free space on the output directory, checked before bytes go to HDF5, with a reserve
  kept free: HDF5 seldom meets ENOSPC in the middle of a write (after which its handle is not to
  be trusted: the writer reopens the file, see service.py).
- `Parts`: the files an earlier incarnation of the writer left for the same scan (same scan id
  and epoch), `<stem>.cxi`, `<stem>.part2.cxi`, ...: a successor continues in the next part.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import h5py

from libs.common.contracts import FrameMeta
from libs.common.frames import Frame

logger = logging.getLogger(__name__)

LIBVER = ("v110", "v110")
LIBVER_PLAIN = ("earliest", "v110")
SCAN_ATTR, EPOCH_ATTR = "surveyor_scan_id", "surveyor_epoch"
"""Root attributes naming the scan and epoch a file belongs to: continuations join only those."""

MB = 1 << 20
IO_ERRORS = (OSError, RuntimeError)
"""What a failed write, flush or open raises: h5py raises RuntimeError for some (a flush that
meets ENOSPC: "Unable to flush raw data (... errno = 28 ...)"), OSError for others."""
RETRYABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
"""Failures a person can clear (free space, remount, fix permissions, replace a disk): the
writer holds the frames and tries again."""


def error_number(exc: BaseException) -> int | None:
    """The errno of an OSError, also of an error h5py raised with the number only in its text."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    found = re.search(r"errno = (\d+)", str(exc))
    return int(found.group(1)) if found else None


def free_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def advice(code: int | None, directory: Path, reserve: int) -> str:
    """What a person does about a failure, in words."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{free_bytes(directory) / MB:.1f} MB free"
        except OSError:
            free = "free space unknown"
        return (f"free space on the file system of {directory} ({free}; the writer keeps {reserve / MB:.0f} MB "
                "in reserve); writing resumes by itself")
    if code == errno.EROFS:
        return f"the file system of {directory} is read-only: remount it read-write; writing resumes by itself"
    if code in (errno.EACCES, errno.EPERM):
        return f"this process may not write in {directory}: fix its permissions; writing resumes by itself"
    if code == errno.EIO:
        return f"I/O error under {directory}: check the disk (dmesg); writing resumes once it works"
    return f"writing under {directory} fails; see the writer's log"


class Space:
    """Free space on the output directory's file system, less a reserve, spent as bytes are written;
    asked of the file system again whenever it runs short and at every flush."""

    def __init__(self, directory: Path, reserve: int) -> None:
        self.directory = directory
        self.reserve = reserve
        self._budget: int | None = None

    def take(self, nbytes: int) -> None:
        """Raise ENOSPC unless `nbytes` fit above the reserve."""
        if self._budget is None or self._budget < nbytes:
            self._budget = free_bytes(self.directory) - self.reserve
        if self._budget < nbytes:
            free = self._budget + self.reserve
            raise OSError(errno.ENOSPC, f"{free / MB:.1f} MB free on the file system of {self.directory}, "
                          f"the writer keeps {self.reserve / MB:.0f} MB free", str(self.directory))
        self._budget -= nbytes

    def refresh(self) -> None:
        self._budget = None


def open_part(path: Path) -> h5py.File:
    """An earlier part, for reading: as a live SWMR reader does, else plainly (a file not in SWMR mode)."""
    try:
        return h5py.File(path, "r", swmr=True)
    except IO_ERRORS:
        return h5py.File(path, "r")


def mark(f: h5py.File, scan_id: str, epoch: int) -> None:
    f.attrs[SCAN_ATTR] = scan_id
    f.attrs[EPOCH_ATTR] = epoch


def part_number(path: Path, stem: str) -> int:
    if path.name == f"{stem}.cxi":
        return 1
    found = re.fullmatch(re.escape(stem) + r"\.part(\d+)\.cxi", path.name)
    return int(found.group(1)) if found else 0


@dataclass
class Parts:
    """The scan's files already on disk from earlier incarnations, oldest first, and the next free name."""

    stem: str
    path: Path
    """Where this incarnation writes: the first free `<stem>.cxi` / `<stem>.partN.cxi`."""
    earlier: list[Path] = field(default_factory=list)
    """Files of the same scan and epoch, oldest first."""
    unreadable: list[Path] = field(default_factory=list)

    @classmethod
    def find(cls, directory: Path, stem: str, scan_id: str, epoch: int) -> Parts:
        taken = sorted((p for p in directory.glob(f"{stem}*.cxi") if part_number(p, stem)),
                       key=lambda p: part_number(p, stem))
        last = part_number(taken[-1], stem) if taken else 0
        path = directory / (f"{stem}.cxi" if last == 0 else f"{stem}.part{last + 1}.cxi")
        parts = cls(stem, path)
        for candidate in taken:
            try:
                with open_part(candidate) as f:
                    same = (f.attrs.get(SCAN_ATTR) == scan_id and int(f.attrs.get(EPOCH_ATTR, -1)) == epoch)
            except (*IO_ERRORS, KeyError, ValueError) as exc:
                logger.warning("%s cannot be read (%s); frames in it are not counted", candidate, exc)
                parts.unreadable.append(candidate)
                continue
            if same:
                parts.earlier.append(candidate)
        return parts

    def read(self, what: str) -> list[tuple[Path, h5py.File]]:
        """Open every earlier part for reading (close them with `close_all`)."""
        opened = []
        for path in self.earlier:
            try:
                opened.append((path, open_part(path)))
            except IO_ERRORS as exc:
                logger.warning("%s cannot be read for %s: %s", path, what, exc)
        return opened


class ScanFile:
    """What every kind of file the writer makes counts the same way: the frames (or records) of
    the scan that earlier parts hold, `earlier`, never written again here, and those this file
    has flushed, `committed`."""

    earlier: set[int]
    committed: set[int]
    takes: ClassVar[tuple[type, ...]]
    """What frames it takes, by their meta as the writer parsed it (FrameMeta)."""

    @staticmethod
    def creation_cost(frame: Frame, meta: FrameMeta) -> int:
        """Bytes a new file takes before its first frame (its metadata), about."""
        return 1 << 20

    @property
    def on_disk(self) -> set[int]:
        """Frames of the scan on disk, this file and the earlier parts."""
        return self.earlier | self.committed

    @property
    def frames_on_disk(self) -> int:
        """`len(on_disk)`: this file never holds a frame an earlier part holds."""
        return len(self.earlier) + len(self.committed)


def frames_in(f: h5py.File) -> set[int]:
    """Frame numbers a raw or ptychography file holds (as of its last flush)."""
    numbers = f.get("entry_1/data_1/frame_number")
    if numbers is None:
        return set()
    slots = numbers[()]
    return set(slots[slots >= 0].tolist())


def close_all(opened: list[tuple[Path, h5py.File]]) -> None:
    for _, f in opened:
        f.close()


def quiet_close(f: h5py.File) -> None:
    """Close a handle that may be broken; what HDF5 says about it is only logged."""
    try:
        if f.id.valid:
            f.close()
    except Exception as exc:  # noqa: BLE001 - the handle is given up either way
        logger.info("closing an HDF5 file after a failure: %s", exc)
