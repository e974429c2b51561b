"""The command line the lab's scenario runners share (`python -m connprobe.lab.scenarios`, `... .twonode`):
`record DIR [SCENARIO...]` writes one recording per scenario into DIR, `matrix TRIALS [SCENARIO...]` runs each
scenario TRIALS times per address family; naming scenarios keeps only those."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_N = TypeVar("_N", bound=_Named)


@dataclass(frozen=True, slots=True)
class RunArgs:
    mode: str  # "record" or "matrix"
    arg: str  # record: the directory; matrix: the number of trials
    only: frozenset[str]  # the scenarios named (empty: all)

    def selected(self, scenarios: Iterable[_N]) -> list[_N]:
        return [sc for sc in scenarios if not self.only or sc.name in self.only]

    def record_dir(self) -> Path:
        out = Path(self.arg)
        out.mkdir(parents=True, exist_ok=True)
        return out


def parse_run_args(argv: list[str], module: str) -> RunArgs | None:
    """The arguments, or None after printing the usage line (naming `module`) to stderr."""
    if len(argv) < 2 or argv[0] not in ("record", "matrix"):
        print(f"usage: python -m {module} record DIR [SCENARIO...] | matrix TRIALS [SCENARIO...]", file=sys.stderr)
        return None
    return RunArgs(argv[0], argv[1], frozenset(argv[2:]))
