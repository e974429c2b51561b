"""Every exception class the clients can raise has an explicit entry in the mapping table."""

from __future__ import annotations

import errno
import inspect
import ssl
import subprocess
import sys

import aiohttp
import aiohttp.client_exceptions
import aiohttp.http_exceptions
import dns.exception
import httpx
import pytest

import prober
from prober.errors import BY_ERRNO, BY_PHASE, NOT_RAISED, classify, rule_for, table
from prober.types import ErrorKind


def _exception_classes(*modules) -> set[type[BaseException]]:
    out = set()
    for mod in modules:
        for name in dir(mod):
            obj = getattr(mod, name)
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                out.add(obj)
    return out


def _library(prefix: str, classes) -> list[type[BaseException]]:
    return sorted((c for c in classes if c.__module__.split(".")[0] == prefix), key=lambda c: c.__qualname__)


AIOHTTP = _library("aiohttp", _exception_classes(aiohttp, aiohttp.client_exceptions, aiohttp.http_exceptions))
HTTPX = _library("httpx", _exception_classes(httpx))


def _dns_classes() -> list[type[BaseException]]:
    def walk(cls):
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    return sorted(set(walk(dns.exception.DNSException)), key=lambda c: c.__qualname__)


@pytest.mark.parametrize("cls", AIOHTTP + HTTPX, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_client_exception_class_has_its_own_entry(cls):
    assert cls in table(), f"{cls.__module__}.{cls.__qualname__} is not mapped in prober/errors.py"


@pytest.mark.parametrize("cls", _dns_classes(), ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_dnspython_exception_maps(cls):
    rule = rule_for(cls)
    assert rule is not None and rule is not NOT_RAISED


def test_library_lists_are_not_empty():
    assert len(AIOHTTP) > 30 and len(HTTPX) > 20  # the enumeration itself must keep working


@pytest.mark.parametrize(
    ("exc", "phase", "kind"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "connect", ErrorKind.CONNECT_REFUSED),
        (PermissionError(errno.EPERM, "Operation not permitted"), "connect", ErrorKind.CONNECT_EPERM),
        (OSError(errno.EHOSTUNREACH, "no route"), "connect", ErrorKind.CONNECT_UNREACHABLE),
        (OSError(errno.ENETUNREACH, "no route"), "connect", ErrorKind.CONNECT_UNREACHABLE),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "processing", ErrorKind.CONNECT_RESET),
        (TimeoutError(), "connect", ErrorKind.CONNECT_TIMEOUT),
        (TimeoutError(), "processing", ErrorKind.READ_TIMEOUT),
        (TimeoutError(), "transfer", ErrorKind.READ_TIMEOUT),
        (TimeoutError(), "resolve", ErrorKind.DNS_TIMEOUT),
        (TimeoutError(), "tls", ErrorKind.TLS_ERROR),
        (ssl.SSLCertVerificationError(1, "bad cert"), "tls", ErrorKind.TLS_ERROR),
        (httpx.ConnectTimeout("t"), "connect", ErrorKind.CONNECT_TIMEOUT),
        (httpx.RemoteProtocolError("bad"), "processing", ErrorKind.PROTOCOL_ERROR),
        (aiohttp.ServerDisconnectedError(), "processing", ErrorKind.CONNECT_RESET),
        (dns.exception.FormError("bad"), "resolve", ErrorKind.PROTOCOL_ERROR),
    ],
)
def test_classify(exc, phase, kind):
    assert classify(exc, phase)[0] is kind


def test_wrapped_errno_decides():
    """aiohttp and httpx wrap the socket error; the errno underneath decides the kind."""
    try:
        try:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        except OSError as inner:
            raise httpx.ConnectError("connect failed") from inner
    except httpx.ConnectError as outer:
        assert classify(outer, "connect")[0] is ErrorKind.CONNECT_EPERM


def test_unknown_exception_is_internal_and_says_so():
    class Weird(Exception):
        pass

    kind, detail = classify(Weird("x"), "connect")
    assert kind is ErrorKind.INTERNAL and "unmapped" in detail and "Weird" in detail


def test_rules_are_kinds_or_known_markers():
    for rule in table().values():
        assert isinstance(rule, ErrorKind) or rule in (BY_ERRNO, BY_PHASE, NOT_RAISED)


def test_public_names():
    for name in prober.__all__:
        assert getattr(prober, name) is not None
    assert set(prober.PROBERS) == {"http", "tcp", "dns", "icmp", "grpc", "websocket", "unix"}


def _grpc_classes() -> list[type[BaseException]]:
    import grpc
    import grpc.aio

    found = {o for m in (grpc, grpc.aio) for o in vars(m).values()
             if inspect.isclass(o) and issubclass(o, BaseException)}
    return sorted(found, key=lambda c: c.__qualname__)


@pytest.mark.parametrize("cls", _grpc_classes(), ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_grpc_exception_class_has_its_own_entry(cls):
    assert len(_grpc_classes()) >= 8
    assert cls in table(), f"{cls.__module__}.{cls.__qualname__} is not mapped in prober/errors.py"


def test_grpc_is_not_imported_until_a_grpc_probe_needs_it():
    """grpcio (~9 MiB of RSS) is not loaded by the prober's import: its table entries join once it is."""
    code = ("import sys; import prober, prober.errors, prober.runner, connprobe.agent, connprobe.cli; "
            "assert 'grpc' not in sys.modules, 'grpc imported'; "
            "import grpc; from prober.errors import rule_for; "
            "assert rule_for(grpc.RpcError) is not None; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


_HTTPX_LAZY = """
import asyncio, sys
import prober, prober.errors, prober.runner, connprobe.agent, connprobe.cli
from prober import HTTPSpec, ModuleSpec, ProbeEnv, ProbeSpec, run_probe
from prober.errors import rule_for
from prober.types import ErrorKind

HTTPX = ('httpx', 'httpcore', 'anyio')

async def answer(reader, writer):
    await reader.readuntil(b'\\r\\n\\r\\n')
    writer.write(b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok')
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(answer, '127.0.0.1', 0)
    url = 'http://127.0.0.1:%d/' % server.sockets[0].getsockname()[1]
    async with ProbeEnv() as env:
        for client in ('aiohttp', 'aiohttp-session', 'httpx'):
            module = ModuleSpec(prober='http', http=HTTPSpec(client=client))
            s = ProbeSpec(name='t', target=url, source='host', interval=3.0, timeout=3.0, module=module)
            (r,) = await run_probe(s, env)
            assert r.ok, (client, r.error_detail)
            loaded = [m for m in HTTPX if m in sys.modules]
            assert loaded == (list(HTTPX) if client == 'httpx' else []), (client, loaded)
    server.close()
    await server.wait_closed()
    import httpx
    assert rule_for(httpx.ConnectTimeout) is ErrorKind.CONNECT_TIMEOUT
    print('ok')

asyncio.run(main())
"""


def test_httpx_is_not_imported_until_an_httpx_probe_needs_it():
    """httpx, httpcore and anyio (~5 MiB of RSS) stay out of an agent whose probes use the default HTTP client
    (or aiohttp-session): a real probe with each client, in a fresh interpreter; httpx's table entries join once
    an httpx probe has loaded it."""
    out = subprocess.run([sys.executable, "-c", _HTTPX_LAZY], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
