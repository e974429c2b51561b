"""The status page in a real headless Chromium (Debian `chromium`): the agent probes the lab, srv2 drops the
probes, and the page Chromium renders shows the failing target first with its cause and kernel timeline. The
screenshot is decoded (tests/agent/png.py) and must show the page, not a blank: many colours, the policy_drop
badge's red and the ok badge's green."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess

import pytest

from connprobe.causes import colour
from tests.agent.helpers import AgentProcess, http_get, lab_config, wait_for
from tests.agent.png import decode

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]

CHROMIUM = "/usr/bin/chromium"


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def chromium(tmp_path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run headless Chromium in its own process group; the whole group is killed if anything is left."""
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium not found: install the Debian package chromium", pytrace=False)
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # helpers (zygote, utility) of this run, by our group id
        proc.wait(5)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_status_page_in_headless_chromium(lab, tmp_path):
    agent = AgentProcess(lab_config(tmp_path / "agent.yml", lab), tmp_path)
    try:
        agent.start()
        wait_for(lambda: len(json.loads(http_get(agent.url + "/api/recent")[1])["probes"]) == 2, 20,
                 "both probes to report")
        with lab.policy_drop("srv2", direction="in", port=8080):
            def dropped() -> bool:
                doc = json.loads(http_get(agent.url + "/api/recent")[1])
                last = doc["probes"]["api"][-1]
                return last["cause"] == "policy_drop" and last["kernel_events"] > 0
            wait_for(dropped, 30, "a policy_drop verdict with kernel evidence")

            dom = chromium(tmp_path, "--dump-dom", agent.url + "/")
            assert dom.returncode == 0, dom.stderr[-2000:]
            html = dom.stdout
            assert "<title>connprobe: 1 failing</title>" in html
            rows = re.findall(r'<tr(?: class="fail")? data-probe="([^"]+)" data-cause="([^"]+)"', html)
            assert rows == [("api", "policy_drop"), ("web", "ok")], rows  # the failing target first
            assert '<tr class="fail" data-probe="api"' in html
            timeline = html[html.index('<section class="timeline" data-probe="api">'):]
            assert "policy_drop/syn" in timeline and "▲ kernel drop" in timeline and "NETFILTER" in timeline

            shot = tmp_path / "status.png"
            run = chromium(tmp_path, "--window-size=1280,900", f"--screenshot={shot}", agent.url + "/")
            assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    finally:
        agent.stop()

    img = decode(shot.read_bytes())
    assert (img.width, img.height) == (1280, 900)
    colours = img.colours()
    total = img.width * img.height
    background, n_bg = colours.most_common(1)[0]
    assert len(colours) > 50, f"only {len(colours)} colours: a blank page?"
    assert n_bg < 0.9 * total, f"{n_bg / total:.0%} of the screenshot is {background}"
    for cause in ("policy_drop", "ok"):
        rgb = _rgb(colour(cause))
        assert colours[rgb] > 100, f"the {cause} badge colour {rgb} is not on screen ({colours[rgb]} px)"
    # the header bar (dark) spans the top of the page
    assert img.pixel(640, 5) == _rgb("#1d2330")
    shutil.copy(shot, tmp_path / "kept-status.png")
