"""The agent's web server against a hostile client: a running agent on loopback, every endpoint with and without
credentials (real TLS with a CA made here, bcrypt users), foreign Origin and Host headers, `source=` as a path,
a FIFO, a device or an unknown name, link-local and metadata targets (refused before any connect: a recording
socket class proves it), a module's secret header aimed outside its allowed_targets, the debug output against a
service that sends a banner, and /api/recent's paging. The 500-call storm and the lab (non-loopback) listener
are in test_hostile_storm.py and test_hostile_lab.py."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import threading
from pathlib import Path

import aiohttp
import bcrypt
import dns.message
import dns.rrset
import pytest
import yaml
from aiohttp import web
from cryptography import x509

from connprobe.agent import Agent
from connprobe.probepolicy import ProbeLimiter, check_target
from connprobe.web import start_server
from prober.resolve import ResolvConf
from prober.spec import ModuleSpec
from tests.agent.pki import CA
from tests.leaks import open_fds

PASSWORD = "correct horse"
ENDPOINTS = [("GET", "/metrics"), ("GET", "/"), ("GET", "/api/recent"),
             ("GET", "/probe?module=http_2xx&target={upstream}/ok"), ("POST", "/-/reload")]
HEALTH_CHECKS = [("GET", "/-/healthy"), ("GET", "/-/ready")]  # the kubelet's checks: no credentials needed
RELOAD_HEADERS = {"X-Connprobe-Request": "1"}


# -- servers the agent probes -----------------------------------------------------------------------------------


class Upstream:
    """127.0.0.1:0: /ok, /redirect?to=URL; remembers the Authorization header of every request."""

    def __init__(self):
        self.seen: list[tuple[str, str | None]] = []

    async def start(self) -> Upstream:
        async def ok(request: web.Request) -> web.Response:
            self.seen.append((request.path, request.headers.get("Authorization")))
            return web.Response(text="ok")

        async def redirect(request: web.Request) -> web.Response:
            self.seen.append((request.path, request.headers.get("Authorization")))
            raise web.HTTPFound(request.query["to"])

        app = web.Application()
        app.router.add_get("/ok", ok)
        app.router.add_get("/redirect", redirect)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self


class BannerServer:
    """A TCP service that speaks first, as sshd does: the banner must never come back through /probe."""

    BANNER = b"SSH-2.0-OpenSSH_9.9 s3cr3t-banner-7f1e\r\n"

    async def start(self) -> BannerServer:
        async def talk(reader, writer):
            writer.write(self.BANNER)
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()

        self.server = await asyncio.start_server(talk, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


class FakeDNS(asyncio.DatagramProtocol):
    """A loopback DNS server: `meta.test.` has the address 169.254.169.254, everything else NXDOMAIN."""

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        name = q.question[0].name.to_text()
        if name == "meta.test." and q.question[0].rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(name, 30, "IN", "A", "169.254.169.254"))
        elif name != "meta.test.":
            r.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(r.to_wire(), addr)


class ConnectRecorder:
    """Every connect() of the process's new sockets while installed; a non-loopback one is refused outright
    (the test must never send a packet elsewhere, even when the code under test is wrong)."""

    def __init__(self):
        self.connects: list[str] = []

    def install(self, monkeypatch) -> ConnectRecorder:
        recorder = self
        base = socket.socket

        class Recording(base):
            def connect(self, address):
                recorder._check(address)
                return super().connect(address)

            def connect_ex(self, address):
                recorder._check(address)
                return super().connect_ex(address)

        monkeypatch.setattr(socket, "socket", Recording)
        return self

    def _check(self, address) -> None:
        if isinstance(address, tuple):
            self.connects.append(str(address[0]))
            if not (address[0].startswith("127.") or address[0] in ("::1", "localhost")):
                raise PermissionError(13, f"the test refuses a connect to {address[0]}")


# -- the agent ---------------------------------------------------------------------------------------------------


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def probe_config(path: Path, upstream: str, probes: list[dict] | None = None, modules: dict | None = None) -> Path:
    mods = {"http_2xx": {"prober": "http", "timeout": "2s"},
            "tcp": {"prober": "tcp", "timeout": "1s", "tcp": {"expect": "^HELLO"}},
            "dns": {"prober": "dns", "timeout": "1s", "dns": {"query_name": "example.test"}},
            "with_token": {"prober": "http", "timeout": "2s", "allowed_targets": ["*.allowed.test", "10.0.0.0/8"],
                           "http": {"headers": {"Authorization": "Bearer tok-7f1e-secret"}}},
            "token_no_list": {"prober": "http", "timeout": "2s",
                              "http": {"headers": {"Authorization": "Bearer tok-7f1e-secret"}}},
            "token_loopback": {"prober": "http", "timeout": "2s", "allowed_targets": ["127.0.0.0/8"],
                               "http": {"headers": {"Authorization": "Bearer tok-7f1e-secret"}}},
            **(modules or {})}
    return write_yaml(path, {"modules": mods, "probes": probes or [], "limits": {"min_interval": "100ms"}})


class Running:
    def __init__(self, agent, server, base, ssl_ctx=None):
        self.agent, self.server, self.base, self.ssl = agent, server, base, ssl_ctx

    async def call(self, method: str, path: str, *, auth=None, headers=None, session=None,
                   ssl_ctx=None) -> tuple[int, str, dict]:
        hdrs = dict(headers or {})
        if auth is not None:
            hdrs["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        own = session is None
        s = session or aiohttp.ClientSession()
        try:
            async with s.request(method, self.base + path, headers=hdrs, ssl=ssl_ctx or self.ssl or False) as r:
                return r.status, await r.text(), dict(r.headers)
        finally:
            if own:
                await s.close()


@pytest.fixture
async def start_agent():
    started = []

    async def start(config: Path, web_config: Path | None = None, **kw) -> Running:
        agent = Agent(config, kernel=False)
        await agent.start()
        server = await start_server(agent, "127.0.0.1", 0, web_config_path=str(web_config) if web_config else None,
                                    **kw)
        started.append((agent, server))
        await agent.wait_ready(10)
        scheme = "https" if server.ssl_context is not None else "http"
        return Running(agent, server, f"{scheme}://127.0.0.1:{server.addresses[0][1]}")

    yield start
    for agent, server in started:
        await server.cleanup()
        await agent.stop()


@pytest.fixture
async def upstream():
    up = await Upstream().start()
    yield up
    await up.runner.cleanup()


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path, "test-ca")
    stranger = CA(tmp_path, "stranger-ca")
    return {"ca": ca, "server": ca.issue("server", server=True), "client": ca.issue("prometheus", server=False),
            "stranger": stranger.issue("mallory", server=False)}


def client_ctx(pki, cert: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"].path))
    if cert is not None:
        ctx.load_cert_chain(str(pki[cert].cert), str(pki[cert].key))
    return ctx


def users_config(path: Path, pki=None, password: str = PASSWORD, **tls) -> Path:
    doc: dict = {"basic_auth_users": {"prometheus": bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()},
                 "http_server_config": {"headers": {"Strict-Transport-Security": "max-age=3600"}}}
    if pki is not None:
        doc["tls_server_config"] = {"cert_file": str(pki["server"].cert), "key_file": str(pki["server"].key),
                                    "client_ca_file": str(pki["ca"].path), **tls}
    return write_yaml(path, doc)


# -- authentication ------------------------------------------------------------------------------------------------


async def test_every_endpoint_needs_tls_client_cert_and_bcrypt_user(tmp_path, upstream, pki, start_agent):
    cfg = probe_config(tmp_path / "c.yml", upstream.url)
    webcfg = users_config(tmp_path / "web.yml", pki, client_auth_type="RequireAndVerifyClientCert")
    a = await start_agent(cfg, webcfg)
    good = client_ctx(pki, "client")
    for method, path in ENDPOINTS:
        path = path.format(upstream=upstream.url)
        hdrs = RELOAD_HEADERS if method == "POST" else None
        for auth in (None, ("prometheus", "wrong"), ("nobody", PASSWORD), ("prometheus", "")):
            status, text, headers = await a.call(method, path, auth=auth, headers=hdrs, ssl_ctx=good)
            assert (status, text) == (401, "authentication required\n"), (method, path, auth)
            assert headers["WWW-Authenticate"] == 'Basic realm="connprobe"'
        status, text, headers = await a.call(method, path, auth=("prometheus", PASSWORD), headers=hdrs, ssl_ctx=good)
        assert status == 200, (method, path, text)
        assert headers["Strict-Transport-Security"] == "max-age=3600"  # http_server_config.headers
        assert headers["X-Content-Type-Options"] == "nosniff"
        # the right password without a client certificate, or with a stranger's: no TLS session at all
        for cert in (None, "stranger"):
            with pytest.raises(aiohttp.ClientError):
                await a.call(method, path, auth=("prometheus", PASSWORD), headers=hdrs, ssl_ctx=client_ctx(pki, cert))
    # plain HTTP on the TLS port gets nowhere
    plain = a.base.replace("https://", "http://")
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.get(plain + "/metrics") as r:
                await r.read()
                raise aiohttp.ClientError(f"answered {r.status}")


async def test_basic_auth_alone_leaves_nothing_open(tmp_path, upstream, start_agent):
    a = await start_agent(probe_config(tmp_path / "c.yml", upstream.url), users_config(tmp_path / "web.yml"))
    for method, path in ENDPOINTS:
        status, _, _ = await a.call(method, path.format(upstream=upstream.url), headers=RELOAD_HEADERS)
        assert status == 401, path
    for method, path in HEALTH_CHECKS:
        status, text, _ = await a.call(method, path)
        assert status == 200 and text.startswith("connprobe agent is"), (path, text)
    status, text, _ = await a.call("GET", "/metrics", auth=("prometheus", PASSWORD))
    assert status == 200 and "connprobe_agent_ready 1.0" in text


async def test_web_config_is_reread_on_reload(tmp_path, upstream, start_agent):
    cfg = probe_config(tmp_path / "c.yml", upstream.url)
    webcfg = users_config(tmp_path / "web.yml")
    a = await start_agent(cfg, webcfg)
    users_config(webcfg, password="new password")
    status, text, _ = await a.call("POST", "/-/reload", auth=("prometheus", PASSWORD), headers=RELOAD_HEADERS)
    assert status == 200 and text.startswith(f"reloaded {cfg}")
    assert (await a.call("GET", "/metrics", auth=("prometheus", PASSWORD)))[0] == 401
    assert (await a.call("GET", "/metrics", auth=("prometheus", "new password")))[0] == 200
    webcfg.write_text("basic_auth_users:\n  prometheus: not-a-hash\n")
    status, text, _ = await a.call("POST", "/-/reload", auth=("prometheus", "new password"), headers=RELOAD_HEADERS)
    assert status == 400
    assert text.endswith(f"failed to reload web config: {webcfg}: basic_auth_users.prometheus: must be a bcrypt "
                         "hash ($2b$..., 60 characters)\n")
    assert (await a.call("GET", "/metrics", auth=("prometheus", "new password")))[0] == 200  # the old one runs on


@pytest.mark.parametrize(("doc", "error"), [
    ({"tls_server_config": {"cert_file": "/nonexistent.crt", "key_file": "/nonexistent.key"}},
     "tls_server_config: cannot load cert_file '/nonexistent.crt' / key_file '/nonexistent.key': No such file or "
     "directory"),
    ({"tls_server_config": {"cert_file": "a", "key_file": "b", "client_auth_type": "Sometimes"}},
     "tls_server_config.client_auth_type: 'Sometimes' is not one of NoClientCert, RequestClientCert, "
     "RequireAnyClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"),
    ({"tls_server_config": {"cert_file": "a", "key_file": "b", "client_auth_type": "RequireAndVerifyClientCert"}},
     "tls_server_config.client_ca_file: required with client_auth_type RequireAndVerifyClientCert"),
    ({"tls_server_config": {"cert_file": "a", "key_file": "b", "min_version": "SSL3"}},
     "tls_server_config.min_version: 'SSL3' is not one of TLS10, TLS11, TLS12, TLS13"),
    ({"tls_server_config": {"cert_file": "a", "key_file": "b", "cipher_suites": ["x"]}},
     "tls_server_config.cipher_suites: not supported by connprobe"),
    ({"basic_auth_users": {"p": "plain"}}, "basic_auth_users.p: must be a bcrypt hash ($2b$..., 60 characters)"),
    ({"http_server_config": {"headers": {"Set-Cookie": "x"}}},
     "http_server_config.headers.Set-Cookie: not allowed (one of Content-Security-Policy, X-Frame-Options, "
     "X-Content-Type-Options, X-XSS-Protection, Strict-Transport-Security)"),
    ({"basic_auth": {}}, "basic_auth: unknown key (expected tls_server_config, basic_auth_users, "
                         "http_server_config)"),
])
def test_bad_web_config_is_one_line_naming_the_key(tmp_path, doc, error):
    from connprobe.cli import build_parser
    from connprobe.commands.agent import run

    cfg = probe_config(tmp_path / "c.yml", "http://127.0.0.1:1")
    webcfg = write_yaml(tmp_path / "web.yml", doc)
    args = build_parser().parse_args(["agent", "--config", str(cfg), "--no-kernel", "--listen", "127.0.0.1:0",
                                      "--web.config.file", str(webcfg)])
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run(args) == 2
    assert err.getvalue() == f"connprobe agent: invalid --web.config.file: {webcfg}: {error}\n"


# -- browsers --------------------------------------------------------------------------------------------------------


async def test_foreign_host_origin_and_simple_posts_are_refused(tmp_path, upstream, start_agent):
    cfg = probe_config(tmp_path / "c.yml", upstream.url)
    a = await start_agent(cfg)
    port = a.base.rsplit(":", 1)[1]
    for method, path in ENDPOINTS:
        status, text, _ = await a.call(method, path.format(upstream=upstream.url),
                                       headers={"Host": f"attacker.example:{port}", **RELOAD_HEADERS})
        assert (status, text) == (403, f"Host 'attacker.example:{port}' is not this agent's address or name "
                                       "(DNS rebinding is refused)\n"), path
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", socket.gethostname()):
        assert (await a.call("GET", "/api/recent", headers={"Host": host}))[0] == 200, host
    # a form or fetch() without preflight: text/plain, no custom header
    status, text, _ = await a.call("POST", "/-/reload", headers={"Content-Type": "text/plain"})
    assert (status, text) == (403, "/-/reload needs the header 'X-Connprobe-Request: 1' (or Content-Type: "
                                   "application/json); a browser form cannot send it\n")
    status, text, _ = await a.call("POST", "/-/reload", headers={"Origin": "http://attacker.example",
                                                                 **RELOAD_HEADERS})
    assert (status, text) == (403, "Origin 'http://attacker.example' is not this agent: cross-site requests are "
                                   "refused\n")
    assert (await a.call("GET", "/-/reload"))[0] == 405
    status, text, _ = await a.call("POST", "/-/reload", headers={"Origin": a.base, **RELOAD_HEADERS})
    assert status == 200 and text.startswith("reloaded")
    status, _, _ = await a.call("POST", "/-/reload", headers={"Content-Type": "application/json"})
    assert status == 200
    assert a.agent.reloads["success"] == 2


# -- /probe is not a proxy ---------------------------------------------------------------------------------------------


async def test_source_must_name_a_configured_source(tmp_path, upstream, start_agent):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cfg = probe_config(tmp_path / "c.yml", upstream.url, probes=[
        {"name": "elsewhere", "module": "http_2xx", "target": upstream.url + "/ok", "source": "netns cp-absent-ns",
         "interval": "1h"}])
    a = await start_agent(cfg)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        assert (await a.call("GET", "/metrics", session=s))[0] == 200  # warm up the worker threads
        assert (await a.call("GET", "/", session=s))[0] == 200
        threads, fds = threading.active_count(), open_fds()
        path_error = ("source: a path is never accepted on /probe; name a source of the configuration (host or the "
                      "netns name of a configured probe)\n")
        for _ in range(20):
            for source in (str(fifo), "/dev/zero", "/etc/hostname", "/proc/1/ns/net", "../../proc/1/ns/net",
                           "netns/x"):
                status, text, _ = await a.call("GET", f"/probe?target={upstream.url}/ok&source={source}", session=s)
                assert (status, text) == (400, path_error), source
            status, text, _ = await a.call("GET", f"/probe?target={upstream.url}/ok&source=cp-unknown", session=s)
            assert (status, text) == (400, "source: 'cp-unknown' is not a source of the configuration (host or the "
                                           "netns name of a configured probe)\n")
        assert (await a.call("GET", "/-/healthy", session=s))[0] == 200
        assert threading.active_count() == threads and open_fds() == fds
        # a declared name is accepted (that namespace does not exist here: the probe says so)
        for declared in ("cp-absent-ns", "netns%20cp-absent-ns"):
            status, text, _ = await a.call("GET", f"/probe?target={upstream.url}/ok&source={declared}", session=s)
            assert status == 200 and "probe_success 0.0" in text


async def test_link_local_and_metadata_targets_are_refused_before_any_connect(tmp_path, upstream, start_agent,
                                                                             monkeypatch):
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(FakeDNS, local_addr=("127.0.0.1", 0))
    dns_port = transport.get_extra_info("sockname")[1]
    cfg = probe_config(tmp_path / "c.yml", upstream.url)
    try:
        a = await start_agent(cfg)
        a.agent.env.resolv_conf = ResolvConf(nameservers=("127.0.0.1",), port=dns_port, timeout=1.0, attempts=1)
        rec = ConnectRecorder().install(monkeypatch)
        cases = {
            "http://169.254.169.254/latest/meta-data/": "target: 169.254.169.254, a link-local or metadata address",
            "http://[fe80::1]:80/": "target: fe80::1, a link-local or metadata address",
            "http://[fd00:ec2::254]/": "target: fd00:ec2::254, a link-local or metadata address",
            "http://[::ffff:169.254.169.254]/": "target: ::ffff:169.254.169.254, a link-local or metadata address",
            "http://meta.test/": "target: meta.test resolves to 169.254.169.254, a link-local or metadata address",
            f"{upstream.url}/redirect?to=http://169.254.169.254/": "target: 169.254.169.254, a link-local or "
                                                                    "metadata address",
        }
        for target, reason in cases.items():
            status, text = await _get_probe(a, target)
            assert (status, text) == (400, reason + "; refused on /probe unless the module lists it in "
                                                    "allowed_targets\n"), target
        status, text = await _get_probe(a, "169.254.169.254:22", module="tcp")
        assert status == 400 and "link-local" in text
        # a DNS probe's server: by address only (a name would go to the system's resolver)
        status, text = await _get_probe(a, "meta.test:53", module="dns")
        assert (status, text) == (400, "target: 'meta.test': on /probe a DNS server is given by its address\n")
        status, text = await _get_probe(a, "[fe80::53]:53", module="dns")
        assert status == 400 and "link-local" in text
        assert not [c for c in rec.connects if not c.startswith("127.")]  # not one connect() elsewhere
        assert upstream.seen == [("/redirect", None)]  # the redirect was followed up to the refused hop only
    finally:
        transport.close()


async def _get_probe(a: Running, target: str, module: str = "http_2xx", **params) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(a.base + "/probe", params={"target": target, "module": module, **params}) as r:
            return r.status, await r.text()


def test_allowed_targets_unlock_by_name_or_cidr_only():
    meta = ModuleSpec(prober="http", allowed_targets=("169.254.169.254", "metadata.internal", "*.example"))
    assert check_target(meta, "169.254.169.254", ["169.254.169.254"]) is None
    assert check_target(meta, "metadata.internal", ["169.254.169.254"]) is None  # named exactly
    assert "link-local" in check_target(meta, "x.example", ["169.254.1.1"])  # a wildcard unlocks nothing
    assert "link-local" in check_target(meta, "169.254.1.1", ["169.254.1.1"])
    plain = ModuleSpec(prober="http")
    assert check_target(plain, "10.1.2.3", ["10.1.2.3"]) is None
    assert "link-local" in check_target(plain, "fe80::1%eth0", ["fe80::1%eth0"])
    secret = ModuleSpec.model_validate({"prober": "http", "allowed_targets": ["*.corp.example", "10.0.0.0/8"],
                                        "http": {"headers": {"X-Token": "t0k"}}})
    assert check_target(secret, "api.corp.example", ["192.0.2.1"]) is None
    assert check_target(secret, "db", ["10.9.9.9"]) is None
    assert check_target(secret, "db", ["10.9.9.9", "192.0.2.1"]) == ("target: db is not in the module's "
                                                                     "allowed_targets (its configured headers stay "
                                                                     "home)")
    with pytest.raises(ValueError, match="neither a hostname"):
        ModuleSpec(prober="http", allowed_targets=("http://x/",))


async def test_secret_headers_go_only_to_allowed_targets(tmp_path, upstream, start_agent):
    cfg = probe_config(tmp_path / "c.yml", upstream.url, probes=[
        {"name": "operator", "module": "token_no_list", "target": upstream.url + "/ok", "interval": "0.3s",
         "timeout": "0.2s", "jitter": 0}])
    a = await start_agent(cfg)
    status, text = await _get_probe(a, upstream.url + "/ok", module="with_token")
    assert (status, text) == (400, "target: 127.0.0.1 is not in the module's allowed_targets (its configured "
                                   "headers stay home)\n")
    status, text = await _get_probe(a, upstream.url + "/ok", module="token_no_list")
    assert (status, text) == (400, "target: the module sends configured headers and has no allowed_targets; on "
                                   "/probe it only probes targets its allowed_targets list\n")
    status, text = await _get_probe(a, f"http://localhost:{upstream.url.rsplit(':', 1)[1]}/ok", module="with_token")
    assert status == 400  # localhost is no *.allowed.test, and 127.0.0.1 is outside 10.0.0.0/8
    assert all(auth is None for _, auth in upstream.seen)
    seen_before = len(upstream.seen)
    status, text = await _get_probe(a, upstream.url + "/ok", module="token_loopback")
    assert status == 200 and "probe_success 1.0" in text
    assert ("/ok", "Bearer tok-7f1e-secret") in upstream.seen[seen_before:]
    # the operator's own scheduled probe is not restricted
    for _ in range(100):
        if a.agent.board.probes().get("operator"):
            break
        await asyncio.sleep(0.05)
    assert a.agent.board.probes()["operator"][-1].verdict.result.ok


async def test_debug_never_echoes_what_the_target_sent(tmp_path, upstream, start_agent):
    banner = await BannerServer().start()
    try:
        a = await start_agent(probe_config(tmp_path / "c.yml", upstream.url))
        for module, target in (("http_2xx", f"http://127.0.0.1:{banner.port}/"), ("tcp", f"127.0.0.1:{banner.port}")):
            status, text = await _get_probe(a, target, module=module, debug="true")
            assert status == 200 and "probe_success 0.0" in text, text
            assert "s3cr3t" not in text and "SSH-2.0" not in text and "OpenSSH" not in text
            assert "(error detail withheld: it can quote bytes the target sent)" in text or "validation" in text
    finally:
        banner.server.close()
        await banner.server.wait_closed()


async def test_probe_calls_beyond_the_cap_get_429_with_retry_after(tmp_path, upstream, start_agent):
    a = await start_agent(probe_config(tmp_path / "c.yml", upstream.url), limiter=ProbeLimiter(4, rate=3, burst=5))
    answers = await asyncio.gather(*(_get_probe_full(a, upstream.url + "/ok") for _ in range(12)))
    refused = [x for x in answers if x[0] == 429]
    assert len([x for x in answers if x[0] == 200]) <= 5 and refused
    for _, text, headers in refused:
        assert int(headers["Retry-After"]) >= 1
        assert text in ("too many /probe calls in flight: retry in 1s\n",
                        f"/probe rate limit reached: retry in {headers['Retry-After']}s\n")
    _, metrics, _ = await a.call("GET", "/metrics")
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("connprobe_probe_requests_refused_total{"))
    assert counted == len(refused)


async def _get_probe_full(a: Running, target: str):
    async with aiohttp.ClientSession() as s:
        async with s.get(a.base + "/probe", params={"target": target, "module": "http_2xx"}) as r:
            return r.status, await r.text(), dict(r.headers)


# -- bounded work -----------------------------------------------------------------------------------------------------


async def test_api_recent_is_paginated(tmp_path, upstream, start_agent):
    probes = [{"name": f"p{i:02d}", "module": "http_2xx", "target": upstream.url + "/ok", "interval": "0.3s",
               "timeout": "0.2s", "jitter": 0} for i in range(12)]
    a = await start_agent(probe_config(tmp_path / "c.yml", upstream.url, probes=probes))
    for _ in range(200):
        if len(a.agent.board.names()) == 12:
            break
        await asyncio.sleep(0.05)
    import json

    status, text, _ = await a.call("GET", "/api/recent?limit=5")
    doc = json.loads(text)
    assert status == 200 and list(doc["probes"]) == ["p00", "p01", "p02", "p03", "p04"]
    assert (doc["total"], doc["offset"], doc["limit"], doc["next_offset"]) == (12, 0, 5, 5)
    doc = json.loads((await a.call("GET", "/api/recent?limit=5&offset=10"))[1])
    assert list(doc["probes"]) == ["p10", "p11"] and doc["next_offset"] is None
    assert (await a.call("GET", "/api/recent?limit=5000"))[:2] == (
        400, "limit: '5000' must be a whole number from 1 to 1000\n")
    assert (await a.call("GET", "/api/recent?offset=-1"))[:2] == (
        400, "offset: '-1' must be a whole number from 0 to 1000000000\n")
    assert (await a.call("GET", "/api/recent?limit=%C2%B2"))[:2] == (  # a digit to str.isdigit, not to int()
        400, "limit: '\u00b2' must be a whole number from 1 to 1000\n")


async def test_a_renewed_certificate_applies_on_reload_and_tls_off_needs_a_restart(tmp_path, upstream, pki,
                                                                                 start_agent):
    cfg = probe_config(tmp_path / "c.yml", upstream.url)
    webcfg = users_config(tmp_path / "web.yml", pki, client_auth_type="VerifyClientCertIfGiven")
    a = await start_agent(cfg, webcfg)
    port = int(a.base.rsplit(":", 1)[1])

    async def served_serial() -> int:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(pki, None))
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        return x509.load_der_x509_certificate(der).serial_number

    before = await served_serial()
    renewed = pki["ca"].issue("server", server=True)  # the same files, a new certificate
    auth = ("prometheus", PASSWORD)
    status, text, _ = await a.call("POST", "/-/reload", auth=auth, headers=RELOAD_HEADERS,
                                   ssl_ctx=client_ctx(pki, None))
    assert status == 200, text
    assert await served_serial() == x509.load_pem_x509_certificate(renewed.cert.read_bytes()).serial_number != before
    users_config(webcfg)  # no tls_server_config any more
    status, text, _ = await a.call("POST", "/-/reload", auth=auth, headers=RELOAD_HEADERS,
                                   ssl_ctx=client_ctx(pki, None))
    assert status == 400 and text.endswith(
        f"failed to reload web config: {webcfg}: turning TLS on or off needs a restart of the agent\n")
    assert (await a.call("GET", "/metrics", auth=auth, ssl_ctx=client_ctx(pki, "client")))[0] == 200
