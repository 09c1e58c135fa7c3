"""Simulated scans for the virtual detector (`surveyor simulate KIND`) and for tests.

A generator says what the detector's series header says (`header`), yields the frames of the
scan as arrays (`images`), may describe the scan for `start_scan` (`scan`), and writes its ground
truth (`write_truth`). Generators are dataclasses: their fields are the simulation's parameters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from libs.common.detector import SeriesStart
from libs.common.messages import ScanDescription


class Generator(Protocol):
    def header(self) -> SeriesStart: ...

    def images(self) -> Iterator[np.ndarray]: ...

    def scan(self) -> ScanDescription | None: ...

    def write_truth(self, path: Path) -> None: ...


KINDS = ("synthetic", "ptycho", "sx")


def generator(kind: str, *, frames: int | None, series: str, scan_id: str | None = None,
              params: dict[str, Any] | None = None) -> Generator:
    """The simulation `kind` with `frames` data frames (None: its default), as detector series
    `series`; `params` set the generator's other fields (ValueError names an unknown one)."""
    from libs.simulation.ptycho import PtychoScan
    from libs.simulation.sx import SxScan
    from libs.simulation.synthetic import SyntheticScan

    generators = {"synthetic": SyntheticScan, "ptycho": PtychoScan, "sx": SxScan}
    if kind not in generators:
        raise ValueError(f"no simulation {kind!r}; there are {sorted(generators)}")
    cls = generators[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {"series": series}
    for name, value in (params or {}).items():
        if name not in fields or name in ("series", "count"):
            raise ValueError(f"simulation {kind} has no parameter {name!r}; it has "
                             f"{sorted(set(fields) - {'series', 'count'})}")
        values[name] = tuple(value) if isinstance(value, list) else value
    if frames is not None:
        values["count"] = frames
    if scan_id is not None and "scan_id" in fields:
        values["scan_id"] = scan_id
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"simulation {kind}: {exc}") from None
