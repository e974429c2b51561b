"""blackbox's `tls_config.min_version` / `max_version` on http (every client), tcp and an OAuth2 token endpoint,
against loopback TLS servers that speak only TLS 1.2 or only TLS 1.3; grpc refuses them at load."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from prober import ErrorKind, HTTPSpec, TCPSpec, TLSSpec, run_probe
from prober.spec import GRPCSpec
from tests.agent.pki import CA, server_context
from tests.prober.helpers import spec


async def _ok(reader, writer):
    """One HTTP/1.1 request, answered 200 "ok", then the connection closed."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def tls_servers(tmp_path):
    """{"TLS12": port, "TLS13": port}: HTTPS on 127.0.0.1 that accepts exactly that version (200 "ok")."""
    ca = CA(tmp_path, "versions-ca")
    pair = ca.issue("localhost", server=True)
    ports: dict[str, int] = {}
    servers = []

    for name, version in (("TLS12", ssl.TLSVersion.TLSv1_2), ("TLS13", ssl.TLSVersion.TLSv1_3)):
        ctx = server_context(pair)
        ctx.minimum_version = ctx.maximum_version = version
        server = await asyncio.start_server(_ok, "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        ports[name] = server.sockets[0].getsockname()[1]
    ports["ca"] = str(ca.path)
    yield ports
    for server in servers:
        server.close()
        await server.wait_closed()


def _tls(s: dict, **kw) -> TLSSpec:
    return TLSSpec(ca_file=s["ca"], **kw)


CLIENTS = ("aiohttp", "aiohttp-session", "httpx")


def refused_in_tls(r) -> None:
    """No common version: the handshake fails (an alert, or the server's close read as a reset) in the tls
    phase, and no TLS version is reported."""
    assert r.error in (ErrorKind.TLS_ERROR, ErrorKind.CONNECT_RESET), (r.error, r.error_detail)
    assert r.phases[-1].name == "tls" and r.value("tls_version") is None, r.phases


@pytest.mark.parametrize("client", CLIENTS)
async def test_http_tls_versions(tls_servers, env, client):
    s = tls_servers

    async def probe(server: str, **kw):
        (r,) = await run_probe(spec(f"https://127.0.0.1:{s[server]}/", prober="http",
                                    section=HTTPSpec(client=client, tls=_tls(s, **kw))), env)
        return r

    r = await probe("TLS12", min_version="TLS12", max_version="TLS12")
    assert r.ok and r.value("tls_version") == 1.2, (r.error, r.error_detail)
    r = await probe("TLS13", min_version="TLS13")
    assert r.ok and r.value("tls_version") == 1.3, (r.error, r.error_detail)
    refused_in_tls(await probe("TLS13", max_version="TLS12"))  # the server wants 1.3, the probe offers 1.2
    refused_in_tls(await probe("TLS12", min_version="TLS13"))  # the server offers 1.2 only
    r = await probe("TLS12", min_version="TLS10")  # allowed down to 1.0: the server's 1.2 is fine
    assert r.ok and r.value("tls_version") == 1.2, (r.error, r.error_detail)


async def test_tcp_tls_versions(tls_servers, env):
    s = tls_servers

    async def probe(server: str, **kw):
        (r,) = await run_probe(spec(f"127.0.0.1:{s[server]}", prober="tcp",
                                    section=TCPSpec(tls=True, tls_config=_tls(s, server_name="localhost", **kw))),
                               env)
        return r

    r = await probe("TLS13", min_version="TLS13", max_version="TLS13")
    assert r.ok and r.value("tls_version") == 1.3, (r.error, r.error_detail)
    refused_in_tls(await probe("TLS13", max_version="TLS12"))
    refused_in_tls(await probe("TLS12", min_version="TLS13"))
    r = await probe("TLS12", max_version="TLS12")
    assert r.ok and r.value("tls_version") == 1.2


def test_version_settings_errors():
    with pytest.raises(ValueError, match="min_version TLS13 is above max_version TLS12"):
        TLSSpec(min_version="TLS13", max_version="TLS12")
    with pytest.raises(ValueError, match="min_version"):
        TLSSpec(min_version="TLS14")
    with pytest.raises(ValueError, match="min_version/max_version are not possible with grpc"):
        GRPCSpec(tls=True, tls_config=TLSSpec(max_version="TLS12"))


# ---------------------------------------------------------------- inline PEM: ca, cert, key


@pytest.fixture
async def mtls(tmp_path):
    """HTTPS on 127.0.0.1 that wants a client certificate of its CA; the PEM texts as blackbox inlines them."""
    ca = CA(tmp_path, "inline-ca")
    server_pair = ca.issue("localhost", server=True)
    client = ca.issue("prober", server=False)
    ctx = server_context(server_pair, client_ca=ca)
    server = await asyncio.start_server(_ok, "127.0.0.1", 0, ssl=ctx)
    yield {"port": server.sockets[0].getsockname()[1], "ca": ca.path.read_text(), "cert": client.cert.read_text(),
           "key": client.key.read_text(), "key_file": str(client.key), "cert_file": str(client.cert)}
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("client", CLIENTS)
async def test_http_inline_pem(mtls, env, client):
    m = mtls
    url = f"https://127.0.0.1:{m['port']}/"
    inline = TLSSpec(ca=m["ca"], cert=m["cert"], key=m["key"])
    (r,) = await run_probe(spec(url, prober="http", section=HTTPSpec(client=client, tls=inline)), env)
    assert r.ok, (r.error, r.error_detail)
    mixed = TLSSpec(ca=m["ca"], cert=m["cert"], key_file=m["key_file"])  # inline and file forms together
    (r,) = await run_probe(spec(url, prober="http", section=HTTPSpec(client=client, tls=mixed)), env)
    assert r.ok, (r.error, r.error_detail)
    (r,) = await run_probe(spec(url, prober="http", section=HTTPSpec(client=client, tls=TLSSpec(ca=m["ca"]))), env)
    # no client certificate: the server refuses (TLS 1.3: an alert after the client's side finished, or a close)
    assert r.error in (ErrorKind.TLS_ERROR, ErrorKind.CONNECT_RESET), (r.error, r.error_detail)
    (r,) = await run_probe(spec(url, prober="http", section=HTTPSpec(client=client)), env)
    assert r.error is ErrorKind.TLS_ERROR  # the system CAs do not know the inline CA


async def test_tcp_inline_pem(mtls, env):
    m = mtls
    tls = TLSSpec(ca=m["ca"], cert=m["cert"], key=m["key"], server_name="localhost")
    (r,) = await run_probe(spec(f"127.0.0.1:{m['port']}", prober="tcp",
                                section=TCPSpec(tls=True, tls_config=tls, send="GET / HTTP/1.0\r\n\r\n",
                                                expect="^HTTP/1.1 200")), env)
    assert r.ok, (r.error, r.error_detail)


def test_inline_pem_errors(mtls):
    m = mtls
    for fields, message in (({"ca": m["ca"], "ca_file": "/x"}, "at most one of ca and ca_file"),
                            ({"cert": m["cert"], "cert_file": "/x"}, "at most one of cert and cert_file"),
                            ({"cert": m["cert"], "key": m["key"], "key_file": "/x"}, "at most one of key and key_file"),
                            ({"key": m["key"]}, "key needs cert_file or cert"),
                            ({"ca": "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"},
                             "ca: not PEM certificates"),
                            ({"cert": m["cert"], "key": m["cert"]}, "cert: cannot load the client certificate and key"),
                            ({"cert": m["ca"], "key": m["key"]}, "cert: cannot load the client certificate and key")):
        with pytest.raises(ValueError, match=message) as ei:
            TLSSpec(**fields)
        assert "PRIVATE KEY" not in ei.value.errors()[0]["msg"]  # the key never shows in an error
    assert "PRIVATE" not in repr(TLSSpec(cert=m["cert"], key=m["key"]))  # nor in a repr


def test_inline_pem_in_a_blackbox_file(mtls, tmp_path):
    import yaml

    from connprobe.config import ConfigError, parse_config

    m = mtls
    good = {"modules": {"m": {"prober": "http", "http": {"tls_config": {"ca": m["ca"], "cert": m["cert"],
                                                                       "key": m["key"]}}}}}
    cfg = parse_config(yaml.safe_dump(good), blackbox=True, base_dir=tmp_path)
    tls = cfg.modules["m"].http.tls
    assert tls.cert == m["cert"] and tls.key.get_secret_value() == m["key"]
    good["modules"]["m"]["http"]["tls_config"]["key"] = m["cert"]  # not a key
    with pytest.raises(ConfigError) as ei:
        parse_config(yaml.safe_dump(good), blackbox=True, base_dir=tmp_path)
    assert ei.value.errors == ['module "m": http.tls: cert: cannot load the client certificate and key: not PEM, '
                               "or the key does not match the certificate"]
    good["modules"]["m"]["http"]["tls_config"].update(key=m["key"], key_file=m["key_file"])
    with pytest.raises(ConfigError) as ei:
        parse_config(yaml.safe_dump(good), blackbox=True, base_dir=tmp_path)
    assert ei.value.errors == ['module "m": http.tls: at most one of key and key_file']
    assert "PRIVATE" not in str(ei.value)


_ENCRYPTED_KEY_CHECKS = """
import fcntl, json, os, ssl, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty is this session's terminal: where OpenSSL would ask
import yaml
from connprobe.config import ConfigError, parse_config
from prober import TLSSpec
from prober.tlsinfo import load_client_chain
m = json.loads(sys.argv[1])

def say(*words):
    os.write(1, (" ".join(map(str, words)) + "\\n").encode())

try:
    TLSSpec(cert=m["cert"], key=m["enc"])
    say("LOADED")
except ValueError as exc:
    say("ERROR", exc.errors()[0]["msg"].removeprefix("Value error, "))
try:
    load_client_chain(ssl.create_default_context(), TLSSpec(cert_file=m["cert_file"], key_file=m["enc_file"]))
    say("LOADED")
except ValueError as exc:
    say("ERROR", type(exc).__name__, exc)
doc = {"modules": {"m": {"prober": "http", "http": {"tls_config": {"cert_file": m["cert_file"],
                                                                   "key_file": m["enc_file"]}}}}}
try:
    parse_config(yaml.safe_dump(doc), blackbox=True)
    say("LOADED")
except ConfigError as exc:
    say("ERROR", *exc.errors)
"""


def test_encrypted_key_is_an_error_not_a_pass_phrase_prompt(mtls):
    """An encrypted client key, inline, as key_file (when a probe loads it; a blackbox file's at load): one line.
    The checks run in a child whose controlling terminal is a pty of the test's, where OpenSSL's default would
    ask for the pass phrase and wait."""
    import json
    from pathlib import Path

    from tests.agent.pki import Pair, encrypted_copy, run_on_pty

    m = mtls
    key_file = encrypted_copy(Pair(Path(m["cert_file"]), Path(m["key_file"])))
    enc = key_file.read_text()
    args = json.dumps({"cert": m["cert"], "cert_file": m["cert_file"], "enc": enc, "enc_file": str(key_file)})
    text = run_on_pty(_ENCRYPTED_KEY_CHECKS, args, lines=3)
    assert "pass phrase:" not in text.lower(), text
    said = "the private key is encrypted with a pass phrase (not supported: give it unencrypted)"
    assert text.strip().splitlines() == [
        f"ERROR key: {said}",
        f"ERROR EncryptedKey {said}",
        f'ERROR module "m": http.tls_config.key_file: {said}',
    ], text
