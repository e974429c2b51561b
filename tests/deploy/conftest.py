"""Fixtures of the deploy/ tests: Prometheus' promtool.

promtool comes from the Debian package `prometheus` (scripts/setup installs it). These tests fail rather
than skip without it: the alert rules are only proven by `promtool test rules`.
"""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the Debian package `prometheus` (scripts/setup does)", pytrace=False)
    return path
