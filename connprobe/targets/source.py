"""The interface of a target source: a source of probe specs that can change over time (see the package
docstring for how to add one)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from connprobe.config import Config

Changed = Callable[[], Awaitable[object]]


class TargetSource(Protocol):
    """What to probe, now and as it changes."""

    @property
    def describe(self) -> str:
        """Where the probes come from, as log lines and the status page name it (e.g. the config file's path)."""
        ...

    async def start(self) -> None:
        """Called once before the first `load()`: take the state that load will read as the one running (a
        file's version, a cluster's first list), so a change in between is seen by `watch`."""
        ...

    def load(self) -> Config:
        """The modules and probes to run now; `ConfigError` (one line per problem) when they are invalid. May
        block (the agent calls it off the event loop on reload)."""
        ...

    async def watch(self, changed: Changed) -> None:
        """Until cancelled: await `changed()` (the agent's reload) whenever `load()` may give something new. A
        source that does not change returns at once."""
        ...
