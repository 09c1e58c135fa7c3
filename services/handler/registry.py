"""The handler's table of service processes: registration, heartbeats, death, topology.

A process is declared dead when it has been silent for `liveness` heartbeat intervals (3 x 1 s
by default) or when it says goodbye. Dead entries stay in the topology for a while so every
producer hears of the death and re-sends what the dead process held; their last counters are
kept in the stage totals.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from libs.common.messages import ServiceIdentity, ServiceInfo, ServiceStats, TopologyArgs

logger = logging.getLogger(__name__)

FORGET_DEAD_AFTER_S = 120.0
STAGE_SUMS = ("frames_in", "frames_out", "busy_s", "queue_depth", "rejected", "duplicates", "dropped")


@dataclass
class Member:
    identity: ServiceIdentity
    last_seen: float
    stats: ServiceStats = field(default_factory=ServiceStats)
    dead_since: float | None = None
    cause: str = ""

    @property
    def alive(self) -> bool:
        return self.dead_since is None

    def info(self) -> ServiceInfo:
        return ServiceInfo(**self.identity.model_dump(), state="up" if self.alive else "dead")


class Registry:
    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.version = 0
        self._retired: dict[str, dict[str, float]] = {}

    def register(self, identity: ServiceIdentity) -> Member:
        member = Member(identity, time.monotonic())
        self.members[identity.instance] = member
        self.version += 1
        return member

    def heartbeat(self, instance: str, stats: ServiceStats) -> bool:
        member = self.members.get(instance)
        if member is None or not member.alive:
            return False
        member.last_seen = time.monotonic()
        member.stats = stats
        return True

    def seen(self, instance: str) -> None:
        member = self.members.get(instance)
        if member is not None and member.alive:
            member.last_seen = time.monotonic()

    def mark_dead(self, instance: str, cause: str) -> Member | None:
        member = self.members.get(instance)
        if member is None or not member.alive:
            return None
        member.dead_since = time.monotonic()
        member.cause = cause
        retired = self._retired.setdefault(member.identity.stage, dict.fromkeys(STAGE_SUMS, 0.0))
        for key in STAGE_SUMS:
            if key != "queue_depth":
                retired[key] += getattr(member.stats, key)
        self.version += 1
        return member

    def expire(self, timeout_s: float) -> list[Member]:
        """Declare dead every process silent for longer than `timeout_s`; forget old deaths."""
        now = time.monotonic()
        dead = []
        for instance, member in list(self.members.items()):
            if member.alive and now - member.last_seen > timeout_s:
                self.mark_dead(instance, f"missed heartbeats for {now - member.last_seen:.1f} s")
                dead.append(member)
            elif not member.alive and now - member.dead_since > FORGET_DEAD_AFTER_S:
                del self.members[instance]
        return dead

    def up(self, stage: str | None = None) -> list[Member]:
        return [m for m in self.members.values() if m.alive and (stage is None or m.identity.stage == stage)]

    def topology(self) -> TopologyArgs:
        return TopologyArgs(version=self.version, services=[m.info() for m in self.members.values()])

    def stage_totals(self, stage: str) -> dict[str, float]:
        totals = dict(self._retired.get(stage, dict.fromkeys(STAGE_SUMS, 0.0)))
        for member in self.up(stage):
            for key in STAGE_SUMS:
                totals[key] += getattr(member.stats, key)
        totals["processes"] = len(self.up(stage))
        return totals
