"""The agent's local diagnose channel: `connprobe diagnose` on a node where an agent runs asks that agent, whose
kernel sensor is already attached, to run its attempts, instead of loading a sensor of its own (compiling and
attaching the BPF programs is most of a standalone diagnose's time).

    connprobe diagnose ──request (one JSON line)──► Unix socket /run/connprobe/diagnose.sock ──► agent
                       ◄──one JSON line per attempt (the Diagnosis and its window's events), then "done"──

- Local and authenticated: a Unix stream socket, mode 0600 (its directory is made 0700 when missing, and must
  not be writable by others), so only its owner (root) can connect; and the agent asks the kernel who
  connected (SO_PEERCRED) and answers anyone but root or its own user with one `refused` line and nothing
  else. The command, in turn, trusts answers only from a root process (SO_PEERCRED on its side).
- The request is checked as hostile input (`DiagnoseRequest`: known fields, bounded values, one line of at
  most 64 KiB); a bad one gets one `error` line naming the field. The target is parsed by the same
  `connprobe.diagnosis.target_spec` as a standalone diagnose, so a usage error reads the same.
- The agent answers `unavailable` (and the command then runs standalone, with the same output) when its
  sensor is not attached, when it dropped a capability the target needs (a `--from` namespace needs
  CAP_SYS_ADMIN, an ICMP echo CAP_NET_RAW), or when `MAX_CLIENTS` diagnoses are running already.
- Attempts run on the agent's own `ProbeEnv` and `KernelWatch` (`connprobe.diagnosis.attempts`), so a verdict
  is the one a standalone diagnose would give; each is sent as soon as it is judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bpf.types import KernelEvent
from connprobe.diagnosis import Diagnosis, UsageError, attempts, duration_arg, target_spec
from correlator.join import GRACE_NS
from correlator.record import from_jsonable, to_jsonable
from prober.redact import redact_url

if TYPE_CHECKING:
    from connprobe.agent import Agent

__all__ = ["DEFAULT_SOCKET", "AgentUnavailable", "ChannelError", "DiagnoseChannel", "DiagnoseRequest",
           "attempts_via_agent", "default_socket"]

log = logging.getLogger("connprobe.agent")

DEFAULT_SOCKET = Path("/run/connprobe/diagnose.sock")
MAX_REQUEST = 64 * 1024  # bytes of the request line
MAX_REPLY = 64 * 1024 * 1024  # bytes of one attempt's line (its window's events included)
MAX_CLIENTS = 4
REQUEST_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 1.0
PROTOCOL = 1


def default_socket() -> Path:
    """The channel's path: $CONNPROBE_DIAGNOSE_SOCKET, else /run/connprobe/diagnose.sock."""
    return Path(os.environ.get("CONNPROBE_DIAGNOSE_SOCKET") or DEFAULT_SOCKET)


class ChannelError(Exception):
    """The agent cannot serve the channel (the message names the path and why)."""


class AgentUnavailable(Exception):
    """No agent answered the request, or it declined it: run standalone. The message says why."""


class DiagnoseRequest(BaseModel):
    """What `connprobe diagnose` asks the agent: its arguments, checked as hostile input."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    v: Literal[1] = PROTOCOL
    target: str = Field(min_length=1, max_length=4096)
    source: str = Field("host", min_length=1, max_length=4096)
    # durations as written on the command line: the agent reads them with `duration_arg`, as diagnose does
    timeout: str = Field("5s", min_length=1, max_length=64)
    client: Literal["aiohttp", "httpx"] = "aiohttp"
    ip_policy: Literal["first", "all", "ipv4", "ipv6"] = "first"
    qtype: str = Field("A", min_length=1, max_length=16)
    count: int = Field(1, ge=1, le=100_000)
    interval: str = Field("0s", min_length=1, max_length=64)
    budget: str | None = Field(None, min_length=1, max_length=64)


def parse_request(line: bytes) -> DiagnoseRequest:
    """The request in one line of JSON; ValueError with one line naming what is wrong."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"request: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("request: must be a JSON object")
    try:
        return DiagnoseRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "request"
        raise ValueError(f"request: field {where!r}: {err['msg']}") from None


