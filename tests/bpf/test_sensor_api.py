"""KernelSensor's API: async iteration, watch/unwatch, loss accounting with a tiny ring buffer, feature
checks that turn off one hook only, clean-up of every BPF program, and the error without privileges."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from bpf.errors import SensorClosed, SensorUnavailable
from bpf.hooks import HOOKS
from bpf.sensor import KernelSensor
from bpf.types import EventKind
from tests.bpf.sensorlab import events_of
from tests.conftest import require

kernel = pytest.mark.kernel


def _require_btf(what: str) -> None:
    """Skip (fail under CONNPROBE_REQUIRE_KERNEL=1) without the kernel's BTF, which the sensor reads first."""
    require(None if Path("/sys/kernel/btf/vmlinux").exists() else f"needs the kernel's BTF to get as far as {what}")


def loopback_pair(count: int, listener: socket.socket) -> None:
    """`count` complete TCP connections to a loopback listener, synchronously."""
    addr = listener.getsockname()
    for _ in range(count):
        with socket.create_connection(addr) as c:
            conn, _ = listener.accept()
            conn.close()
            c.recv(1)


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(512)
    return s


def bpftool_prog_exists(prog_id: int) -> bool:
    out = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True, text=True)
    return out.returncode == 0


def still_loaded(ids: list[int], within: float = 3.0) -> list[int]:
    """Program ids bpftool still lists after `within` seconds. The kernel frees a program after an RCU grace
    period once its last fd is closed (about 0.1 s for the raw tracepoint here), so poll briefly."""
    deadline = time.monotonic() + within
    while (left := [i for i in ids if bpftool_prog_exists(i)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# -- without the kernel -----------------------------------------------------------------------------------


def test_not_root_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setattr("bpf.preload.import_bcc", lambda: None)
    with pytest.raises(SensorUnavailable, match=r"not root: the kernel sensor needs root"):
        KernelSensor().open()


def test_missing_tracefs_and_btf_name_the_missing_piece(monkeypatch, tmp_path):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("bpf.preload.import_bcc", lambda: None)  # these checks come before bcc is used
    with pytest.raises(SensorUnavailable, match="tracefs is not mounted"):
        KernelSensor(tracefs_root=tmp_path / "no-tracefs").open()
    (tmp_path / "events").mkdir()
    with pytest.raises(SensorUnavailable, match="kernel BTF unusable: cannot read BTF"):
        KernelSensor(tracefs_root=tmp_path, btf_path=tmp_path / "vmlinux").open()


def test_parameters_are_validated_and_closed_sensor_refuses_use():
    with pytest.raises(ValueError, match="power of two"):
        KernelSensor(ring_pages=3)
    s = KernelSensor()
    with pytest.raises(SensorClosed):
        s.watch("tcp", 1234)
    with pytest.raises(ValueError, match="proto must be"):
        s._key("sctp", 1)
    assert s._key("icmp", 7) == (1, 7)  # an echo identifier (ICMPv6 echoes are folded into icmp)
    s.close()
    with pytest.raises(SensorClosed):
        s.open()


# -- on the running kernel --------------------------------------------------------------------------------


@kernel
async def test_async_iteration_delivers_watched_events_only():
    lst = listener()
    other = listener()
    try:
        async with KernelSensor() as sensor:
            assert all(h.attached for h in sensor.status()), sensor.status()
            port = lst.getsockname()[1]
            sensor.watch("tcp", port)
            sensor.watch("tcp", port)  # reference-counted
            loopback_pair(1, lst)
            loopback_pair(1, other)  # not watched
            first = await sensor.next_event(timeout=5)
            assert first is not None and first.kind == EventKind.STATE and port in (first.sport, first.dport)
            seen = [first]
            while (ev := await sensor.next_event(timeout=0.3)) is not None:
                seen.append(ev)
            assert all(port in (e.sport, e.dport) for e in seen)
            assert {"ESTABLISHED", "SYN_RECV", "CLOSE"} <= {e.tcp_state for e in seen}
            sensor.unwatch("tcp", port)
            assert sensor.watched() == {("tcp", port)}  # one reference left
            sensor.unwatch("tcp", port)
            assert sensor.watched() == set()
            loopback_pair(1, lst)
            assert await sensor.next_event(timeout=0.5) is None
            c = sensor.counters()
            assert c.total(EventKind.STATE, "ESTABLISHED") >= 6  # 3 connections x 2 sides
            assert c.total(EventKind.STATE, "ESTABLISHED", watched=True) == 2
            assert c.lost == 0 and c.delivered == len(seen)
        assert sensor.closed
        assert await sensor.next_event(timeout=0.1) is None  # iteration ends after close
        assert sensor.counters().total(EventKind.STATE, "ESTABLISHED", watched=True) == 2  # last counts kept
        assert sensor.lost_events == 0
    finally:
        lst.close()
        other.close()


@kernel
async def test_a_port_watched_by_two_protocols_stays_watched_for_the_one_left():
    """The kernel tells unwatched ports apart by a per-port count of the protocols watching it before it looks
    at the watch list: unwatching udp/P must leave tcp/P watched, and unwatching both must leave P silent."""
    lst = listener()
    try:
        async with KernelSensor() as sensor:
            port = lst.getsockname()[1]
            sensor.watch("tcp", port)
            sensor.watch("udp", port)
            sensor.unwatch("udp", port)
            loopback_pair(1, lst)
            ev = await sensor.next_event(timeout=5)
            assert ev is not None and ev.kind == EventKind.STATE and port in (ev.sport, ev.dport)
            while await sensor.next_event(timeout=0.3) is not None:
                pass
            sensor.unwatch("tcp", port)
            sensor.watch("udp", port)  # the port counted again, for udp only: tcp/P stays unwatched
            loopback_pair(1, lst)
            assert await sensor.next_event(timeout=0.5) is None
            sensor.unwatch("udp", port)
            assert sensor.watched() == set()
    finally:
        lst.close()


@kernel
async def test_tiny_ring_buffer_counts_lost_events_and_keeps_running():
    lst = listener()
    try:
        async with KernelSensor(ring_pages=1) as sensor:
            sensor.watch("tcp", lst.getsockname()[1])
            # The loop is blocked during the burst, so nothing reads the 4 KiB ring buffer meanwhile.
            loopback_pair(300, lst)
            assert sensor.lost_events > 0
            lost = sensor.counters().ring_lost
            assert lost == sensor.lost_events
            got = 0
            while await sensor.next_event(timeout=0.3) is not None:
                got += 1
            assert 0 < got < 300 * 6
            loopback_pair(1, lst)  # still running: a new connection's events arrive
            ev = await sensor.next_event(timeout=5)
            assert ev is not None and ev.kind == EventKind.STATE
    finally:
        lst.close()


@kernel
async def test_no_program_stays_attached_after_close_even_on_exception():
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is not installed")
    ids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"):
        async with KernelSensor() as sensor:
            ids = sensor.prog_ids()
            assert len(ids) == len(HOOKS)
            assert all(bpftool_prog_exists(i) for i in ids)
            raise RuntimeError("boom")
    assert not still_loaded(ids)
    # and the synchronous form
    with KernelSensor() as sensor:
        ids = sensor.prog_ids()
    assert ids and not still_loaded(ids)


@kernel
def test_missing_tracepoint_turns_off_only_that_hook(tmp_path, caplog):
    real = Path("/sys/kernel/tracing/events")
    for hook in HOOKS:
        if hook.event == "tcp_receive_reset":
            continue
        dst = tmp_path / "events" / hook.category / hook.event
        dst.mkdir(parents=True)
        shutil.copy(real / hook.category / hook.event / "format", dst / "format")
    lst = listener()
    port = lst.getsockname()[1]
    lst.close()  # nothing listens there now: connect gets a reset
    with KernelSensor(tracefs_root=tmp_path) as sensor:
        status = {h.name: h for h in sensor.status()}
        assert not status["tcp:tcp_receive_reset"].attached
        assert "does not exist" in status["tcp:tcp_receive_reset"].detail
        assert all(h.attached for n, h in status.items() if n != "tcp:tcp_receive_reset")
        assert len(sensor.prog_ids()) == len(HOOKS) - 1
        with socket.socket() as c:
            c.bind(("127.0.0.1", 0))
            sensor.watch("tcp", c.getsockname()[1])
            with pytest.raises(ConnectionRefusedError):
                c.connect(("127.0.0.1", port))
            evs = events_of(sensor, c.getsockname()[1], settle=0.2)
    got = {e.kind for e in evs}
    assert EventKind.RESET_TX in got and EventKind.RESET_RX not in got
    assert "tcp:tcp_receive_reset" in caplog.text


@kernel
def test_udp_to_a_closed_port_gives_no_socket_drop_and_icmp(lab, sensor):
    """The DNS-server-down signature, IPv4: the query is freed with NO_SOCKET in the server namespace and
    an ICMP port unreachable is sent; the client's connected socket gets ECONNREFUSED."""
    dst = lab.server("srv1").addr4

    def query() -> tuple[int, int]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("0.0.0.0", 0))
            lport = s.getsockname()[1]
            sensor.watch("udp", lport)
            s.connect((dst, 5399))
            s.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00")
            s.settimeout(2)
            try:
                s.recv(512)
            except OSError as exc:
                return lport, exc.errno or -1
            return lport, 0

    lport, err = lab.executor("client").call(query)
    try:
        evs = events_of(sensor, lport, lab)
    finally:
        sensor.unwatch("udp", lport)
    assert err == errno.ECONNREFUSED
    (drop,) = [e for e in evs if e.kind == EventKind.DROP]
    assert drop.five_tuple == ("udp", "10.77.1.2", lport, dst, 5399)
    assert (drop.reason, drop.netns, drop.tcp_flags) == ("NO_SOCKET", lab.ns("srv1").inode, None)
    (icmp,) = [e for e in evs if e.kind == EventKind.ICMP_SEND]
    assert icmp.five_tuple == drop.five_tuple and icmp.reason == "PORT_UNREACH" and icmp.netns == lab.ns("srv1").inode
    errs = [e for e in evs if e.kind == EventKind.SOCK_ERROR]
    assert errs and errs[0].reason == "ECONNREFUSED" and errs[0].five_tuple == drop.five_tuple
    assert errs[0].netns == lab.ns("client").inode


@kernel
def test_offsets_decode_a_packet_whose_tuple_is_known(lab, sensor):
    """Second source for the BTF offsets: a TCP SYN sent from a socket whose addresses we chose must decode
    (skb->head + network_header, transport header, skb->dev->nd_net->ns.inum) to exactly those, in both
    families; a wrong offset gives garbage or nothing."""
    from tests.bpf.sensorlab import client_request

    for addr, caddr in ((lab.server("srv2").addr4, "10.77.1.2"), (lab.server("srv2").addr6, "fd77:1::2")):
        with lab.no_listener("srv2"):
            run = client_request(lab, sensor, addr, 8080)
        try:
            evs = events_of(sensor, run.local_port, lab)
        finally:
            sensor.unwatch("tcp", run.local_port)
        (drop,) = [e for e in evs if e.kind == EventKind.DROP]
        assert drop.five_tuple == ("tcp", caddr, run.local_port, addr, 8080)
        assert drop.netns == lab.ns("srv2").inode == Path(f"/run/netns/{lab.ns('srv2').name}").stat().st_ino
        assert drop.tcp_flags == "S" and drop.location == ("tcp_v4_rcv" if ":" not in addr else "tcp_v6_rcv")


@kernel
async def test_events_arrive_while_the_loop_waits():
    """The ring buffer is read from the event loop (add_reader): a consumer awaiting the iterator wakes up."""
    lst = listener()
    try:
        async with KernelSensor() as sensor:
            sensor.watch("tcp", lst.getsockname()[1])

            async def consume() -> EventKind:
                async for ev in sensor:
                    return ev.kind
                raise AssertionError("iteration ended")

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.05)
            await asyncio.to_thread(loopback_pair, 1, lst)
            assert await asyncio.wait_for(task, 5) == EventKind.STATE
    finally:
        lst.close()


