"""Batch ingest: `RingReader` (the ring buffer read through mmap, no callback per record) and `decode_records`
(runs of records unpacked in one call) give exactly the events the per-record decoder gives.

- on a ring laid out in memory as the kernel lays it out (consumer page, producer page, data mapped twice):
  runs that wrap around the end, a record still being written (the read stops there), discarded records, a
  record of another size (an older layout) in the middle;
- on records built from random field values (every kind, both families, every flag);
- on the running kernel's own ring: every record the sensor wrote, decoded in a batch and one by one.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpf.decode import (
    AF_INET,
    AF_INET6,
    EVENT_SIZE,
    EVENT_V1_STRUCT,
    NUMBER_BY_KIND,
    RECORD_STRUCT,
    KernelNames,
    decode_event,
    decode_records,
)
from bpf.ring import BUSY_BIT, DISCARD_BIT, RingReader
from bpf.types import EventKind
from tests.bpf.records import encode_event

PAGE = mmap.PAGESIZE
NAMES = KernelNames(drop_reasons={2: "NOT_SPECIFIED", 5: "NETFILTER_DROP"}, rst_reasons={1: "NOT_SPECIFIED"})


class FakeRing:
    """A memfd laid out like a BPF ring buffer map: what the kernel would have written, for RingReader."""

    def __init__(self, data_size: int = 4 * PAGE):
        self.size = data_size
        self.fd = os.memfd_create("fake-ringbuf")
        os.ftruncate(self.fd, 2 * PAGE + 2 * data_size)
        self.mem = mmap.mmap(self.fd, 2 * PAGE + 2 * data_size)
        self.prod = 0
        self.reader = RingReader(self.fd, data_size)

    def close(self) -> None:
        self.reader.close()
        self.mem.close()
        os.close(self.fd)

    @property
    def cons(self) -> int:
        return struct.unpack_from("<Q", self.mem, 0)[0]

    def set_cons(self, pos: int) -> None:
        struct.pack_into("<Q", self.mem, 0, pos)
        self.prod = pos
        struct.pack_into("<Q", self.mem, PAGE, pos)

    def _write(self, pos: int, data: bytes) -> None:
        for i, b in enumerate(data):  # both copies of the data area (the kernel maps its pages twice)
            off = (pos + i) % self.size
            self.mem[2 * PAGE + off] = b
            self.mem[2 * PAGE + self.size + off] = b

    def push(self, sample: bytes, flags: int = 0) -> None:
        self._write(self.prod, struct.pack("<II", len(sample) | flags, 0) + sample)
        self.prod += (len(sample) + 8 + 7) & ~7
        struct.pack_into("<Q", self.mem, PAGE, self.prod)


@pytest.fixture
def ring():
    r = FakeRing()
    yield r
    r.close()


def _event(i: int, family: int = AF_INET) -> bytes:
    addr = "10.0.0.1" if family == AF_INET else "fd00::1"
    kinds = list(NUMBER_BY_KIND)
    return encode_event(kind=kinds[i % len(kinds)], ts_ns=1_000 + i, family=family, saddr=addr, daddr=addr,
                        sport=1000 + i, dport=80, netns=4026531840, reason=5, state=1, old_state=2,
                        tcp_flags=0x12, seq=i if i % 2 else None, seq_len=3, snd_una=7 if i % 3 else None)


def _read_all(ring: FakeRing) -> list:
    fixed, other = ring.reader.read(RECORD_STRUCT)
    others = iter(other)
    return [decode_event(next(others), NAMES) if f is None else decode_records([f], NAMES)[0] for f in fixed]


def test_a_run_of_records_including_one_across_the_end(ring):
    ring.set_cons(ring.size - 3 * 112 - 40)  # the third record's bytes straddle the end of the data area
    samples = [_event(i) for i in range(6)]
    for s in samples:
        ring.push(s)
    assert _read_all(ring) == [decode_event(s, NAMES) for s in samples]
    assert ring.cons == ring.prod  # the room is given back
    assert ring.reader.read(RECORD_STRUCT) == ([], [])


def test_stops_at_a_record_still_being_written_and_resumes(ring):
    samples = [_event(i, AF_INET6) for i in range(4)]
    ring.push(samples[0])
    ring.push(samples[1])
    busy_at = ring.prod
    ring.push(samples[2], flags=BUSY_BIT)
    ring.push(samples[3])
    assert _read_all(ring) == [decode_event(s, NAMES) for s in samples[:2]]
    assert ring.cons == busy_at
    ring._write(busy_at, struct.pack("<I", EVENT_SIZE))  # submitted: the busy bit cleared
    assert _read_all(ring) == [decode_event(s, NAMES) for s in samples[2:]]


def test_skips_discarded_records_and_keeps_order_with_an_older_layout(ring):
    a, b, c = _event(1), _event(2), _event(3)
    old = encode_event(kind=EventKind.STATE, ts_ns=5, state=1, old_state=2)[:EVENT_V1_STRUCT.size]
    ring.push(a)
    ring.push(b, flags=DISCARD_BIT)
    ring.push(old)
    ring.push(c)
    assert _read_all(ring) == [decode_event(a, NAMES), decode_event(old, NAMES), decode_event(c, NAMES)]


_fields = st.tuples(
    st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1), st.integers(-(2**31), 2**31 - 1), st.sampled_from(sorted(NUMBER_BY_KIND.values())),
    st.sampled_from([AF_INET, AF_INET6, 0]), st.integers(0, 65535), st.integers(0, 65535),
    st.sampled_from([1, 6, 17, 58, 132, 99]), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
    st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 7), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)


@settings(max_examples=500, derandomize=True, deadline=None)
@given(st.lists(_fields, min_size=1, max_size=8))
def test_batch_decoder_is_the_record_decoder(records):
    rows = [(EVENT_SIZE, 0, *f) for f in records]
    raws = [RECORD_STRUCT.pack(*r)[8:] for r in rows]
    names = KernelNames(drop_reasons={5: "NETFILTER_DROP"}, symbolize={123: "tcp_v4_rcv+0x9"}.get)
    assert decode_records(rows, names) == [decode_event(raw, names) for raw in raws]


@pytest.mark.kernel
def test_the_kernels_own_records_decode_the_same_in_a_batch(sensor):
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    port = lst.getsockname()[1]
    sensor.drain()
    sensor.watch("tcp", port)
    try:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as c:
                conn, _ = lst.accept()
                conn.close()
                c.recv(1)
    finally:
        sensor.unwatch("tcp", port)
        lst.close()
    fixed, other = sensor._reader.read(RECORD_STRUCT)  # what the sensor would read next, read here instead
    assert other == [] and len(fixed) >= 20 * 4
    batch = decode_records(fixed, sensor.names)
    assert batch == [decode_event(RECORD_STRUCT.pack(*f)[8:], sensor.names) for f in fixed]
    assert {e.kind for e in batch} >= {EventKind.STATE}
    assert all(port in (e.sport, e.dport) for e in batch)
