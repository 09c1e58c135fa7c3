"""The processing node's parameters (`[stages.NAME.params]` of a pipeline). Light (pydantic and libs only),
so that every process can check every stage's parameters (libs/common/stages.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from libs.common import processing


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    processing: str = Field(description="the Processing class: 'package.module:Class' or 'path/to/file.py:Class'")
    parameters: dict[str, Any] = Field(default_factory=dict, description="given to the class as `parameters`")

    @field_validator("processing")
    @classmethod
    def _spec(cls, value: str) -> str:
        return processing.check_spec(value)
