"""Pipeline graph files (`pipelines/*.toml`): the model, `--set` overrides and validation.

A pipeline names its stages, the service each runs, how many processes, which stages feed it and
how (`delivery = "all"` for every frame with back-pressure, `"latest"` for live views that
prefer fresh data), and which frames of a scan (`frames = "darks"`, the scan's first `n_dark`,
or `"data"`, the rest: the producer routes them). Everything is checked on load, and an error
names the file, the key and what is expected, because the person reading it is at a beamline
with a scan waiting.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from libs.common import security
from libs.common.errors import PipelineError
from libs.common.messages import ScanId, Strict, describe
from libs.common.security import Keys
from libs.common.stages import params_model

PIPELINES_DIR = Path(__file__).resolve().parents[2] / "pipelines"


class HandlerConfig(Strict):
    command: str = "tcp://127.0.0.1:5550"
    status: str = "tcp://127.0.0.1:5551"
    data_host: str = Field("127.0.0.1", description="address services bind their ports on")
    heartbeat_s: float = Field(1.0, gt=0, le=30)
    liveness: int = Field(3, ge=1, le=10, description="heartbeats missed before a process is declared dead")
    scan_end_timeout_s: float = Field(30.0, gt=0)
    state_dir: str = Field("state", description="the handler's journal and the stages' checkpoints "
                           "(shared storage when stages run on several hosts)")


class SecurityConfig(Strict):
    keys: str = Field("", description="key directory (libs/common/security.py): CURVE on every socket, only "
                      "the allow-list's clients let in; relative to the pipeline file; $SURVEYOR_KEYS overrides it")


class StageConfig(Strict):
    service: str
    processes: int = Field(1, ge=1, le=64)
    inputs: list[str] = Field(default_factory=list)
    delivery: Literal["all", "latest"] = "all"
    frames: Literal["all", "darks", "data"] = Field(
        "all", description="which frames of a scan this stage takes: its first n_dark, the rest, or all")
    queue: int = Field(2, ge=1, le=1000, description="frames kept on a `latest` edge")
    credit: int = Field(2, ge=1, le=64, description="frames a process may hold per producer")
    params: dict[str, Any] = Field(default_factory=dict)


class Simulation(Strict):
    """The built-in simulated detector that `surveyor run --simulate` drives: the receiver's own
    synthetic source, or else a virtual detector (`surveyor simulate KIND`) bound where the
    receiver connects, streaming in the receiver's protocol."""

    kind: Literal["synthetic", "ptycho", "sx"] = "synthetic"
    params: dict[str, Any] = Field(default_factory=dict, description="the generator's parameters")
    frames: int = Field(100, ge=1)
    rate_hz: float = Field(0.0, ge=0, description="0 = as fast as the pipeline takes")
    scan_id: ScanId = ScanId("sim")
    technique: Literal["ptychography", "crystallography", "raw"] = "raw"
    shape: tuple[int, int] = (256, 256)
    dtype: Literal["uint8", "uint16", "uint32", "float32"] = "uint16"


