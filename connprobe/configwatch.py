"""Reload the agent's config when its file changes, Kubernetes ConfigMap volumes included.

A ConfigMap volume is a directory of symlinks: `config.yaml -> ..data/config.yaml`, `..data -> ..2026_11_30_...`;
an update writes a new `..2026_...` directory and renames a new `..data` symlink over the old one (atomic),
then removes the old directory. The file's own inode never changes, so watching the file itself sees nothing.

    ConfigWatcher(path, on_change).run()
      inotify on the config's directory (and on the resolved file's directory when it differs): any entry
      created, moved in, written and closed, or the directory itself going away ─► "dirty"
      no inotify (old kernel, no instances left): a stat of the resolved file every `poll_interval` seconds
      dirty ─► quiet for `debounce` seconds ─► fingerprint (resolved path, inode, mtime, size; the content's
      SHA-256 only when those moved) ─► a content never tried before ─► on_change()   (the agent's reload())

The watcher only decides *when*; what a reload does (all of the new file or none of it, one log line when
rejected) is `Agent.reload`, the same as SIGHUP. A content already tried is not tried again, so a bad file
gives one log line, not one per event. A file that is missing for a moment (an editor's rename, the
instant of a swap) is not a reload: the watcher waits for it to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ConfigWatcher", "Fingerprint"]

log = logging.getLogger("connprobe.agent")

IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
WATCH_MASK = IN_MOVED_TO | IN_CREATE | IN_CLOSE_WRITE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)


@dataclass(frozen=True)
class Fingerprint:
    """What identifies one version of the config: where the path leads and what the file holds."""

    stat: tuple[str, int, int, int, int]  # resolved path, device, inode, mtime (ns), size
    digest: str


def _stat_key(path: Path) -> tuple[str, int, int, int, int] | None:
    """The resolved file's identity, or None when it is not there (or not a regular file) right now."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (real, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _digest(real: str, limit: int = 32 << 20) -> str | None:
    try:
        with open(real, "rb") as f:
            return hashlib.sha256(f.read(limit)).hexdigest()
    except OSError:
        return None


