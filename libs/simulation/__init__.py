"""Simulated scans for the virtual detector (`surveyor simulate KIND`) and for tests.

A generator says what the detector's series header says (`header`), yields the frames of the
scan as arrays (`images`), may describe the scan for `start_scan` (`scan`), and writes its ground
truth (`write_truth`). The science issues add theirs to `GENERATORS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from libs.common.detector import SeriesStart
from libs.common.messages import ScanDescription


class Generator(Protocol):
    def header(self) -> SeriesStart: ...

    def images(self) -> Iterator[np.ndarray]: ...

    def scan(self) -> ScanDescription | None: ...

    def write_truth(self, path: Path) -> None: ...


def generator(kind: str, *, frames: int | None, series: str) -> Generator:
    """The simulation `kind` with `frames` frames (None: its default), as detector series `series`."""
    from libs.simulation.synthetic import SyntheticScan

    generators = {"synthetic": SyntheticScan}
    if kind not in generators:
        raise ValueError(f"no simulation {kind!r}; there are {sorted(generators)}")
    made = generators[kind](series=series)
    if frames is not None:
        made.count = frames
    return made
