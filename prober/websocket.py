"""WebSocket probe: the HTTP upgrade, then `query_response` over messages (expect a regex, send text).

The connection is the HTTP prober's aiohttp session (`prober/http.py`): its socket comes from the probe's
source, bound and announced before the SYN (so the kernel sensor watches it, and the correlator judges a
WebSocket probe's packets like an HTTP one's), and the probe's address is the one already resolved. An
`expect` step reads messages until one matches (a close or the deadline fails it); `send` sends a text message
(groups of the last match substituted, as blackbox does).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp

from prober.attempt import Attempt
from prober.env import ProbeEnv
from prober.http import _CTX_CB, _CTX_DEADLINE, _CURRENT, _aiohttp_session, ssl_context
from prober.query import expand
from prober.types import ErrorKind

monotonic_ns = time.monotonic_ns
MAX_MESSAGE = 1 << 20


async def probe_websocket(attempt: Attempt, env: ProbeEnv, deadline_ns: int):
    spec = attempt.spec.module.websocket
    t1 = _CURRENT.set(attempt)
    t2 = _CTX_CB.set(env.on_local_port)
    t3 = _CTX_DEADLINE.set(deadline_ns)
    ws = None
    try:
        async with asyncio.timeout(max(0.0, (deadline_ns - monotonic_ns()) / 1e9)):
            kwargs: dict[str, Any] = {}
            if attempt.target.scheme == "wss":
                kwargs["ssl"] = ssl_context(spec.tls_config)
                if spec.tls_config.server_name:
                    kwargs["server_hostname"] = spec.tls_config.server_name
            headers = {k: v.get_secret_value() for k, v in spec.headers.items()}
            try:
                ws = await _aiohttp_session(env).ws_connect(
                    attempt.target.raw, headers=headers, autoping=True, max_msg_size=MAX_MESSAGE, **kwargs)
            except aiohttp.WSServerHandshakeError as exc:
                attempt.http_status = exc.status
                return attempt.result(ErrorKind.HTTP_STATUS, f"upgrade refused: HTTP {exc.status} {exc.message}")
            hop = attempt.timeline.hops[-1] if attempt.timeline.hops else attempt.timeline.hop()
            attempt.http_status = 101
            failed = await _converse(ws, spec.query_response, hop)
            if failed:
                attempt.failed.append(failed)
            hop.end = monotonic_ns()
            return attempt.result()
    except Exception as exc:
        return attempt.result_of(exc)
    finally:
        _CURRENT.reset(t1)
        _CTX_CB.reset(t2)
        _CTX_DEADLINE.reset(t3)
        if ws is not None:
            await _close(ws)


async def _close(ws: aiohttp.ClientWebSocketResponse) -> None:
    try:
        async with asyncio.timeout(0.2):
            await ws.close()
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass


async def _converse(ws: aiohttp.ClientWebSocketResponse, steps, hop) -> str | None:
    last: re.Match | None = None
    for i, step in enumerate(steps):
        if step.expect is not None:
            pattern = re.compile(step.expect)
            while True:
                msg = await ws.receive()
                if not hop.first_byte:
                    hop.first_byte = monotonic_ns()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    text = msg.data
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    text = msg.data.decode("utf-8", "replace")
                else:  # closed, closing or an error: the expectation cannot be met any more
                    return f"query_response[{i}].expect"
                last = pattern.search(text)
                if last:
                    break
        if step.send is not None:
            if not hop.sent:
                hop.sent = monotonic_ns()
            await ws.send_str(expand(step.send, last))
    return None
