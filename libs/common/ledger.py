"""The delivery ledger of one process: nothing is acknowledged until it is safe.

An input frame is acknowledged to its producer once the process no longer holds it (`hold`,
`release`: not on disk yet, not checkpointed) and every frame derived from it has been
acknowledged downstream (chained acknowledgements). The ledger keeps, per frame, the holds, the
children still in flight and every producer that sent it (more than one when a producer thought
dead, only stalled, sends it too), and drops all of it at a new epoch.
"""

from __future__ import annotations

from typing import Callable, Iterable

from libs.common.frames import FrameKey

Token = tuple[str, FrameKey]
"""A frame being worked on: (producer stage, (epoch, frame)). It names the frame, not the link it
came by: when a producer re-sends a frame this process still holds (after a reconnection, or from
a successor of a dead producer), the hold and the pending children carry over to the new copy."""


class Ledger:
    def __init__(self, ack: Callable[[str, FrameKey], None]) -> None:
        self._ack = ack
        self._children: dict[Token, int] = {}
        self._on_hold: set[Token] = set()
        self._producers: dict[Token, set[str]] = {}
        self._seen: dict[str, set[int]] = {}

    def arrived(self, producer: str, stage: str, key: FrameKey) -> tuple[Token, bool, bool]:
        """A frame came from `producer`: its token, whether this process took it before, and (for
        a duplicate) whether the first copy is still being made safe here."""
        token = (stage, key)
        seen = self._seen.setdefault(stage, set())
        if key[1] not in seen:
            seen.add(key[1])
            self._producers[token] = {producer}
            return token, False, False
        self._producers.setdefault(token, set()).add(producer)
        return token, True, self.pending(token)

    def pending(self, token: Token) -> bool:
        return token in self._on_hold or bool(self._children.get(token))

    def hold(self, token: Token) -> None:
        self._on_hold.add(token)

    def release(self, token: Token) -> None:
        self._on_hold.discard(token)
        if not self._children.get(token):
            self.acknowledge(token)

    def derived(self, parents: Iterable[Token], children: int) -> None:
        """`children` frames derived from each of `parents` went downstream."""
        for token in parents:
            self._children[token] = self._children.get(token, 0) + children

    def delivered(self, parents: Iterable[Token]) -> None:
        """One child of each of `parents` was acknowledged downstream."""
        for parent in parents:
            left = self._children.get(parent)
            if left is None:
                continue
            if left > 1:
                self._children[parent] = left - 1
            else:
                del self._children[parent]
                if parent not in self._on_hold:
                    self.acknowledge(parent)

    def settle(self, token: Token) -> None:
        """A frame's hook returned: acknowledge it unless it is held or has children in flight."""
        if not self.pending(token):
            self._children.pop(token, None)
            self.acknowledge(token)

    def acknowledge(self, token: Token) -> None:
        for producer in self._producers.pop(token, ()):
            self._ack(producer, token[1])

    def new_epoch(self, epoch: int) -> None:
        """Forget every frame of an earlier epoch, and which frame numbers were seen."""
        self._children = {t: n for t, n in self._children.items() if t[1][0] >= epoch}
        self._on_hold = {t for t in self._on_hold if t[1][0] >= epoch}
        self._producers = {t: p for t, p in self._producers.items() if t[1][0] >= epoch}
        self._seen.clear()
