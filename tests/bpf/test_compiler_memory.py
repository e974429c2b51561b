"""After compiling, the sensor gives back the compiler's code pages and freed heap (bpf/loader.py
`release_compiler_memory`): the loaded sensor keeps working, and a later compile in the same process (a second
sensor, as a reload or a diagnose does) runs the compiler again from the faulted-back pages."""

from __future__ import annotations

import socket

import pytest

from bpf.loader import release_compiler_memory
from bpf.sensor import KernelSensor
from bpf.types import EventKind


def _connections(sensor: KernelSensor, n: int = 3) -> list:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    port = lst.getsockname()[1]
    sensor.watch("tcp", port)
    try:
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port)) as c:
                conn, _ = lst.accept()
                conn.close()
                c.recv(1)
        sensor.poll(200)
        return [e for e in sensor.drain() if port in (e.sport, e.dport)]
    finally:
        sensor.unwatch("tcp", port)
        lst.close()


@pytest.mark.kernel
def test_sensor_works_after_the_compiler_memory_is_released():
    with KernelSensor() as first:
        assert release_compiler_memory() > 0  # the libraries are mapped: their code pages were dropped (again)
        assert any(e.kind == EventKind.STATE for e in _connections(first))
        with KernelSensor() as second:  # compiles with the released libraries
            assert all(h.attached for h in second.status())
            assert any(e.kind == EventKind.STATE for e in _connections(second))
        assert any(e.kind == EventKind.STATE for e in _connections(first))
