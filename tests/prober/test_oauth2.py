"""OAuth2 client credentials (`http.oauth2`, `prober.oauth2`) against a real token server on loopback (aiohttp):
the token request as Go's client sends it, the token on the probe's request, caching and refresh, every way a
token endpoint can fail (each a one-line failure of the probe, by its deadline), the /probe policy on the token
endpoint's connect, and the secrets kept out of the result."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import urllib.parse

import pytest
from aiohttp import web

from prober import ErrorKind, HTTPSpec, TLSSpec, run_probe
from prober import oauth2 as oauth2_mod
from prober.spec import OAuth2Spec
from tests.agent.pki import CA, server_context
from tests.prober.helpers import spec
from tests.prober.servers import serve_plain_and_tls

CLIENT_ID = "probe client"  # a space: form-encoded in the Basic credentials
SECRET = "s3cr3t:Cn-oauth-secret"  # a colon: the same


class TokenServer:
    """Token endpoint `/token` and an API `/api` that wants the current token; `mode` says how /token answers."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.expires_in: object = 3600
        self.token_requests: list[tuple[str | None, dict]] = []  # (Authorization header, form)
        self.api_auth: list[str | None] = []
        self.issued = 0
        self.port = 0
        self.tls_port = 0

    @property
    def current(self) -> str:
        return f"Cn-tok3n-{self.issued}"

    async def token(self, request: web.Request) -> web.StreamResponse:
        form = dict(urllib.parse.parse_qsl((await request.read()).decode()))
        auth = request.headers.get("Authorization")
        self.token_requests.append((auth, form))
        mode = self.mode
        if mode == "401":
            return web.json_response({"error": "invalid_client"}, status=401)
        if mode == "params_only" and "client_secret" not in form:
            return web.json_response({"error": "invalid_client"}, status=401)
        if mode == "echo_secret":  # an error text that quotes the request's form field, as it was sent
            raw = (await request.read()).decode()
            field = next((f for f in raw.split("&") if f.startswith("client_secret=")), "none")
            return web.json_response({"error": f"rejected {field}"}, status=400)
        if mode == "badjson":
            return web.Response(text="{not json", content_type="application/json")
        if mode == "noaccess":
            return web.json_response({"token_type": "bearer", "expires_in": 60})
        if mode == "badtype":
            return web.json_response({"access_token": "x1234", "token_type": "Bearer\r\nX-Injected: 1"})
        if mode == "huge":  # an endless body: the prober stops reading at its cap
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            try:
                chunk = b'{"access_token": "' + b"a" * 65536
                for _ in range(64):
                    await resp.write(chunk)
            except (ConnectionError, RuntimeError):
                pass
            return resp
        if mode == "slow":
            await asyncio.sleep(5)
        if mode == "form":
            self.issued += 1
            return web.Response(text=f"access_token={self.current}&token_type=bearer",
                                content_type="application/x-www-form-urlencoded")
        self.issued += 1
        doc = {"access_token": self.current, "token_type": "bearer"}
        if self.expires_in is not None:
            doc["expires_in"] = self.expires_in
        return web.json_response(doc)

    async def api(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        self.api_auth.append(auth)
        if auth != f"Bearer {self.current}":
            return web.Response(status=401, text="stale token")
        return web.Response(text="ok")

    def url(self, path: str = "/token", tls: bool = False) -> str:
        return f"https://127.0.0.1:{self.tls_port}{path}" if tls else f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def token_server(tmp_path):
    oauth2_mod.forget_tokens()
    s = TokenServer()
    ca = CA(tmp_path, "oauth-ca")
    pair = ca.issue("localhost", server=True)
    app = web.Application()
    app.router.add_post("/token", s.token)
    app.router.add_get("/api", s.api)
    runner, s.port, s.tls_port = await serve_plain_and_tls(app, server_context(pair))
    s.ca = ca
    yield s
    await runner.cleanup()
    oauth2_mod.forget_tokens()


def _oauth(server: TokenServer, **kw) -> OAuth2Spec:
    fields = {"client_id": CLIENT_ID, "client_secret": SECRET, "token_url": server.url(),
              "scopes": ("read", "probe"), "endpoint_params": {"audience": "api"}}
    fields.update(kw)
    return OAuth2Spec(**fields)


def _probe(server: TokenServer, client: str = "aiohttp", timeout: float = 3.0, path: str = "/api", **kw):
    return spec(server.url(path), prober="http", timeout=timeout,
                section=HTTPSpec(client=client, oauth2=_oauth(server, **kw)))


@pytest.mark.parametrize("client", ("aiohttp", "aiohttp-session", "httpx"))
async def test_token_fetched_sent_and_reused(token_server, env, client):
    s = token_server
    probe = _probe(s, client)
    (r,) = await run_probe(probe, env)
    assert r.ok, (r.error, r.error_detail)
    assert s.api_auth == ["Bearer Cn-tok3n-1"]
    ((auth, form),) = s.token_requests
    # Go's clientcredentials: Basic credentials, each part form-encoded; scopes space-joined; params added
    user, _, password = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
    assert (urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)) == (CLIENT_ID, SECRET)
    assert form == {"grant_type": "client_credentials", "scope": "read probe", "audience": "api"}
    # the token endpoint's connection is one of the probe's flows (kernel evidence covers it)
    assert {f.remote_port for f in r.flows} == {s.port}
    assert len(r.flows) == 2
    (r,) = await run_probe(probe, env)  # cached: no second token request
    assert r.ok and len(s.token_requests) == 1 and s.api_auth[-1] == "Bearer Cn-tok3n-1"
    assert len(r.flows) == 1


