"""The consumer side of a BPF ring buffer (BPF_MAP_TYPE_RINGBUF), read through mmap in batches.

libbpf's consumer (what bcc's `ring_buffer_consume` runs) calls back into Python once per record through
ctypes (~1.5 µs before any decoding, plus a copy with `ctypes.string_at`). Here the records between the
consumer and producer positions are read in one pass: the kernel maps the data area twice in a row, so a
run of records that wraps around the end is one contiguous slice, and fixed-size records are unpacked with
`struct.iter_unpack` over the whole slice.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (the only page user space may write), page 1
the producer position, then the data area (a power of two bytes) mapped twice. Each record is an 8-byte header
— length with the BUSY (bit 31, reserved but not yet submitted) and DISCARD (bit 30) flags, and a page offset
— then the sample, the whole rounded up to 8 bytes.
"""

from __future__ import annotations

import mmap
import select
import struct

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
_POS = struct.Struct("<Q")
_HDR = struct.Struct("<I")


def _round8(n: int) -> int:
    return (n + 7) & ~7


class RingReader:
    """Reads a ring buffer map's records; `read()` returns the ready ones and frees their room in the ring."""

    def __init__(self, map_fd: int, data_size: int):
        if data_size <= 0 or data_size & (data_size - 1):
            raise ValueError(f"ring buffer size must be a power of two, got {data_size}")
        page = mmap.PAGESIZE
        self.fd = map_fd
        self.data_size = data_size
        self._mask = data_size - 1
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._prod = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            self._cons.close()
            raise
        self._data_off = page  # in the second mapping: producer page, then the data area twice
        self._poll = select.poll()
        self._poll.register(map_fd, select.POLLIN)

    def close(self) -> None:
        for m in (self._cons, self._prod):
            if not m.closed:
                m.close()

    def pending(self) -> int:
        """Bytes between the consumer and producer positions (records not read yet, headers included)."""
        return _POS.unpack_from(self._prod, 0)[0] - _POS.unpack_from(self._cons, 0)[0]

    def wait(self, timeout_ms: int) -> bool:
        """Block until the kernel says records are ready (or the timeout); True when they are."""
        return bool(self._poll.poll(timeout_ms))

    def read(self, record: struct.Struct) -> tuple[list[tuple], list[bytes]]:
        """Every complete record ready now, in order: those of `record.size - 8` bytes of sample unpacked with
        `record` (whose format starts with the header's two u32), the others (any other length) as raw bytes,
        each with its position in the first list marked by a None. Discarded records are skipped; the read
        stops at the first record still being written. Then the consumer position moves past what was read."""
        cons = _POS.unpack_from(self._cons, 0)[0]
        prod = _POS.unpack_from(self._prod, 0)[0]
        if prod == cons:
            return [], []
        if prod - cons > self.data_size:  # cannot happen with a sane kernel: the producer stops at a full ring
            raise ValueError(f"ring buffer positions out of range (consumer {cons}, producer {prod})")
        data, base, mask = self._prod, self._data_off, self._mask
        want = record.size - HDR_SIZE
        stride = _round8(record.size)
        fixed: list[tuple] = []
        other: list[bytes] = []
        pos = cons
        while pos < prod:
            start = base + (pos & mask)
            # fast path: a run of fixed-size, submitted records, unpacked in one call
            n = (prod - pos) // stride
            if n and stride == record.size:
                block = data[start:start + n * stride]
                got = 0
                for fields in record.iter_unpack(block):
                    if fields[0] != want:
                        break
                    fixed.append(fields)
                    got += 1
                pos += got * stride
                if got == n:
                    continue
                start = base + (pos & mask)
            length = _HDR.unpack_from(data, start)[0]
            if length & BUSY_BIT:
                break
            size = length & ~(BUSY_BIT | DISCARD_BIT)
            if not length & DISCARD_BIT:
                if size == want:
                    fixed.append(record.unpack_from(data, start))
                else:
                    other.append(data[start + HDR_SIZE:start + HDR_SIZE + size])
                    fixed.append(None)  # type: ignore[arg-type]  # its place among the fixed ones
            pos += _round8(size + HDR_SIZE)
        _POS.pack_into(self._cons, 0, pos)
        return fixed, other


def wait_any(readers: list[RingReader], timeout_ms: int) -> bool:
    """Block until the kernel says one of the rings has records ready (or the timeout); True when one has."""
    poller = select.poll()
    for r in readers:
        poller.register(r.fd, select.POLLIN)
    return bool(poller.poll(timeout_ms))
