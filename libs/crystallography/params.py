"""The crystallography algorithms' parameter models, apart from their kernels: a process that only
validates a pipeline (any stage's, the handler) loads no numba (libs/common/stages.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Peakfinder8Params(BaseModel):
    """OM's peakfinder8 parameters, under OM's names (radii in pixels)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_num_peaks: int = Field(2048, ge=1, le=100_000, description="peaks stored per frame")
    adc_threshold: float = Field(100.0, description="floor of the per-radius detection threshold")
    minimum_snr: float = Field(6.0, gt=0, description="sigma-clipping factor and signal-to-noise cut")
    min_pixel_count: int = Field(2, ge=1)
    max_pixel_count: int = Field(30, ge=1)
    local_bg_radius: int = Field(4, ge=1, le=64, description="local background: a disc of twice this radius")
    min_res: float = Field(0.0, ge=0, description="pixels nearer the beam centre are not searched")
    max_res: float = Field(1e6, gt=0, description="pixels farther from the beam centre are not searched")

    @model_validator(mode="after")
    def _ranges(self) -> Peakfinder8Params:
        if self.min_pixel_count > self.max_pixel_count:
            raise ValueError(f"min_pixel_count {self.min_pixel_count} > max_pixel_count {self.max_pixel_count}")
        if self.min_res >= self.max_res:
            raise ValueError(f"min_res {self.min_res} >= max_res {self.max_res}: no pixel would be searched")
        return self
