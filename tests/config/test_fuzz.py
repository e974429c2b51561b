"""Fuzzing the config loader, targets and durations (hypothesis, structure-aware, bounded).

Property: whatever the input, the result is a value the agent can run (finite, bounded durations; names
that dnspython accepts; a source that parses) or one `ConfigError` / `ValueError` of one-line messages —
never another exception. CONNPROBE_FUZZ_EXAMPLES sets the examples per test (default 400, about 15 s in all) and
CONNPROBE_FUZZ_SEED the seed (default fixed, so a CI failure replays as is; hypothesis also keeps failing
examples in .hypothesis/ and replays them first).
"""

from __future__ import annotations

import ipaddress
import math
import os
import tempfile
from pathlib import Path

import dns.name
import pytest
import yaml
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from connprobe.agent import Agent, agent_config
from connprobe.config import MAX_LINE, Config, ConfigError, load_config, parse_config
from prober.resolve import ResolvConf, candidates
from prober.source import parse_source
from prober.spec import MAX_DURATION, MAX_TIMEOUT, ModuleSpec, ProbeSpec, format_duration, parse_duration
from prober.target import parse_target
from tests.leaks import FUZZ_SEED

EXAMPLES = int(os.environ.get("CONNPROBE_FUZZ_EXAMPLES", "400"))

FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

# -- strategies ------------------------------------------------------------------------------------------------

duration_text = st.one_of(
    st.from_regex(r"\A-?[0-9]{0,12}(\.[0-9]{0,12})?(ms|s|m|h|d|us|ns|y)?\Z"),
    st.from_regex(r"\A([0-9]{1,5}d)?([0-9]{1,5}h)?([0-9]{1,5}m)?([0-9]{1,5}s)?([0-9]{1,5}ms)?\Z"),
    st.text(alphabet="0123456789.msdh -+eE_", max_size=20),
    st.builds(lambda n: "9" * n + "s", st.integers(0, 500)),
)
durations = st.one_of(
    duration_text,
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
)
label = st.one_of(
    st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\Z"),
    st.builds(lambda n: "a" * n, st.integers(0, 70)),
    st.text(alphabet="abc-_.%@:/\\ é\x00\n", max_size=6),
)
hosts = st.one_of(
    st.lists(label, min_size=1, max_size=5).map(".".join),
    st.builds(lambda h: h + ".", st.lists(label, min_size=1, max_size=3).map(".".join)),
    st.sampled_from(["127.0.0.1", "[::1]", "[fe80::1%25eth0]", "10.77.2.53", "a..b", "-x.y", "x-.y", "."]),
    st.builds(lambda n: ".".join(["abcdefghij" * 6] * n), st.integers(1, 6)),
)
ports = st.one_of(st.integers(0, 70000).map(str), st.sampled_from(["", "x", "-1", "99999999999999999999"]))


@st.composite
def targets(draw, prober: str | None = None) -> str:
    prober = prober or draw(st.sampled_from(["http", "tcp", "dns"]))
    host = draw(hosts)
    if prober == "http":
        scheme = draw(st.sampled_from(["http://", "https://", "ftp://", ""]))
        port = draw(st.one_of(st.just(""), ports.map(lambda p: ":" + p)))
        return f"{scheme}{host}{port}/{draw(st.text(max_size=5))}"
    if prober == "tcp":
        return f"{host}:{draw(ports)}"
    return draw(st.one_of(st.just("resolv.conf"), st.just(host), ports.map(lambda p: f"{host}:{p}")))


sources = st.one_of(
    st.sampled_from(["host", "netns cp-a", "/run/netns/cp-a", "/proc/1/ns/net", "/proc/self/ns/net", "/etc/hostname",
                     "/dev/null", "netns ../x", "netns", "/proc/99999999/ns/net", "/run/netns/a/b"]),
    st.text(max_size=20), st.integers(), st.none(),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=12))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=12)