async def test_token_refreshed_before_it_expires(token_server, env):
    s = token_server
    s.expires_in = oauth2_mod.EXPIRY_MARGIN_S + 0.5  # good for half a second after the margin
    probe = _probe(s)
    (r,) = await run_probe(probe, env)
    assert r.ok and s.issued == 1
    await asyncio.sleep(0.7)
    (r,) = await run_probe(probe, env)
    assert r.ok, r.error_detail
    assert s.issued == 2 and s.api_auth[-1] == "Bearer Cn-tok3n-2"
    s.expires_in = None  # no expires_in: kept (as Go's client keeps it)
    oauth2_mod.forget_tokens()
    for _ in range(3):
        (r,) = await run_probe(probe, env)
        assert r.ok
    assert s.issued == 3


@pytest.mark.parametrize("expires_in", ["abc", float("inf"), {"seconds": 60}, [60], True])
async def test_expires_in_that_is_not_seconds_fails_the_fetch(token_server, env, expires_in):
    """Not a number of seconds in a JSON answer: a one-line protocol error (as Go's client), not a token kept until
    the next reload."""
    s = token_server
    s.expires_in = expires_in
    (r,) = await run_probe(_probe(s), env)
    assert r.error is ErrorKind.PROTOCOL_ERROR, (r.error, r.error_detail)
    assert r.error_detail.startswith(f"oauth2 token endpoint {s.url()}: expires_in "), r.error_detail
    assert r.error_detail.endswith(" is not a number of seconds"), r.error_detail
    assert s.api_auth == []


@pytest.mark.parametrize("expires_in", [-5, "-5", " 60 ", 0])
async def test_expires_in_negative_is_expired_zero_is_kept(token_server, env, expires_in):
    s = token_server
    s.expires_in = expires_in
    probe = _probe(s)
    for _ in range(2):
        (r,) = await run_probe(probe, env)
        assert r.ok, r.error_detail
    # negative: expired when it came (Go's client fetches again); a number of seconds, or 0 (no expiry): kept
    assert s.issued == (2 if str(expires_in).startswith("-") else 1)


async def test_concurrent_probes_share_one_fetch(token_server, env):
    s = token_server
    probe = _probe(s)
    results = await asyncio.gather(*(run_probe(probe, env) for _ in range(6)))
    assert all(r.ok for (r,) in results), [r.error_detail for (r,) in results]
    assert len(s.token_requests) == 1


