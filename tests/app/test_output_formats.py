"""`-o text|json|yaml` on every command that prints data (check-config, doctor, diagnose): one option spelling,
json and yaml parse to the same document, text stays the default and unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from connprobe.cli import build_parser
from tests.agent.helpers import write_config


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "connprobe.cli", *args], capture_output=True, text=True,
                          timeout=120)


def _documents(*args: str) -> tuple[int, dict]:
    j, y = _cli(*args, "-o", "json"), _cli(*args, "-o", "yaml")
    assert j.returncode == y.returncode, (j.stderr, y.stderr)
    doc, same = json.loads(j.stdout), yaml.safe_load(y.stdout)
    if args[0] == "doctor":  # two runs of the host's checks: a detail (what other processes hold) may move
        assert [(c["name"], c["status"]) for c in same["checks"]] == [(c["name"], c["status"]) for c in doc["checks"]]
    else:
        assert same == doc
    return j.returncode, doc


def test_check_config_documents_and_text_unchanged(tmp_path):
    good = write_config(tmp_path / "good.yml", [{"name": "a", "module": "tcp", "target": "127.0.0.1:9"}])
    code, doc = _documents("check-config", str(good))
    assert code == 0 and doc["ok"] is True and doc["errors"] == []
    assert [p["name"] for p in doc["probes"]] == ["a"]
    assert doc["probes"][0]["prober"] == "tcp" and doc["probes"][0]["target"] == "127.0.0.1:9"
    assert "tcp" in doc["modules"]
    text = _cli("check-config", str(good))
    assert text.stdout == _cli("check-config", str(good), "-o", "text").stdout
    assert text.stdout.startswith(f"{good}: OK: ") and "\n  a: tcp 127.0.0.1:9 from " in text.stdout


def test_check_config_errors_as_a_document(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("probes: [\n")
    code, doc = _documents("check-config", str(bad))
    assert code == 1 and doc["ok"] is False and any("invalid YAML" in e for e in doc["errors"])
    missing = _cli("check-config", str(tmp_path / "missing.yml"), "-o", "json")
    assert missing.returncode == 2 and missing.stdout == ""


def test_check_config_blackbox_modules_in_the_document(tmp_path):
    f = tmp_path / "blackbox.yml"
    f.write_text("modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n")
    code, doc = _documents("check-config", "--blackbox", str(f))
    assert code == 0 and doc["blackbox"] is True
    assert doc["modules"]["http_2xx"] == {"prober": "http", "timeout_seconds": 5.0}


def test_doctor_documents_and_text_unchanged():
    code, doc = _documents("doctor", "--no-load")
    names = [c["name"] for c in doc["checks"]]
    assert names and doc["failed"] == sum(c["status"] == "FAIL" for c in doc["checks"])
    text = _cli("doctor", "--no-load")
    assert text.returncode == code
    again = _cli("doctor", "--no-load", "-o", "text").stdout.splitlines()  # a detail may move between runs
    assert [ln.split()[0] for ln in again] == [ln.split()[0] for ln in text.stdout.splitlines()]
    lines = text.stdout.splitlines()
    assert len(lines) == len(names) + 1 and lines[-1].startswith("kernel sensor: ")
    for line, c in zip(lines[:-1], doc["checks"], strict=True):
        assert line.split()[0] == c["status"] and c["name"] in line


def test_one_option_spelling_on_every_data_command_and_in_completion():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("check-config", "doctor", "diagnose", "lab"):
        opt = next(a for a in subs[name]._actions if a.dest == "output")
        assert opt.option_strings == ["-o", "--output"] and opt.choices == ["text", "json", "yaml"], name
        assert opt.default is None
    script = _cli("completion", "bash").stdout
    assert "--output" in script and "json" in script and "yaml" in script


def test_lab_status_document_and_refused_elsewhere():
    p = _cli("lab", "status", "-o", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert isinstance(doc["labs"], list)  # other runs' labs may be listed; each has the documented keys
    for lab in doc["labs"]:
        assert set(lab) == {"id", "persistent", "owner_pid", "owner_alive", "namespaces", "stale"}
    assert isinstance(yaml.safe_load(_cli("lab", "status", "-o", "yaml").stdout)["labs"], list)
    up = _cli("lab", "up", "-o", "json")  # refused before anything is built
    assert up.returncode == 2 and "-o json is for lab status only" in up.stderr and up.stdout == ""
