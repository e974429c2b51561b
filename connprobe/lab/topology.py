"""The lab: network namespaces on one machine, wired like a small cluster.

    client ── eth0 ⇄ c0 ── router ── br0 ┬─ s-srv1 ⇄ eth0 ── srv1   (HTTP :8080, HTTPS :8443)
    10.77.1.2       10.77.1.1       10.77.2.1 ├─ s-srv2 ⇄ eth0 ── srv2   (HTTP :8080, HTTPS :8443)
    fd77:1::2       fd77:1::1       fd77:2::1 └─ s-dns  ⇄ eth0 ── dns    (DNS :53, zone lab.test.)

The client namespace also maps a Service virtual IP, 10.96.0.10:80 / [fd96::10]:80 (`svc.lab.test`), to srv1:8080
with nftables DNAT, as kube-proxy does on a node.

Every namespace is named `cp-<id>-<role>`, so two labs side by side never collide (their addresses are the
same, but each lab's namespaces only see each other). Path faults go on the router. The root namespace
gets nothing: every interface is created inside a lab namespace, and all addresses live there.

State lives in /run/connprobe/labs/<id>/ (owner PID, server PIDs, logs, control sockets, TLS
certificate). A lab whose owner died is stale: the next `Lab.up()` or `connprobe lab down --all` removes it.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from connprobe.lab import faults
from connprobe.lab.plumbing import LabError, in_ns, ip, named_netns, netns_pids, nft, run, spawn_in_ns
from prober.netns import NetnsExecutor, close_shared_executor, netns_inode, shared_executor

STATE_ROOT = Path(os.environ.get("CONNPROBE_LAB_STATE", "/run/connprobe/labs"))
NETNS_CONF = Path("/etc/netns")
PREFIX = "cp-"
ZONE = "lab.test."
HTTP_PORT = 8080
HTTPS_PORT = 8443
DNS_PORT = 53

ROLES = ("client", "router", "srv1", "srv2", "dns")
SERVER_ROLES = ("srv1", "srv2")

CLIENT_NET = ("10.77.1.{}", "fd77:1::{}")
SERVER_NET = ("10.77.2.{}", "fd77:2::{}")
HOST_NUMBER = {"client": 2, "srv1": 11, "srv2": 12, "dns": 53}
ROUTER_NUMBER = 1
# A Service virtual IP, DNAT'ed in the client namespace to srv1 the way kube-proxy does it on a node.
VIP = ("10.96.0.10", "fd96::10")
VIP_PORT = 80


def role_addresses(role: str) -> tuple[str, str]:
    net = CLIENT_NET if role == "client" else SERVER_NET
    n = HOST_NUMBER[role]
    return net[0].format(n), net[1].format(n)


@dataclass(frozen=True)
class Netns:
    role: str
    name: str
    inode: int

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"


@dataclass(frozen=True)
class Server:
    role: str
    addr4: str
    addr6: str
    port: int
    tls_port: int
    hostname: str
    control: Path

    def url(self, path: str = "/ok", family: int = 4, tls: bool = False) -> str:
        host = self.addr4 if family == 4 else f"[{self.addr6}]"
        scheme, port = ("https", self.tls_port) if tls else ("http", self.port)
        return f"{scheme}://{host}:{port}{path}"


def _zone_names() -> dict[str, dict[str, list[str]]]:
    s1, s2 = role_addresses("srv1"), role_addresses("srv2")
    d = role_addresses("dns")
    names = {
        f"srv1.{ZONE}": {"A": [s1[0]], "AAAA": [s1[1]]},
        f"srv2.{ZONE}": {"A": [s2[0]], "AAAA": [s2[1]]},
        f"both.{ZONE}": {"A": [s1[0], s2[0]], "AAAA": [s1[1], s2[1]]},
        f"v4only.{ZONE}": {"A": [s1[0]]},
        f"v6only.{ZONE}": {"AAAA": [s1[1]]},
        f"dns.{ZONE}": {"A": [d[0]], "AAAA": [d[1]]},
        f"svc.{ZONE}": {"A": [VIP[0]], "AAAA": [VIP[1]]},
        # Too large for a 512-byte UDP answer: answered truncated, complete over TCP.
        f"large.{ZONE}": {"A": [f"10.77.3.{i}" for i in range(1, 61)]},
    }
    # Names whose fault is built in (the demo and docs use them; tests may switch any name).
    for fault in ("fail", "void", "slow", "refused"):
        names[f"{fault}.{ZONE}"] = {"A": [s1[0]], "AAAA": [s1[1]]}
    return names


BUILTIN_DNS_MODES = {
    f"fail.{ZONE}": {"mode": "servfail"},
    f"void.{ZONE}": {"mode": "timeout"},
    f"slow.{ZONE}": {"mode": "slow", "delay": 0.5},
    f"refused.{ZONE}": {"mode": "refused"},
}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_start(pid: int) -> str | None:
    """Start time of a process (field 22 of /proc/PID/stat): tells a live owner from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class Lab(AbstractContextManager):
    """One instance of the lab. `with Lab() as lab:` brings it up and always tears it down."""

    def __init__(self, lab_id: str | None = None, persistent: bool = False):
        self.id = lab_id or secrets.token_hex(3)
        self.persistent = persistent
        self.state_dir = STATE_ROOT / self.id
        self._ns: dict[str, Netns] = {}
        self._procs: dict[str, subprocess.Popen | int] = {}
        self.servers: dict[str, Server] = {}
        self.dns_addr4, self.dns_addr6 = role_addresses("dns")
        self.dns_control = self.state_dir / "dns.sock"
        self.ca_file = self.state_dir / "tls.crt"
        self.zone = ZONE
        self.vip4, self.vip6 = VIP
        self.vip_port = VIP_PORT
        self._fault_seq = 0
        self._active_faults: list[AbstractContextManager] = []

    # -- naming -------------------------------------------------------------------------------------
    def ns_name(self, role: str) -> str:
        return f"{PREFIX}{self.id}-{role}"

    def ns(self, role: str) -> Netns:
        if role not in self._ns:
            raise LabError(f"lab {self.id} has no namespace {role!r} (roles: {', '.join(ROLES)})")
        return self._ns[role]

    def server(self, role: str) -> Server:
        if role not in self.servers:
            raise LabError(f"lab {self.id} has no server {role!r} (servers: {', '.join(SERVER_ROLES)})")
        return self.servers[role]

    def executor(self, role: str) -> NetnsExecutor:
        """A long-lived worker thread inside the namespace (for sockets created there)."""
        return shared_executor(self.ns(role).name)

    def exec(self, role: str, *argv: str, check: bool = True) -> str:
        """Run a command inside a lab namespace and return its output."""
        return in_ns(self.ns(role).name, *argv, check=check)

    def next_fault_id(self) -> int:
        self._fault_seq += 1
        return self._fault_seq

    # -- life cycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> Lab:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (it creates network namespaces): run as root")
        remove_stale_labs()
        if any(n.startswith(f"{PREFIX}{self.id}-") for n in named_netns()):
            raise LabError(f"lab id {self.id} is already in use (connprobe lab down --id {self.id})")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_state()
        try:
            self._build_network()
            self._write_tls_cert()
            self._start_servers()
            self._warm_up()
        except BaseException:
            self.down()
            raise
        self._write_state()
        return self

    def _build_network(self) -> None:
        for role in ROLES:
            name = self.ns_name(role)
            run(["ip", "netns", "add", name])
            self._ns[role] = Netns(role, name, netns_inode(name))
            ip(name, "link", "set", "lo", "up")
            self._write_state()
        r = self.ns_name("router")
        in_ns(r, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # Every veth is created inside the router namespace with its peer placed straight into the
        # other lab namespace: no device ever exists in the root namespace, even for a moment.
        ip(r, "link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns", self.ns_name("client"))
        ip(r, "link", "add", "br0", "type", "bridge")
        for role in ("srv1", "srv2", "dns"):
            ip(r, "link", "add", f"s-{role}", "type", "veth", "peer", "name", "eth0", "netns", self.ns_name(role))
            ip(r, "link", "set", f"s-{role}", "master", "br0", "up")
        for dev, net in (("c0", CLIENT_NET), ("br0", SERVER_NET)):
            ip(r, "addr", "add", f"{net[0].format(ROUTER_NUMBER)}/24", "dev", dev)
            ip(r, "addr", "add", f"{net[1].format(ROUTER_NUMBER)}/64", "dev", dev, "nodad")
            ip(r, "link", "set", dev, "up")
        for role in ("client", "srv1", "srv2", "dns"):
            name = self.ns_name(role)
            a4, a6 = role_addresses(role)
            net = CLIENT_NET if role == "client" else SERVER_NET
            ip(name, "addr", "add", f"{a4}/24", "dev", "eth0")
            ip(name, "addr", "add", f"{a6}/64", "dev", "eth0", "nodad")
            ip(name, "link", "set", "eth0", "up")
            ip(name, "route", "add", "default", "via", net[0].format(ROUTER_NUMBER))
            ip(name, "-6", "route", "add", "default", "via", net[1].format(ROUTER_NUMBER))
        s1 = role_addresses("srv1")
        nft(self.ns_name("client"), f"""table inet connprobe_lab {{
 chain service_vip {{
  type nat hook output priority -100; policy accept;
  ip daddr {VIP[0]} tcp dport {VIP_PORT} dnat ip to {s1[0]}:{HTTP_PORT}
  ip6 daddr {VIP[1]} tcp dport {VIP_PORT} dnat ip6 to [{s1[1]}]:{HTTP_PORT}
 }}
}}
""")
        # `ip netns exec` (and connprobe's prober) read /etc/netns/NAME/resolv.conf for that namespace.
        conf = NETNS_CONF / self.ns_name("client")
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "resolv.conf").write_text(
            f"# connprobe lab {self.id}\nnameserver {self.dns_addr4}\nnameserver {self.dns_addr6}\n"
            f"search {ZONE.rstrip('.')}\noptions ndots:1 timeout:1 attempts:1\n"
        )

    def _write_tls_cert(self) -> None:
        sans = ",".join(
            [f"DNS:{r}.{ZONE.rstrip('.')}" for r in SERVER_ROLES]
            + [f"DNS:both.{ZONE.rstrip('.')}"]
            + [f"IP:{a}" for r in SERVER_ROLES for a in role_addresses(r)]
        )
        run([
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "7", "-subj", f"/CN=connprobe lab {self.id}",
            "-addext", f"subjectAltName={sans}",
            "-keyout", str(self.state_dir / "tls.key"), "-out", str(self.ca_file),
        ])

    def _start_servers(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        die = not self.persistent
        pending: dict[str, subprocess.Popen] = {}
        for role in SERVER_ROLES:
            sock = self.state_dir / f"{role}.sock"
            a4, a6 = role_addresses(role)
            self.servers[role] = Server(role, a4, a6, HTTP_PORT, HTTPS_PORT, f"{role}.{ZONE.rstrip('.')}", sock)
            argv = [sys.executable, "-m", "connprobe.lab.httpd", "--name", role, "--port", str(HTTP_PORT),
                    "--tls-port", str(HTTPS_PORT), "--cert", str(self.ca_file),
                    "--key", str(self.state_dir / "tls.key"), "--control", str(sock)]
            pending[role] = spawn_in_ns(self.ns_name(role), argv, log=self.state_dir / f"{role}.log",
                                        die_with_parent=die, env=env)
        zone_file = self.state_dir / "zone.json"
        zone_file.write_text(json.dumps({"zone": ZONE, "names": _zone_names(), "modes": BUILTIN_DNS_MODES}))
        argv = [sys.executable, "-m", "connprobe.lab.dnsd", "--zone-file", str(zone_file),
                "--listen", self.dns_addr4, "--listen", self.dns_addr6, "--port", str(DNS_PORT),
                "--control", str(self.dns_control)]
        pending["dns"] = spawn_in_ns(self.ns_name("dns"), argv, log=self.state_dir / "dns.log",
                                     die_with_parent=die, env=env)
        self._procs.update(pending)
        self._write_state()
        deadline = time.monotonic() + 20
        for role, proc in pending.items():
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = proc.stdout.readline() if ready else b""
            if b'"ready"' not in line:
                log = (self.state_dir / f"{role}.log").read_text(errors="replace")[-2000:]
                raise LabError(f"lab server {role} did not start (exit {proc.poll()}): {log.strip()}")
            proc.stdout.close()

    def _warm_up(self) -> None:
        """One connection to every server in both families, so neighbour discovery has run before the
        first measured probe (an unresolved IPv6 neighbour costs a first connect hundreds of ms)."""

        def touch(addr: str, port: int) -> None:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect((addr, port))

        with NetnsExecutor(self.ns_name("client")) as ex:
            for srv in self.servers.values():
                for addr in (srv.addr4, srv.addr6):
                    ex.call(touch, addr, srv.port)
            for addr in (self.dns_addr4, self.dns_addr6):
                ex.call(touch, addr, DNS_PORT)

    def _write_state(self) -> None:
        state = {
            "id": self.id,
            "owner_pid": os.getpid(),
            "owner_start": _proc_start(os.getpid()),
            "persistent": self.persistent,
            "namespaces": {r: n.name for r, n in self._ns.items()},
            "pids": {r: (p.pid if isinstance(p, subprocess.Popen) else p) for r, p in self._procs.items()},
        }
        if self.state_dir.exists():
            (self.state_dir / "state.json").write_text(json.dumps(state, indent=1))

    def down(self) -> list[str]:
        """Tear everything down; returns the problems met (each step is tried regardless)."""
        problems: list[str] = []
        for fault in reversed(self._active_faults):
            try:
                fault.__exit__(None, None, None)
            except Exception as exc:
                problems.append(f"undo fault: {exc}")
        self._active_faults.clear()
        for role in ROLES:
            close_shared_executor(self.ns_name(role))
        pids = [p.pid if isinstance(p, subprocess.Popen) else p for p in self._procs.values()]
        problems += _stop_pids(pids)
        for p in self._procs.values():
            if isinstance(p, subprocess.Popen):
                try:
                    p.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    problems.append(f"server {p.pid} did not exit")
                if p.stdout and not p.stdout.closed:
                    p.stdout.close()
        self._procs.clear()
        problems += _remove_lab_namespaces(self.id)
        shutil.rmtree(NETNS_CONF / self.ns_name("client"), ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self._ns.clear()
        return problems

    # -- faults (each a context manager undone on exit, even when the body raises) ------------------
    def policy_drop(self, ns: str, **kw) -> faults.PolicyDrop:
        return self._track(faults.PolicyDrop(self, ns, **kw))

    def icmp_echo_drop(self, ns: str, **kw) -> faults.IcmpEchoDrop:
        return self._track(faults.IcmpEchoDrop(self, ns, **kw))

    def packet_loss(self, fraction: float, **kw) -> faults.PacketLoss:
        return self._track(faults.PacketLoss(self, fraction, **kw))

    def random_drop(self, fraction: float, **kw) -> faults.RandomDrop:
        return self._track(faults.RandomDrop(self, fraction, **kw))

    def dns_fault(self, name: str, mode: str, delay: float = 0.0) -> faults.DnsFault:
        return self._track(faults.DnsFault(self, name, mode, delay))

    def slow_upstream(self, server: str, delay: float) -> faults.ServerFault:
        return self._track(faults.ServerFault(self, server, delay=delay))

    def http_status(self, server: str, status: int) -> faults.ServerFault:
        return self._track(faults.ServerFault(self, server, status=status))

    def no_listener(self, server: str) -> faults.ServerFault:
        return self._track(faults.ServerFault(self, server, listen=False))

    def _track(self, fault):
        fault.on_enter = self._active_faults.append
        fault.on_exit = lambda f: f in self._active_faults and self._active_faults.remove(f)
        return fault


def _stop_pids(pids: list[int]) -> list[str]:
    problems = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 3
    for pid in pids:
        while _pid_alive(pid) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.02)
        if _pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            else:
                problems.append(f"process {pid} needed SIGKILL")
    return problems


def _remove_lab_namespaces(lab_id: str) -> list[str]:
    problems = []
    for name in named_netns():
        if not name.startswith(f"{PREFIX}{lab_id}-"):
            continue
        # Processes still inside (a server of this lab that outlived its record) go first.
        _stop_pids(netns_pids(name))
        try:
            run(["ip", "netns", "del", name])
        except LabError as exc:
            problems.append(str(exc))
        shutil.rmtree(NETNS_CONF / name, ignore_errors=True)
    return problems


def list_labs() -> list[dict]:
    """Every lab on this machine: from state files, plus orphan namespaces without one."""
    labs: dict[str, dict] = {}
    if STATE_ROOT.exists():
        for d in sorted(STATE_ROOT.iterdir()):
            try:
                st = json.loads((d / "state.json").read_text())
            except (OSError, ValueError):
                st = {"id": d.name}
            owner = st.get("owner_pid")
            st["owner_alive"] = bool(owner) and _proc_start(owner) == st.get("owner_start")
            labs[st["id"]] = st
    for name in named_netns():
        if name.startswith(PREFIX) and name.count("-") >= 2:
            lab_id = name.split("-")[1]
            entry = labs.setdefault(lab_id, {"id": lab_id, "owner_alive": False, "orphan": True})
            entry.setdefault("present", []).append(name)
    for st in labs.values():
        st["stale"] = not st.get("persistent") and not st["owner_alive"]
    return list(labs.values())


def remove_lab(lab_id: str) -> list[str]:
    problems = []
    state = STATE_ROOT / lab_id / "state.json"
    try:
        pids = list(json.loads(state.read_text()).get("pids", {}).values())
    except (OSError, ValueError):
        pids = []
    problems += _stop_pids([p for p in pids if p])
    problems += _remove_lab_namespaces(lab_id)
    shutil.rmtree(STATE_ROOT / lab_id, ignore_errors=True)
    return problems


def remove_stale_labs() -> list[str]:
    removed = []
    for st in list_labs():
        if st["stale"]:
            remove_lab(st["id"])
            removed.append(st["id"])
    return removed
