"""What passes between stages, in one home: the names of scan headers and records, and a model of
the meta (`FrameHeader.meta`) each one carries. No stage imports another's package to learn them,
a process loads only its own stage's code, and no consumer reads a magic key.

Scan headers (facts about a whole scan, sent to every downstream process before its frames) are
told apart by `meta["header"]` (the detector's has none); records that are not detector frames by
`meta["kind"]`. A clean frame (the frame stage's output) carries its index and no kind. A detector
frame's meta is what the detector said of that frame, passed on as it came: it is no contract
between stages and is never parsed (a writer takes thousands of them a second).

A producer builds meta from its model (`to_meta()`). A consumer parses it once, where the frame
arrives in its service (`parse_record`, `parse_header`, or `Model.of(frame)` for the one kind it
takes), and reads attributes from then on. Meta that does not parse raises FrameError naming the
frame, the stage that sent it and the field; the consumer rejects that frame or header (a hook that
raises has its frame counted rejected). Every model refuses keys it does not know: Surveyor owns
both ends of each contract, so an unknown key means stages of different versions, not something
to pass over.

The keys and values on the wire are those the stages have always sent, so files and INTERFACES.md
do not change: the detector header has no `header` key, a peak record without sums no
`sum_frames`, a synthetic series' header no `detector`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, Self, TypeVar, Union

import numpy as np
from pydantic import Discriminator, Field, Tag, TypeAdapter, ValidationError, field_serializer, model_validator

from libs.common.detector.events import DetectorInfo
from libs.common.errors import FrameError
from libs.common.frames import Compression, Frame
from libs.common.messages import Strict

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


# --- the models ---------------------------------------------------------------------------------


def _is_none(value: Any) -> bool:
    return value is None


def _problems(error: ValidationError) -> str:
    """One clause per problem, with the key it is about and the value found."""
    clauses = []
    for problem in error.errors(include_url=False):
        loc = problem["loc"]
        if problem["type"] in ("union_tag_invalid", "union_tag_not_found"):
            key = problem["ctx"]["discriminator"].strip("'")
            key = "header" if key.endswith("()") else key  # the scan headers' tag is read by a function
            clauses.append(f"{key} {problem['ctx']['tag']!r} is none of {problem['ctx']['expected_tags']}"
                           if problem["type"] == "union_tag_invalid" else f"no {key!r}")
            continue
        if loc and isinstance(loc[0], str) and loc[0] in _TAGS:
            loc = loc[1:]  # the union member (a record's kind) the meta was checked as
        where = ".".join(str(p) for p in loc) or "meta"
        found = "" if problem["type"] == "missing" or not loc else f" (got {repr(problem['input'])[:60]})"
        clauses.append(f"{where}: {problem['msg']}{found}")
    return "; ".join(clauses)


def _refused(frame: Frame, what: str, error: ValidationError) -> FrameError:
    """Why `frame`'s meta is not a `what`: the frame (the scan, for a header), the stage that sent
    it, the fields."""
    h = frame.header
    which = f"scan {h.scan_id}" if what.endswith("header") else f"frame {h.frame} of scan {h.scan_id}"
    return FrameError(f"{what} of {which} from {h.origin}: {_problems(error)} (the contract is in "
                      "libs/common/contracts.py: do both stages run the same version?)")


class Meta(Strict):
    """Base of the models of `Frame.meta`: a consumer parses with `of`, a producer sends `to_meta()`."""

    label: ClassVar[str] = "meta"
    """What the meta is, in messages."""

    @classmethod
    def of(cls, frame: Frame) -> Self:
        """`frame`'s meta as this model; FrameError (frame, sender, field) if it is not one."""
        try:
            return cls.model_validate(frame.header.meta)
        except ValidationError as exc:
            raise _refused(frame, cls.label, exc) from None

    def to_meta(self) -> dict[str, Any]:
        """The meta to send, as it travels (JSON types)."""
        return self.model_dump(mode="json")


class DetectorHeader(Meta):
    """The detector's series header, from the receiver (and `surveyor process`): the series, the
    protocol it came by, what the header says of the detector in SI units and numpy order
    (`DetectorInfo`), and everything else it says as the detector names it (`config`). A synthetic
    series has neither. Its arrays: `flatfield`, `pixel_mask` (`<name>_<channel>` for further
    thresholds). An EIGER1 1M on Stream V1, its config cut short:

        {"series": "14", "protocol": "stream1",
         "detector": {"shape": [1065, 1030], "dtype": "<u4", "n_images": 100000, "energy_ev": 8000.0,
                      "distance_m": 0.0, "pixel_size_m": [7.5e-05, 7.5e-05], "beam_center_px": [0.0, 0.0],
                      "count_time_s": 0.9999999, "frame_time_s": 1.0000029, "threshold_energy_ev": 4000.0,
                      "sensor_material": "Si", "sensor_thickness_m": 0.00045,
                      "description": "Dectris EIGER1 Si 1M", "serial_number": "E-02-0153"},
         "config": {"flatfield_correction_applied": true, "nimages": 100000, "software_version": "1.8.0"}}
    """

    label = "detector header"
    header: Literal["detector"] = Field("detector", exclude=True)
    """Never sent: a scan header without `header` is the detector's."""
    series: str
    protocol: str
    detector: DetectorInfo | None = Field(None, exclude_if=_is_none)
    config: dict[str, Any] | None = Field(None, exclude_if=_is_none)

    @field_serializer("detector")
    def _known(self, info: DetectorInfo) -> dict[str, Any]:
        """Only what the header said: a fact it did not give is left out, not sent as null."""
        return info.model_dump(mode="json", exclude_none=True)


