"""The two-node lab: the lab's namespaces split between two "nodes", each with its own agent (its own kernel
sensor restricted to its namespaces, its own web endpoint on loopback), the way each node of a cluster has
its own kernel and agent.

    node A (the probing agent):  client                      sensor: client's events only
    the network in between:      router                      no agent (what neither node sees)
    node B (the answering agent): srv1, srv2, dns             sensor: servers' events; watches tcp/8080

Node A's `peers:` sends questions about 10.77.2.0/24 and fd77:2::/64 to node B's /api/evidence with a bearer
token. The router stands for the network between the nodes: a drop there is seen by neither node, which is
what "dropped in between" means. Both agents run in this process (`TwoNodes`, an async context manager).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from connprobe.agent import Agent
from connprobe.config import parse_config
from connprobe.lab.topology import HTTP_PORT, SERVER_NET, VIP, VIP_PORT, Lab
from correlator.types import Verdict
from prober.runner import run_probe
from prober.types import ProbeResult

NODE_A_ROLES = ("client",)
NODE_B_ROLES = ("srv1", "srv2", "dns")
PEER_CIDRS = ("10.77.2.0/24", "fd77:2::/64")


@dataclass
class Outcome:
    """One probe seen both ways: node A alone (single-node mode) and node A asking node B."""

    result: ProbeResult
    alone: Verdict
    asked: Verdict
    events: tuple = ()  # node A's kernel events of the probe's window
    coverage: object = None  # node A's KernelCoverage


class TwoNodes:
    def __init__(self, lab: Lab, workdir: Path, *, skew_ns: int = 0, peer_url: str | None = None,
                 peer_timeout: str = "500ms", token: str | None = None, static_peers: bool = True):
        self.lab, self.workdir = lab, Path(workdir)
        self.skew_ns = skew_ns
        self.peer_url = peer_url  # None: node B's own URL; else (a dead or slow stand-in) this
        self.peer_timeout = peer_timeout
        self.token = token or secrets.token_urlsafe(24)
        self.static_peers = static_peers  # False: node A has no `peers:` (the test gives it a cluster resolver)
        self.b_port = 0
        self.a: Agent | None = None
        self.b: Agent | None = None
        self._servers: list = []
        self.b_url = ""

    def _write(self, name: str, doc: dict) -> Path:
        path = self.workdir / name
        path.write_text(yaml.safe_dump(doc))
        return path

    async def __aenter__(self) -> TwoNodes:
        from connprobe.web import start_server

        self.workdir.mkdir(parents=True, exist_ok=True)
        token_file = self.workdir / "peer-token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o600)
        lab = self.lab
        b_cfg = self._write("node-b.yml", {"node": {
            "name": "node-b", "netns": [lab.ns(r).name for r in NODE_B_ROLES], "watch": [f"tcp/{HTTP_PORT}"],
            "peer_token_file": str(token_file)}})
        skew = self.skew_ns
        try:
            self.b = Agent(b_cfg, wall_clock=(lambda: time.time_ns() + skew) if skew else time.time_ns)
            await self.b.start()
            server = await start_server(self.b, "127.0.0.1", 0)
            self._servers.append(server)
            host, port = server.addresses[0][:2]
            self.b_url, self.b_port = f"http://{host}:{port}", port
            url = self.peer_url or self.b_url
            a_doc: dict = {"node": {"name": "node-a", "netns": [lab.ns(r).name for r in NODE_A_ROLES],
                                    "peer_token_file": str(token_file)}}
            if self.static_peers:
                a_doc["peers"] = [{"cidr": c, "url": url, "token_file": str(token_file), "timeout": self.peer_timeout}
                                  for c in PEER_CIDRS]
            a_cfg = self._write("node-a.yml", a_doc)
            self.a = Agent(a_cfg)
            await self.a.start()
            await self.b.wait_ready(60)
            await self.a.wait_ready(60)
            for agent in (self.a, self.b):
                if agent.sensor_state != "attached":
                    raise RuntimeError(f"{agent.node_name}: kernel sensor {agent.sensor_state}")
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self._servers:
            with contextlib.suppress(Exception):
                await s.cleanup()
        self._servers.clear()
        for agent in (self.a, self.b):
            if agent is not None:
                with contextlib.suppress(Exception):
                    await agent.stop()
        self.a = self.b = None

    def server_addr(self, family: int, role: str = "srv1") -> str:
        s = self.lab.server(role)
        return s.addr4 if family == 4 else s.addr6

    async def probe(self, addr: str, port: int = HTTP_PORT, *, kind: str = "tcp", timeout: str = "1500ms") -> Outcome:
        """Run one probe from the client namespace with node A's agent: the verdict of node A alone, and the one
        made after asking node B (when node A's own evidence leaves the question open)."""
        assert self.a is not None and self.a.env is not None
        host = f"[{addr}]" if ":" in addr else addr
        target = f"{host}:{port}" if kind == "tcp" else f"http://{host}:{port}/ok"
        cfg = parse_config(yaml.safe_dump({
            "modules": {"m": {"prober": kind, "timeout": timeout}},
            "probes": [{"name": "crossnode", "module": "m", "target": target,
                        "source": f"netns {self.lab.ns('client').name}"}]}))
        result = (await run_probe(cfg.probes[0], self.a.env))[0]
        seen: dict = {}
        alone, asked = await self.a.verdicts_for(result, None, seen=seen)
        return Outcome(result, alone, asked, tuple(seen.get("events", ())), seen.get("coverage"))


# -- the two-node rows of the fault matrix ------------------------------------------------------------------


@dataclass(frozen=True)
class TwoNodeScenario:
    """A fault, and the verdicts node A must give alone (single-node mode) and after asking node B."""

    name: str
    alone: str  # sub-cause of node A alone
    expected: str  # cause after asking
    expected_sub: str  # sub-cause after asking
    fault: Callable[[Lab], contextlib.AbstractContextManager]
    kind: str = "tcp"  # tcp (connect) or http (GET /ok)
    timeout: str = "1500ms"
    fact: str = ""  # words the first fact must hold (which node saw what)
    asks: bool = True  # whether node B is asked (when node A's own evidence decides: whether B agrees)
    agrees: str = ""  # decided on node A: words of the fact saying node B's evidence agrees (or says nothing)
    vip: bool = False  # probe the Service's virtual IP (DNAT'ed to srv1 in the client namespace), not srv1


TWO_NODE_SCENARIOS: tuple[TwoNodeScenario, ...] = (
    TwoNodeScenario("syn_drop_at_b", "unknown/connect_timeout", "policy_drop", "policy_drop/syn",
                    lambda lab: lab.policy_drop("srv1", direction="in", port=HTTP_PORT), fact="on node node-b"),
    TwoNodeScenario("answer_drop_b_egress", "unknown/connect_timeout", "policy_drop", "policy_drop/syn",
                    lambda lab: lab.policy_drop("srv1", direction="out", port=HTTP_PORT, port_side="src"),
                    fact="node node-b's way out"),
    TwoNodeScenario("answer_drop_a_ingress", "policy_drop/syn", "policy_drop", "policy_drop/syn",
                    lambda lab: lab.policy_drop("client", direction="in", port=HTTP_PORT, port_side="src"),
                    fact="SYN-ACK", agrees="node node-b "),
    TwoNodeScenario("drop_in_router", "unknown/connect_timeout", "unknown", "unknown/between_nodes",
                    lambda lab: lab.policy_drop("router", direction="forward", port=HTTP_PORT),
                    fact="saw none of them arrive"),
    TwoNodeScenario("vip_syn_drop_at_b", "unknown/connect_timeout", "policy_drop", "policy_drop/syn",
                    lambda lab: lab.policy_drop("srv1", direction="in", port=HTTP_PORT), fact="on node node-b",
                    vip=True),
    TwoNodeScenario("no_listener_b", "connection_refused", "connection_refused", "connection_refused/no_listener",
                    lambda lab: lab.no_listener("srv1"), fact="node node-b's TCP stack"),
    TwoNodeScenario("reject_at_b", "connection_refused", "policy_drop", "policy_drop/reject",
                    lambda lab: lab.policy_drop("srv1", direction="in", port=HTTP_PORT, action="reject"),
                    fact="on node node-b"),
    TwoNodeScenario("established_drop_b", "tcp_retransmit/processing", "policy_drop", "policy_drop/established",
                    lambda lab: lab.policy_drop("srv1", direction="out", port=HTTP_PORT, port_side="src",
                                                expr="tcp flags & (syn | ack) == ack"),
                    kind="http", timeout="2s", fact="on node node-b"),
)


async def run_two_node_scenario(nodes: TwoNodes, sc: TwoNodeScenario, family: int) -> tuple[Outcome, str | None]:
    """One trial: both verdicts, and a lab error when the fault acted on no packet (then nothing is judged)."""
    addr, port = (VIP[0 if family == 4 else 1], VIP_PORT) if sc.vip else (nodes.server_addr(family), HTTP_PORT)
    with sc.fault(nodes.lab) as fault:
        out = await nodes.probe(addr, port, kind=sc.kind, timeout=sc.timeout)
        bites = getattr(fault, "bites", lambda: None)()
    if bites == 0:
        return out, f"{sc.name}: the fault acted on no packet"
    if out.result.ok:
        return out, f"{sc.name}: the probe succeeded"
    return out, None


def recording(sc: TwoNodeScenario, out: Outcome, family: int, events, coverage):
    from correlator.record import Recording

    return Recording(f"{sc.name} (IPv{family})", out.result, tuple(events), coverage, None, sc.expected,
                     note="recorded in the two-node lab by `python -m connprobe.lab.twonode record`; node A alone: "
                          f"{sc.alone}; after asking node B: {sc.expected_sub}", remote=out.asked.remote)


async def _main(argv: list[str]) -> int:
    import sys
    import tempfile
    from collections import Counter

    from connprobe.lab.runargs import parse_run_args

    args = parse_run_args(argv, "connprobe.lab.twonode")
    if args is None:
        return 2
    from correlator.record import dumps

    with Lab() as lab, tempfile.TemporaryDirectory() as d:
        async with TwoNodes(lab, Path(d)) as nodes:
            if args.mode == "record":
                outdir = args.record_dir()
                for sc in args.selected(TWO_NODE_SCENARIOS):
                    out, err = await run_two_node_scenario(nodes, sc, 4)
                    if err:
                        print(f"lab error: {err}", file=sys.stderr)
                        continue
                    rec = recording(sc, out, 4, out.events, out.coverage)
                    (outdir / f"{sc.name}.json").write_text(dumps(rec) + "\n")
                    print(f"recorded {sc.name}: {len(rec.events)} local events, "
                          f"{sum(len(r.events) for r in rec.remote)} remote")
                return 0
            trials = int(args.arg)
            rows: Counter[tuple[str, str, str]] = Counter()
            for sc in args.selected(TWO_NODE_SCENARIOS):
                for family in (4, 6):
                    for _ in range(trials):
                        out, err = await run_two_node_scenario(nodes, sc, family)
                        if err:
                            print(f"lab error: {err}", file=sys.stderr)
                            continue
                        if out.asked.sub_cause != sc.expected_sub:
                            print(f"{sc.name} v{family}: {out.asked.sub_cause}: {out.asked.facts}", file=sys.stderr)
                        rows[(sc.name, "alone", out.alone.sub_cause or str(out.alone.cause))] += 1
                        rows[(sc.name, "asked", out.asked.sub_cause or str(out.asked.cause))] += 1
            print("| scenario | node A alone (single node) | node A asking node B | expected |")
            print("|---|---|---|---|")
            for sc in args.selected(TWO_NODE_SCENARIOS):
                alone = ", ".join(f"{k} x{n}" for (name, w, k), n in sorted(rows.items()) if name == sc.name
                                  and w == "alone")
                asked = ", ".join(f"{k} x{n}" for (name, w, k), n in sorted(rows.items()) if name == sc.name
                                  and w == "asked")
                print(f"| {sc.name} | {alone} | {asked} | {sc.expected_sub} |")
            return 0


if __name__ == "__main__":
    import asyncio
    import sys

    sys.exit(asyncio.run(_main(sys.argv[1:])))


__all__ = ["NODE_A_ROLES", "NODE_B_ROLES", "PEER_CIDRS", "SERVER_NET", "TWO_NODE_SCENARIOS", "Outcome",
           "TwoNodeScenario", "TwoNodes", "run_two_node_scenario"]
