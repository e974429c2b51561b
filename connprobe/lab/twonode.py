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
from dataclasses import dataclass
from pathlib import Path

import yaml

from connprobe.agent import Agent
from connprobe.config import parse_config
from connprobe.lab.topology import HTTP_PORT, SERVER_NET, Lab
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


class TwoNodes:
    def __init__(self, lab: Lab, workdir: Path, *, skew_ns: int = 0, peer_url: str | None = None,
                 peer_timeout: str = "500ms", token: str | None = None):
        self.lab, self.workdir = lab, Path(workdir)
        self.skew_ns = skew_ns
        self.peer_url = peer_url  # None: node B's own URL; else (a dead or slow stand-in) this
        self.peer_timeout = peer_timeout
        self.token = token or secrets.token_urlsafe(24)
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
            self.b_url = f"http://{host}:{port}"
            url = self.peer_url or self.b_url
            a_cfg = self._write("node-a.yml", {
                "node": {"name": "node-a", "netns": [lab.ns(r).name for r in NODE_A_ROLES]},
                "peers": [{"cidr": c, "url": url, "token_file": str(token_file), "timeout": self.peer_timeout}
                          for c in PEER_CIDRS]})
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
        alone, asked = await self.a.verdicts_for(result, None)
        return Outcome(result, alone, asked)


__all__ = ["NODE_A_ROLES", "NODE_B_ROLES", "PEER_CIDRS", "SERVER_NET", "Outcome", "TwoNodes"]