class Calibration(Meta):
    """The dark stage's calibration of a scan (dark_worker): how many dark frames went into the mean
    dark, and the diffraction centre [y, x] in raw detector pixels. Its arrays: `dark` (float64
    mean, absent without darks) and `bad` (uint8, 1 for a bad pixel; absent without darks or mask).

        {"header": "calibration", "darks": 20, "centre_px": [256.0, 255.5]}
    """

    label = "calibration header"
    header: Literal["calibration"] = "calibration"
    darks: int = Field(ge=0)
    centre_px: tuple[float, float]


class FramesHeader(Meta):
    """The frame stage's geometry of its clean frames (frame_worker): `size` x `size` pixels cut
    from a `crop` x `crop` window around the centre and downsampled (`downsample`); the effective
    pixel size, distance and energy, None where the scan description gave none (the frames are then
    written without geometry and not reconstructed); the probe support's radius and the probe size
    that the geometry was chosen for (libs/ptychography/geometry.py), with the choice in words. Its
    array: `mask` (uint8, size x size, 1 where there is data).

        {"header": "frames", "size": 128, "crop": 512, "downsample": "bin", "centre_px": [256.0, 255.5],
         "pixel_size_m": 0.0001, "distance_m": 0.08, "energy_ev": 800.0, "support_radius_px": 51.2,
         "probe_diameter_m": 5.73e-07, "probe_from": "probe model",
         "geometry": "crop 512 px -> 128 px clean frames: object pixel 9.69 nm, window 1.24 um"}
    """

    label = "frames header"
    header: Literal["frames"] = "frames"
    size: int = Field(gt=0)
    crop: int = Field(gt=0)
    downsample: Literal["fourier", "bin"]
    centre_px: tuple[float, float]
    pixel_size_m: float | None = Field(gt=0)
    distance_m: float | None = Field(gt=0)
    energy_ev: float | None = Field(gt=0)
    support_radius_px: float | None = Field(None, gt=0, description="the probe support's radius, clean pixels")
    probe_diameter_m: float | None = Field(None, gt=0, description="the probe's size the geometry was chosen for")
    probe_from: str | None = Field(None, description="what that size came from (probe model, scan step)")
    geometry: str | None = Field(None, description="the choice in words, as logged")

    @property
    def placed(self) -> bool:
        """Energy, distance and pixel size all known: the frames can be placed on an object."""
        return bool(self.pixel_size_m and self.distance_m and self.energy_ev)


class CleanFrame(Meta):
    """A clean frame of the frame stage (frame_worker): its index in the scan (frame number minus
    `n_dark`), which is its position in `positions_m`. Its arrays: `data` (float32, size x size,
    photons) and `mask` (uint8, 1 where there is data). It carries no kind: the frames-header
    consumers take only clean frames, and the wire has always been this:

        {"index": 17}
    """

    label = "clean frame"
    index: int


class PixelFormat(Strict):
    """How a detector frame's pixels travel: what a file needs to hold them as they came."""

    shape: tuple[int, ...]
    dtype: str
    compression: Compression


class Peaks(Meta):
    """The peak stage's record of one frame (peak_worker): peaks kept (`n_peaks`, at most
    `max_num_peaks`) of those found, whether it is a hit, and the detector frame's format. Its
    arrays: the peak list (`fs`, `ss`, `intensity`, `num_pixels`, `max_pixel_intensity`, `snr`,
    `sigma`, float32), and for a hit `data`, the frame's bytes as they came. A record may carry the
    class sums its process added since the last (`sum_frames`: frames per class, misses then hits;
    `summed`: which frames; arrays `misses_sum`, `hits_sum` for the classes with frames):

        {"kind": "peaks", "n_peaks": 14, "found": 14, "hit": true, "max_num_peaks": 2048,
         "frame": {"shape": [1065, 1030], "dtype": "<u4", "compression": "bslz4"},
         "sum_frames": [3, 2], "summed": [40, 41, 42, 43, 44]}
    """

    label = "peak record"
    kind: Literal["peaks"] = "peaks"
    n_peaks: int = Field(ge=0)
    found: int = Field(ge=0)
    hit: bool
    frame: PixelFormat
    max_num_peaks: int = Field(gt=0)
    sum_frames: tuple[int, int] | None = Field(None, exclude_if=_is_none)
    summed: list[int] | None = Field(None, exclude_if=_is_none)

    @model_validator(mode="after")
    def _sums_whole(self) -> Self:
        if (self.sum_frames is None) != (self.summed is None):
            raise ValueError("sum_frames and summed come together (class sums and the frames in them)")
        return self


