"""Shared test plumbing.

Kernel tests (root, network namespaces, nftables, BPF) are marked `kernel`. Where the machine cannot run
them they skip — unless CONNPROBE_REQUIRE_KERNEL=1 (set by .ci/run), in which case they fail, so CI can
never go green by skipping the tests that matter.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile

import pytest

from tests.timeouts import (  # noqa: F401 (hooks)
    pytest_exception_interact,
    pytest_runtest_logreport,
    pytest_timeout_cancel_timer,
    pytest_timeout_set_timer,
)

REQUIRE_KERNEL = os.environ.get("CONNPROBE_REQUIRE_KERNEL") == "1"

# Agents and diagnoses started by this test run meet on a channel of their own, not on the node's
# /run/connprobe/diagnose.sock (where an agent of another run, or of the machine, may answer); the kernel
# cache (BTF offsets) is the run's own too, and removed with it.
_RUN_DIR = tempfile.mkdtemp(prefix="connprobe-test-run-")
os.environ["CONNPROBE_DIAGNOSE_SOCKET"] = os.path.join(_RUN_DIR, "diagnose.sock")
os.environ["CONNPROBE_CACHE_DIR"] = os.path.join(_RUN_DIR, "cache")
atexit.register(shutil.rmtree, _RUN_DIR, True)


def _kernel_missing() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (run scripts/setup)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns unusable: {probe.stderr.strip()}"
    return None


def require(missing: str | None) -> None:
    """Skip (or, with CONNPROBE_REQUIRE_KERNEL=1, fail) when `missing` names what is lacking."""
    if missing is None:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"kernel test cannot run ({missing}) but CONNPROBE_REQUIRE_KERNEL=1", pytrace=False)
    pytest.skip(f"kernel test skipped: {missing}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None:
        require(_kernel_missing())


@pytest.fixture(scope="session")
def lab():
    """One lab for the whole session (faults are switched per test and always undone)."""
    require(_kernel_missing())
    from connprobe.lab import Lab

    with Lab() as the_lab:
        yield the_lab


def _our_labs() -> set[str]:
    """Lab namespaces this test process owns, or whose owner is gone (ours, if they appeared during the run)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return set()
    from connprobe.lab import list_labs

    names: set[str] = set()
    for st in list_labs():
        if st.get("owner_pid") == os.getpid() or st["stale"]:
            names.update(st.get("present", []) or (st.get("namespaces") or {}).values())
    return names


_AT_START: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _AT_START.update(_our_labs())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A lab namespace this run made and left behind is a clean-up hole: fail the run."""
    left = sorted(_our_labs() - _AT_START)
    if left:
        session.config.get_terminal_writer().line(f"LEFT BEHIND by the tests: network namespaces {left}", red=True)
        session.exitstatus = 1


def _own_capabilities() -> str:
    try:
        with open("/proc/thread-self/status") as f:
            return next((ln.split()[1] for ln in f if ln.startswith("CapEff:")), "")
    except OSError:
        return ""


@pytest.fixture(autouse=True)
def _capabilities_kept():
    """A test that runs the agent's command in this process with capability dropping on would leave every later
    kernel test without privileges (capabilities do not come back): name the culprit instead."""
    before = _own_capabilities()
    yield
    after = _own_capabilities()
    if after != before:
        pytest.fail(f"this test dropped the test process's capabilities (CapEff {before} -> {after}): run the "
                    "agent in-process with --keep-capabilities", pytrace=False)