async def test_token_endpoint_refuses_the_client(token_server, env):
    s = token_server
    s.mode = "401"
    (r,) = await run_probe(_probe(s), env)
    assert r.error is ErrorKind.HTTP_STATUS
    assert r.error_detail == f"oauth2 token endpoint {s.url()}: status 401 (error: invalid_client)"
    assert r.http_status is None and s.api_auth == []  # the target was never asked
    # as Go's client: the credentials in the header first, then in the form
    assert [a is not None for a, _ in s.token_requests] == [True, False]
    assert s.token_requests[1][1]["client_id"] == CLIENT_ID and s.token_requests[1][1]["client_secret"] == SECRET


async def test_credentials_in_the_form_when_the_endpoint_wants_them(token_server, env):
    s = token_server
    s.mode = "params_only"
    s.expires_in = 1  # expires at once (inside the margin): every probe fetches
    probe = _probe(s)
    (r,) = await run_probe(probe, env)
    assert r.ok, r.error_detail
    assert len(s.token_requests) == 2
    (r,) = await run_probe(probe, env)
    assert r.ok and len(s.token_requests) == 3  # the style that worked is kept for the token URL
    assert s.token_requests[-1][0] is None


@pytest.mark.parametrize("mode, detail", [
    ("badjson", "the answer is not a JSON object"),
    ("noaccess", "the answer has no access_token"),
    ("badtype", "token_type 'Bearer??X-Injected: 1' is not an authorization scheme"),
    ("huge", f"answer larger than {oauth2_mod.MAX_ANSWER_BYTES} bytes"),
])
async def test_token_answers_that_are_not_a_token(token_server, env, mode, detail):
    s = token_server
    s.mode = mode
    (r,) = await run_probe(_probe(s), env)
    assert r.error is ErrorKind.PROTOCOL_ERROR, (r.error, r.error_detail)
    assert r.error_detail == f"oauth2 token endpoint {s.url()}: {detail}"
    assert s.api_auth == []


async def test_form_encoded_token_answer(token_server, env):
    s = token_server
    s.mode = "form"
    (r,) = await run_probe(_probe(s), env)
    assert r.ok, r.error_detail


async def test_token_endpoint_down_or_slow_ends_by_the_deadline(token_server, env):
    s = token_server
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/token"
        (r,) = await run_probe(_probe(s, token_url=url), env)
    assert r.error is ErrorKind.CONNECT_REFUSED
    assert r.error_detail.startswith(f"oauth2 token endpoint {url}: ")
    s.mode = "slow"
    t0 = time.monotonic()
    (r,) = await run_probe(_probe(s, timeout=0.5), env)
    assert time.monotonic() - t0 < 3  # the probe's deadline, not the endpoint's 5 s
    assert r.error is ErrorKind.READ_TIMEOUT, (r.error, r.error_detail)
    assert r.error_detail == (f"oauth2 token endpoint {s.url()}: no token within the probe's timeout "
                              "(in processing)")
    assert s.api_auth == []


async def test_https_token_endpoint_with_its_own_tls(token_server, env):
    s = token_server
    good = TLSSpec(ca_file=str(s.ca.path), server_name="localhost")
    (r,) = await run_probe(_probe(s, token_url=s.url(tls=True), tls=good), env)
    assert r.ok, r.error_detail
    oauth2_mod.forget_tokens()
    (r,) = await run_probe(_probe(s, token_url=s.url(tls=True), tls=TLSSpec(server_name="localhost")), env)
    # the system CAs do not know it
    assert r.error is ErrorKind.TLS_ERROR, (r.error, r.error_detail)
    assert r.error_detail.startswith(f"oauth2 token endpoint {s.url(tls=True)}: ")


