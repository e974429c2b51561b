"""Fixtures for the kernel sensor's tests."""

from __future__ import annotations

import pytest

from bpf.sensor import KernelSensor


@pytest.fixture(scope="module")
def sensor():
    """A sensor used synchronously (events read with drain()); closed at the end of the module.
    Only kernel-marked tests use it: tests/conftest.py skips (or, in CI, fails) them first."""
    s = KernelSensor()
    s.open()
    try:
        yield s
    finally:
        s.close()
