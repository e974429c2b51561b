"""Recordings: a probe result, the kernel events of its window and the sensor's coverage of it, as JSON.

The same shape is `connprobe diagnose --json`'s per-attempt input and the checked-in fixtures that the
rules are tested on. Decoding follows the dataclasses' type hints, so fields added to the record types
round-trip without touching this module.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

from bpf.types import KernelEvent, RemoteEvidence
from correlator.types import KernelCoverage
from prober.types import ProbeResult

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Recording:
    scenario: str
    result: ProbeResult
    events: tuple[KernelEvent, ...]
    coverage: KernelCoverage = dataclasses.field(metadata={"json": "evidence"})  # its key in the files
    budget_ns: int | None = None
    expected_cause: str | None = None
    note: str = ""
    remote: tuple[RemoteEvidence, ...] = ()  # what peer agents answered (cross-node evidence), with their node


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {_key(f): to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj


def _key(f: dataclasses.Field) -> str:
    """A field's JSON key: its name, or the `json` metadata where the file format kept an older name."""
    return f.metadata.get("json", f.name)


def from_jsonable(tp: Any, data: Any) -> Any:
    """Build a value of type `tp` (a dataclass, enum, tuple[..], X | None, primitive) from JSON data."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if data is None:
            return None
        for a in args:
            try:
                return from_jsonable(a, data)
            except (TypeError, ValueError, KeyError):
                continue
        raise ValueError(f"{data!r} fits none of {args}")
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], x) for x in data)
        return tuple(from_jsonable(a, x) for a, x in zip(args, data, strict=True))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise TypeError(f"{tp.__name__} wants an object, got {data!r}")
        hints = typing.get_type_hints(tp)
        kwargs = {f.name: from_jsonable(hints[f.name], data[_key(f)])
                  for f in dataclasses.fields(tp) if f.init and _key(f) in data}
        return tp(**kwargs)
    if tp is float and isinstance(data, int):
        return float(data)
    if tp in (int, str, float, bool) and not isinstance(data, tp):
        raise TypeError(f"{data!r} is not {tp.__name__}")
    return data


def dumps(rec: Recording) -> str:
    return json.dumps({"schema": SCHEMA_VERSION, **to_jsonable(rec)}, indent=1)


def save(path: Path, rec: Recording) -> None:
    """Write a recording readable by its owner only (mode 0600, also when the file exists already): it
    holds a probe's target and error details."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, 0o600)
        f.write(dumps(rec))


def loads(text: str) -> Recording:
    data = json.loads(text)
    if data.pop("schema", None) != SCHEMA_VERSION:
        raise ValueError(f"recording schema is not {SCHEMA_VERSION}")
    return from_jsonable(Recording, data)


def load(path: Path) -> Recording:
    return loads(path.read_text())