class Pipeline(Strict):
    name: str = ""
    identity: str = Field("", description="digest of the pipeline as loaded: a service registers only "
                          "with the handler of its own pipeline")
    directory: str = Field("", description="the pipeline file's folder: a relative path in a stage's "
                           "parameters (a Processing class's file) is taken from it")
    handler: HandlerConfig = HandlerConfig()
    security: SecurityConfig = SecurityConfig()
    stages: dict[str, StageConfig]
    simulation: Simulation = Simulation()

    @model_validator(mode="after")
    def _graph(self) -> Pipeline:
        if not self.stages:
            raise ValueError("a pipeline needs at least one stage under [stages.NAME]")
        for name, stage in self.stages.items():
            for source in stage.inputs:
                if source not in self.stages:
                    raise ValueError(f"stages.{name}.inputs names {source!r}, which is not a stage; "
                                     f"stages are {sorted(self.stages)}")
        _ = self.topological_order  # computing the order raises on a cycle
        return self

    @cached_property
    def topological_order(self) -> list[str]:
        """Stages with their inputs before them (Kahn's algorithm); ValueError on a cycle."""
        waiting = {name: set(stage.inputs) for name, stage in self.stages.items()}
        order: list[str] = []
        while waiting:
            ready = sorted(name for name, inputs in waiting.items() if not inputs)
            if not ready:
                raise ValueError(f"the stages {sorted(waiting)} feed each other in a cycle")
            for name in ready:
                del waiting[name]
                order.append(name)
            for inputs in waiting.values():
                inputs.difference_update(ready)
        return order

    def downstream(self, stage: str) -> dict[str, StageConfig]:
        return {name: s for name, s in self.stages.items() if stage in s.inputs}

    def share(self, stage: str) -> str:
        """Which frames of a scan reach `stage` ("all", "darks" or "data"): its own `frames`
        within what its inputs pass on (a source takes all; darks and data together are all)."""
        config = self.stages[stage]
        passed = {self.share(name) for name in config.inputs} or {"all"}
        taken = "all" if "all" in passed or passed >= {"darks", "data"} else passed.pop()
        return taken if config.frames == "all" else config.frames

    def sources(self) -> list[str]:
        return [name for name, s in self.stages.items() if not s.inputs]

    def params(self, stage: str) -> BaseModel:
        """The parameters of `stage`, validated by its service's model once per pipeline object
        (`services/<service>/params.py`: light, so every process checks every stage's)."""
        config = self.stages[stage]
        cache = self.__dict__.setdefault("_validated", {})  # shared by copies: keyed by the values
        key = (config.service, json.dumps(config.params, sort_keys=True, default=str))
        if key not in cache:
            cache[key] = params_model(config.service).model_validate(config.params)
        return cache[key]

    def keys(self) -> Keys | None:
        """The CURVE keys this host's processes use: $SURVEYOR_KEYS, else `[security] keys`."""
        named = self.security.keys
        return security.configured(Path(self.directory or ".", named) if named else None)

    @property
    def state_path(self) -> Path:
        """This pipeline's own folder under `state_dir` (two pipelines never share one)."""
        port = self.handler.command.rsplit(":", 1)[-1]
        return Path(self.handler.state_dir) / f"{self.name or 'pipeline'}-{port}"


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise PipelineError(f"--set {dotted}: {key!r} is a value, not a table")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE read as TOML; a bare word that is not TOML is taken as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise PipelineError(f"--set {text!r}: expected KEY=VALUE, e.g. stages.writer.params.output_dir=\"/data\"")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def resolve(path: str | Path) -> Path:
    """A pipeline path, or the bare name of a shipped pipeline (`ptychography`)."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    shipped = PIPELINES_DIR / f"{candidate.stem}.toml"
    if candidate.suffix in ("", ".toml") and shipped.exists():
        return shipped
    raise PipelineError(f"{path}: no such pipeline file; shipped pipelines are "
                        f"{sorted(p.stem for p in PIPELINES_DIR.glob('*.toml'))}")


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read, override and validate a pipeline file, stage parameters included."""
    file = resolve(path)
    try:
        tree = tomllib.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{file}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{file}: not valid TOML: {exc}") from None
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    tree.setdefault("directory", str(file.parent.resolve()))
    return from_dict(tree, origin=str(file))


def from_dict(tree: dict[str, Any], *, origin: str = "<pipeline>") -> Pipeline:
    tree = copy.deepcopy(tree)
    tree.setdefault("name", Path(origin).stem)
    graph = {key: value for key, value in tree.items() if key != "security"}  # each host may keep its keys elsewhere
    tree.setdefault("identity", hashlib.sha256(json.dumps(graph, sort_keys=True, default=str).encode()).hexdigest()[:16])
    try:
        pipeline = Pipeline.model_validate(tree)
    except ValidationError as exc:
        raise PipelineError(f"{origin}: {describe(exc)}") from None
    for name, stage in pipeline.stages.items():
        try:
            pipeline.params(name)
        except LookupError:
            raise PipelineError(f"{origin}: stages.{name}.service = {stage.service!r} is not a "
                                f"Surveyor service (a package services/<name>/ with params.py and service.py)") from None
        except ValidationError as exc:
            raise PipelineError(f"{origin}: stages.{name}.params: {describe(exc)}") from None
    return pipeline


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