def _config_strategy(hostile_slots: tuple[int, ...]):
    """Configs whose every field is valid except in `hostile_slots` of ten draws (none: all valid)."""

    def mostly(valid, hostile):
        """`valid` most of the time: most configs get far enough for their probes to be checked."""
        # hypothesis leans to the ends of a range (and shrinks to 0): the hostile pick sits in the middle
        return st.integers(0, 9).flatmap(lambda i: hostile if i in hostile_slots else valid)


    intervals = mostly(st.sampled_from(["15s", "1m30s", 30, "1h", "2m", "1d"]), durations)
    timeouts = mostly(st.sampled_from(["1s", "250ms", "2s", 1, "1s500ms"]), durations)
    good_hosts = st.lists(st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\Z"), min_size=1, max_size=4).map(".".join)


    def _maybe(draw, key: str, strategy, into: dict, p: float = 0.5) -> None:
        if draw(st.integers(0, 99)) >= 100 - p * 100:  # hypothesis leans to 0: "absent" is the simple case
            into[key] = draw(strategy)


    @st.composite
    def modules(draw) -> dict:
        body: dict = {"prober": draw(mostly(st.sampled_from(["http", "tcp", "dns"]), anything))}
        _maybe(draw, "timeout", timeouts, body)
        _maybe(draw, "budget", timeouts, body, 0.2)
        _maybe(draw, "ip_policy", mostly(st.sampled_from(["all", "first", "ipv4"]), anything), body, 0.2)
        if body["prober"] == "dns" or draw(st.integers(0, 9)) == 9:
            body["dns"] = {"query_name": draw(mostly(good_hosts, st.one_of(hosts, anything)))}
            _maybe(draw, "query_type", st.sampled_from(["A", "AAAA", "AXFR", "txt"]), body["dns"], 0.3)
        if body["prober"] == "http" and draw(st.booleans()):
            http: dict = {}
            _maybe(draw, "headers", st.dictionaries(st.text(max_size=6), mostly(st.text(max_size=6), anything),
                                                    max_size=2), http, 0.3)
            _maybe(draw, "tls", st.fixed_dictionaries({"server_name": mostly(good_hosts, st.one_of(hosts, anything))}),
                   http, 0.3)
            _maybe(draw, "max_body_bytes", mostly(st.integers(0, 10**7), st.one_of(st.integers(-5, 10**30), anything)),
                   http, 0.3)
            body["http"] = http
        _maybe(draw, draw(st.text(max_size=6)), anything, body, 0.05)  # an unknown key now and then
        return body


    @st.composite
    def configs(draw) -> dict:
        mods = draw(st.dictionaries(mostly(st.from_regex(r"\A[a-z]{1,6}\Z"), st.one_of(st.text(max_size=6),
                                                                                            st.integers())),
                                    modules(), min_size=1, max_size=3))
        names = list(mods) or ["m"]
        probes = []
        for i in range(draw(st.integers(0, 4))):
            p: dict = {"name": draw(mostly(st.just(f"p{i}"), st.one_of(st.just("p0"), anything))),
                       "module": draw(mostly(st.sampled_from(names), anything))}
            prober = mods.get(p["module"], {}).get("prober") if isinstance(p["module"], str | int) else None
            kind = prober if prober in ("http", "tcp", "dns") else None
            p["target"] = draw(mostly(_good_target(kind), targets(kind)))
            _maybe(draw, "source", mostly(st.sampled_from(["host", "netns cp-a", "/run/netns/cp-b", "/proc/7/ns/net"]),
                                          sources), p, 0.4)
            _maybe(draw, "interval", intervals, p)
            _maybe(draw, "timeout", timeouts, p, 0.3)
            _maybe(draw, "labels", mostly(st.dictionaries(st.from_regex(r"\A[a-z]{1,5}\Z"), st.text(max_size=5),
                                                          max_size=2), anything), p, 0.2)
            _maybe(draw, "jitter", mostly(st.floats(0, 1), st.one_of(st.floats(), anything)), p, 0.2)
            probes.append(p)
        cfg: dict = {"modules": mods, "probes": probes}
        _maybe(draw, "limits", st.fixed_dictionaries({}, optional={
            "max_probes": mostly(st.integers(1, 5), st.one_of(st.integers(-1, 5), anything)),
            "min_interval": mostly(st.sampled_from(["100ms", "1s", "10s"]), durations)}), cfg, 0.3)
        _maybe(draw, draw(st.text(max_size=5)), anything, cfg, 0.03)
        return cfg


    def _good_target(kind: str | None):
        host = st.one_of(good_hosts, st.sampled_from(["127.0.0.1", "[::1]", "10.77.2.53"]))
        port = st.integers(1, 65535)
        if kind == "http":
            return st.builds(lambda h, p, path: f"http://{h}:{p}/{path}", host, port, st.from_regex(r"\A[a-z]{0,4}\Z"))
        if kind == "dns":
            return st.one_of(st.just("resolv.conf"), st.builds(lambda h, p: f"{h}:{p}", host, port))
        return st.builds(lambda h, p: f"{h}:{p}", host, port)

    return configs()


configs = _config_strategy((3, 6))  # about one field in five hostile
clean_configs = _config_strategy(())  # every field of a kind that may load: the probes get checked


@st.composite
def config_bytes(draw) -> bytes:
    """A config as YAML, then perhaps mutated on the text: a line repeated (duplicate keys), a line nested,
    bytes spliced in (non-UTF-8, control characters), an alias that contains itself."""
    text = yaml.safe_dump(draw(configs), allow_unicode=True, sort_keys=False, width=1000)
    lines = text.splitlines()
    for _ in range(draw(st.integers(0, 2))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["dup", "nest", "drop", "alias"]))
        if op == "dup":
            lines.insert(i, lines[i])
        elif op == "nest":
            lines[i] = lines[i] + " " + "[" * draw(st.integers(1, 60)) + "]" * draw(st.integers(0, 60))
        elif op == "drop":
            del lines[i]
        else:
            lines.append("x: &a [*a]")
    data = ("\n".join(lines) + "\n").encode()
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=4)) + data[at:]
    return data


