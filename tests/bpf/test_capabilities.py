"""The sensor says which capability is missing before it tries to load anything."""

from __future__ import annotations

import pytest

from bpf.preload import missing_capabilities


@pytest.mark.parametrize("capeff,missing", [
    ("000001ffffffffff", []),                      # root in the init namespace: everything
    ("0000000000200000", []),                      # CAP_SYS_ADMIN alone covers BPF and perf
    ("000000c000000000", []),                      # CAP_BPF + CAP_PERFMON
    ("0000004000000000", ["CAP_BPF"]),             # CAP_PERFMON (bit 38) without CAP_BPF (bit 39)
    ("0000000000000000", ["CAP_BPF", "CAP_PERFMON"]),
])
def test_missing_capabilities_from_proc_status(tmp_path, capeff, missing):
    status = tmp_path / "status"
    status.write_text(f"Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{capeff}\nCapBnd:\t{capeff}\n")
    assert missing_capabilities(status) == missing


def test_unreadable_status_leaves_the_decision_to_the_load(tmp_path):
    assert missing_capabilities(tmp_path / "absent") == []
