"""`connprobe diagnose` as a user runs it: the timeline output, the JSON document, exit codes, errors."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "diagnose.schema.json").read_text())
SNAPSHOTS = Path(__file__).parent / "snapshots"
CLI = [sys.executable, "-m", "connprobe.cli", "diagnose"]


def diagnose(*args: str, unprivileged: bool = False) -> subprocess.CompletedProcess:
    argv = [*CLI, *args]
    if unprivileged:
        # Every capability dropped (bounding set empty): what a user without CAP_BPF/CAP_SYS_ADMIN gets.
        argv = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "160"})


def normalise(text: str, lab_id: str) -> str:
    """Timings, ports and namespace ids vary from run to run; the shape of the output must not."""
    text = text.replace(lab_id, "LAB")
    text = re.sub(r"[+-]?\d+\.\d+ ms", "T ms", text)
    text = re.sub(r"(\d+\.\d+\.\d+\.\d+):\d+", r"\1:PORT", text)
    text = re.sub(r"succeeded in \d+ ms", "succeeded in T ms", text)
    text = re.sub(r"(seq|snd_una) \d+", r"\1 N", text)
    return "\n".join(re.sub(r" +", " ", line.rstrip()) for line in text.splitlines()) + "\n"


@pytest.mark.kernel
def test_timeline_and_verdict_snapshot_for_no_listener(lab):
    with lab.no_listener("srv2"):
        proc = diagnose("http://srv2.lab.test:8080/ok", "--from", lab.ns("client").name, "--ip", "ipv4")
    assert proc.returncode == 1, proc.stderr
    got = normalise(proc.stdout, lab.id)
    snap = SNAPSHOTS / "diagnose_no_listener.txt"
    if os.environ.get("CONNPROBE_UPDATE_SNAPSHOTS") == "1":
        snap.write_text(got)
    assert got == snap.read_text()


@pytest.mark.kernel
def test_json_document_follows_the_schema(lab):
    with lab.policy_drop("srv1", direction="in", port=8080, action="reject"):
        proc = diagnose("http://srv1.lab.test:8080/ok", "--from", lab.ns("client").name, "--json", "-n", "2",
                        "--budget", "300ms")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, SCHEMA)
    assert doc["exit_code"] == 1 and doc["budget_ms"] == 300
    for a in doc["attempts"]:
        assert a["verdict"]["cause"] == "policy_drop" and a["verdict"]["sub_cause"] == "policy_drop/reject"
        assert any(e["reason"] == "NETFILTER_DROP" and e["netns_name"] == lab.ns("srv1").name for e in a["events"])


@pytest.mark.kernel
def test_healthy_target_exits_zero_and_dns_target_works(lab):
    ok = diagnose("http://srv1.lab.test:8080/ok", "--from", lab.ns("client").name, "--json")
    assert ok.returncode == 0, ok.stderr
    jsonschema.validate(json.loads(ok.stdout), SCHEMA)
    nx = diagnose("dns:nothere.lab.test", "--from", lab.ns("client").name, "--json")
    assert nx.returncode == 1
    assert json.loads(nx.stdout)["attempts"][0]["verdict"]["sub_cause"] == "dns/nxdomain"


@pytest.mark.parametrize("args,message", [
    (["http://x", "--count", "0"], "connprobe diagnose: --count: 0 must be at least 1"),
    (["http://x", "--budget", "soon"], "connprobe diagnose: --budget: 'soon' is not a duration (e.g. 300ms, 2s)"),
    (["nohostport"], "connprobe diagnose: TARGET 'nohostport': target: tcp target must be host:port"),
    (["dns:"], "connprobe diagnose: TARGET: dns: needs a name, e.g. dns:api.example.com"),
])
def test_usage_errors_exit_2_with_one_line(args, message):
    proc = diagnose(*args, "--no-kernel")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert " ".join(proc.stderr.split()).startswith(message)


@pytest.mark.kernel
def test_unknown_source_namespace_is_an_environment_error():
    proc = diagnose("http://10.77.2.11:8080/ok", "--from", "cp-nosuch-client", "--no-kernel")
    assert proc.returncode == 2
    assert "network namespace 'cp-nosuch-client' does not exist" in " ".join(proc.stderr.split())


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.mark.kernel
def test_without_privileges_probes_run_and_verdicts_say_no_kernel_evidence():
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to drop privileges")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        port = server.server_address[1]
        proc = diagnose(f"http://127.0.0.1:{port}/", unprivileged=True)
        refused = diagnose("127.0.0.1:1", "--json", unprivileged=True)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    assert "kernel evidence is off: root without CAP_BPF and CAP_PERFMON" in " ".join(proc.stdout.split())
    assert "verdict: ok" in proc.stdout
    doc = json.loads(refused.stdout)
    a = doc["attempts"][0]
    assert a["kernel_evidence"]["available"] is False
    assert a["verdict"]["cause"] == "connection_refused" and a["verdict"]["confidence"] <= 0.5


def test_record_into_an_unwritable_place_is_a_one_line_usage_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    proc = diagnose("127.0.0.1:1", "--no-kernel", "--record", str(not_a_dir))
    assert proc.returncode == 2
    assert proc.stderr.startswith("connprobe diagnose: --record: cannot create ")
    assert "Traceback" not in proc.stderr


@pytest.mark.kernel
def test_json_shows_sequence_fields_and_how_the_answer_arrived(lab):
    """Heavy random loss on a transfer that runs out of time: the JSON gives each retransmission its sequence
    range and the sender's counters, the prober's progress points, and the verdict is never a policy."""
    # Loss on the answer's way only: a lost SYN-ACK can still eat an attempt's time, so three attempts, judged
    # where the transfer began.
    with lab.packet_loss(0.2, link="client", direction="egress"):
        proc = diagnose("http://srv1.lab.test:8080/bytes/400000000", "--from", lab.ns("client").name, "--json",
                        "--ip", "ipv4", "--timeout", "2s", "--budget", "100ms", "-n", "3")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, SCHEMA)
    transfers = [a for a in doc["attempts"] if any(p["name"] == "transfer" for p in a["phases"])]
    assert transfers, [a["error_detail"] for a in doc["attempts"]]
    a = max(transfers, key=lambda a: len(a["progress"]))
    assert a["error"] == "read_timeout", a["error_detail"]
    pts = a["progress"]
    assert 2 <= len(pts) <= 40 and all(p["bytes"] < q["bytes"] for p, q in itertools.pairwise(pts))
    assert a["result"]["progress"][-1]["bytes"] == pts[-1]["bytes"]
    rtx = [e for e in a["events"] if e["kind"] == "retransmit" and e["seq"] is not None]
    assert rtx and all(e["seq_len"] and e["snd_una"] is not None and e["data_segs_out"] and e["total_retrans"]
                       for e in rtx)
    assert a["verdict"]["cause"] == "tcp_retransmit", a["verdict"]
