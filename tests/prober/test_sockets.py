"""prober.sockets.connect and recv_stamped (the prober's own thin connect and datagram read), on the
plain asyncio loop and on uvloop.

Each path they can take is made to happen for real on loopback: the handshake over before connect()
returns, a handshake that has to be waited for (the listener's accept queue is full, so the first SYN is
dropped and the kernel retransmits it ~1 s later), a refused connection, a datagram that arrives later or
is queued already, and an ICMP error.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time

import pytest

from prober.sockets import connect, recv_stamped

LOOPS = ["asyncio", "uvloop"]


def run(loop_kind: str, main):
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main())
    return asyncio.run(main())


def _listener(backlog: int) -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(backlog)
    return srv


@pytest.fixture
def listener():
    srv = _listener(8)
    yield srv
    srv.close()


@pytest.fixture
def full_listener():
    """A listener whose accept queue is full: the next SYN it gets is dropped (the kernel retries ~1 s later)."""
    srv = _listener(0)
    first = socket.create_connection(srv.getsockname())
    yield srv
    first.close()
    srv.close()


def _client() -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    return sock


async def _works(sock: socket.socket, peer: socket.socket) -> None:
    """The connected socket carries an asyncio transport afterwards."""
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"ping")
    await writer.drain()
    assert peer.recv(4) == b"ping"
    peer.sendall(b"pong")
    assert await reader.readexactly(4) == b"pong"
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_connect_on_a_short_path(loop_kind, listener):
    srv = listener

    async def main():
        sock = _client()
        before = time.monotonic_ns()
        stamp = await connect(asyncio.get_running_loop(), sock, srv.getsockname())
        assert before <= stamp <= time.monotonic_ns()
        peer, _ = srv.accept()
        with peer:
            await _works(sock, peer)

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_connect_waits_for_a_late_handshake_and_stamps_when_it_completes(loop_kind, full_listener):
    srv = full_listener

    async def main():
        loop = asyncio.get_running_loop()
        sock = _client()
        before = time.monotonic_ns()
        pending = asyncio.ensure_future(connect(loop, sock, srv.getsockname()))
        await asyncio.sleep(0.2)
        assert not pending.done()  # still in SYN_SENT
        srv.accept()[0].close()  # room again: the retransmitted SYN (after ~1 s) gets through
        stamp = await asyncio.wait_for(pending, 5)
        assert stamp - before > 0.5e9  # stamped when the handshake completed, not when connect() began
        assert time.monotonic_ns() - stamp < 0.5e9
        peer, _ = srv.accept()
        with peer:
            await _works(sock, peer)

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_connect_refused_raises_the_errno(loop_kind):
    srv = _listener(1)
    addr = srv.getsockname()
    srv.close()  # nothing listens there now

    async def main():
        sock = _client()
        with sock, pytest.raises(OSError) as info:
            await connect(asyncio.get_running_loop(), sock, addr)
        assert info.value.errno == errno.ECONNREFUSED

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_cancelled_connect_stops_watching_the_socket(loop_kind, full_listener):
    srv = full_listener

    async def main():
        loop = asyncio.get_running_loop()
        sock = _client()
        pending = asyncio.ensure_future(connect(loop, sock, srv.getsockname()))
        await asyncio.sleep(0.1)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        if loop_kind == "asyncio":  # uvloop's remove_writer answers None either way: it cannot tell
            assert loop.remove_writer(sock.fileno()) is False  # nothing left registered for the socket
        sock.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_connect_sees_its_socket_through_a_stale_registration(loop_kind, full_listener):
    """Some code closed an fd while the loop still watched it; the new socket gets the same fd number. The
    loop's selector keeps a key that epoll forgot: add_writer alone would never see the handshake end."""
    srv = full_listener

    async def main():
        loop = asyncio.get_running_loop()
        old = _client()
        fd = old.fileno()
        loop.add_writer(fd, lambda: None)
        loop.add_reader(fd, lambda: None)
        old.close()  # closed under the loop's feet
        sock = _client()
        assert sock.fileno() == fd
        pending = asyncio.ensure_future(connect(loop, sock, srv.getsockname()))
        await asyncio.sleep(0.2)
        srv.accept()[0].close()  # the retransmitted SYN (after ~1 s) gets through
        await asyncio.wait_for(pending, 10)  # seen: not left waiting for an event that never comes
        peer, _ = srv.accept()
        peer.close()
        sock.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_recv_stamped_stamps_a_datagram_when_it_arrives(loop_kind):
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))

    async def main():
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        with sock:
            sock.connect(peer.getsockname())
            sent: list[int] = []

            def answer():
                sent.append(time.monotonic_ns())
                peer.sendto(b"late", sock.getsockname())

            loop.call_later(0.2, answer)
            data, seen = await asyncio.wait_for(recv_stamped(loop, sock), 5)
            assert data == b"late" and 0 <= seen - sent[0] < 50e6
            peer.sendto(b"early", sock.getsockname())  # already queued: read at once
            await asyncio.sleep(0.05)
            before = time.monotonic_ns()
            data, seen = await recv_stamped(loop, sock)
            assert data == b"early" and seen >= before

    try:
        run(loop_kind, main)
    finally:
        peer.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_recv_stamped_raises_an_icmp_error(loop_kind):
    gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gone.bind(("127.0.0.1", 0))
    addr = gone.getsockname()
    gone.close()  # nothing listens there: the kernel answers with ICMP port unreachable

    async def main():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        with sock, pytest.raises(OSError) as info:
            sock.connect(addr)
            sock.send(b"anyone?")
            await asyncio.wait_for(recv_stamped(asyncio.get_running_loop(), sock), 5)
        assert info.value.errno == errno.ECONNREFUSED

    run(loop_kind, main)
