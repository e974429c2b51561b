"""Sockets the prober creates itself: bound before use, announced, optionally inside another netns.

Every socket a probe uses (TCP connections and the UDP/TCP sockets of its own DNS queries) comes from
`Source.open()`: it is created in the probe's source namespace (for a named namespace, on a worker thread
checked to be in it), bound to an ephemeral port, and the port is handed to the `on_local_port(proto, port)`
callback *before* the first packet can leave — the kernel sensor watches that port from then on.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextvars
import errno
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from prober.netns import (
    NetnsError,
    netns_inode,
    netns_path,
    release_vanished_executors,
    shared_executor,
)
from prober.source import SourceSpec, parse_source
from prober.types import Flow, Proto

PortCallback = Callable[[Proto, int], None]
monotonic_ns = time.monotonic_ns

# Who the probes of the current context may connect to: None (scheduled probes: the operator's own choice), or
# a callable given the numeric address that raises OSError to refuse it before any packet leaves. The agent's
# `/probe` sets it, so a redirect or a name that re-resolves elsewhere cannot reach what `/probe` refuses.
connect_guard: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "connprobe_connect_guard", default=None)


async def connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: tuple) -> int:
    """Connect a non-blocking socket to a numeric address; returns when it was seen connected (ns).

    What `loop.sock_connect` does, thinner (the prober's addresses are numeric already), and timed where
    the event is seen rather than where the awaiting task resumes: when several probes start in one slot,
    the task of the last one resumes only after the others' steps have run, but its "connected" stamp is
    taken in the loop's I/O callback. On a short path (loopback, a lab) the handshake is often over before
    connect() returns, which getpeername() tells at once: then there is nothing to wait for.
    """
    guard = connect_guard.get()
    if guard is not None:
        guard(addr[0])
    try:
        sock.connect(addr)
        return monotonic_ns()
    except (BlockingIOError, InterruptedError):
        pass
    try:
        sock.getpeername()  # ENOTCONN until the handshake is complete
        return monotonic_ns()
    except OSError:
        pass
    fd = sock.fileno()
    waiter = loop.create_future()
    _forget_stale(loop, fd)
    loop.add_writer(fd, _writable, waiter)
    try:
        stamp = await waiter
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"Connect call failed {addr}")
    return stamp


def _forget_stale(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Drop whatever the loop still has registered for this fd number: the socket is new, so that belongs to
    a closed one. Code that closes an fd without removing its reader/writer leaves asyncio's selector a key
    that epoll no longer has; add_writer then only swaps the callback (same events: no epoll_ctl) and the
    new socket's event is never seen — a connect that waits for nothing, its deadline its only way out."""
    for remove in (loop.remove_reader, loop.remove_writer):
        try:
            remove(fd)
        except (OSError, ValueError):  # the kernel had forgotten it already (ENOENT): the key is gone now
            pass


def _writable(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(monotonic_ns())


async def recv_stamped(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int = 65535) -> tuple[bytes, int]:
    """One datagram from a non-blocking socket, and when the loop saw it arrive (ns).

    Stamped in the loop's I/O callback, as `connect` is: a DNS answer's time does not wait for the
    steps of other probes that the loop runs before this task resumes.
    """
    try:
        return sock.recv(size), monotonic_ns()
    except (BlockingIOError, InterruptedError):
        pass
    fd = sock.fileno()
    waiter = loop.create_future()
    _forget_stale(loop, fd)
    loop.add_reader(fd, _readable, sock, size, waiter)
    try:
        return await waiter
    finally:
        loop.remove_reader(fd)


def _readable(sock: socket.socket, size: int, waiter: asyncio.Future) -> None:
    if waiter.done():
        return
    seen = monotonic_ns()
    try:
        data = sock.recv(size)
    except (BlockingIOError, InterruptedError):
        return
    except OSError as exc:  # e.g. ECONNREFUSED: an ICMP port unreachable came back
        waiter.set_exception(exc)
        return
    waiter.set_result((data, seen))

def family_mismatch(local: str | None, remote: str) -> str | None:
    """Why a probe's `source_ip_address` cannot reach `remote` (one is IPv4, the other IPv6), or None: the one
    check every prober with that key makes before binding (`Source.open(..., local_addr)`)."""
    if local is not None and (":" in local) != (":" in remote):
        return f"source_ip_address {local} is not of {remote}'s family"
    return None


_ANY = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
_PROTO = {socket.SOCK_STREAM: Proto.TCP, socket.SOCK_DGRAM: Proto.UDP}


def no_callback(proto: Proto, port: int) -> None:
    """Default `on_local_port`: nobody is watching."""


class SourceError(OSError):
    """The probe's source namespace cannot be used."""


class Source:
    """Where a probe's sockets live: the host (the process's own namespace) or a named/pinned netns.

    `spec` is a `prober.source.SourceSpec` or its written form: "host", "netns NAME" (or a bare NAME),
    /run/netns/NAME or /proc/PID/ns/net. Building one for a namespace opens and checks the namespace file
    and may start its worker thread: from a coroutine use `await open_source(spec)`, which does it off the loop.
    """

    __slots__ = ("inode", "label", "netns", "spec")

    def __init__(self, spec: str | SourceSpec = "host"):
        try:
            self.spec = parse_source(spec, bare_name=True)
        except ValueError as exc:
            raise SourceError(errno.EINVAL, f"source {spec!r}: {exc}") from None
        self.label = self.spec.label
        if self.spec.path is None:
            self.netns: str | None = None
            self.inode = netns_inode()
            return
        self.netns = self.spec.name or str(self.spec.path)  # a name: /run/netns/NAME
        try:
            self.inode = shared_executor(self.netns).inode
        except (NetnsError, OSError) as exc:
            raise SourceError(exc.errno or 0, f"source {self.label!r}: {exc.strerror or exc}") from None

    @property
    def resolv_conf(self) -> Path:
        """The resolv.conf `ip netns exec NAME` would bind-mount, else the host's."""
        return self.spec.resolv_conf

    def vanished(self) -> bool:
        """Whether the namespace's file is gone or names another namespace now (never for the host)."""
        return self.netns is not None and _inode_or_none(self.netns) != self.inode

    async def open(
        self, family: int, type: int, on_local_port: PortCallback, local_addr: str | None = None
    ) -> socket.socket:
        """A non-blocking socket bound to an ephemeral port, announced through `on_local_port`."""
        if self.netns is None:
            sock = socket.socket(family, type)
        else:
            sock = self._pooled(family, type) or await self._create(family, type)
        try:
            sock.setblocking(False)
            if type == socket.SOCK_STREAM:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((local_addr or _ANY[family], 0))
            on_local_port(_PROTO[type], sock.getsockname()[1])
        except BaseException:
            sock.close()
            raise
        return sock

    def _executor(self):
        # Looked up each time: the lab may close and recreate a namespace's executor.
        try:
            executor = shared_executor(self.netns)
        except (NetnsError, OSError) as exc:
            raise SourceError(exc.errno or 0, f"source {self.label!r}: {exc.strerror or exc}") from None
        if executor.inode != self.inode:
            raise SourceError(0, f"source {self.label!r} was recreated (inode {executor.inode})")
        return executor

    async def open_unannounced(self, family: int, type: int, proto: int, local_addr: str | None = None
                               ) -> socket.socket:
        """A non-blocking socket of any type and protocol (an ICMP echo's raw socket) made in the source's
        namespace, bound to `local_addr` when given. Not announced: the kernel sensor keys on ports."""
        if self.netns is None:
            sock = socket.socket(family, type, proto)
        else:
            sock = await self._create(family, type, proto)
        try:
            sock.setblocking(False)
            if local_addr:
                sock.bind((local_addr, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    def _make(self, family: int, type: int, n: int, proto: int = 0) -> list[socket.socket]:
        """Runs on the namespace's worker thread: n sockets. socket() creates a socket in the calling thread's
        namespace, so the thread's namespace is what is checked (ioctl SIOCGSKNS on each socket would need
        CAP_NET_ADMIN, which the agent does not keep: connprobe/privileges.py)."""
        if netns_inode() != self.inode:
            return []
        return [socket.socket(family, type, proto) for _ in range(n)]

    async def _create(self, family: int, type: int, proto: int = 0) -> socket.socket:
        made = self._executor().submit(self._make, family, type, 1, proto)
        try:
            got = await asyncio.wrap_future(made)
        except asyncio.CancelledError:
            # The probe gave up (its deadline) while the worker thread was busy: whatever the worker still
            # makes is nobody's, close it there and then.
            made.add_done_callback(_close_made)
            raise
        if not got:
            raise SourceError(0, f"socket not created in {netns_path(self.netns)}")
        return got[0]

    def _pooled(self, family: int, type: int) -> socket.socket | None:
        """A socket made ahead of time in the namespace (keeps the worker-thread hop off the timed path)."""
        pool = _POOLS.setdefault((self.inode, family, type), collections.deque())
        sock = pool.popleft() if pool else None
        if len(pool) < POOL_SIZE // 2 and (self.inode, family, type) not in _refilling:
            _refilling.add((self.inode, family, type))
            fut = self._executor().submit(self._make, family, type, POOL_SIZE - len(pool))
            loop = asyncio.get_running_loop()

            def done(f, key=(self.inode, family, type)):
                _refilling.discard(key)
                if f.cancelled() or f.exception() is not None:
                    return
                try:
                    loop.call_soon_threadsafe(_POOLS.setdefault(key, collections.deque()).extend, f.result())
                except RuntimeError:  # that loop is closed (its probes are long gone): nobody will use them
                    for made in f.result():
                        made.close()

            fut.add_done_callback(done)
        return sock

    def flow(self, sock: socket.socket, remote: tuple, proto: Proto) -> Flow:
        """The flow of a socket that has started connecting (its local address is then fixed)."""
        try:
            local = sock.getsockname()
        except OSError:
            local = ("", 0)
        return Flow(proto, local[0], local[1], remote[0], remote[1], self.inode)

    def __repr__(self) -> str:
        return f"Source({self.label!r}, inode={self.inode})"


def _close_made(f) -> None:
    if not f.cancelled() and f.exception() is None:
        for sock in f.result():
            sock.close()


POOL_SIZE = 16
_POOLS: dict[tuple[int, int, int], collections.deque[socket.socket]] = {}
_refilling: set[tuple[int, int, int]] = set()


def close_socket_pools(inode: int | None = None) -> None:
    """Close the sockets made ahead of time for namespace sources (all, or one namespace's).

    ProbeEnv.aclose calls this; an open socket keeps its namespace alive after the namespace is removed.
    """
    for (ns, _, _), pool in _POOLS.items():
        if inode is None or ns == inode:
            while pool:
                pool.popleft().close()


atexit.register(close_socket_pools)

_sources: dict[str, Source] = {}
MAX_SOURCES = 1024  # cached Source objects (only sources that opened: a bad one is never kept)
_OPENER = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="netns-open")


def _cached(spec: str | SourceSpec | None) -> tuple[str | SourceSpec, Source | None]:
    """The cached Source of a spec (by the spec as written: no parsing on the hot path), or None."""
    key = spec or "host"
    src = _sources.get(key)
    if src is not None and src.vanished():
        # The namespace is gone or was recreated: pooled sockets would keep the old one alive.
        close_socket_pools(src.inode)
        del _sources[key]
        src = None
    return key, src


def _keep(key: str | SourceSpec, src: Source) -> Source:
    while len(_sources) >= MAX_SOURCES:
        old = _sources.pop(next(iter(_sources)))
        close_socket_pools(old.inode)
    _sources[key] = src
    return src


def get_source(spec: str | SourceSpec | None) -> Source:
    """A cached `Source` per spec (namespaces are re-checked by `shared_executor` when recreated).

    Opens a namespace on the calling thread: coroutines use `open_source`.
    """
    key, src = _cached(spec)
    return src if src is not None else _keep(key, Source(key))


_SWEEP_S = 1.0
_next_sweep = 0.0


def release_vanished_sources() -> None:
    """Forget the sources whose namespace is gone and close their pooled sockets, and end the worker
    threads of vanished namespaces: both would keep a deleted namespace alive."""
    for key, src in list(_sources.items()):
        if src.netns is not None and src.vanished():
            close_socket_pools(src.inode)
            _sources.pop(key, None)
    release_vanished_executors()


async def open_source(spec: str | SourceSpec | None, timeout: float | None = None) -> Source:
    """`get_source` for a coroutine: a namespace file is opened, checked and its worker thread started on a
    small bounded pool (`_OPENER`), never on the event loop, within `timeout` seconds; SourceError (one
    line) when it cannot be used. A cached source costs no thread hop. At most once a second it also
    releases what vanished namespaces still hold (`release_vanished_sources`), even for a probe of another
    source: a namespace no probe uses any more is let go too."""
    global _next_sweep
    now = time.monotonic()
    if now >= _next_sweep:
        _next_sweep = now + _SWEEP_S
        release_vanished_sources()
    key, src = _cached(spec)
    if src is not None:
        return src
    try:
        parsed = parse_source(key, bare_name=True)
    except ValueError as exc:
        raise SourceError(errno.EINVAL, f"source {key!r}: {exc}") from None
    if parsed.path is None:
        return _keep(key, Source(parsed))
    try:
        src = await asyncio.wait_for(asyncio.wrap_future(_OPENER.submit(Source, parsed)), timeout)
    except TimeoutError:
        raise SourceError(errno.ETIMEDOUT, f"source {parsed.label!r}: not opened within {timeout:g}s") from None
    return _keep(key, src)


def _inode_or_none(name: str) -> int | None:
    """The inode a namespace path names now (a plain stat: cheap enough for every probe run)."""
    try:
        return os.stat(netns_path(name)).st_ino
    except OSError:
        return None
