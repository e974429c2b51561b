"""`http.no_proxy` and `http.proxy_from_environment` (`prober.proxy`): Go's rules for which request goes through
the proxy, and real probes through a forward proxy on loopback (its upstream connections go to 127.0.0.1 only,
whatever name the request carries)."""

from __future__ import annotations

import pytest
import yaml

from connprobe.config import ConfigError, parse_config
from prober import HTTPSpec, run_probe
from prober.proxy import ProxyRules, from_environment
from tests.prober.helpers import spec

PROXY = "http://10.9.9.9:3128"  # never connected to: only compared


@pytest.mark.parametrize("no_proxy, scheme, host, port, proxied", [
    ((), "http", "127.0.0.1", 80, True),  # proxy_url alone: everything through it (Go's http.ProxyURL)
    (("other.test",), "http", "127.0.0.1", 80, False),  # with no_proxy, Go's httpproxy: loopback is direct
    (("other.test",), "http", "localhost", 80, False),
    (("other.test",), "http", "::1", 80, False),
    (("other.test",), "http", "api.lab.test", 80, True),
    (("lab.test",), "http", "api.lab.test", 80, False),  # a domain matches itself and its subdomains
    (("lab.test",), "http", "lab.test", 80, False),
    ((".lab.test",), "http", "lab.test", 80, True),  # a leading dot: only subdomains
    (("*.lab.test",), "https", "api.lab.test", 443, False),
    (("*.lab.test",), "https", "xlab.test", 443, True),
    (("api.lab.test:8080",), "http", "api.lab.test", 8080, False),  # with a port: only that port
    (("api.lab.test:8080",), "http", "api.lab.test", 80, True),
    (("10.0.0.0/8",), "http", "10.1.2.3", 80, False),
    (("10.0.0.0/8",), "http", "11.1.2.3", 80, True),
    (("10.1.2.3",), "https", "10.1.2.3", 443, False),
    (("10.1.2.3:8443",), "https", "10.1.2.3", 443, True),
    (("[2001:db8::1]:443",), "https", "[2001:db8::1]", None, False),  # no port: the scheme's
    (("2001:db8::/32",), "https", "2001:db8::7", 443, False),
    (("*",), "http", "anything.test", 80, False),
])
def test_go_rules(no_proxy, scheme, host, port, proxied):
    rules = ProxyRules(PROXY, {}, no_proxy)
    assert (rules.proxy_for(scheme, host, port) == PROXY) is proxied


def test_per_scheme_proxies_and_the_environment():
    urls, no_proxy = from_environment({"HTTP_PROXY": "10.9.9.9:3128", "no_proxy": " a.test, 10.0.0.0/8 ,"})
    assert urls == {"http": "http://10.9.9.9:3128"} and no_proxy == ("a.test", "10.0.0.0/8")
    rules = ProxyRules(None, urls, no_proxy)
    assert rules.proxy_for("http", "b.test", 80) == "http://10.9.9.9:3128"
    assert rules.proxy_for("https", "b.test", 443) is None  # no HTTPS_PROXY: https targets go direct, as in Go
    assert rules.proxy_for("http", "x.a.test", 80) is None
    urls, _ = from_environment({"HTTPS_PROXY": "http://p:1", "https_proxy": "http://ignored:2"})
    assert urls == {"https": "http://p:1"}  # the upper-case name first
    assert from_environment({}) == ({}, ())


async def test_no_proxy_through_a_real_proxy(http_server, proxy, env):
    port = http_server.port
    proxy_url = f"http://127.0.0.1:{proxy.port}"

    async def probe(target: str, **kw) -> None:
        (r,) = await run_probe(spec(target, prober="http", ip_policy="ipv4",
                                    section=HTTPSpec(client="httpx", proxy_url=proxy_url, **kw)), env)
        assert r.ok, (target, r.error, r.error_detail)
        return r

    r = await probe(f"http://srv1.lab.test:{port}/ok", no_proxy=("v4only.lab.test",))
    assert proxy.lines == [f"GET http://srv1.lab.test:{port}/ok HTTP/1.1"]
    assert r.flows[-1].remote_port == proxy.port  # the connection is the proxy's
    r = await probe(f"http://v4only.lab.test:{port}/ok", no_proxy=("v4only.lab.test",))
    assert len(proxy.lines) == 1 and r.flows[-1].remote_port == port  # direct to the target
    await probe(f"http://srv1.lab.test:{port}/ok", no_proxy="other.test, *.lab.test")  # blackbox's string form
    assert len(proxy.lines) == 1
    await probe(f"http://127.0.0.1:{port}/ok", no_proxy=("other.test",))  # loopback: direct under Go's rules
    assert len(proxy.lines) == 1
    await probe(f"http://127.0.0.1:{port}/ok")  # proxy_url alone: through it
    assert proxy.lines[-1] == f"GET http://127.0.0.1:{port}/ok HTTP/1.1"


