"""The hit server's parameters (`[stages.NAME.params]` of a pipeline). Light (pydantic and libs only),
so that every process can check every stage's parameters (libs/common/stages.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    endpoint: str = Field("tcp://127.0.0.1:12322", description="where indexers connect (OM's default port, "
                          "loopback: bind tcp://*:PORT for indexers on other hosts)")
    curve: bool = Field(True, description="with the pipeline's keys, indexers connect with CURVE; false serves them "
                        "plain, for CrystFEL's indexamajig, which speaks no CURVE (keep the endpoint on loopback)")
    buffer: int = Field(20, ge=1, le=1000, description="newest hits kept, and requests waiting")
    flatfield: bool = Field(True, description="as the peak stage: apply the detector's flatfield unless it did")
