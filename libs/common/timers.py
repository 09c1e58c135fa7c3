"""Timers on a process's event loop: `after` (once) and `every` (periodic), in place of a source's
`produce` used as a clock. A service arms them; the runtime fires them between frames.

Timers belong to the scan they were armed in: a new epoch (an abort, the next scan) clears them,
as it clears everything else the process held of the old one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

Callback = Callable[[], None]


@dataclass(eq=False)
class Timer:
    due: float
    callback: Callback
    period: float | None = None
    cancelled: bool = field(default=False)

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    def __init__(self) -> None:
        self._timers: list[Timer] = []

    def after(self, delay: float, callback: Callback) -> Timer:
        """Call `callback` once in `delay` seconds. Armed again before it fired, the same callback
        keeps one timer, due at the earlier of the two times (a flush wanted "at the latest then")."""
        due = time.monotonic() + max(0.0, delay)
        for timer in self._timers:
            if timer.callback == callback and timer.period is None and not timer.cancelled:
                timer.due = min(timer.due, due)
                return timer
        timer = Timer(due, callback)
        self._timers.append(timer)
        return timer

    def every(self, period: float, callback: Callback) -> Timer:
        """Call `callback` every `period` seconds, the first time in `period` seconds."""
        timer = Timer(time.monotonic() + period, callback, period)
        self._timers.append(timer)
        return timer

    def due_in(self, now: float) -> float | None:
        """Seconds until the next timer is due (0 when one is), None when none is armed."""
        due = [t.due for t in self._timers if not t.cancelled]
        return max(0.0, min(due) - now) if due else None

    def take_due(self, now: float) -> list[Callback]:
        """The callbacks due now, in the order they fell due; periodic ones are armed again."""
        due = sorted((t for t in self._timers if not t.cancelled and t.due <= now), key=lambda t: t.due)
        for timer in due:
            if timer.period is None:
                timer.cancelled = True
            else:
                timer.due = max(timer.due + timer.period, now)
        self._timers = [t for t in self._timers if not t.cancelled]
        return [t.callback for t in due]

    def clear(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers = []
