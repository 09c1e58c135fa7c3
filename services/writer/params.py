"""The writer stage's parameters (`[stages.NAME.params]` of a pipeline). Light (pydantic and libs only),
so that every process can check every stage's parameters (libs/common/stages.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from libs.common.contracts import WRITER_OUTPUT_DIR


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    output_dir: str = WRITER_OUTPUT_DIR
    flush_interval_s: float = Field(0.25, gt=0, le=60, description="longest time written frames stay unflushed")
    preview_interval_s: float = Field(1.0, gt=0, description="previews to front-ends this often: the latency "
                                      "histogram; crystallography: the aggregates and the latest hit")
    hit_rate_window: int = Field(100, ge=1, description="crystallography: the hit rate is over this many frames")
    reserve_mb: float = Field(64, ge=0, description="free space left on the output file system: below it the "
                              "writer holds frames and waits (HDF5 then seldom meets a full disk mid-write)")
    retry_s: float = Field(1.0, gt=0, le=60, description="how often a write that failed is tried again")
