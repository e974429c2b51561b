"""Helpers for the kernel sensor's lab tests: a client that registers its local port on the watch list
between bind() and connect(), as the prober does, and event filters."""

from __future__ import annotations

import errno
import os
import socket
import time
from dataclasses import dataclass

from bpf.sensor import KernelSensor
from bpf.types import EventKind, KernelEvent


@dataclass
class ClientRun:
    family: int
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    error: int  # errno of connect (0 = connected)
    received: int  # bytes read after sending the request


def client_request(lab, sensor: KernelSensor | None, addr: str, port: int, *, request: bytes | None = None,
                   timeout: float = 2.5, watch: bool = True) -> ClientRun:
    """Connect from the lab's client namespace (watching the local port first), optionally send `request`
    and read until the peer closes. Returns what happened; the port is unwatched by the caller."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    def run() -> ClientRun:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            lport = s.getsockname()[1]
            if watch and sensor is not None:
                sensor.watch("tcp", lport)
            s.settimeout(timeout)
            err, got = 0, 0
            try:
                s.connect((addr, port))
            except TimeoutError:
                err = errno.ETIMEDOUT
            except OSError as exc:
                err = exc.errno or -1
            laddr = s.getsockname()[0] if err == 0 else ""
            if err == 0 and request is not None:
                s.sendall(request)
                s.settimeout(30)
                while chunk := s.recv(65536):
                    got += len(chunk)
            return ClientRun(family, laddr, lport, addr, port, err, got)

    return lab.executor("client").call(run)


def lab_netns(lab) -> set[int]:
    from connprobe.lab.topology import ROLES

    return {lab.ns(role).inode for role in ROLES}


def events_of(sensor: KernelSensor, port: int, lab=None, settle: float = 0.3) -> list[KernelEvent]:
    """Every event read so far that involves `port` on either side (after letting late ones arrive), seen in
    one of `lab`'s namespaces (or, without a lab, in this process's own). The sensor watches ports on the
    whole node: another lab on this machine (same addresses, other namespaces) may use the same port."""
    time.sleep(settle)
    keep = lab_netns(lab) if lab is not None else {os.stat("/proc/self/ns/net").st_ino}
    return [e for e in sensor.drain() if port in (e.sport, e.dport) and e.netns in keep]


def kinds(events: list[KernelEvent]) -> set[EventKind]:
    return {e.kind for e in events}


def http_get(path: str, host: str = "lab") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
