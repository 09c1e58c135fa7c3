"""The image stage's parameters (`[stages.NAME.params]` of a pipeline). Light (pydantic and libs only),
so that every process can check every stage's parameters (libs/common/stages.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    preview_interval_s: float = Field(2.0, gt=0)
