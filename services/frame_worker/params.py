"""The frame stage's parameters (`[stages.NAME.params]` of a pipeline): the cleaning's (cleaning.py)
and the calibration wait. Light (pydantic only), so that every process can check every stage's
parameters (libs/common/stages.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CleaningParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    crop: int = Field(512, ge=8, description="raw pixels cut around the diffraction centre")
    size: int = Field(128, ge=8, description="clean frame size N; crop must be a multiple of it")
    downsample: Literal["fourier", "bin"] = "fourier"
    photon_threshold: float = Field(0.5, ge=0, description="photons per raw pixel below which it is 0")
    saturation_adu: int = Field(65535, ge=1, description="raw values at or above this are masked")

    @model_validator(mode="after")
    def _multiple(self) -> CleaningParams:
        if self.crop % self.size:
            raise ValueError(f"crop ({self.crop}) must be a multiple of size ({self.size})")
        return self


class Params(CleaningParams):
    calibration_timeout_s: float = Field(
        60.0, gt=0, description="give up on frames held for the calibration this long after the first one")
