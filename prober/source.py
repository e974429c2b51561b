"""Where a probe runs from, as written in a config, a command line or a query: parsed once, in one place.

    host                     the agent's own network namespace
    netns NAME               /run/netns/NAME, as `ip netns` names it (also written as the path itself)
    /proc/PID/ns/net         the network namespace of a process (e.g. a pod's)

Nothing else is a source: no other path is ever opened. `parse_source` only parses (no file is touched);
`prober.netns.open_netns` opens the file and checks that it is a network namespace before `setns`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["NETNS_RUN_DIR", "SourceSpec", "parse_source"]

NETNS_RUN_DIR = Path("/run/netns")
PID_MAX = 4_194_304  # the kernel's PID_MAX_LIMIT

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
_PROC = re.compile(r"/proc/([1-9][0-9]{0,6})/ns/net")
_FORMS = "'host', 'netns NAME', /run/netns/NAME or /proc/PID/ns/net"


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A parsed source. `kind` is "host", "netns" (a name under /run/netns) or "pid" (/proc/PID/ns/net)."""

    kind: Literal["host", "netns", "pid"]
    name: str = ""  # the namespace's name (kind "netns")
    pid: int = 0  # the process (kind "pid")

    @property
    def path(self) -> Path | None:
        """The namespace file to open (None for the host)."""
        if self.kind == "netns":
            return NETNS_RUN_DIR / self.name
        if self.kind == "pid":
            return Path(f"/proc/{self.pid}/ns/net")
        return None

    @property
    def text(self) -> str:
        """The canonical written form: "host", "netns NAME" or "/proc/PID/ns/net"."""
        if self.kind == "netns":
            return f"netns {self.name}"
        if self.kind == "pid":
            return f"/proc/{self.pid}/ns/net"
        return "host"

    @property
    def label(self) -> str:
        """What results and metrics carry as `source`: "host", the namespace's name, or the /proc path."""
        if self.kind == "netns":
            return self.name
        if self.kind == "pid":
            return f"/proc/{self.pid}/ns/net"
        return "host"

    @property
    def resolv_conf(self) -> Path:
        """The resolv.conf `ip netns exec NAME` would bind-mount, else the host's."""
        if self.kind == "netns":
            candidate = Path("/etc/netns") / self.name / "resolv.conf"
            if candidate.is_file():
                return candidate
        return Path("/etc/resolv.conf")

    def __str__(self) -> str:
        return self.text


HOST = SourceSpec("host")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def parse_source(value: object, *, bare_name: bool = False) -> SourceSpec:
    """A `SourceSpec` from its written form; ValueError (one line, naming the value) otherwise.

    `bare_name=True` also takes a bare namespace name (`connprobe diagnose --from NAME`).
    """
    if isinstance(value, SourceSpec):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be {_FORMS}, got {_shown(value)}")
    text = value.strip()
    if text in ("", "host"):
        return HOST
    name = None
    if text.startswith("netns "):
        name = text[len("netns "):].strip()
    elif text.startswith(f"{NETNS_RUN_DIR}/"):
        name = text[len(f"{NETNS_RUN_DIR}/"):]
    elif bare_name and "/" not in text:
        name = text
    if name is not None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"network namespace name {_shown(name)} may hold only letters, digits, '.', '_' "
                             "and '-' (at most 255, not starting with '.' or '-')")
        return SourceSpec("netns", name=name)
    m = _PROC.fullmatch(text)
    if m and 0 < int(m.group(1)) <= PID_MAX:
        return SourceSpec("pid", pid=int(m.group(1)))
    raise ValueError(f"must be {_FORMS}, got {_shown(value)}")
