"""The lab runners' shared command line (connprobe/lab/runargs.py): usage errors before any lab is built, the
scenarios a run keeps, the record directory made."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from connprobe.lab.runargs import parse_run_args


@pytest.mark.parametrize("argv", [[], ["record"], ["matrix"], ["replay", "3"]])
def test_usage_line_names_the_module(argv, capsys):
    assert parse_run_args(argv, "connprobe.lab.twonode") is None
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m connprobe.lab.twonode record DIR [SCENARIO...] | matrix TRIALS")


def test_named_scenarios_are_kept_in_table_order(tmp_path):
    table = [SimpleNamespace(name=n) for n in ("dns", "loss", "policy")]
    args = parse_run_args(["matrix", "3", "policy", "dns"], "m")
    assert args is not None and args.mode == "matrix" and int(args.arg) == 3
    assert [sc.name for sc in args.selected(table)] == ["dns", "policy"]
    every = parse_run_args(["record", str(tmp_path / "a" / "b")], "m")
    assert every is not None and every.selected(table) == table
    assert every.record_dir().is_dir()


@pytest.mark.parametrize("module", ["connprobe.lab.scenarios", "connprobe.lab.twonode"])
def test_runner_refuses_bad_arguments_before_building_a_lab(module):
    proc = subprocess.run([sys.executable, "-m", module, "record"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"usage: python -m {module} record DIR")
    assert "Traceback" not in proc.stderr