class _Inotify:
    """inotify through libc (ctypes): no extra dependency. Raises OSError when the kernel has none to give."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.fd = fd
        self.watched: dict[str, int] = {}

    def watch(self, directory: str) -> bool:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), WATCH_MASK)
        if wd < 0:
            return False
        self.watched[directory] = wd
        return True

    def read(self) -> tuple[int, bool]:
        """Drain the queue: (events read, whether a watch was lost or the queue overflowed)."""
        n, lost = 0, False
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return n, lost
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return n, True
            if not data:
                return n, lost
            off = 0
            while off + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, off)
                off += _EVENT.size + length
                n += 1
                if mask & (IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    lost = True
                    if mask & IN_IGNORED:
                        self.watched = {d: w for d, w in self.watched.items() if w != wd}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class ConfigWatcher:
    """Calls `on_change()` once per new version of the file at `path` (see the module docstring).

    `use_inotify=False` forces the stat poll. With inotify, the poll still runs every `safety_interval`
    seconds (one stat), in case a watch was lost with its directory."""

    def __init__(self, path: str | Path, on_change: Callable[[], Awaitable[object]], *, debounce: float = 0.5,
                 poll_interval: float = 5.0, safety_interval: float = 60.0, use_inotify: bool = True):
        self.path = Path(path)
        self.on_change = on_change
        self.debounce = debounce
        self.poll_interval = poll_interval
        self.safety_interval = safety_interval
        self.use_inotify = use_inotify
        self.mode = "starting"  # then "inotify" or "poll"
        self.changes = 0  # versions handed to on_change
        self._inotify: _Inotify | None = None
        self._dirty = asyncio.Event()
        self._last_stat: tuple[str, int, int, int, int] | None = None
        self._last_digest: str | None = None
        self._missing_logged = False

    async def prime(self) -> None:
        """Take the current file as the version already running (call right after the agent loaded it)."""
        fp = await asyncio.to_thread(self.fingerprint)
        if fp is not None:
            self._last_stat, self._last_digest = fp.stat, fp.digest

    def fingerprint(self) -> Fingerprint | None:
        key = _stat_key(self.path)
        if key is None:
            return None
        digest = self._last_digest if key == self._last_stat else _digest(key[0])
        return Fingerprint(key, digest) if digest is not None else None

    def _directories(self) -> list[str]:
        dirs = [os.path.dirname(os.path.abspath(self.path)) or "/"]
        real_dir = os.path.dirname(os.path.realpath(self.path))
        if real_dir not in dirs:
            dirs.append(real_dir)  # a file written in place behind a symlink in another directory
        return dirs

    def _start_inotify(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.use_inotify:
            self.mode = "poll"
            return
        try:
            self._inotify = _Inotify()
        except (OSError, AttributeError) as exc:
            log.warning("config watch: inotify is not available (%s); checking %s every %gs instead",
                        exc, self.path, self.poll_interval)
            self.mode = "poll"
            return
        self._rewatch()
        loop.add_reader(self._inotify.fd, self._on_readable)
        if self.mode == "poll":
            log.warning("config watch: cannot watch the directory of %s; checking it every %gs until it can",
                        self.path, self.poll_interval)

    def _rewatch(self) -> None:
        """Watch the directories the path goes through now (after a swap the resolved one may be new). When the
        config's own directory cannot be watched (gone, or no watches left: fs.inotify.max_user_watches), the
        stat poll takes over until it can."""
        ino = self._inotify
        if ino is None:
            return
        dirs = self._directories()
        watched = ino.watch(dirs[0])
        for d in dirs[1:]:
            ino.watch(d)
        mode = "inotify" if watched else "poll"
        if mode != self.mode and self.mode != "starting":
            if watched:
                log.info("config watch: watching %s again (inotify)", dirs[0])
            else:
                log.warning("config watch: cannot watch %s; checking %s every %gs meanwhile", dirs[0], self.path,
                            self.poll_interval)
        self.mode = mode

    def _on_readable(self) -> None:
        ino = self._inotify
        if ino is None:
            return
        n, lost = ino.read()
        if n or lost:
            self._dirty.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._start_inotify(loop)
        log.info("config watch: reloading %s when it changes (%s)", self.path, self.mode)
        try:
            while True:
                wait = self.safety_interval if self.mode == "inotify" else self.poll_interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), wait)
                if self._dirty.is_set():
                    await self._quiet()
                try:
                    await self.check()
                except Exception as exc:  # never let the watch die silently; the next change is tried again
                    log.error("config watch: checking %s failed: %s: %s", self.path, type(exc).__name__, exc)
        finally:
            if self._inotify is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(self._inotify.fd)
                self._inotify.close()
                self._inotify = None

    async def _quiet(self) -> None:
        """Wait until no event came for `debounce` seconds (an update is several events), at most 10 rounds."""
        for _ in range(10):
            self._dirty.clear()
            await asyncio.sleep(self.debounce)
            if not self._dirty.is_set():
                return
        self._dirty.clear()

    async def check(self) -> bool:
        """Compare the file with the last version tried; hand a new one to `on_change`. True if it did."""
        self._rewatch()
        key = await asyncio.to_thread(_stat_key, self.path)
        if key is None:
            if not self._missing_logged:
                self._missing_logged = True
                log.warning("config watch: %s is not there (or not a regular file) right now; the running "
                            "configuration stays until it is back", self.path)
            return False
        self._missing_logged = False
        if key == self._last_stat:
            return False
        digest = await asyncio.to_thread(_digest, key[0])
        if digest is None:
            return False
        self._last_stat = key
        if digest == self._last_digest:
            return False  # touched, or swapped for the same content
        self._last_digest = digest
        self.changes += 1
        await self.on_change()
        return True
