"""Where probes come from: target sources, apart from the agent's pipeline that runs what they give.

A target source (`TargetSource`) says what to probe now — a `connprobe.config.Config`: modules and probe specs —
and tells when that may have changed. The agent (`connprobe/agent.py`) asks it once at start-up and again on
every reload; a reload applies all of what `load()` returns or none of it. The first source is the static config
file (`ConfigFile`, watched for changes when asked).

To add a target source: a module here with a class that has `describe`, `start()`, `load()` and `watch(changed)`
(`connprobe/targets/source.py` says what each must do); its tests next to `tests/agent/test_config_watch.py`;
its line in docs/architecture.md. `load()` returns whole probe specs (name, module, target, source, labels) and
raises `ConfigError` with one line per problem; `watch()` awaits `changed()` when `load()` would give something
new, and never raises for a passing problem (it logs and keeps the last state).
"""

from connprobe.targets.file import ConfigFile
from connprobe.targets.source import TargetSource

__all__ = ["ConfigFile", "TargetSource"]
