"""One log file per service process, one line per event, the service name on every line.

Only entry points (`__main__`, the CLI) call `configure`; modules just use
`logging.getLogger(__name__)`. `tail -f logs/writer.1.log` is how an operator watches a service.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(service)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


def log_dir() -> Path:
    """Where every service writes its log: $SURVEYOR_LOG_DIR, else ./logs."""
    return Path(os.environ.get("SURVEYOR_LOG_DIR", "logs"))


def log_path(service: str) -> Path:
    return log_dir() / f"{service}.log"


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