def peer_credentials(writer: asyncio.StreamWriter) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of a Unix socket, as the kernel knows it."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", raw)


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class DiagnoseChannel:
    """The agent's end: `await start()` listens on `path`, `await close()` stops and removes the socket.
    `mode` is the socket file's mode (0600; tests widen it to show the peer check refuses on its own)."""

    def __init__(self, agent: Agent, path: Path, *, mode: int = 0o600, max_clients: int = MAX_CLIENTS):
        self.agent = agent
        self.path = Path(path)
        self.mode = mode
        self.max_clients = max_clients
        self.served = 0  # requests answered with attempts
        self.refused = 0  # callers turned away by the peer check
        self.declined = 0  # answered `unavailable` or `error`
        self._running = 0
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        path = self.path
        try:
            if not path.parent.exists():
                path.parent.mkdir(mode=0o700, parents=True)
            parent = path.parent.stat()
            if parent.st_mode & 0o022 or parent.st_uid not in (0, os.geteuid()):
                raise ChannelError(f"{path.parent} is writable by others (or not ours): someone could put "
                                   "their own socket there")
            if path.is_symlink() or path.exists():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise ChannelError(f"{path} exists and is not a socket")
                if _listening(path):
                    raise ChannelError(f"{path}: another agent answers there")
                path.unlink()  # left by an agent that did not stop cleanly
            old = os.umask(0o177)  # the socket is never, not even for a moment, connectable by others
            try:
                self._server = await asyncio.start_unix_server(self._serve, path=str(path), limit=MAX_REQUEST)
            finally:
                os.umask(old)
            os.chmod(path, self.mode)
            self._inode = path.stat().st_ino
        except OSError as exc:
            raise ChannelError(f"{path}: {exc.strerror or exc}") from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._clients):
                t.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        with contextlib.suppress(OSError):  # only our own socket: another agent's may be there by now
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        self._inode = None

    def _allowed(self, cred: tuple[int, int, int] | None) -> bool:
        return cred is not None and cred[1] in (0, os.geteuid())

    def _cannot(self, spec: Any) -> str | None:
        """Why the agent cannot run this target as a standalone diagnose would, or None."""
        from connprobe.privileges import CAP_BITS, needed_for, read_caps

        agent = self.agent
        watch = agent.kernel_watch
        if not agent.ready or watch is None or agent.env is None:
            return "the agent is still starting"
        if not watch.available:
            return f"the agent's kernel sensor is {agent.sensor_state}"
        try:
            held = read_caps().effective
        except (OSError, KeyError, ValueError):
            return None
        missing = [cap for cap in needed_for([spec]) if not held >> CAP_BITS[cap] & 1]
        if missing:
            return f"the agent dropped {' and '.join(missing)}, which this target needs"
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the caller went away: its attempt's ports were released by `attempts`
        except Exception:
            log.exception("diagnose channel: answering a request failed")
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cred = peer_credentials(writer)
        if not self._allowed(cred):
            self.refused += 1
            who = f"uid {cred[1]} (pid {cred[0]})" if cred else "an unidentified caller"
            log.warning("diagnose channel: refused %s: only root may ask", who)
            await _send(writer, {"refused": "only root may use the agent's diagnose channel"})
            return
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
        except ValueError:  # the limit: no newline within MAX_REQUEST bytes
            await self._decline(writer, "error", f"request: longer than {MAX_REQUEST} bytes")
            return
        except TimeoutError:
            await self._decline(writer, "error", f"request: none within {REQUEST_TIMEOUT_S:g} s")
            return
        try:
            req = parse_request(line)
            timeout = duration_arg("timeout", req.timeout) or 5.0
            budget = duration_arg("budget", req.budget)
            interval = duration_arg("interval", req.interval) or 0.0
            spec = target_spec(req.target, source=req.source, timeout=timeout, client=req.client,
                               ip_policy=req.ip_policy, qtype=req.qtype)
        except (ValueError, UsageError) as exc:  # UsageError is a ValueError
            await self._decline(writer, "error", str(exc))
            return
        why = self._cannot(spec)
        if why is None and self._running >= self.max_clients:
            why = f"the agent is running {self._running} diagnoses already"
        if why is not None:
            await self._decline(writer, "unavailable", why)
            return
        self._running += 1
        self.served += 1
        assert cred is not None
        log.info("diagnose channel: %d attempt(s) of %s for pid %d", req.count, redact_url(req.target), cred[0])
        try:
            assert self.agent.kernel_watch is not None
            stream = attempts(spec, self.agent.kernel_watch, count=req.count, interval=interval,
                              budget=budget, env=self.agent.env, asker=self.agent.asker)  # its peers too
            async with contextlib.aclosing(stream):
                async for a, events in stream:
                    await _send(writer, {"attempt": to_jsonable(a), "events": to_jsonable(events)})
            await _send(writer, {"done": True})
        finally:
            self._running -= 1

    async def _decline(self, writer: asyncio.StreamWriter, key: str, message: str) -> None:
        self.declined += 1
        await _send(writer, {key: message})


