"""`connprobe doctor`: one line per check, a fix for each failure, exit 1 only when the sensor cannot run."""

from __future__ import annotations

import argparse
import io
import os
import shutil
from pathlib import Path

import pytest

from bpf import preload
from bpf.errors import SensorUnavailable
from bpf.hooks import HOOKS
from bpf.kernel_compat import Tracefs
from bpf.sensor import KernelSensor
from connprobe import doctor
from connprobe.commands import doctor as doctor_command

DATA = Path(__file__).parent / "data"


def test_not_root_fails_with_a_fix_and_skips_the_load(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    out = io.StringIO()
    assert doctor_command.run(argparse.Namespace(), out) == 1
    text = out.getvalue()
    assert "FAIL  root" in text and "sudo connprobe doctor" in text
    assert "skip  BPF load + attach" in text
    assert "kernel sensor: UNAVAILABLE" in text and "no kernel evidence" in text


def test_missing_headers_say_what_to_do(tmp_path):
    c = doctor.check_headers(tmp_path)
    assert c.status == doctor.FAIL and "scripts/setup" in c.fix and str(tmp_path) in c.detail


def test_missing_tracepoint_is_a_warning_naming_the_lost_event_kind(tmp_path):
    (tmp_path / "events" / "skb" / "kfree_skb").mkdir(parents=True)
    shutil.copy(DATA / "kfree_skb.format", tmp_path / "events" / "skb" / "kfree_skb" / "format")
    checks = {c.name: c for c in doctor.check_tracepoints(Tracefs(tmp_path))}
    assert len(checks) == len(HOOKS)
    assert checks["tracepoint skb:kfree_skb"].status == doctor.OK
    lost = checks["tracepoint tcp:tcp_retransmit_skb"]
    assert lost.status == doctor.WARN and "retransmit events will be missing" in lost.line()
    assert doctor.check_reason_names(Tracefs(tmp_path)).detail.startswith("127 names")


@pytest.mark.parametrize(("present", "ready"), [
    (("build",), True), (("build", "source"), True), (("source",), False), ((), False)])
def test_headers_are_the_build_link_for_doctor_and_sensor_alike(tmp_path, present, ready):
    """bcc compiles against /lib/modules/R/build (`source` only beside it): a `source` link alone is not enough,
    for the doctor and the sensor's own pre-load check both."""
    release_dir = tmp_path / os.uname().release
    release_dir.mkdir()
    for name in present:
        (release_dir / name).mkdir()
    assert (preload.kernel_headers_dir(tmp_path) is not None) is ready
    c = doctor.check_headers(tmp_path)
    assert (c.status == doctor.OK) is ready, c.line()
    assert str(release_dir / "build") in c.detail


def test_root_without_capabilities_fails_the_doctor_as_it_fails_the_sensor(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("bpf.preload.missing_capabilities", lambda: ["CAP_BPF", "CAP_PERFMON"])
    c = doctor.check_root()
    assert c.status == doctor.FAIL and "root without CAP_BPF and CAP_PERFMON" in c.detail and "grant" in c.fix
    monkeypatch.setattr("bpf.preload.import_bcc", lambda: None)
    with pytest.raises(SensorUnavailable, match="root without CAP_BPF and CAP_PERFMON"):
        KernelSensor().open()


def test_tracefs_and_btf_failures(tmp_path):
    c, tfs = doctor.check_tracefs(tmp_path)
    assert c.status == doctor.FAIL and "mount -t tracefs" in c.fix and tfs is None
    c = doctor.check_btf(tmp_path / "vmlinux")
    assert c.status == doctor.FAIL and "CONFIG_DEBUG_INFO_BTF" in c.fix


@pytest.mark.kernel
def test_doctor_on_this_machine_is_ready():
    out = io.StringIO()
    assert doctor_command.run(argparse.Namespace(no_load=False), out) == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    for hook in HOOKS:
        assert any(line.startswith("ok    tracepoint " + hook.name) for line in lines), hook.name
    assert any(line.startswith("ok    BPF load + attach") for line in lines)
    assert lines[-1].startswith("kernel sensor: ready")
