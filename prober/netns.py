"""Doing work inside another network namespace from one asyncio process.

Python has no `os.setns` before 3.12, so a dedicated worker thread calls libc `setns(fd, CLONE_NEWNET)`
once and then runs whatever it is given: sockets created there keep that namespace for life and can be
used from any thread, including the event loop's. `socket_netns()` (ioctl SIOCGSKNS) tells which
namespace a socket belongs to, so a caller can check before it connects.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import fcntl
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
SIOCGSKNS = 0x894C  # linux/sockios.h: get the socket's network namespace as a new fd
NETNS_RUN_DIR = Path("/run/netns")
START_TIMEOUT_S = 5.0  # a worker thread that has not entered its namespace by then is given up on

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(OSError):
    """A network namespace could not be found or entered."""


def netns_path(name_or_path: str) -> Path:
    """`/run/netns/NAME` for a bare name (as `ip netns` names them), else the path itself."""
    if "/" in name_or_path:
        return Path(name_or_path)
    return NETNS_RUN_DIR / name_or_path


def netns_inode(name_or_path: str | None = None) -> int:
    """Inode of a namespace; None means this thread's own (`/proc/thread-self/ns/net`)."""
    if name_or_path is None:
        return os.stat("/proc/thread-self/ns/net").st_ino
    try:
        return os.stat(netns_path(name_or_path)).st_ino
    except FileNotFoundError as exc:
        raise NetnsError(exc.errno, f"network namespace {name_or_path!r} does not exist") from None


def socket_netns(sock: socket.socket) -> int:
    """Inode of the namespace a socket was created in."""
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _setns(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsExecutor:
    """A single worker thread that lives inside one network namespace.

    `call(fn, *args)` runs fn there and returns its result; `submit` returns a concurrent Future
    (wrap with `asyncio.wrap_future` from a coroutine). Close it (or use `with`) to end the thread.
    """

    def __init__(self, name_or_path: str):
        self.path = netns_path(name_or_path)
        self.inode = netns_inode(name_or_path)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"netns-{self.path.name}", initializer=_setns, initargs=(self.path,)
        )
        # Surface a failing setns now, not at first use; never wait for ever (this runs on the event loop).
        try:
            got = self._pool.submit(netns_inode).result(timeout=START_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise NetnsError(0, f"the worker thread for {self.path} did not start in {START_TIMEOUT_S:g}s") from None
        if got != self.inode:
            self._pool.shutdown(wait=False)
            raise NetnsError(0, f"worker thread is in netns {got}, wanted {self.inode} ({self.path})")

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> concurrent.futures.Future[T]:
        return self._pool.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """A socket created inside the namespace (checked with SIOCGSKNS)."""
        sock = self.call(socket.socket, family, type, proto)
        if socket_netns(sock) != self.inode:
            sock.close()
            raise NetnsError(0, f"socket was not created in {self.path}")
        return sock

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> NetnsExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared: dict[Path, NetnsExecutor] = {}
_shared_lock = threading.Lock()


def shared_executor(name_or_path: str) -> NetnsExecutor:
    """One long-lived executor per namespace path, for callers that create sockets repeatedly."""
    path = netns_path(name_or_path)
    with _shared_lock:
        ex = _shared.get(path)
        if ex is None or ex.inode != netns_inode(name_or_path):
            if ex is not None:  # its namespace is gone: don't hold the caller (the event loop) up for its queue
                ex._pool.shutdown(wait=False, cancel_futures=True)
            ex = _shared[path] = NetnsExecutor(name_or_path)
        return ex


def close_shared_executor(name_or_path: str) -> None:
    """End the shared executor of one namespace (before the namespace is deleted)."""
    with _shared_lock:
        ex = _shared.pop(netns_path(name_or_path), None)
    if ex is not None:
        ex.close()


def close_shared_executors() -> None:
    with _shared_lock:
        for ex in _shared.values():
            ex.close()
        _shared.clear()
