"""The passthrough stage's parameters (`[stages.NAME.params]` of a pipeline). Light (pydantic and libs only),
so that every process can check every stage's parameters (libs/common/stages.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    offset: int = Field(0, ge=0, le=1000, description="added to every pixel")
    delay_s: float = Field(0.0, ge=0, le=10, description="simulated work per frame")
