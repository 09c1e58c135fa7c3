"""One log file per service process, one line per event, the service name on every line.

Only entry points (`__main__`, the CLI) call `configure`; modules just use
`logging.getLogger(__name__)`. `tail -f logs/writer.1.log` is how an operator watches a service.
`surveyor run` gives each run a directory of its own under the log root (`run_dir`), so two
pipelines side by side, or one run after another, never write into the same files.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from pathlib import Path

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(service)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
RUN_NAME = re.compile(r"-(\d{8}-\d{6})(?:-(\d+))?$")
"""A run directory's name ends in its start time (and a number when two started in one second)."""


def log_dir() -> Path:
    """Where every service writes its log: $SURVEYOR_LOG_DIR, else ./logs."""
    return Path(os.environ.get("SURVEYOR_LOG_DIR", "logs"))


def log_path(service: str) -> Path:
    return log_dir() / f"{service}.log"


def run_dir(pipeline: str) -> Path:
    """A new directory `<log root>/<pipeline>-<YYYYmmdd-HHMMSS>` for one run's logs (a suffix
    `-2`, `-3`... when a run of the same pipeline started in the same second)."""
    stem = log_dir() / f"{pipeline or 'pipeline'}-{time.strftime('%Y%m%d-%H%M%S')}"
    for number in itertools.count(1):
        path = stem if number == 1 else stem.with_name(f"{stem.name}-{number}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue


def newest_run(root: Path | None = None) -> Path | None:
    """The most recently started run directory under the log root, by the start time in its name
    (None: no run there yet)."""
    root = log_dir() if root is None else root
    runs = [(match.group(1), int(match.group(2) or 1), path) for path in root.glob("*-*")
            if path.is_dir() and (match := RUN_NAME.search(path.name))]
    return max(runs, default=(None, None, None))[2]


class _ServiceName(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        return True


def configure(service: str, *, level: int = logging.INFO) -> Path:
    """Send this process's logging to its own file (appending, so restarts keep history)."""
    path = log_path(service)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(_ServiceName(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return path
