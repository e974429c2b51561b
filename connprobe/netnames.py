"""Names for network-namespace inodes, so a timeline says `cp-1a2b3c-srv1` rather than 4026532481."""

from __future__ import annotations

import os
from pathlib import Path


def netns_names(run_dir: Path = Path("/run/netns")) -> dict[int, str]:
    """Network-namespace inode -> its name under `run_dir` ("host" for this process's own); the lab's list of
    names alone is `connprobe.lab.plumbing.named_netns`."""
    names: dict[int, str] = {}
    try:
        names[os.stat("/proc/self/ns/net").st_ino] = "host"
    except OSError:
        pass
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return names
    for p in entries:
        try:
            names[os.stat(p).st_ino] = p.name
        except OSError:
            continue
    return names
