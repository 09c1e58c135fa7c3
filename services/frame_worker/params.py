"""The frame stage's parameters (`[stages.NAME.params]` of a pipeline): the cleaning's (cleaning.py)
and the calibration wait. The crop and the clean size follow from each scan unless pinned here.
Light (pydantic only), so that every process can check every stage's parameters
(libs/common/stages.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CleaningParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    crop: int | None = Field(None, ge=8, description="raw pixels cut around the diffraction centre; none: "
                             "chosen from the scan (libs/ptychography/geometry.py)")
    size: int | None = Field(None, ge=8, description="clean frame size N (crop a multiple of it); none: chosen "
                             "from the scan")
    max_size: int = Field(128, ge=16, le=4096, description="the largest N the scan's geometry may choose (the "
                          "solver's cost grows as N^2: a larger one buys resolution when the detector has it)")
    downsample: Literal["bin", "fourier"] = Field(
        "bin", description="bin: sum raw pixels (PtyPy's rebin); fourier: crop the pattern's spectrum, exact "
        "only for an exit wave inside half the window")
    photon_threshold: float = Field(0.5, ge=0, description="photons per raw pixel below which it is 0")
    saturation_adu: int = Field(65535, ge=1, description="raw values at or above this are masked")

    @model_validator(mode="after")
    def _multiple(self) -> CleaningParams:
        if self.crop is not None and self.size is not None and self.crop % self.size:
            raise ValueError(f"crop ({self.crop}) must be a multiple of size ({self.size})")
        return self


class Params(CleaningParams):
    calibration_timeout_s: float = Field(
        60.0, gt=0, description="give up on frames held for the calibration this long after the first one")
