"""DNS probe: one question to a server (the target, or the source's resolv.conf nameserver)."""

from __future__ import annotations

import re
import time
from dataclasses import replace

from prober.attempt import Attempt
from prober.env import ProbeEnv
from prober.resolve import query
from prober.types import RCODE_ERROR, ErrorKind

monotonic_ns = time.monotonic_ns


async def probe_dns(attempt: Attempt, env: ProbeEnv, deadline_ns: int):
    spec = attempt.spec.module.dns
    server = attempt.target.address or attempt.target.host
    if not server:
        conf = attempt.resolv_conf()
        if not conf.nameservers:
            return attempt.result(ErrorKind.DNS_UNREACHABLE, f"no nameserver in {attempt.source.resolv_conf}")
        server = conf.nameservers[0]
        attempt.target = replace(attempt.target, address=server, port=conf.port)
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
    )
    attempt.dns.extend(o.txn for o in outs)
    last = outs[-1]
    txn = last.txn
    if txn.end_ns is not None:  # a dns probe's one phase is its resolve span
        attempt.timeline.resolves.append((outs[0].txn.start_ns, txn.end_ns))
    if last.response is None:
        return attempt.result(last.error or ErrorKind.DNS_TIMEOUT, last.detail)
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
    return attempt.result()
