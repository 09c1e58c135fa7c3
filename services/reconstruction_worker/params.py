"""The reconstruction stage's parameters (`[stages.NAME.params]` of a pipeline). Light (pydantic and libs only),
so that every process can check every stage's parameters (libs/common/stages.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    beta: float = Field(0.8, gt=0, le=1, description="RAAR relaxation (1 = difference map)")
    iterations: int = Field(10, ge=0, le=10000, description="RAAR iterations after the last frame, from free "
                            "space: the start for ML, which does the rest (on the quality matrix 10 and 40 end "
                            "within 0.0007 NRMSE of each other after ML; RAAR alone levels off by 10)")
    tolerance: float = Field(1e-5, ge=0, description="stop early when the exit-wave change is below this")
    ml_iterations: int = Field(100, ge=0, le=10000, description="maximum-likelihood refinement steps after those "
                               "(ml.py); 0 leaves them out")
    ml_budget_s: float = Field(30.0, gt=0, description="the ML steps stop once they have taken this long (the "
                               "result records how many ran)")
    smoothness: float = Field(0.02, ge=0, description="the ML refinement's smoothness prior, relative to the "
                              "data at 1e6 photons per frame (ml.py)")
    min_frames: int = Field(8, ge=1, description="frames needed before the first iteration")
    probe_fraction: float = Field(1.0, ge=0, le=1, description="refine the probe once this part of the scan is in")
    preview_interval_s: float = Field(3.0, gt=0)
    idle_s: float = Field(30.0, gt=0, description="finish with the frames received after this long without one")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="where the solver runs: a CUDA GPU through "
                                                 "CuPy when one is found (auto), or always the CPU, or only a GPU")
    threads: int = Field(0, ge=0, le=64, description="FFT threads; 0: one while frames arrive (the other stages "
                         "need the cores), every core once the last is in")
    checkpoint_interval_s: float = Field(0.5, gt=0, le=60, description="frames are saved (then acknowledged) "
                                         "at least this often")
    checkpoint_frames: int = Field(64, ge=1, le=100_000, description="or as soon as this many wait")
    state_interval_s: float = Field(5.0, gt=0, description="the solver's object and probe are saved this often")
