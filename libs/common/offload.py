"""Heavy work off the event loop: one worker thread per process runs a service's hooks (a batch
of frames, a scan header, a timer's solver step) while the loop thread keeps answering the handler,
heartbeats included. A process busy for seconds is then still seen alive, and a real death is
found after `liveness` heartbeats instead of a margin wide enough for the slowest frame.

The worker thread touches no socket: what a hook sends is put off (`defer`) and sent by the loop
thread once the hook returns, in the order it was asked for. Completion wakes the loop through an
inproc socket it polls.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any, Callable

import zmq

_names = itertools.count(1)


class Offload:
    def __init__(self, context: zmq.Context) -> None:
        address = f"inproc://surveyor-offload-{next(_names)}"
        self.wake = context.socket(zmq.PAIR)
        self.wake.bind(address)
        self._done = context.socket(zmq.PAIR)
        self._done.connect(address)
        self._jobs: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._result: tuple[Any, BaseException | None] = (None, None)
        self._effects: list[Callable[[], None]] = []
        self.busy = False
        self._thread = threading.Thread(target=self._work, name="hooks", daemon=True)
        self._thread.start()

    def start(self, job: Callable[[], Any]) -> None:
        self.busy = True
        self._jobs.put(job)

    def finish(self) -> Any:
        """The job's result (its exception raised here), once `wake` is readable."""
        self.wake.recv()
        self.busy = False
        result, error = self._result
        self._result = (None, None)
        if error is not None:
            raise error
        return result

    def in_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def defer(self, effect: Callable[[], None]) -> None:
        self._effects.append(effect)

    def effects(self) -> list[Callable[[], None]]:
        """What the finished job asked to send, in order; taken once."""
        effects, self._effects = self._effects, []
        return effects

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._result = (job(), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the loop thread
                self._result = (None, exc)
            self._done.send(b"")
        self._done.close(linger=0)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
        self.wake.close(linger=0)
