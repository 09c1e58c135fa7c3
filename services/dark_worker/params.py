"""The dark stage's parameters (`[stages.NAME.params]` of a pipeline). Light (pydantic and libs only),
so that every process can check every stage's parameters (libs/common/stages.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    hot_factor: float = Field(10.0, gt=1, description="hot: dark variance above this x the median")
    centre_frames: int = Field(0, ge=0, le=1000, description="data frames to find the centre in, if not given")
