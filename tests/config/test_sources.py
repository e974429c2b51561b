"""Sources: only /run/netns/NAME or /proc/PID/ns/net; a namespace file is checked (nsfs, type net) before
setns, off the event loop; nothing is left behind by a bad source; worker threads are bounded and released
when their namespace is gone; a namespace deleted mid-probe gives `source_error`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from prober import ErrorKind, HTTPSpec, ModuleSpec, ProbeEnv, ProbeSpec, netns, run_probe, sockets
from prober.netns import NetnsError, NetnsExecutor, open_netns, shared_executor
from prober.sockets import Source, SourceError
from prober.source import parse_source
from tests.leaks import open_fds

RUN = Path("/run/netns")


def shared_executor_count() -> int:
    """Worker threads the prober holds for namespaces now (none may be left behind)."""
    return len(netns._shared)


def _spec(source: str, target: str = "127.0.0.1:9", prober: str = "tcp", timeout: float = 2.0) -> ProbeSpec:
    module = ModuleSpec(prober=prober, timeout=timeout, **({"http": HTTPSpec()} if prober == "http" else {}))
    return ProbeSpec(name="t", module=module, target=target, source=source, interval=max(timeout, 5.0))


@contextlib.contextmanager
def namespace():
    """A network namespace of this test only (loopback up), always deleted."""
    name = f"cpt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        netns.close_shared_executor(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _listener(name: str) -> socket.socket:
    """A TCP socket listening on 127.0.0.1 inside the namespace, which never answers what it accepts."""
    with NetnsExecutor(name) as ex:
        sock = ex.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock


# -- parsing: no file is touched ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "canonical", "label"), [
    ("host", "host", "host"), ("", "host", "host"), ("netns cp-a", "netns cp-a", "cp-a"),
    ("/run/netns/cp-a", "netns cp-a", "cp-a"), ("/proc/42/ns/net", "/proc/42/ns/net", "/proc/42/ns/net"),
])
def test_source_forms(text, canonical, label):
    s = parse_source(text)
    assert (s.text, s.label) == (canonical, label)


@pytest.mark.parametrize("text", ["/etc/hostname", "/dev/null", "/proc/self/ns/net", "/proc/1/ns/mnt", "netns ../x",
                                  "/run/netns/a/b", "/run/netns/../x", "netns ", "cp-a", "/proc/0/ns/net",
                                  "/proc/99999999/ns/net"])
def test_other_paths_are_refused_before_any_open(text):
    with pytest.raises(ValueError) as info:
        parse_source(text)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="source"):
        _spec(text)
    with pytest.raises(SourceError):
        Source(text)


# -- opening: every non-namespace refused, nothing left behind ----------------------------------------------


@pytest.mark.parametrize(("path", "message"), [
    ("/dev/null", "'/dev/null' is not a network namespace (not an nsfs file)"),
    ("/etc/hostname", "'/etc/hostname' is not a network namespace (not an nsfs file)"),
    ("/proc/self/ns/mnt", "'/proc/self/ns/mnt' is a namespace of another type, not a network namespace"),
    ("/run/netns/cpt-does-not-exist", "network namespace '/run/netns/cpt-does-not-exist' does not exist"),
])
def test_open_netns_checks_the_file(path, message):
    before = open_fds()
    with pytest.raises(NetnsError) as info:
        open_netns(path)
    assert info.value.strerror == message
    assert open_fds() == before


def test_open_netns_of_this_process():
    fd = open_netns("/proc/self/ns/net")
    try:
        assert os.fstat(fd).st_ino == os.stat("/proc/thread-self/ns/net").st_ino
        assert os.get_blocking(fd) is False
    finally:
        os.close(fd)


@pytest.mark.kernel
async def test_bad_sources_are_source_errors_without_blocking_or_leaks():
    """FIFOs (a blocking open would freeze the loop until a writer came), devices, regular files and
    symlinks under /run/netns, missing names and dead PIDs: 200 distinct ones, each a one-line
    source_error; no thread, fd or cached executor more afterwards."""
    made: list[Path] = []
    tag = uuid.uuid4().hex[:6]

    def make(kind: str, i: int) -> str:
        p = RUN / f"cpt-{tag}-{kind}-{i}"
        if kind == "fifo":
            os.mkfifo(p)
        elif kind == "file":
            p.write_text("not a namespace\n")
        elif kind == "null":
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        elif kind == "link":
            p.symlink_to("/proc/self/ns/net")
        if kind != "none":
            made.append(p)
        return f"netns {p.name}"

    RUN.mkdir(exist_ok=True)
    try:
        sources = [make(kind, i) for i in range(40) for kind in ("fifo", "file", "null", "link", "none")]
        sources += [f"/proc/{4_100_000 + i}/ns/net" for i in range(len(sources) // 5)]
        async with ProbeEnv() as env:
            # the opener pool's threads (at most 2) start once, at the first concurrent opens
            warm = await asyncio.gather(*(run_probe(_spec(s), env) for s in sources[:10]))
            assert all(r.error is ErrorKind.SOURCE_ERROR for (r,) in warm)
            threads, fds, executors = threading.active_count(), open_fds(), shared_executor_count()
            results = await asyncio.wait_for(asyncio.gather(*(run_probe(_spec(s), env) for s in sources)), 60)
        for s, (r,) in zip(sources, results, strict=True):
            assert r.error is ErrorKind.SOURCE_ERROR, (s, r)
            assert "\n" not in r.error_detail and r.error_detail, (s, r.error_detail)
            assert r.source == parse_source(s).label
        by_kind = {s.rsplit("-", 2)[-2] if s.startswith("netns") else "pid": r.error_detail
                   for s, (r,) in zip(sources, results, strict=True)}
        for kind in ("fifo", "null", "file", "link"):  # a link is not followed: O_PATH|O_NOFOLLOW sees the link
            assert by_kind[kind].endswith("is not a network namespace (not an nsfs file)"), by_kind[kind]
        assert "does not exist" in by_kind["none"] and "does not exist" in by_kind["pid"]
        assert (threading.active_count(), open_fds(), shared_executor_count()) == (threads, fds, executors)
    finally:
        for p in made:
            p.unlink(missing_ok=True)


# -- a real namespace: by PID, deleted mid-probe, thread bound ------------------------------------------------


@pytest.mark.kernel
async def test_proc_pid_source():
    with namespace() as name:
        inode = os.stat(RUN / name).st_ino
        listener = _listener(name)
        proc = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
        try:
            path = Path(f"/proc/{proc.pid}/ns/net")
            for _ in range(500):  # `ip netns exec` calls setns before it execs sleep
                if path.stat().st_ino == inode:
                    break
                await asyncio.sleep(0.01)
            async with ProbeEnv() as env:
                (r,) = await run_probe(_spec(str(path), f"127.0.0.1:{listener.getsockname()[1]}"), env)
            assert r.ok, r.error_detail
            assert r.source == str(path) and r.flows[0].netns == inode
        finally:
            proc.kill()
            proc.wait()
            listener.close()
            netns.close_shared_executor(str(path))


@pytest.mark.kernel
async def test_namespace_deleted_mid_probe_is_source_error():
    with namespace() as name:
        listener = _listener(name)
        conn = None
        try:
            async with ProbeEnv() as env:
                spec = _spec(f"netns {name}", f"http://127.0.0.1:{listener.getsockname()[1]}/", "http", 3.0)
                task = asyncio.create_task(run_probe(spec, env))
                conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(listener), 10)
                subprocess.run(["ip", "netns", "del", name], check=True)  # the probe waits for its answer
                (r,) = await asyncio.wait_for(task, 10)
            assert r.error is ErrorKind.SOURCE_ERROR
            assert r.error_detail == f"network namespace {name!r} vanished during the probe"
            # what kept the deleted namespace alive (its worker thread, its pooled sockets) is released at the
            # next probe of any source, here the host
            assert RUN / name in netns._shared and any(s.netns == name for s in sockets._sources.values())
            sockets._next_sweep = 0.0
            async with ProbeEnv() as env:
                (r,) = await run_probe(_spec("host"), env)
            assert r.error is not ErrorKind.SOURCE_ERROR
            assert RUN / name not in netns._shared and all(s.netns != name for s in sockets._sources.values())
        finally:
            if conn is not None:
                conn.close()
            listener.close()


@pytest.mark.kernel
def test_worker_threads_are_bounded_and_released(monkeypatch):
    monkeypatch.setattr(netns, "_shared", {})
    monkeypatch.setattr(netns, "MAX_SHARED", 2)
    threads = threading.active_count()
    with namespace() as a, namespace() as b, namespace() as c:
        shared_executor(a)
        shared_executor(b)
        assert threading.active_count() == threads + 2
        with pytest.raises(NetnsError) as info:
            shared_executor(c)
        assert info.value.strerror == "more than 2 network namespaces in use at once"
        with pytest.raises(SourceError, match="more than 2 network namespaces in use at once"):
            Source(f"netns {c}")
        subprocess.run(["ip", "netns", "del", a], check=True)
        ex_a = netns._shared[RUN / a]
        ex = shared_executor(c)  # a's worker is released to make room
        assert set(netns._shared) == {RUN / b, RUN / c} and ex.inode == os.stat(RUN / c).st_ino
        ex_a._pool.shutdown(wait=True)  # its thread ends once its queue is empty
    assert netns._shared == {}
    assert threading.active_count() == threads
