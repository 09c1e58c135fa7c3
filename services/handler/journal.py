"""The handler's journal: what a handler killed at any moment needs to carry on.

One small JSON file (`<state_dir>/<pipeline>-<port>/handler.json`), replaced atomically (write a
temporary file, fsync, rename) at every change of a scan's state and at most once a second for
the counters. It holds the last epoch handed out (so epochs never repeat), the running scan (its
description, epoch, state, the sources that finished, each process's counters), the processes
that were up (a restarted handler waits for them to register again before it ends a scan), and
the recent scans' records.

Why a journal and not only what the services tell a new handler: the services know their epoch
and scan, but not which of them had finished, what the handler had collected from processes that
died, or the scans before; those live nowhere else.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VERSION = 1


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._failing = False

    def load(self) -> dict[str, Any] | None:
        """The last state written, or None (no journal yet, or one that cannot be read)."""
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.error("journal %s cannot be read (%s); starting from an empty state", self.path, exc)
            return None
        if not isinstance(state, dict) or state.get("version") != VERSION:
            logger.error("journal %s is not a version %d journal; starting from an empty state", self.path, VERSION)
            return None
        return state

    def save(self, state: dict[str, Any]) -> bool:
        """Write `state`; a failure is logged once per run of failures, and the handler goes on."""
        temporary = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "w") as handle:
                json.dump({"version": VERSION, **state}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            if not self._failing:
                logger.error("cannot write the journal %s (%s): a handler restarted now would forget the "
                             "running scan; free space or fix the permissions of %s",
                             self.path, exc, self.path.parent)
            self._failing = True
            return False
        if self._failing:
            logger.info("journal %s written again", self.path)
        self._failing = False
        return True