async def test_secrets_stay_out_of_the_result(token_server, env):
    """The API answers a malformed header that repeats the Authorization it got: the error text quotes the
    token, which the probe's redactor learnt when it was fetched."""
    s = token_server
    seen: list[bytes] = []
    server = await asyncio.start_server(lambda r, w: _echo_auth(r, w, seen), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        probe = spec(f"http://127.0.0.1:{port}/", prober="http", section=HTTPSpec(oauth2=_oauth(s)))
        (r,) = await run_probe(probe, env)
    finally:
        server.close()
        await server.wait_closed()
    assert r.error is ErrorKind.PROTOCOL_ERROR, (r.error, r.error_detail)
    assert seen == [f"Bearer {s.current}".encode()]  # the token did go out, and came back in the error text
    assert "<redacted>" in r.error_detail, r.error_detail
    text = json.dumps([r.error_detail, r.target, list(r.captured_headers)])
    for secret in (s.current, SECRET, oauth2_mod.basic_credentials(CLIENT_ID, SECRET)):
        assert secret not in text
    from prober.redact import known_redactor

    assert s.current not in known_redactor().text(f"log line with {s.current}")


async def test_an_error_quoting_the_form_encoded_secret_is_redacted(token_server, env):
    """The token request's form carries the secret form-encoded (':' as %3A): an endpoint's error text that quotes
    it is redacted like the secret itself."""
    s = token_server
    s.mode = "echo_secret"
    (r,) = await run_probe(_probe(s), env)
    assert r.error is ErrorKind.HTTP_STATUS, (r.error, r.error_detail)
    assert urllib.parse.quote_plus(SECRET, safe="") != SECRET  # the text quoted is not the secret as configured
    assert r.error_detail == f"oauth2 token endpoint {s.url()}: status 400 (error: rejected client_secret=<redacted>)"


async def _echo_auth(reader, writer, seen: list[bytes]):
    head = await reader.readuntil(b"\r\n\r\n")
    auth = next((ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n") if ln.lower().startswith(b"authoriz")),
                b"")
    seen.append(auth)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12 " + auth + b"\r\n\r\n")
    await writer.drain()
    writer.close()


async def test_probe_policy_applies_to_the_token_endpoint(token_server, env):
    """On /probe, the token endpoint's connect passes the same check as the target's: a metadata address is
    refused before any packet leaves; and a module with oauth2 carries secrets (allowed_targets needed)."""
    from connprobe.probepolicy import check_target, connect_guard
    from prober import sockets

    s = token_server
    probe = spec(s.url("/api"), prober="http", allowed_targets=("127.0.0.1",),
                 section=HTTPSpec(oauth2=_oauth(s, token_url="http://169.254.169.254/token")))
    assert check_target(probe.module, "127.0.0.1", ["127.0.0.1"]) is None
    token = sockets.connect_guard.set(connect_guard(probe.module, "127.0.0.1"))
    try:
        (r,) = await run_probe(probe, env)
    finally:
        sockets.connect_guard.reset(token)
    assert r.error is ErrorKind.CONNECT_EPERM, (r.error, r.error_detail)
    assert "oauth2 token endpoint http://169.254.169.254/token" in r.error_detail
    assert "refused by /probe policy" in r.error_detail and "link-local or metadata" in r.error_detail
    assert s.api_auth == []
    bare = spec(s.url("/api"), prober="http", section=HTTPSpec(oauth2=_oauth(s)))
    assert "has no allowed_targets" in check_target(bare.module, "127.0.0.1", ["127.0.0.1"])


def test_oauth2_spec_errors():
    base = {"client_id": "a", "client_secret": "b", "token_url": "http://127.0.0.1/t"}
    for change, message in (({"token_url": "ftp://h/t"}, "is not an http:// or https:// URL"),
                            ({"token_url": "http://u:p@h/t"}, "credentials in the URL are not supported"),
                            ({"token_url": "http://h/t#x"}, "a URL with a #fragment"),
                            ({"client_secret": ""}, "client_secret: must not be empty"),
                            ({"client_id": "a\nb"}, "client_id: contains a line break"),
                            ({"scopes": ("a b",)}, "a scope is one word"),
                            ({"tls": TLSSpec(min_cert_days=7)}, "tls.min_cert_days: not supported for the token "
                                                                "endpoint")):
        with pytest.raises(ValueError, match=message):
            OAuth2Spec(**{**base, **change})
    with pytest.raises(ValueError, match="an Authorization header is also configured"):
        HTTPSpec(headers={"authorization": "x"}, oauth2=OAuth2Spec(**base))
