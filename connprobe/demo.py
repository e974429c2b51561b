"""`connprobe demo`: bring the lab up, probe it from the client namespace under each fault of the fault
matrix in turn, and print what a client saw and what the lab's own counters say happened."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from connprobe.lab import Lab, LabError


@dataclass
class Scenario:
    name: str
    fault: str
    switch: Callable[[Lab], contextlib.AbstractContextManager]
    path: str = "/ok"


SCENARIOS = [
    Scenario("healthy", "none", lambda lab: contextlib.nullcontext()),
    Scenario("dns nxdomain", "DNS answers NXDOMAIN for srv1", lambda lab: lab.dns_fault("srv1.lab.test", "nxdomain")),
    Scenario("dns servfail", "DNS answers SERVFAIL for srv1", lambda lab: lab.dns_fault("srv1.lab.test", "servfail")),
    Scenario("dns no answer", "DNS never answers for srv1", lambda lab: lab.dns_fault("srv1.lab.test", "timeout")),
    Scenario("dns slow", "DNS answers after 0.8 s", lambda lab: lab.dns_fault("srv1.lab.test", "slow", 0.8)),
    Scenario("policy drop (server)", "nft drop tcp/8080 in srv1",
             lambda lab: lab.policy_drop("srv1", direction="in", port=8080)),
    Scenario("policy drop (client)", "nft drop tcp/8080 out of client",
             lambda lab: lab.policy_drop("client", direction="out", port=8080)),
    Scenario("policy reject", "nft reject tcp/8080 in srv1",
             lambda lab: lab.policy_drop("srv1", direction="in", port=8080, action="reject")),
    Scenario("packet loss", "5% random loss on the client link", lambda lab: lab.packet_loss(0.05),
             "/bytes/4000000"),
    Scenario("slow upstream", "srv1 handler sleeps 0.6 s", lambda lab: lab.slow_upstream("srv1", 0.6)),
    Scenario("no listener", "srv1 closes its port", lambda lab: lab.no_listener("srv1")),
    Scenario("http 503", "srv1 answers 503", lambda lab: lab.http_status("srv1", 503)),
]

CURL_FORMAT = "%{http_code} %{time_namelookup} %{time_connect} %{time_starttransfer} %{time_total} %{size_download}"
CURL_ERRORS = {6: "could not resolve host", 7: "connection refused", 28: "timed out", 0: ""}


def _retransmits(lab: Lab) -> int:
    total = 0
    for role in ("client", "srv1"):
        out = lab.exec(role, "nstat", "-az", "TcpRetransSegs")
        total += int(out.split("TcpRetransSegs")[1].split()[0])
    return total


def run_scenario(lab: Lab, sc: Scenario) -> list[str]:
    url = f"http://srv1.lab.test:8080{sc.path}"
    before = _retransmits(lab)
    with sc.switch(lab) as fault:
        proc = lab.exec("client", "sh", "-c", f"curl -s -o /dev/null -m 3 -w '{CURL_FORMAT}' {url}; echo \" $?\"",
                        check=False)
        matched = fault.matched() if hasattr(fault, "matched") else None
        lost = fault.stats()[1] if hasattr(fault, "stats") else None
    code, dns, conn, ttfb, total, size, rc = proc.split()
    rc = int(rc)
    seen = f"HTTP {code}, {int(size)} bytes" if code != "000" else CURL_ERRORS.get(rc, f"curl exit {rc}")
    ms = lambda s: f"{float(s) * 1000:.0f}"  # noqa: E731
    conn_ms = f"{(float(conn) - float(dns)) * 1000:.0f}" if float(conn) else "-"
    ttfb_ms = f"{(float(ttfb) - float(conn)) * 1000:.0f}" if float(ttfb) else "-"
    kernel = [f"retransmits +{_retransmits(lab) - before}"]
    if matched is not None:
        kernel.append(f"nft matched {matched}")
    if lost is not None:
        kernel.append(f"lost {lost} pkts")
    return [sc.name, sc.fault, seen, ms(dns), conn_ms, ttfb_ms, ms(total), ", ".join(kernel)]


def run(args: argparse.Namespace) -> int:
    out = Console()
    if not out.is_terminal:
        out = Console(width=170)
    try:
        lab = Lab().up()
    except LabError as exc:
        Console(stderr=True).print(f"connprobe demo: {exc}", markup=False)
        return 2
    try:
        out.print(f"[bold]lab {lab.id}[/bold] is up: client {lab.ns('client').name} → router → srv1/srv2 + DNS "
                  f"(zone {lab.zone}); probing http://srv1.lab.test:8080 from the client with curl")
        table = Table(title="What the client saw under each fault", title_justify="left")
        for col, just in (("scenario", "left"), ("fault injected", "left"), ("client saw", "left"),
                          ("dns ms", "right"), ("connect ms", "right"), ("server ms", "right"),
                          ("total ms", "right"), ("lab counters", "left")):
            table.add_column(col, justify=just, no_wrap=col in ("client saw", "lab counters"))
        t0 = time.monotonic()
        for sc in SCENARIOS:
            table.add_row(*run_scenario(lab, sc))
        out.print(table)
        out.print(f"{len(SCENARIOS)} scenarios in {time.monotonic() - t0:.1f} s; lab {lab.id} torn down.")
    finally:
        lab.down()
    return 0