async def test_proxy_from_environment(http_server, proxy, env, monkeypatch, tmp_path):
    port = http_server.port
    monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "v4only.lab.test")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    doc = {"modules": {"m": {"prober": "http", "http": {"proxy_from_environment": True}}}}
    cfg = parse_config(yaml.safe_dump(doc), blackbox=True, base_dir=tmp_path)
    h = cfg.modules["m"].http
    assert h.proxy_urls == {"http": f"http://127.0.0.1:{proxy.port}"} and h.no_proxy == ("v4only.lab.test",)
    assert h.client == "httpx"
    for target, through in ((f"http://srv1.lab.test:{port}/ok", True), (f"http://v4only.lab.test:{port}/ok", False)):
        before = len(proxy.lines)
        (r,) = await run_probe(spec(target, prober="http", ip_policy="ipv4", section=h), env)
        assert r.ok, (r.error, r.error_detail)
        assert (len(proxy.lines) > before) is through, (target, proxy.lines)
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.delenv("http_proxy", raising=False)
    cfg = parse_config(yaml.safe_dump(doc), blackbox=True, base_dir=tmp_path)
    assert cfg.modules["m"].http.proxy_urls == {} and cfg.modules["m"].http.client == "aiohttp"  # no proxy: direct


@pytest.mark.parametrize("http, message", [
    ({"proxy_from_environment": True, "proxy_url": "http://127.0.0.1:3128"},
     "http.proxy_from_environment: give proxy_url or proxy_from_environment, not both"),
    ({"proxy_from_environment": True, "no_proxy": "a.test"},
     "http.proxy_from_environment: give no_proxy or proxy_from_environment (NO_PROXY is read then), not both"),
    ({"proxy_from_environment": "yes"}, "http.proxy_from_environment: must be true or false"),
    ({"no_proxy": "a.test"}, "http: no_proxy: needs proxy_url"),
    ({"proxy_url": "http://127.0.0.1:3128", "no_proxy": "10.0.0.0/99"}, "no_proxy: '10.0.0.0/99' is not a CIDR"),
    ({"proxy_url": "http://127.0.0.1:3128", "no_proxy": "a.test:http"},
     "no_proxy: 'a.test:http': 'http' is not a port"),
    ({"proxy_url": "http://127.0.0.1:3128", "no_proxy": "a b.test"}, "no_proxy: 'a b.test' is not a host, domain"),
])
def test_proxy_config_errors(http, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    doc = {"modules": {"m": {"prober": "http", "http": http}}}
    with pytest.raises(ConfigError) as ei:
        parse_config(yaml.safe_dump(doc), blackbox=True, base_dir=tmp_path)
    assert len(ei.value.errors) == 1 and message in ei.value.errors[0], ei.value.errors


@pytest.mark.parametrize("environ, message", [
    ({"HTTPS_PROXY": "https://proxy.test:3128"},
     "http.proxy_from_environment: HTTPS_PROXY in the agent's environment: 'https://proxy.test:3128': only "
     "http://HOST:PORT proxies are supported"),
    ({"http_proxy": "http://user:pa55w0rd@proxy.test:bad"},
     "http.proxy_from_environment: http_proxy in the agent's environment: 'http://<redacted>@proxy.test:bad' is "
     "not a URL"),
    ({"HTTP_PROXY": "proxy.test:3128", "NO_PROXY": "a.test, *.svc:abc"},
     "http.proxy_from_environment: NO_PROXY in the agent's environment: no_proxy: '*.svc:abc': 'abc' is not a port"),
])
def test_proxy_environment_errors_name_the_variable(environ, message, tmp_path, monkeypatch):
    """A malformed proxy variable: one error naming the variable (not proxy_urls/no_proxy, keys the file does not
    have), and a proxy password in it is not shown."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    doc = {"modules": {"m": {"prober": "http", "http": {"proxy_from_environment": True}}}}
    with pytest.raises(ConfigError) as ei:
        parse_config(yaml.safe_dump(doc), blackbox=True, base_dir=tmp_path)
    assert len(ei.value.errors) == 1 and message in ei.value.errors[0], ei.value.errors
    assert "pa55w0rd" not in ei.value.errors[0]
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)  # NO_PROXY alone is not read: no error
    parse_config(yaml.safe_dump(doc), blackbox=True, base_dir=tmp_path)


def test_proxy_url_errors_hide_the_password(tmp_path):
    doc = {"modules": {"m": {"prober": "http", "http": {"proxy_url": "http://user:pa55w0rd@proxy.test:bad"}}}}
    with pytest.raises(ConfigError) as ei:
        parse_config(yaml.safe_dump(doc), base_dir=tmp_path)
    assert len(ei.value.errors) == 1 and "'http://<redacted>@proxy.test:bad' is not a URL" in ei.value.errors[0]
    assert "pa55w0rd" not in ei.value.errors[0], ei.value.errors
