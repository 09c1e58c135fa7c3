"""The receiver stage's parameters (`[stages.NAME.params]` of a pipeline). Light (pydantic and libs only),
so that every process can check every stage's parameters (libs/common/stages.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIB = 2**20


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    protocol: Literal["synthetic", "replay", "stream1", "stream2", "stins"] = "synthetic"
    source: str = Field("", description="detector endpoint to connect PULL to, or the file to replay")
    series_timeout_s: float = Field(30.0, gt=0, description="close a series silent this long")
    republish: str = Field("", description="PUSH endpoint to bind for STINS re-publication; empty: off")
    rate_hz: float = Field(0.0, ge=0, description="replay pace; 0 = as fast as the pipeline takes")
    dataset: str = Field("", description="replay: the frame stack's path in the file; empty: look for it")
    buffer_frames: int = Field(1000, ge=1, le=100_000,
                               description="messages queued from the detector before it is made to wait")
    buffer_mb: float = Field(1024, gt=0, description="and fewer if needed so that they fill at most this many "
                             "MiB, were every one of max_message_bytes")
    max_message_bytes: int = Field(256 * MIB, ge=4096, description="a larger message part from the detector is "
                                   "dropped (ZeroMQ MAXMSGSIZE), counted as rejected and reported")

    @model_validator(mode="after")
    def _source_given(self) -> Params:
        if self.protocol != "synthetic" and not self.source:
            what = "the file to replay" if self.protocol == "replay" else "the detector's endpoint"
            raise ValueError(f"protocol {self.protocol} needs `source`: {what}")
        return self
