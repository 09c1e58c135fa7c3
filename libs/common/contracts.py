"""The names of what passes between stages, in one home: no stage imports another's package to
learn them, and a process loads only its own stage's code.

Scan headers (facts about a whole scan, sent to every downstream process before its frames) are
told apart by `meta["header"]`; records that are not detector frames by `meta["kind"]`.
"""

from __future__ import annotations

from pathlib import Path

from libs.common.frames import Frame

DETECTOR_HEADER = "detector"
"""The detector's series header (geometry, flatfield, pixel mask), from the receiver."""
CALIBRATION = "calibration"
"""The dark stage's calibration of a scan: mean dark, bad pixels, diffraction centre."""
FRAMES_HEADER = "frames"
"""The frame stage's geometry of the clean frames: size, pixel size, distance, energy, mask."""

PEAKS = "peaks"
"""Record kind: a frame's peak list and hit flag from the peak stage (with sum deltas)."""
RESULT = "reconstruction"
"""Record kind: the reconstruction's object and probe."""
RECORD = "processed"
"""Record kind (`meta["kind"]`): one frame's `process_data` dict, with the frame's identity."""
END_RECORD = "processing_end"
"""Record kind: a processing node's `end_processing_on_processing_node` dict."""

WRITER_OUTPUT_DIR = "out"
"""The writer's `output_dir` when its stage gives none."""


def raw_path(output_dir: str, scan_id: str) -> str:
    """Where a writer puts a scan's frames as received (a writer restarted mid-scan goes on in
    `<scan_id>_raw.partN.cxi` beside it): the receiver names it to STINS consumers."""
    return str(Path(output_dir) / f"{scan_id}_raw.cxi")


def header_name(header: Frame) -> str:
    """Which scan header a header frame is (its `meta["header"]`; the detector's by default)."""
    return header.header.meta.get("header", DETECTOR_HEADER)
