"""Least privilege, measured: the capabilities `connprobe agent` holds once it is ready (every thread, every set),
that the sensor keeps working without any, and for each capability kept — by the agent or by the DaemonSet — a
test that fails without it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from connprobe.config import ConfigError, parse_config
from connprobe.privileges import CapSets, Privileges, held_by_threads, mask_of, names, needed_for, read_caps
from tests.agent.helpers import (
    REPO,
    AgentProcess,
    http_get,
    lab_config,
    last_recent,
    samples_named,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.timeout(240)]
kernel = pytest.mark.kernel

DAEMONSET = REPO / "deploy" / "kubernetes" / "daemonset.yaml"


# -- without the kernel ------------------------------------------------------------------------------------------


def _probes(*sources: str):
    text = yaml.safe_dump({"modules": {"tcp": {"prober": "tcp"}},
                           "probes": [{"name": f"p{i}", "module": "tcp", "target": "127.0.0.1:1", "source": s}
                                      for i, s in enumerate(sources)]})
    return parse_config(text).probes


def test_what_the_probes_need():
    assert needed_for(_probes("host")) == {}
    assert needed_for(_probes("host", "netns a", "netns b")) == {"CAP_SYS_ADMIN": ["p1", "p2"]}
    assert needed_for(_probes("/proc/42/ns/net")) == {"CAP_SYS_ADMIN": ["p0"], "CAP_SYS_PTRACE": ["p0"]}


def test_a_reload_needing_a_dropped_capability_is_one_line_per_probe():
    p = Privileges()
    p.dropped, p.kept = True, needed_for(_probes("netns a"))
    p.check(_probes("netns a", "netns b", "host"))  # what was kept is enough
    with pytest.raises(ConfigError) as err:
        p.check(_probes("netns a", "/proc/7/ns/net"))
    assert err.value.errors == [
        "probe 'p1': needs CAP_SYS_PTRACE (opening another process's /proc/PID/ns/net for its source), which the "
        "agent dropped at start-up (no probe needed it then): restart the agent to use this configuration"]
    Privileges(enabled=False).check(_probes("/proc/7/ns/net"))  # nothing dropped, nothing refused


def test_capability_sets_from_a_status_file(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nCapInh:\t0000000000000000\nCapPrm:\t0000000000200000\n"
                      "CapEff:\t0000000000200000\nCapBnd:\t000000c000200000\nCapAmb:\t0000000000000000\n"
                      "NoNewPrivs:\t1\n")
    caps = read_caps(status)
    assert names(caps.effective) == names(caps.permitted) == ["CAP_SYS_ADMIN"]
    assert names(caps.bounding) == ["CAP_SYS_ADMIN", "CAP_PERFMON", "CAP_BPF"]
    assert caps.inheritable == caps.ambient == 0 and caps.no_new_privs
    assert mask_of(["CAP_SYS_ADMIN", "CAP_BPF"]) == 1 << 21 | 1 << 39


# -- the running agent -------------------------------------------------------------------------------------------


def _bpf_prog_ids(pid: int) -> list[int]:
    """Ids of the BPF programs a process holds open (from its fdinfo)."""
    ids = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines():
                if line.startswith("prog_id:"):
                    ids.append(int(line.split()[1]))
        except OSError:
            continue
    return sorted(ids)


def _prog_exists(prog_id: int) -> bool:
    return subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True).returncode == 0


def _assert_every_thread_holds(pid: int, want: list[str], bounding: list[str] | None = None
                               ) -> dict[int, tuple[str, CapSets]]:
    """Every thread: `want` effective and permitted, nothing inheritable or ambient, no_new_privs; the bounding
    set `want` too (the tests run with CAP_SETPCAP, so it goes), or `bounding` when given."""
    mask = mask_of(want)
    threads = held_by_threads(pid)
    assert threads
    for tid, (comm, caps) in threads.items():
        where = f"thread {tid} ({comm})"
        assert names(caps.effective) == names(mask), where
        assert names(caps.permitted) == names(mask), where
        assert names(caps.bounding) == names(mask_of(bounding) if bounding is not None else mask), where
        assert caps.inheritable == 0 and caps.ambient == 0, where
        assert caps.no_new_privs, where
    assert read_caps(Path(f"/proc/{pid}/status")) == threads[pid][1]
    return threads


def _held_metric(agent: AgentProcess) -> set[str]:
    return {dict(lbl)["capability"] for lbl in samples_named(agent.metrics(), "connprobe_capability_held")}


@kernel
def test_agent_with_netns_sources_keeps_only_sys_admin_and_the_sensor_still_sees_drops(lab, tmp_path):
    cfg = lab_config(tmp_path / "agent.yml", lab)
    agent = AgentProcess(cfg, tmp_path, "--no-config-watch")  # the reload below is SIGHUP alone
    prog_ids: list[int] = []
    try:
        agent.start()
        code, text = http_get(agent.url + "/-/ready")
        assert code == 200 and "kernel sensor attached" in text
        assert "capabilities: kept CAP_SYS_ADMIN (setns() into the network namespace of web, api)" in agent.stderr()
        assert "still holds" not in agent.stderr()
        prog_ids = _bpf_prog_ids(agent.proc.pid)
        assert prog_ids
        for name in ("web", "api"):
            wait_for(lambda n=name: (last_recent(agent, n) or {}).get("cause") == "ok", 20, f"{name} healthy")
        # after probes ran: the netns worker threads started since then hold no more than the loop thread
        threads = _assert_every_thread_holds(agent.proc.pid, ["CAP_SYS_ADMIN"])
        client = lab.ns("client").inode
        assert any(os.stat(f"/proc/{agent.proc.pid}/task/{tid}/ns/net").st_ino == client for tid in threads)
        assert _held_metric(agent) == {"CAP_SYS_ADMIN"}

        # without CAP_BPF/CAP_PERFMON the sensor still announces ports and reads the ring buffer
        with lab.policy_drop("srv2", direction="in", port=8080):
            last = wait_for(lambda: (d := last_recent(agent, "api")) and d["cause"] == "policy_drop" and d, 30,
                            "a policy_drop verdict for api")
        assert last["sub_cause"] == "policy_drop/syn" and last["kernel_events"] > 0

        # a reload that needs a capability dropped at start-up is refused, one line, the old config stays
        pid = agent.proc.pid
        lab_config(cfg, lab, extra=[{"name": "by-pid", "module": "tcp", "target": "10.77.2.11:8080", "interval": "3s",
                                     "source": f"/proc/{pid}/ns/net"}])
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "reload of" in agent.stderr(), 15, "the reload to be refused")
        assert ("probe 'by-pid': needs CAP_SYS_PTRACE (opening another process's /proc/PID/ns/net for its "
                "source), which the agent dropped at start-up") in agent.stderr()
        assert "Traceback" not in agent.stderr()
        assert samples_named(agent.metrics(), "connprobe_config_reloads_total", result="failure") == \
            {frozenset({("result", "failure")}): 1.0}
    finally:
        assert agent.stop() == 0
    # detaching needed no capability either: nothing is left loaded
    wait_for(lambda: not any(_prog_exists(i) for i in prog_ids), 5, "the programs to be unloaded")


@kernel
def test_agent_with_host_probes_only_drops_every_capability(tmp_path):
    cfg = write_config(tmp_path / "agent.yml", [
        {"name": "refused", "module": "tcp", "target": "127.0.0.1:1", "interval": "1s", "jitter": 0}])
    agent = AgentProcess(cfg, tmp_path, "--no-config-watch")
    try:
        agent.start()
        assert "capabilities: kept none; dropped all others (bounding set too; no_new_privs on)" in agent.stderr()
        assert "still holds" not in agent.stderr()
        _assert_every_thread_holds(agent.proc.pid, [])
        assert _held_metric(agent) == set()
        # the watch list and the ring buffer work with no capability at all: the reset is kernel evidence
        last = wait_for(lambda: (d := last_recent(agent, "refused")) and d["kernel_events"] > 0 and d, 20,
                        "kernel evidence for the refused connection")
        assert last["cause"] == "connection_refused"
        # a netns source cannot come back by reload: CAP_SYS_ADMIN is gone
        write_config(cfg, [{"name": "refused", "module": "tcp", "target": "127.0.0.1:1"},
                           {"name": "lab", "module": "tcp", "target": "10.77.2.11:8080", "source": "netns x"}])
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "needs CAP_SYS_ADMIN" in agent.stderr(), 10, "the reload to be refused")
    finally:
        assert agent.stop() == 0


@kernel
def test_keep_capabilities_keeps_them(tmp_path):
    cfg = write_config(tmp_path / "agent.yml", [{"name": "refused", "module": "tcp", "target": "127.0.0.1:1"}])
    agent = AgentProcess(cfg, tmp_path, "--no-kernel", "--keep-capabilities")
    try:
        agent.start()
        caps = read_caps(Path(f"/proc/{agent.proc.pid}/status"))
        assert caps.effective == read_caps().effective and not caps.no_new_privs
        assert "dropping is off (--keep-capabilities)" in agent.stderr()
        assert "CAP_NET_ADMIN" in _held_metric(agent)
    finally:
        assert agent.stop() == 0


@kernel
def test_a_port_below_1024_is_refused_with_the_reason(tmp_path):
    port = next(p for p in range(1023, 900, -1) if _free(p))
    cfg = write_config(tmp_path / "agent.yml", [{"name": "refused", "module": "tcp", "target": "127.0.0.1:1"}])
    out = subprocess.run([sys.executable, "-m", "connprobe.cli", "agent", "--config", str(cfg), "--no-kernel",
                          "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("connprobe agent:")]
    assert line.startswith(f"connprobe agent: cannot listen on 127.0.0.1:{port}: ") and line.endswith(
        "(a port below 1024 needs CAP_NET_BIND_SERVICE, which the agent drops before it listens: use another "
        "port or --keep-capabilities)")
    assert "Traceback" not in out.stderr


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

# -- each capability kept, and what fails without it -----------------------------------------------------------

_UNDER_CAPS = """
import asyncio, json, sys
from connprobe.privileges import drop_to, mask_of
drop_to(mask_of([c for c in sys.argv[1].split(",") if c]))
"""

_PROBE = _UNDER_CAPS + """
from connprobe.config import parse_config
from prober.env import ProbeEnv
from prober.runner import run_probe

