"""blackbox_exporter's `query_response` over a byte stream: steps of expect (a regex a line must match), send
(a line, "${1}"-style groups of the last match substituted) and starttls, in order.

As blackbox does: `expect` reads line by line until one matches (end of stream: the step fails); `send` writes
its text and a newline. `converse` returns the validator name of the step that failed, or None.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time

from prober.spec import QueryStep

MAX_LINE = 65536
_GROUP = re.compile(r"\$\{(\w+)\}|\$(\d+)")


def expand(text: str, m: re.Match | None) -> str:
    """`text` with ${1} / ${name} / $1 replaced by the last expect's groups (missing: empty)."""
    if m is None:
        return text

    def one(g: re.Match) -> str:
        key = g.group(1) or g.group(2)
        try:
            value = m.group(int(key) if key.isdigit() else key)
        except IndexError:
            value = None
        return value or ""

    return _GROUP.sub(one, text)



async def converse(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    steps: tuple[QueryStep, ...],
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    on_first_byte=None,
) -> str | None:
    last: re.Match | None = None
    for i, step in enumerate(steps):
        if step.expect is not None:
            pattern = re.compile(step.expect)
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    line = exc.partial
                    if not line:
                        return f"query_response[{i}].expect"
                except asyncio.LimitOverrunError:
                    return f"query_response[{i}].expect"
                if on_first_byte is not None:
                    on_first_byte(time.monotonic_ns())
                    on_first_byte = None
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                last = pattern.search(text)
                if last:
                    break
        if step.send is not None:
            writer.write(expand(step.send, last).encode() + b"\n")
            await writer.drain()
        if step.starttls:
            if tls is None:
                tls = ssl.create_default_context()
            await writer.start_tls(tls, server_hostname=server_hostname)
    return None