# -- what a loaded config must be -------------------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _runnable(cfg: Config) -> None:
    """What the agent does with a config at start and reload: none of it may raise."""
    assert len(cfg.probes) <= cfg.limits.max_probes
    for p in cfg.probes:
        for d in (p.interval, p.effective_timeout, p.effective_budget or 1.0):
            assert math.isfinite(d) and 0 < d <= MAX_DURATION
        assert p.effective_timeout <= MAX_TIMEOUT and p.interval >= cfg.limits.min_interval
        int(p.effective_timeout * 1e9)
        t = parse_target(p.module.prober, p.target)
        if t.host and not _is_ip(t.host):
            for name in candidates(t.host, ResolvConf(nameservers=("127.0.0.1",))):
                dns.name.from_text(name)
        if p.module.dns is not None:
            dns.name.from_text(p.module.dns.query_name)
        parse_source(p.source)
    agent_cfg = agent_config(cfg, "<fuzz>")
    Agent._keep_ns(agent_cfg)


def _one_line_errors(exc: ConfigError) -> None:
    assert exc.errors
    for line in exc.errors:
        assert line and "\n" not in line and "\r" not in line and len(line) <= MAX_LINE, line


def _load(data: bytes) -> Config:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yml"
        path.write_bytes(data)
        return load_config(path)


@seed(FUZZ_SEED)
@FUZZ
@given(config_bytes())
@example(b"modules: {t: {prober: tcp, timeout: .inf}}\nprobes: [{name: a, module: t, target: 'h:1'}]\n")
@example(b"modules: {t: {prober: tcp}}\nprobes: [{name: a, module: [x], target: 'h:1'}]\n")
@example(b"probes: [{name: a\xff}]\n")
@example(b"a: " + b"[" * 5000)
@example(b"modules: {t: {prober: http}}\nprobes: [{name: a, module: t, target: 'http://a..b/'}]\n")
def test_config_bytes_load_or_one_line_errors(data):
    try:
        cfg = _load(data)
    except ConfigError as exc:
        _one_line_errors(exc)
    else:
        _runnable(cfg)


@seed(FUZZ_SEED)
@FUZZ
@given(st.one_of(configs, clean_configs))
def test_structured_configs(raw):
    try:
        cfg = parse_config(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    except ConfigError as exc:
        _one_line_errors(exc)
    else:
        _runnable(cfg)


@seed(FUZZ_SEED)
@FUZZ
@given(st.sampled_from(["http", "tcp", "dns"]).flatmap(lambda k: st.tuples(st.just(k), targets(k))))
@example(("http", "http://a..b/"))
@example(("tcp", "a" * 64 + ".example:80"))
@example(("dns", "a" * 64))
def test_targets(case):
    kind, target = case
    module = ModuleSpec(prober=kind, **({"dns": {"query_name": "x.test"}} if kind == "dns" else {}))
    try:
        spec = ProbeSpec(name="t", module=module, target=target)
    except ValidationError as exc:
        for err in exc.errors():
            assert "\n" not in err["msg"]
        return
    _runnable(Config(modules={"m": module}, probes=(spec,)))


@seed(FUZZ_SEED)
@FUZZ
@given(durations)
@example(float("inf"))
@example(10**400)
@example("9" * 400 + "s")
@example("1m30s")
def test_durations(value):
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 200
        return
    assert math.isfinite(seconds) and 0 <= seconds <= MAX_DURATION
    if seconds > 0:
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
