"""`KernelSensor(state_records=...)`: a watched flow's TCP state changes to the listed states become events, the
others are only counted in the kernel — and every change is accounted for: events delivered plus changes counted
and not sent equal the changes the kernel saw on watched flows (`counters().watched`), nothing lost."""

from __future__ import annotations

import socket

import pytest

from bpf.decode import DEFAULT_TCP_STATES, KernelNames
from bpf.sensor import KernelSensor, state_record_mask
from bpf.types import EventKind
from correlator.join import TCP_STATES_READ

kernel = pytest.mark.kernel


def test_mask_numbers_states_as_the_running_kernel_does():
    assert state_record_mask(None, KernelNames()) is None
    assert state_record_mask(frozenset({"ESTABLISHED", "CLOSE"}), KernelNames()) == (1 << 1) | (1 << 7)
    renumbered = KernelNames(tcp_states={**DEFAULT_TCP_STATES, 1: "CLOSE", 7: "ESTABLISHED", 3: "X"})
    assert state_record_mask(frozenset({"SYN_RECV"}), renumbered) == 1 << 3  # not in this table: default number
    assert state_record_mask(frozenset({"CLOSE"}), KernelNames(tcp_states={20: "CLOSE"})) is None  # no slot


@pytest.mark.parametrize("bad", [{"ESTABLISHED", "OPEN"}, {"established"}, {""}, {"TCP_CLOSE"}])
def test_unknown_state_names_are_refused_in_one_line(bad):
    with pytest.raises(ValueError) as err:
        KernelSensor(state_records=bad)
    msg = str(err.value)
    assert msg.startswith("state_records: unknown TCP state") and "\n" not in msg


def test_a_single_name_is_one_state_not_its_letters():
    assert KernelSensor(state_records="CLOSE").state_records == frozenset({"CLOSE"})


def _listener(backlog: int) -> socket.socket:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(backlog)
    return lst


async def _events(sensor: KernelSensor, timeout: float) -> list:
    """Every event until none comes for `timeout` seconds."""
    seen = []
    while (ev := await sensor.next_event(timeout=timeout)) is not None:
        seen.append(ev)
    return seen


def _connections(lst: socket.socket, n: int) -> None:
    for _ in range(n):
        with socket.create_connection(lst.getsockname()) as c:
            conn, _ = lst.accept()
            conn.close()
            c.recv(1)


def _state_total(c, *, watched: bool) -> int:
    return sum(n for (k, _r), n in (c.watched if watched else c.events).items() if k == EventKind.STATE)


@kernel
async def test_only_the_listed_states_become_events_and_the_rest_are_counted():
    lst = _listener(64)
    port = lst.getsockname()[1]
    try:
        async with KernelSensor(state_records=TCP_STATES_READ) as sensor:
            c0 = sensor.counters()
            before = _state_total(c0, watched=True)
            sensor.watch("tcp", port)
            _connections(lst, 5)
            seen = await _events(sensor, 0.5)
            sensor.unwatch("tcp", port)
            c = sensor.counters()
            states = [e for e in seen if e.kind == EventKind.STATE]
            assert {e.tcp_state for e in states} == {"ESTABLISHED", "CLOSE"}, seen
            # both ends of each connection: ESTABLISHED and CLOSE of the client and of the server
            assert sum(e.tcp_state == "ESTABLISHED" for e in states) == 10
            assert sum(e.tcp_state == "CLOSE" for e in states) == 10
            observed = _state_total(c, watched=True) - before
            counted_only = sum(n - c0.watched.get((k, r), 0) for (k, r), n in c.watched.items()
                               if k == EventKind.STATE and r not in TCP_STATES_READ)
            assert c.total(EventKind.STATE, "SYN_SENT", watched=True) >= 5  # counted, never sent
            assert observed > len(states) and counted_only > 0
            assert observed == len(states) + counted_only  # every change: an event, or counted
            assert c.lost == 0
    finally:
        lst.close()


@kernel
async def test_without_the_list_every_change_is_an_event():
    lst = _listener(64)
    port = lst.getsockname()[1]
    try:
        async with KernelSensor() as sensor:
            before = _state_total(sensor.counters(), watched=True)
            sensor.watch("tcp", port)
            _connections(lst, 3)
            seen = await _events(sensor, 0.5)
            sensor.unwatch("tcp", port)
            states = [e for e in seen if e.kind == EventKind.STATE]
            assert {"SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "CLOSE"} <= {e.tcp_state for e in states}
            assert len(states) == _state_total(sensor.counters(), watched=True) - before
    finally:
        lst.close()


@kernel
async def test_records_the_ring_refuses_go_to_the_second_ring_and_are_delivered():
    """A 4 KiB ring, not read during a burst, refuses records after ~36: the second ring (64 KiB) takes the next
    ones, delivered with the others; only what both refuse is lost, and every change is accounted for."""
    lst = _listener(256)
    try:
        async with KernelSensor(ring_pages=1) as sensor:
            before = _state_total(sensor.counters(), watched=True)
            sensor.watch("tcp", lst.getsockname()[1])
            _connections(lst, 100)  # ~1,000 state changes; the loop is blocked meanwhile: nothing reads
            got = len(await _events(sensor, 0.3))
            observed = _state_total(sensor.counters(), watched=True) - before
            assert sensor.rescued_events > 0 and sensor.lost_events > 0
            assert got > 4096 // 112  # more than the first ring holds
            assert got + sensor.lost_events == observed
            rescued = sensor.rescued_events
        assert sensor.rescued_events == rescued  # kept after close
    finally:
        lst.close()


def _in_a_wait(tid: int) -> bool:
    """The thread sleeps in poll/ppoll (x86_64 7, 271; aarch64 73)."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            nr = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return nr in ("7", "271", "73")


@kernel
@pytest.mark.timeout(60)
def test_synchronous_poll_wakes_for_a_record_only_the_second_ring_took():
    """`poll(timeout)` waits on both rings: a record the first ring refused (sensor.c emit(): the kernel also
    refuses now and then with that ring nearly empty) is delivered when it comes, not when the timeout ends.
    The refusal is made certain by moving the first ring's consumer position (the page user space may write)
    past its producer's while `poll` is already waiting: every reservation fails; it is put back afterwards."""
    import struct
    import threading
    import time

    lst = _listener(16)
    pos = struct.Struct("<Q")
    try:
        with KernelSensor(ring_pages=1) as sensor:
            sensor.watch("tcp", lst.getsockname()[1])
            sensor.poll(0)
            sensor.drain()
            rescued = sensor.rescued_events
            cons_page = sensor._reader._cons
            saved = pos.unpack_from(cons_page, 0)[0]
            returned = threading.Event()
            waiter = threading.Thread(target=lambda: (sensor.poll(20_000), returned.set()), daemon=True)
            waiter.start()
            try:
                deadline = time.monotonic() + 10
                while not _in_a_wait(waiter.native_id) and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert _in_a_wait(waiter.native_id), "poll() did not start waiting"
                pos.pack_into(cons_page, 0, saved + (1 << 62))  # the first ring refuses from now on
                _connections(lst, 1)
                # bounded: a poll that waits only on the first ring sleeps its 20 s out
                assert returned.wait(10), "poll() slept through a record in the second ring"
            finally:
                waiter.join(30)
                pos.pack_into(cons_page, 0, saved)
            assert sensor.rescued_events > rescued
            events = sensor.drain()
            assert any(e.kind == EventKind.STATE for e in events), events
    finally:
        lst.close()
