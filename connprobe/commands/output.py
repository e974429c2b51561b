"""The one home of `-o text|json|yaml` for every command that prints data: the option itself and the printing of
a document (a JSON-able dict) as json or yaml. Text stays each command's own printing and the default."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

FORMATS = ("text", "json", "yaml")


def add_output_option(p: argparse.ArgumentParser, what: str = "the same data as a document") -> None:
    p.add_argument("-o", "--output", choices=list(FORMATS), default=None,
                   help=f"text (default), json or yaml ({what})")


def output_format(args: argparse.Namespace) -> str:
    return getattr(args, "output", None) or "text"


def write_document(doc: Any, fmt: str, out: TextIO | None = None) -> None:
    """`doc` as `fmt` ("json": indented one space; "yaml": block style, keys in the document's order)."""
    out = out or sys.stdout
    if fmt == "json":
        out.write(json.dumps(doc, indent=1) + "\n")
    elif fmt == "yaml":
        import yaml

        out.write(yaml.safe_dump(doc, sort_keys=False))
    else:
        raise ValueError(f"output format {fmt!r}: not a document format")
    out.flush()
