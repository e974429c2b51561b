"""The kernel sensor of one "node" reports only events seen in that node's network namespaces (an in-kernel
filter): two sensors side by side on the lab, node A (client + router) and node B (the servers), each see
their own side of one flow. Unfiltered (the default) a sensor sees both sides, as before."""

from __future__ import annotations

import errno

import pytest

from bpf.errors import SensorError
from bpf.sensor import KernelSensor
from bpf.types import EventKind
from tests.bpf.sensorlab import client_request, events_of

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

NODE_A = ("client", "router")
NODE_B = ("srv1", "srv2", "dns")


def inodes(lab, roles) -> set[int]:
    return {lab.ns(r).inode for r in roles}


@pytest.fixture(scope="module")
def two_sensors(lab):
    a = KernelSensor(netns=inodes(lab, NODE_A))
    b = KernelSensor(netns=inodes(lab, NODE_B))
    a.open()
    try:
        b.open()
        try:
            yield a, b
        finally:
            b.close()
    finally:
        a.close()


@pytest.mark.parametrize("family", [4, 6])
def test_syn_dropped_at_b_is_seen_by_b_only(lab, two_sensors, family):
    a, b = two_sensors
    srv = lab.server("srv1")
    addr = srv.addr4 if family == 4 else srv.addr6
    b.watch("tcp", srv.port)  # node B watches its service's port; node A the probe's own port
    try:
        with lab.policy_drop("srv1", direction="in", proto="tcp", port=srv.port):
            run = client_request(lab, a, addr, srv.port, timeout=1.5)
        evs_a = events_of(a, run.local_port, lab)
        evs_b = events_of(b, run.local_port, lab, settle=0)
    finally:
        a.unwatch("tcp", run.local_port)
        b.unwatch("tcp", srv.port)
    assert run.error == errno.ETIMEDOUT
    assert {e.netns for e in evs_a} <= inodes(lab, NODE_A)
    assert {e.netns for e in evs_b} <= inodes(lab, NODE_B)
    assert any(e.kind == EventKind.RETRANSMIT for e in evs_a), evs_a  # our SYN resent: node A's socket
    assert not any(e.kind == EventKind.DROP for e in evs_a), evs_a  # the drop happened on node B
    drops = [e for e in evs_b if e.kind == EventKind.DROP]
    assert drops and all(d.reason == "NETFILTER_DROP" and d.netns == lab.ns("srv1").inode for d in drops), evs_b
    assert a.foreign_events > 0  # node A's sensor saw node B's drops in the kernel, and did not report them


def test_unfiltered_sensor_sees_both_nodes(lab, sensor):
    srv = lab.server("srv1")
    with lab.policy_drop("srv1", direction="in", proto="tcp", port=srv.port):
        run = client_request(lab, sensor, srv.addr4, srv.port, timeout=1.2)
    try:
        evs = events_of(sensor, run.local_port, lab)
    finally:
        sensor.unwatch("tcp", run.local_port)
    seen = {e.netns for e in evs}
    assert lab.ns("client").inode in seen and lab.ns("srv1").inode in seen
    assert sensor.foreign_events == 0 and sensor.netns is None


def test_filter_can_be_changed_and_is_checked(lab, two_sensors):
    a, _ = two_sensors
    before = a.netns
    a.set_netns({lab.ns("client").inode})
    try:
        assert a.netns == {lab.ns("client").inode}
    finally:
        a.set_netns(before)
    with pytest.raises(ValueError, match="empty"):
        a.set_netns(set())
    with pytest.raises(ValueError, match="32-bit"):
        KernelSensor(netns={-1})
    with pytest.raises(ValueError, match="empty"):
        KernelSensor(netns=set())


def test_unfiltered_sensor_cannot_be_narrowed(sensor):
    with pytest.raises(SensorError, match="every namespace"):
        sensor.set_netns({1})
