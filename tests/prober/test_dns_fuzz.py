"""Fuzzing the prober's own DNS client with mutations of real answers (hypothesis).

The loopback DNS server of tests/prober/servers.py builds a real answer (dnspython) for every query, then
a generated list of mutations is applied to it (flipped and overwritten bytes, truncation, inserted bytes,
header flags such as TC/QR/rcode, section counts), over UDP, TCP or both. Both users of the client are
driven: the DNS probe (`run_probe`) and `resolve()` (what HTTP/TCP probes use for a name; called directly,
so no fuzzed address is ever connected to). Property: an `ErrorKind` other than `internal` or a clean
answer, nothing logged as an error, no file descriptor left. CONNPROBE_FUZZ_EXAMPLES sets the count.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

from prober import DNSSpec, ErrorKind, ProbeEnv, ProbeResult, run_probe
from prober.resolve import ResolvConf, resolve
from prober.sockets import get_source, no_callback
from tests.leaks import FUZZ_SEED, ErrorRecords, open_fds
from tests.prober.helpers import spec
from tests.prober.servers import DnsServer

EXAMPLES = int(os.environ.get("CONNPROBE_FUZZ_EXAMPLES", "40"))
TIMEOUT = 0.1
NAMES = ["www.fuzz.test", "big.fuzz.test", "txt.fuzz.test", "alias.fuzz.test", "missing.fuzz.test"]

_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 600), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 600), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 600)),
    st.tuples(st.just("insert"), st.integers(0, 600), st.binary(min_size=1, max_size=20)),
    st.tuples(st.just("flags"), st.integers(0, 0xFFFF)),  # bytes 2-3: QR, opcode, AA, TC, RD, RA, Z, rcode
    st.tuples(st.just("count"), st.integers(0, 3), st.integers(0, 0xFFFF)),  # qd/an/ns/ar counts
)


def mutate(wire: bytes, ops) -> bytes:
    """Apply mutations; the message ID (bytes 0-1) stays, or the client would rightly wait for its answer."""
    data = bytearray(wire)
    for op in ops:
        kind = op[0]
        if kind == "flags":
            data[2:4] = op[1].to_bytes(2, "big")
        elif kind == "count":
            at = 4 + 2 * op[1]
            data[at : at + 2] = op[2].to_bytes(2, "big")
        elif kind == "truncate":
            del data[max(2, op[1] % (len(data) + 1)) :]
        else:
            at = 2 + op[1] % max(1, len(data) - 2)
            if kind == "insert":
                data[at:at] = op[2]
            elif at < len(data):
                data[at] = data[at] ^ op[2] if kind == "flip" else op[2]
    return bytes(data)


async def _run(ops, protos: str, name: str, qtype: str, transport: str, policy: str):
    srv = DnsServer()
    srv.add("www.fuzz.test", "A", "127.0.0.1")
    srv.add("www.fuzz.test", "AAAA", "::1")
    srv.add("big.fuzz.test", "A", *[f"127.0.1.{i}" for i in range(1, 60)])  # > 512 bytes: TC, then TCP
    srv.add("txt.fuzz.test", "TXT", '"hello world"', '"v=spf1 -all"')
    srv.add("alias.fuzz.test", "CNAME", "www.fuzz.test.")
    srv.add("www.fuzz.test", "MX", "10 mail.fuzz.test.")
    srv.mutate = lambda wire, proto: mutate(wire, ops) if proto in protos else wire
    await srv.start()
    try:
        conf = ResolvConf(nameservers=("127.0.0.1",), port=srv.port, timeout=TIMEOUT, attempts=1)
        async with ProbeEnv(resolv_conf=conf) as env:
            section = DNSSpec(query_name=name, query_type=qtype, transport=transport,
                              fail_if_answer_not_matches_regexp=("fuzz",))
            s = spec(f"127.0.0.1:{srv.port}", prober="dns", section=section, timeout=TIMEOUT * 2)
            (r,) = await run_probe(s, env)
            res = await resolve(get_source("host"), name, policy, time.monotonic_ns() + int(TIMEOUT * 2e9),
                                no_callback, conf)
        return r, res
    finally:
        await srv.stop()


@pytest.mark.timeout(600)
def test_mutated_dns_answers_end_in_an_error_kind():
    errors = ErrorRecords()
    logging.getLogger().addHandler(errors)
    before = open_fds()

    @seed(FUZZ_SEED)
    @settings(max_examples=EXAMPLES, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    @given(
        ops=st.lists(_op, min_size=1, max_size=4),
        protos=st.sampled_from(["udp", "tcp", "udp tcp"]),
        name=st.sampled_from(NAMES),
        qtype=st.sampled_from(["A", "AAAA", "TXT", "MX", "CNAME"]),
        transport=st.sampled_from(["udp", "tcp"]),
        policy=st.sampled_from(["first", "all", "ipv4", "ipv6"]),
    )
    @example(ops=[("flags", 0x8380)], protos="udp tcp", name="www.fuzz.test", qtype="A", transport="udp",
             policy="ipv4")  # TC set on every answer, TCP's too
    @example(ops=[("count", 1, 0xFFFF)], protos="udp tcp", name="big.fuzz.test", qtype="A", transport="udp",
             policy="all")
    def check(ops, protos, name, qtype, transport, policy):
        r, res = asyncio.run(_run(ops, protos, name, qtype, transport, policy))
        assert isinstance(r, ProbeResult)
        assert r.ok or isinstance(r.error, ErrorKind)
        assert r.error is not ErrorKind.INTERNAL, r.error_detail
        assert res.addresses or isinstance(res.error, ErrorKind), res
        assert res.error is not ErrorKind.INTERNAL, res
        assert all(isinstance(a, str) for a in res.addresses)
        assert not errors.records, [e.getMessage() for e in errors.records]

    try:
        check()
    finally:
        logging.getLogger().removeHandler(errors)
    assert open_fds() <= before
