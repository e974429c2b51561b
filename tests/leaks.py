"""What the fuzz and hostile-input tests share: the fixed fuzzing seed, a count of open file descriptors, and a
handler that collects ERROR log records."""

from __future__ import annotations

import logging
import os

# Fixed by default, so a CI failure replays as it is; CONNPROBE_FUZZ_SEED explores other examples.
FUZZ_SEED = int(os.environ.get("CONNPROBE_FUZZ_SEED", "20261130"))


def open_fds() -> int:
    """File descriptors this process holds now."""
    return len(os.listdir("/proc/self/fd"))


class ErrorRecords(logging.Handler):
    """Collects every ERROR (or worse) record logged while it is installed."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
