"""The static config file as a target source: the probes of one YAML file (`connprobe/config.py`), reloaded when
the file changes (`connprobe/configwatch.py`, ConfigMap volumes included) if watching is on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connprobe.config import Config, load_config
from connprobe.configwatch import ConfigWatcher
from connprobe.targets.source import Changed


class ConfigFile:
    """The probes of the config file at `path`; `watch=True`: a new version of the file calls `changed()`
    (`watch_options` go to `ConfigWatcher`: poll_interval, debounce, use_inotify ...)."""

    def __init__(self, path: str | Path, *, watch: bool = False, watch_options: dict[str, Any] | None = None):
        self.path = Path(path)
        self.watcher: ConfigWatcher | None = None
        self._changed: Changed | None = None
        if watch:
            self.watcher = ConfigWatcher(self.path, self._on_change, **(watch_options or {}))

    @property
    def describe(self) -> str:
        return str(self.path)

    async def start(self) -> None:
        if self.watcher is not None:  # before the load: a change in between differs from it at the next check
            await self.watcher.prime()

    def load(self) -> Config:
        return load_config(self.path)

    async def watch(self, changed: Changed) -> None:
        if self.watcher is None:
            return
        self._changed = changed
        await self.watcher.run()

    async def _on_change(self) -> object:
        return await self._changed() if self._changed is not None else None
