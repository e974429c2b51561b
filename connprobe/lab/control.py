"""The lab servers' control channel: one JSON object per line over a Unix socket.

A Unix socket bound to a path is reachable from every network namespace, so the test process steers
servers that live inside the lab's namespaces without sending a packet through the lab itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(RuntimeError):
    """A lab server refused a control request or could not be reached."""


async def serve(path: Path, handler: Handler) -> asyncio.AbstractServer:
    """Answer control requests at `path`; `handler` gets the request and returns the reply."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = await handler(json.loads(line))
                except Exception as exc:  # reported to the caller, who raises it
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    if path.exists():
        path.unlink()
    server = await asyncio.start_unix_server(on_client, path=str(path))
    os.chmod(path, 0o600)
    return server


def request(path: Path, op: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """Send one request and return the reply; raises ControlError on failure."""
    msg = json.dumps({"op": op, **args}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(msg)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        raise ControlError(f"lab control {path}: {exc}") from exc
    if not buf:
        raise ControlError(f"lab control {path}: no reply to {op!r}")
    reply = json.loads(buf)
    if "error" in reply:
        raise ControlError(f"lab control {path}: {op}: {reply['error']}")
    return reply
