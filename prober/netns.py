"""Doing work inside another network namespace from one asyncio process.

Python has no `os.setns` before 3.12, so a dedicated worker thread calls libc `setns(fd, CLONE_NEWNET)`
once and then runs whatever it is given: sockets created there keep that namespace for life and can be
used from any thread, including the event loop's. `socket_netns()` (ioctl SIOCGSKNS) tells which
namespace a socket belongs to, so a caller can check before it connects.

A namespace file is never trusted: `open_netns` opens it with O_PATH (a FIFO or a device is not opened
at all), checks with fstatfs that it lives on nsfs, reopens it O_RDONLY|O_NONBLOCK|O_CLOEXEC and asks
the kernel its type (NS_GET_NSTYPE) before any `setns`. The shared worker threads are bounded
(`MAX_SHARED`) and released once their namespace is gone (its file removed or replaced).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from prober.source import NETNS_RUN_DIR

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
SIOCGSKNS = 0x894C  # linux/sockios.h: get the socket's network namespace as a new fd
NS_GET_NSTYPE = 0xB703  # linux/nsfs.h: _IO(0xb7, 0x3), the CLONE_NEW* type of a namespace fd
NSFS_MAGIC = 0x6E736673  # linux/magic.h: statfs f_type of a namespace file
START_TIMEOUT_S = 5.0  # a worker thread that has not entered its namespace by then is given up on

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(OSError):
    """A network namespace could not be found or entered."""


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type (a C long) comes first
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value


def open_netns(path: Path | str) -> int:
    """An fd (O_RDONLY|O_NONBLOCK|O_CLOEXEC) on a network namespace file, checked before anyone setns()es it.

    NetnsError (one line) when the file does not exist, is not a namespace (a FIFO, a device, a regular
    file: none of them is ever opened for reading) or is a namespace of another type. Never blocks.
    """
    path = Path(path)
    # A bind mount under /run/netns is never a symlink; /proc/PID/ns/net is a magic link to follow.
    nofollow = os.O_NOFOLLOW if path.parent == NETNS_RUN_DIR else 0
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC | nofollow)
    except FileNotFoundError:
        raise NetnsError(errno.ENOENT, f"network namespace {str(path)!r} does not exist") from None
    except OSError as exc:
        raise NetnsError(exc.errno or 0, f"{str(path)!r}: {exc.strerror or exc}") from None
    try:
        if _fs_type(pfd) != NSFS_MAGIC:
            raise NetnsError(errno.EINVAL, f"{str(path)!r} is not a network namespace (not an nsfs file)")
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except NetnsError:
        raise
    except OSError as exc:
        raise NetnsError(exc.errno or 0, f"{str(path)!r}: {exc.strerror or exc}") from None
    finally:
        os.close(pfd)
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        os.close(fd)
        raise NetnsError(exc.errno or 0, f"{str(path)!r} is not a network namespace: {exc.strerror}") from None
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise NetnsError(errno.EINVAL, f"{str(path)!r} is a namespace of another type, not a network namespace")
    return fd


def netns_path(name_or_path: str) -> Path:
    """`/run/netns/NAME` for a bare name (as `ip netns` names them), else the path itself."""
    if "/" in name_or_path:
        return Path(name_or_path)
    return NETNS_RUN_DIR / name_or_path


def netns_inode(name_or_path: str | None = None) -> int:
    """Inode of a namespace (checked to be one, `open_netns`); None means this thread's own."""
    if name_or_path is None:
        return os.stat("/proc/thread-self/ns/net").st_ino
    try:
        fd = open_netns(netns_path(name_or_path))
    except NetnsError as exc:
        if exc.errno == errno.ENOENT:  # named as the caller named it
            raise NetnsError(exc.errno, f"network namespace {name_or_path!r} does not exist") from None
        raise
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) the path names now, None when it is gone (a cheap stat, no open)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def socket_netns(sock: socket.socket) -> int:
    """Inode of the namespace a socket was created in."""
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _setns(path: Path) -> None:
    fd = open_netns(path)
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
        self._enter_error: OSError | None = None
        self.identity = _identity(self.path)
        self.last_used = time.monotonic()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"netns-{self.path.name}", initializer=self._enter
        )
        # Surface a failing setns now, not at first use; never wait for ever (this may run on the event loop).
        try:
            got = self._pool.submit(netns_inode).result(timeout=START_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise NetnsError(0, f"the worker thread for {self.path} did not start in {START_TIMEOUT_S:g}s") from None
        if self._enter_error is not None:  # setns failed (e.g. EPERM without CAP_SYS_ADMIN)
            self._pool.shutdown(wait=False)
            raise self._enter_error
        if got != self.inode:
            self._pool.shutdown(wait=False)
            raise NetnsError(0, f"worker thread is in netns {got}, wanted {self.inode} ({self.path})")

    def _enter(self) -> None:
        """The worker's initializer. A failure is kept for __init__ to raise (an initializer that raises would
        only break the pool, with a logged traceback instead of the error)."""
        try:
            _setns(self.path)
        except OSError as exc:
            self._enter_error = exc if isinstance(exc, NetnsError) else NetnsError(exc.errno, f"{self.path}: {exc}")

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

    def close(self, wait: bool = True) -> None:
        """End the thread (at once with wait=False: work already queued still runs, then it exits)."""
        self._pool.shutdown(wait=wait)

    def __enter__(self) -> NetnsExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared: dict[Path, NetnsExecutor] = {}
_shared_lock = threading.Lock()
MAX_SHARED = 64  # namespaces with a worker thread at once
IDLE_S = 300.0  # a worker unused this long may make room for another namespace
_SWEEP_S = 1.0
_next_sweep = 0.0


def _sweep(now: float) -> None:
    """Release (under the lock) the workers whose namespace file is gone or now names another namespace:
    the thread would otherwise keep a deleted namespace alive."""
    global _next_sweep
    _next_sweep = now + _SWEEP_S
    for path, ex in list(_shared.items()):
        if _identity(path) != ex.identity:
            del _shared[path]
            ex.close(wait=False)


def release_vanished_executors() -> None:
    """Release now the workers whose namespace is gone (`shared_executor` also does it, at most once a second)."""
    with _shared_lock:
        _sweep(time.monotonic())


def shared_executor(name_or_path: str) -> NetnsExecutor:
    """One long-lived executor per namespace path, for callers that create sockets repeatedly.

    At most MAX_SHARED at once: workers of vanished namespaces are released, then one idle for IDLE_S;
    past that a new namespace is refused (NetnsError) rather than given one more thread.
    """
    path = netns_path(name_or_path)
    now = time.monotonic()
    with _shared_lock:
        if now >= _next_sweep:
            _sweep(now)
        ex = _shared.get(path)
        if ex is not None and _identity(path) != ex.identity:
            del _shared[path]
            ex._pool.shutdown(wait=False, cancel_futures=True)  # don't hold the caller up for its queue
            ex = None
        if ex is None:
            if len(_shared) >= MAX_SHARED:
                _sweep(now)
            if len(_shared) >= MAX_SHARED:
                idle = min(_shared.values(), key=lambda e: e.last_used)
                if now - idle.last_used < IDLE_S:
                    raise NetnsError(errno.EMFILE, f"more than {MAX_SHARED} network namespaces in use at once")
                del _shared[idle.path]
                idle.close(wait=False)
            ex = _shared[path] = NetnsExecutor(name_or_path)
        ex.last_used = now
        return ex


def close_shared_executor(name_or_path: str) -> None:
    """End the shared executor of one namespace (before the namespace is deleted)."""
    with _shared_lock:
        ex = _shared.pop(netns_path(name_or_path), None)
    if ex is not None:
        ex.close()

