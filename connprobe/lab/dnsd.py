"""The lab's DNS server (dnspython messages over asyncio UDP and TCP), run inside the DNS namespace.

It is authoritative for one zone, read from a JSON file: {"zone": "lab.test.", "names": {NAME: {"A": [..],
"AAAA": [..]}}, "modes": {NAME: {"mode": ..., "delay": S}}}. A name's mode decides how it is answered:
  answer    the records (NOERROR; NOERROR with no answer for a type it has none of)
  nxdomain  NXDOMAIN          servfail  SERVFAIL          refused  REFUSED
  timeout   no answer at all  slow      the records, after `delay` seconds
Names under the zone that are not listed get NXDOMAIN; names outside it get REFUSED. A UDP answer larger
than 512 bytes (or the client's EDNS size) is sent truncated (TC) so the client retries over TCP.
Modes are switched at run time through the control socket: {"op": "mode", "name": N, "mode": M, "delay": S}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import struct
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from connprobe.lab import control

MODES = ("answer", "nxdomain", "servfail", "refused", "timeout", "slow")
TTL = 5


class LabDnsServer:
    def __init__(self, zone: str, names: dict[str, dict[str, list[str]]], modes: dict[str, dict]):
        self.zone = dns.name.from_text(zone)
        self.names = {dns.name.from_text(n): recs for n, recs in names.items()}
        self.modes: dict[dns.name.Name, tuple[str, float]] = {}
        for n, m in modes.items():
            self.set_mode(n, m["mode"], m.get("delay", 0.0))
        self.queries = 0

    def set_mode(self, name: str, mode: str, delay: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        key = dns.name.from_text(name)
        if mode == "answer":
            self.modes.pop(key, None)
        else:
            self.modes[key] = (mode, float(delay))

    async def answer(self, wire: bytes, max_size: int | None) -> bytes | None:
        """The reply to one query, or None for "no answer"."""
        self.queries += 1
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        if not query.question:
            resp.set_rcode(dns.rcode.FORMERR)
            return resp.to_wire()
        q = query.question[0]
        mode, delay = self.modes.get(q.name, ("answer", 0.0))
        if mode == "timeout":
            return None
        if mode == "slow":
            await asyncio.sleep(delay)
        if mode in ("nxdomain", "servfail", "refused"):
            resp.set_rcode({"nxdomain": dns.rcode.NXDOMAIN, "servfail": dns.rcode.SERVFAIL,
                            "refused": dns.rcode.REFUSED}[mode])
        elif not q.name.is_subdomain(self.zone):
            resp.set_rcode(dns.rcode.REFUSED)
            resp.flags &= ~dns.flags.AA
        elif q.name not in self.names:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        else:
            addrs = self.names[q.name].get(dns.rdatatype.to_text(q.rdtype), [])
            if addrs:
                resp.answer.append(dns.rrset.from_text_list(q.name, TTL, dns.rdataclass.IN, q.rdtype, addrs))
        if max_size is not None:
            limit = max(512, query.payload if query.edns >= 0 else 512)
            try:
                return resp.to_wire(max_size=limit)
            except dns.exception.TooBig:
                resp.answer.clear()
                resp.flags |= dns.flags.TC
        return resp.to_wire()

    def on_control_sync(self, req: dict) -> dict:
        if req.get("op") == "mode":
            self.set_mode(req["name"], req["mode"], req.get("delay", 0.0))
        elif req.get("op") != "ping":
            raise ValueError(f"unknown op {req.get('op')!r}")
        return {"pid": os.getpid(), "queries": self.queries,
                "modes": {n.to_text(): {"mode": m, "delay": d} for n, (m, d) in self.modes.items()}}

    async def on_control(self, req: dict) -> dict:
        return self.on_control_sync(req)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: LabDnsServer):
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task] = set()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        task = asyncio.ensure_future(self._reply(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, addr) -> None:
        out = await self.server.answer(data, max_size=512)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


async def _tcp_client(server: LabDnsServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readexactly(2)
            wire = await reader.readexactly(struct.unpack("!H", head)[0])
            out = await server.answer(wire, max_size=None)
            if out is not None:
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def amain(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.zone_file).read_text())
    server = LabDnsServer(spec["zone"], spec["names"], spec.get("modes", {}))
    loop = asyncio.get_running_loop()
    transports = []
    tcp_servers = []
    for host in args.listen:
        t, _ = await loop.create_datagram_endpoint(lambda: _Udp(server), local_addr=(host, args.port))
        transports.append(t)
        tcp_servers.append(
            await asyncio.start_server(lambda r, w: _tcp_client(server, r, w), host=host, port=args.port)
        )
    ctl = await control.serve(args.control, server.on_control)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": "dns", "pid": os.getpid()}), flush=True)
    await stop.wait()
    ctl.close()
    for t in transports:
        t.close()
    for s in tcp_servers:
        s.close()


def main() -> None:
    p = argparse.ArgumentParser(description="connprobe lab DNS server")
    p.add_argument("--zone-file", required=True)
    p.add_argument("--listen", action="append", required=True, help="address to listen on (repeatable)")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--control", type=Path, required=True)
    asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    main()