async def main():
    config = parse_config(sys.argv[2])
    async with ProbeEnv() as env:
        (r, *_) = await run_probe(config.probes[0], env)
    print(json.dumps({"ok": r.ok, "error": str(r.error) if r.error else None, "detail": r.error_detail}))

asyncio.run(main())
"""

_SENSOR = _UNDER_CAPS + """
from bpf.errors import SensorError
from bpf.sensor import KernelSensor
try:
    with KernelSensor() as s:
        print(json.dumps({"ok": True, "programs": len(s.prog_ids())}))
except SensorError as exc:
    print(json.dumps({"ok": False, "error": str(exc)}))
"""


def _run(code: str, caps: list[str], *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, ",".join(caps), *args], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


def _probe_from(source: str, target: str, caps: list[str]) -> dict:
    config = yaml.safe_dump({"modules": {"tcp": {"prober": "tcp", "timeout": "2s"}},
                             "probes": [{"name": "p", "module": "tcp", "target": target, "source": source}]})
    return _run(_PROBE, caps, config)


def _srv1(lab) -> str:
    srv = lab.server("srv1")
    return f"{srv.addr4}:{srv.port}"


@kernel
def test_sys_admin_is_what_lets_a_probe_enter_a_named_namespace(lab):
    source, target = f"netns {lab.ns('client').name}", _srv1(lab)
    assert _probe_from(source, target, ["CAP_SYS_ADMIN"]) == {"ok": True, "error": None, "detail": ""}
    without = _probe_from(source, target, [])
    assert without["error"] == "source_error" and "Operation not permitted" in without["detail"], without


@kernel
def test_sys_ptrace_is_what_lets_a_probe_use_another_process_namespace(lab):
    target = _srv1(lab)
    # a root process with every capability, inside the lab's client namespace (ours, stopped by PID)
    sleeper = subprocess.Popen(["ip", "netns", "exec", lab.ns("client").name, "sleep", "120"])
    try:
        source = f"/proc/{sleeper.pid}/ns/net"
        wait_for(lambda: os.stat(source).st_ino == lab.ns("client").inode, 5, "the sleeper in the namespace")
        got = _probe_from(source, target, ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"])
        assert got == {"ok": True, "error": None, "detail": ""}
        without = _probe_from(source, target, ["CAP_SYS_ADMIN"])
        assert without["error"] == "source_error" and "Permission denied" in without["detail"], without
    finally:
        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait(10)


def _daemonset_caps() -> list[str]:
    pod = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    sc = agent["securityContext"]["capabilities"]
    assert sc["drop"] == ["ALL"]
    return [f"CAP_{c}" for c in sc["add"]]


_EXEC_UNDER_CAPS = """
import os, sys
from connprobe.privileges import drop_to, mask_of
drop_to(mask_of(sys.argv[1].split(",")))
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@kernel
def test_the_agent_runs_with_the_daemonset_capabilities(lab, tmp_path):
    """Started as the container starts it: only the DaemonSet's capabilities, no CAP_SETPCAP, no_new_privs."""
    caps = _daemonset_caps()
    agent = AgentProcess(lab_config(tmp_path / "agent.yml", lab), tmp_path)
    agent.argv = [sys.executable, "-c", _EXEC_UNDER_CAPS, ",".join(caps), *agent.argv[1:]]
    try:
        agent.start()
        assert "kernel sensor attached" in http_get(agent.url + "/-/ready")[1]
        assert "not from the bounding set: no CAP_SETPCAP" in agent.stderr()
        assert "still holds" not in agent.stderr()
        assert _held_metric(agent) == {"CAP_SYS_ADMIN"}
        wait_for(lambda: (last_recent(agent, "web") or {}).get("cause") == "ok", 20, "web healthy")
        _assert_every_thread_holds(agent.proc.pid, ["CAP_SYS_ADMIN"], bounding=caps)
    finally:
        assert agent.stop() == 0


@kernel
def test_the_daemonset_capabilities_load_the_sensor_and_each_is_needed():
    caps = _daemonset_caps()
    # CAP_SYS_PTRACE: --kubernetes reads pods' /proc/PID/ns/net (other users' processes), the access
    # test_sys_ptrace_is_what_lets_a_probe_use_another_process_namespace shows it takes
    assert sorted(caps) == ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]
    assert _run(_SENSOR, caps)["ok"]
    # CAP_BPF and CAP_PERFMON load the programs on their own (CAP_SYS_ADMIN is for setns, see above) ...
    assert _run(_SENSOR, ["CAP_BPF", "CAP_PERFMON"])["ok"]
    # ... and neither is enough without the other
    for missing in ("CAP_BPF", "CAP_PERFMON"):
        got = _run(_SENSOR, [c for c in ("CAP_BPF", "CAP_PERFMON") if c != missing])
        assert not got["ok"] and f"root without {missing}" in got["error"], got
