"""What this connprobe is: its version (from the installed package's metadata) and the build facts that
`connprobe --version` prints and `connprobe_build_info` exports."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

__all__ = ["build_labels", "version", "version_text"]


@functools.cache
def version() -> str:
    try:
        return metadata.version("connprobe")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_labels() -> dict[str, str]:
    """The labels of `connprobe_build_info` (blackbox_exporter's `blackbox_exporter_build_info` has the like)."""
    return {"version": version(), "python": platform.python_version(),
            "implementation": platform.python_implementation(), "arch": platform.machine() or "unknown"}


def version_text() -> str:
    b = build_labels()
    return f"connprobe {b['version']} ({b['implementation']} {b['python']}, {platform.system().lower()}/{b['arch']})"