def test_no_usable_tracepoint_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("bpf.preload.import_bcc", lambda: None)
    (tmp_path / "events").mkdir()
    monkeypatch.setattr("bpf.preload.kernel_headers_dir", lambda *_: tmp_path)
    _require_btf("the tracepoint checks")
    with pytest.raises(SensorUnavailable, match=r"no usable tracepoint.*kfree_skb does not exist"):
        KernelSensor(tracefs_root=tmp_path).open()


def test_missing_bcc_and_headers_name_the_missing_piece(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_bcc(name, *args, **kwargs):
        if name == "bcc":
            raise ImportError("No module named 'bcc'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bcc)
    with pytest.raises(SensorUnavailable, match=r"bcc is not importable.*python3-bpfcc"):
        KernelSensor().open()
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("bpf.preload.import_bcc", lambda: None)
    monkeypatch.setattr("bpf.preload.kernel_headers_dir", lambda *_: None)
    (tmp_path / "events").mkdir()
    _require_btf("the headers check")
    with pytest.raises(SensorUnavailable, match=r"no kernel headers at /lib/modules/.*scripts/setup"):
        KernelSensor(tracefs_root=tmp_path).open()


def test_a_source_link_alone_is_not_kernel_headers(monkeypatch, tmp_path):
    """The sensor refuses before compiling when only /lib/modules/R/source is there (bcc would not find it)."""
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("bpf.preload.import_bcc", lambda: None)
    modules = tmp_path / "modules"
    (modules / os.uname().release / "source").mkdir(parents=True)
    monkeypatch.setattr("bpf.preload.MODULES_DIR", modules)
    (tmp_path / "events").mkdir()
    _require_btf("the headers check")
    with pytest.raises(SensorUnavailable, match=r"no kernel headers at .*/build: bcc needs them"):
        KernelSensor(tracefs_root=tmp_path).open()


def test_public_names():
    import bpf.errors
    import bpf.sensor

    for name in bpf.sensor.__all__:
        assert hasattr(bpf.sensor, name), name
    # Each name has one home: errors in bpf/errors.py, the hook table in bpf/hooks.py, statistics in runstats.
    assert not {"SensorError", "HOOKS", "HookSpec", "HookStatus", "bpf_run_time_stats"} & set(bpf.sensor.__all__)
    assert issubclass(SensorUnavailable, bpf.errors.SensorError)
    assert issubclass(SensorClosed, bpf.errors.SensorError)


@kernel
def test_source_switch_prints_the_program_and_its_flags(capfd):
    with KernelSensor(debug_source=True, ring_pages=1):
        pass
    err = capfd.readouterr().err
    assert "TRACEPOINT_PROBE(skb, kfree_skb)" in err and "struct cp_event {" in err
    assert "-DOFF_SKB_HEAD=" in err and "-DHOOK_SKB_KFREE_SKB" in err


@kernel
def test_a_hook_that_fails_to_attach_costs_only_itself(tmp_path):
    """A tracepoint that passes the format check but cannot be attached (here: one the kernel lacks, with a
    format file planted in a copied tracefs) is reported in status(); every other hook is attached, and
    nothing of the failed one stays loaded."""
    from bpf.hooks import HookSpec

    real = Path("/sys/kernel/tracing/events")
    for hook in HOOKS:
        dst = tmp_path / "events" / hook.category / hook.event
        dst.mkdir(parents=True)
        shutil.copy(real / hook.category / hook.event / "format", dst / "format")
    bogus = HookSpec("tcp", "tcp_connprobe_bogus", EventKind.RETRANSMIT, ())
    (tmp_path / "events" / "tcp" / bogus.event).mkdir()
    shutil.copy(real / "tcp" / "tcp_retransmit_skb" / "format", tmp_path / "events" / "tcp" / bogus.event / "format")
    with KernelSensor(tracefs_root=tmp_path, hooks=(*HOOKS, bogus)) as sensor:
        status = {h.name: h for h in sensor.status()}
        assert not status[bogus.name].attached and "load/attach failed" in status[bogus.name].detail
        assert all(status[h.name].attached for h in HOOKS)
        ids = sensor.prog_ids()
        assert len(ids) == len(HOOKS)
    assert not still_loaded(ids)


@kernel
def test_run_time_stats_count_program_runs_while_enabled():
    from bpf.runstats import bpf_run_time_stats

    lst = listener()
    try:
        with KernelSensor(ring_pages=1) as sensor:
            with bpf_run_time_stats():
                before = sensor.prog_stats()["tracepoint__sock__inet_sock_set_state"]
                loopback_pair(5, lst)
                after = sensor.prog_stats()["tracepoint__sock__inet_sock_set_state"]
            assert after[0] - before[0] >= 5 * 4  # each connection changes state several times on each side
            assert after[1] > before[1]
    finally:
        lst.close()
