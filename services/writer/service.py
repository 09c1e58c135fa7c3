"""The writer stage: every frame of a scan into `<output_dir>/<scan_id>_raw.cxi`.

The file opens with the first frame (its shape and dtype come with it) and closes when the scan
ends or is aborted; `written` and the file path go into the scan's counters. A writer restarted
mid-scan continues in `<scan_id>_raw.part2.cxi` rather than overwrite what is on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from libs.common.errors import FrameError
from libs.common.frames import Frame
from libs.common.runtime import Service as Runtime
from services.writer.raw_file import RawFile

logger = logging.getLogger(__name__)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    output_dir: str = "out"


def free_path(directory: Path, stem: str) -> Path:
    """`stem.cxi`, or `stem.partN.cxi` when a writer restarted mid-scan: never overwrite a file."""
    path = directory / f"{stem}.cxi"
    part = 1
    while path.exists():
        part += 1
        path = directory / f"{stem}.part{part}.cxi"
    return path


class Service(Runtime):
    Params = Params
    _raw: RawFile | None = None

    def on_frame(self, frame: Frame) -> None:
        spec = frame.spec("data")
        if spec.compression != "none":
            raise FrameError(f"frame {frame.header.frame}: {spec.compression} frames are not written yet")
        if self._raw is None:
            path = free_path(Path(self.params.output_dir), f"{frame.header.scan_id}_raw")
            self._raw = RawFile(path, shape=spec.shape, dtype=spec.dtype)
            logger.info("scan %s: writing %s", frame.header.scan_id, path)
            self.counters.outputs.append(str(path))
        elif spec.shape != self._raw.shape or np.dtype(spec.dtype) != self._raw.dtype:
            raise FrameError(f"frame {frame.header.frame} ({spec.dtype}{list(spec.shape)}) does not fit "
                             f"{self._raw.path} (frames of {self._raw.dtype}{list(self._raw.shape)})")
        if self._raw.write(frame.header.frame, frame.raw("data")):
            self.counters.written += 1
            self.totals.written += 1

    def on_scan_end(self) -> None:
        self._close()

    def on_abort(self) -> int:
        self._close()
        return 0

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            logger.info("closed %s with %d frames", self._raw.path, len(self._raw.written))
            self._raw = None