class Reconstruction(Meta):
    """The reconstruction's result (reconstruction_worker): the object's pixel size, the RAAR
    iterations in all and after the last frame joined, the last exit-wave change, how many frames
    went in, and the time taken after the last frame. Its arrays: `object`, `probe`,
    `initial_probe` (complex64) and `weights` (uint8 per position, 1 where a frame came).

        {"kind": "reconstruction", "pixel_size_m": 1.2e-08, "iterations": 160, "ml_iterations": 0,
         "iterations_after_last_frame": 60,
         "error": 0.0021, "frames_used": 1600, "beta": 0.9, "seconds_after_last_frame": 14.2,
         "seconds_per_iteration_after_last_frame": 0.2367, "device": "cpu"}
    """

    label = "reconstruction result"
    kind: Literal["reconstruction"] = "reconstruction"
    pixel_size_m: float = Field(gt=0)
    iterations: int = Field(ge=0)
    ml_iterations: int = Field(0, ge=0, description="of them, maximum-likelihood refinement steps")
    iterations_after_last_frame: int = Field(ge=0)
    error: float
    frames_used: int = Field(ge=0)
    beta: float
    seconds_after_last_frame: float
    seconds_per_iteration_after_last_frame: float
    device: str = Field("cpu", description="where the solver ran: cpu, or gpu and the GPU's name")


class ProcessingRecord(Meta):
    """A processing node's record for the collecting node (libs/common/processing_wire.py): one
    frame's `process_data` dict (`processed`) or the node's end dict (`processing_end`), and the
    rank of the node that sent it. Its arrays: `values` (msgpack of the dict without its arrays)
    and `array_<i>` for each array taken out. What is in the dict is the scientist's; the runtime
    reads only this:

        {"kind": "processed", "rank": 2}
    """

    label = "processing record"
    kind: Literal["processed", "processing_end"]
    rank: int = Field(ge=0)


Record = Annotated[Union[Peaks, Reconstruction, ProcessingRecord], Field(discriminator="kind")]
"""A record by its kind (`meta["kind"]`)."""


def _header_tag(meta: Any) -> str | None:
    """A scan header's name: the detector's has none on the wire."""
    return meta.get("header", DETECTOR_HEADER) if isinstance(meta, dict) else getattr(meta, "header", None)


HeaderMeta = Annotated[Union[Annotated[DetectorHeader, Tag(DETECTOR_HEADER)], Annotated[Calibration, Tag(CALIBRATION)],
                             Annotated[FramesHeader, Tag(FRAMES_HEADER)]], Discriminator(_header_tag)]
"""A scan header's meta by its name (`meta["header"]`, the detector's when there is none)."""
FrameMeta = Union[Peaks, Reconstruction, ProcessingRecord, CleanFrame, None]
"""What a consumer makes of a frame's meta: a record, a clean frame, or None for a detector frame."""

_RECORDS: TypeAdapter[Record] = TypeAdapter(Record)
_HEADERS: TypeAdapter[HeaderMeta] = TypeAdapter(HeaderMeta)
_TAGS = {PEAKS, RESULT, RECORD, END_RECORD, DETECTOR_HEADER, CALIBRATION, FRAMES_HEADER}
"""Discriminator values: pydantic puts them first in the location of a union member's problem."""


def parse_record(frame: Frame) -> Peaks | Reconstruction | ProcessingRecord:
    """A record's meta by its kind; FrameError (frame, sender, field) if it is none we know."""
    try:
        return _RECORDS.validate_python(frame.header.meta)
    except ValidationError as exc:
        kind = frame.header.meta.get("kind")
        raise _refused(frame, f"{kind} record" if isinstance(kind, str) and kind in _TAGS else "record", exc) from None


def parse_header(frame: Frame) -> DetectorHeader | Calibration | FramesHeader:
    """A scan header's meta by its name; FrameError (scan, sender, field) if it is none we know."""
    try:
        return _HEADERS.validate_python(frame.header.meta)
    except ValidationError as exc:
        raise _refused(frame, f"{header_name(frame)} header", exc) from None


H = TypeVar("H", DetectorHeader, Calibration, FramesHeader)


@dataclass(frozen=True)
class ScanHeader(Generic[H]):
    """A scan header as a stage keeps it: its meta parsed once, when it came, and its frame for the
    arrays (`array`, `names`)."""

    meta: H
    frame: Frame

    @classmethod
    def of(cls, frame: Frame) -> ScanHeader:
        """A header frame, its meta parsed (`parse_header`: FrameError if it does not parse)."""
        return cls(parse_header(frame), frame)

    @property
    def names(self) -> set[str]:
        """The arrays it carries."""
        return {spec.name for spec in self.frame.header.arrays}

    def array(self, name: str) -> np.ndarray:
        return self.frame.array(name)
