"""The peak stage's parameters (`[stages.NAME.params]` of a pipeline). Light (pydantic and libs only),
so that every process can check every stage's parameters (libs/common/stages.py)."""

from __future__ import annotations

from pydantic import Field, model_validator

from libs.crystallography.params import Peakfinder8Params


class Params(Peakfinder8Params):
    min_peaks: int = Field(10, ge=0, description="a hit has at least this many peaks")
    max_peaks: int = Field(100_000, ge=0, description="and at most this many")
    asic_shape: tuple[int, int] | None = Field(None, description="ASIC (rows, columns); default from the scan")
    flatfield: bool = Field(True, description="apply the detector's flatfield unless it did")
    sums_interval_s: float = Field(2.0, gt=0, le=60, description="how often the class sums go downstream")

    @model_validator(mode="after")
    def _hit_range(self) -> Params:
        if self.min_peaks > self.max_peaks:
            raise ValueError(f"min_peaks {self.min_peaks} > max_peaks {self.max_peaks}: nothing would be a hit")
        return self