async def _send(writer: asyncio.StreamWriter, msg: dict) -> None:
    writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


_SIMPLE_DURATION = re.compile(r"\s*(\d{1,9}(?:\.\d{1,9})?)\s*(ms|s|m|h)?\s*")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _seconds(value: str | None, longest: float) -> float:
    """Roughly how long a duration option is, only to bound the wait for the agent's answer (which reads it
    exactly, with `duration_arg`); a form this does not read counts as `longest`."""
    m = _SIMPLE_DURATION.fullmatch(value or "0")
    return min(float(m.group(1)) * _UNIT_S[m.group(2)], longest) if m else longest


async def attempts_via_agent(path: Path, request: DiagnoseRequest) -> AsyncIterator[tuple[Diagnosis,
                                                                                        list[KernelEvent]]]:
    """The attempts as the agent at `path` runs and judges them, each as it comes. Before the first one:
    AgentUnavailable (no agent, refused, declined: run standalone) or UsageError (the agent's answer to a bad
    target). After it, a broken channel is an UsageError naming the attempt it broke after."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=MAX_REPLY),
                                                CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise AgentUnavailable(f"no agent at {path}: {getattr(exc, 'strerror', None) or exc}") from None
    cred = peer_credentials(writer)
    if cred is None or cred[1] not in (0, os.geteuid()):  # answers are trusted only from root (or ourselves)
        writer.close()
        raise AgentUnavailable(f"{path}: the process answering there is not root")
    got = 0
    # the longest an attempt may take: its timeout, the pause before it, the grace period for late events (the
    # agent bounds both durations; a value it refuses is answered at once)
    line_timeout = _seconds(request.timeout, 600.0) + _seconds(request.interval, 86_400.0) + GRACE_NS / 1e9 + 10.0
    try:
        writer.write(request.model_dump_json().encode() + b"\n")
        await writer.drain()
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), line_timeout)
                msg = json.loads(line) if line else None
            except (OSError, ValueError, TimeoutError) as exc:
                msg, why = None, f"{type(exc).__name__}: {exc}"
            else:
                why = "the agent closed the channel"
            if not isinstance(msg, dict):
                if got:
                    raise UsageError(f"the agent's diagnose channel broke after attempt {got}: {why}")
                raise AgentUnavailable(why)
            if "attempt" in msg:
                try:
                    a = from_jsonable(Diagnosis, msg["attempt"])
                    events = list(from_jsonable(tuple[KernelEvent, ...], msg.get("events", [])))
                except (TypeError, ValueError, KeyError) as exc:
                    raise UsageError(f"the agent sent an attempt that does not decode: {exc}") from None
                got += 1
                yield a, events
            elif msg.get("done") is True:
                return
            elif isinstance(msg.get("error"), str):
                raise UsageError(msg["error"])
            elif not got:
                raise AgentUnavailable(str(msg.get("unavailable") or msg.get("refused") or msg)[:300])
            else:
                raise UsageError(f"the agent's diagnose channel broke after attempt {got}: {str(msg)[:300]}")
    except ConnectionError as exc:
        if got:
            raise UsageError(f"the agent's diagnose channel broke after attempt {got}: {exc}") from None
        raise AgentUnavailable(str(exc)) from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
