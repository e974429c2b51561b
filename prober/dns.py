"""DNS probe: one question to a server (the target, or the source's resolv.conf nameserver), over UDP, TCP or
TLS (`transport`), from `source_ip_address` when set."""

from __future__ import annotations

import re
import time
from dataclasses import replace

import dns.rdataclass
import dns.rdatatype

from prober.attempt import Attempt
from prober.env import ProbeEnv
from prober.http import ssl_context
from prober.resolve import query
from prober.sockets import family_mismatch
from prober.types import RCODE_ERROR, ErrorKind, PhaseSpan

DOT_PORT = 853  # RFC 7858's port, what a DNS-over-TLS target without a port is asked on (as blackbox does)

monotonic_ns = time.monotonic_ns


async def probe_dns(attempt: Attempt, env: ProbeEnv, deadline_ns: int):
    spec = attempt.spec.module.dns
    server = attempt.target.address or attempt.target.host
    if not server:
        conf = attempt.resolv_conf()
        if not conf.nameservers:
            return attempt.result(ErrorKind.DNS_UNREACHABLE, f"no nameserver in {attempt.source.resolv_conf}")
        server = conf.nameservers[0]
        port = DOT_PORT if spec.transport == "tls" else conf.port
        attempt.target = replace(attempt.target, address=server, port=port)
    local = spec.source_ip_address
    if (err := family_mismatch(local, server)) is not None:
        return attempt.result(ErrorKind.DNS_UNREACHABLE, err)
    tls = None
    if spec.transport == "tls":
        try:
            tls = ssl_context(spec.tls_config)
        except (OSError, ValueError) as exc:  # a CA or client certificate file gone or broken since the load
            return attempt.result(ErrorKind.TLS_ERROR, f"tls_config: {exc}")
    left = (deadline_ns - monotonic_ns()) / 1e9
    outs = await query(
        attempt.source,
        server,
        spec.query_name,
        spec.query_type,
        max(0.0, left),
        env.on_local_port,
        port=attempt.target.port,
        tcp=spec.transport == "tcp",
        recursion_desired=spec.recursion_desired,
        tls=tls,
        server_name=spec.tls_config.server_name or attempt.target.host or server,
        local_addr=local,
    )
    attempt.dns.extend(o.txn for o in outs)
    last = outs[-1]
    txn = last.txn
    if txn.end_ns is not None:  # the whole query is a dns probe's resolve span
        attempt.timeline.resolves.append((outs[0].txn.start_ns, txn.end_ns))
    # blackbox's connect phase of a stream query: the TCP connect and, over TLS, the handshake (its own phase)
    for out in outs:
        if out.connect is not None:
            attempt.timeline.marks.append(PhaseSpan("connect", *out.connect))
        if out.tls is not None:
            attempt.timeline.marks.append(PhaseSpan("tls", *out.tls))
    attempt.values["dns_query_succeeded"] = 0.0 if last.response is None else 1.0
    if last.response is None:
        return attempt.result(last.error or ErrorKind.DNS_TIMEOUT, last.detail)
    resp = last.response
    for name, rrsets in (("answer", resp.answer), ("authority", resp.authority), ("additional", resp.additional)):
        attempt.values[f"dns_{name}_rrs"] = float(sum(len(rrset) for rrset in rrsets))
    for rrset in resp.answer:  # blackbox's probe_dns_serial: the zone's serial, from an SOA answer
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            attempt.values["dns_serial"] = float(rrset[0].serial)
            break
    rcode = txn.rcode or ""
    if rcode not in spec.valid_rcodes:
        attempt.failed.append("valid_rcodes")
        kind = RCODE_ERROR.get(rcode, ErrorKind.DNS_UNEXPECTED)
        return attempt.result(kind, f"rcode {rcode}")
    if spec.fail_if_no_answer and not txn.answers:
        attempt.failed.append("fail_if_no_answer")
        return attempt.result(ErrorKind.DNS_NO_ANSWER, f"no answer for {spec.query_name} {spec.query_type}")
    for pattern in spec.fail_if_answer_not_matches_regexp:
        if not any(re.search(pattern, a) for a in txn.answers):
            attempt.failed.append("fail_if_answer_not_matches_regexp")
            return attempt.result(ErrorKind.DNS_UNEXPECTED, "answer did not match")
    sections = (("answer", last.response.answer, spec.validate_answer_rrs),
                ("authority", last.response.authority, spec.validate_authority_rrs),
                ("additional", last.response.additional, spec.validate_additional_rrs))
    for name, rrsets, validator in sections:
        failed = validator.failed(rr_lines(rrsets))
        if failed:
            attempt.failed.append(f"validate_{name}_rrs.{failed}")
            return attempt.result(ErrorKind.DNS_UNEXPECTED, f"{name} section: {failed}")
    return attempt.result()


def rr_lines(rrsets) -> list[str]:
    """Each record of a section as `name<TAB>ttl<TAB>class<TAB>type<TAB>data` (what blackbox's matchers see)."""
    return [f"{rrset.name}\t{rrset.ttl}\t{dns.rdataclass.to_text(rrset.rdclass)}\t"
            f"{dns.rdatatype.to_text(rrset.rdtype)}\t{rd.to_text()}"
            for rrset in rrsets for rd in rrset]
