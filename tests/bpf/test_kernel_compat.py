"""tracefs format parsing and kallsyms symbolisation, on format files recorded from kernel 6.18."""

from __future__ import annotations

import bisect
import random
import shutil
from pathlib import Path

import pytest

from bpf.kernel_compat import (
    Kallsyms,
    Tracefs,
    TracefsUnavailable,
    find_tracefs,
    parse_format,
    parse_print_symbolic,
)

DATA = Path(__file__).parent / "data"


def fmt(name: str):
    return parse_format((DATA / f"{name}.format").read_text())


def test_kfree_skb_fields_and_reason_table() -> None:
    f = fmt("kfree_skb")
    assert f.fields["reason"].offset == 36 and f.fields["reason"].size == 4
    assert f.fields["reason"].ctype == "enum skb_drop_reason"
    assert f.fields["rx_sk"].offset == 24
    assert f.fields["protocol"].ctype == "unsigned short"
    reasons = f.symbolic("reason")
    # Measured on 6.18 (the 6.1 headers say NETFILTER_DROP=7, QDISC_DROP=45)
    assert reasons[12] == "NETFILTER_DROP"
    assert reasons[62] == "TC_EGRESS" and reasons[73] == "TC_INGRESS"
    assert reasons[64] == "QDISC_DROP" and reasons[104] == "QUEUE_PURGE"
    assert reasons[2] == "NOT_SPECIFIED" and reasons[3] == "NO_SOCKET"


def test_tcp_send_reset_has_the_sockaddr_layout() -> None:
    f = fmt("tcp_send_reset")
    assert f.fields["saddr"].size == 28 and f.fields["saddr"].array_len == 28
    assert f.fields["daddr"].offset == 60
    assert "sport" not in f.fields
    assert f.symbolic("reason")[1] == "NO_SOCKET"


def test_symbolic_tables_with_macro_entries_only_keep_numbers() -> None:
    # tcp_retransmit_skb names states by macro ({ TCP_ESTABLISHED, "..." }): nothing trustworthy to take
    assert fmt("tcp_retransmit_skb").symbolic("state") == {}
    states = fmt("inet_sock_set_state").symbolic("newstate")
    assert states[1] == "TCP_ESTABLISHED" and states[2] == "TCP_SYN_SENT" and states[12] == "TCP_NEW_SYN_RECV"
    assert fmt("inet_sock_set_state").symbolic("family") == {2: "AF_INET", 10: "AF_INET6"}


def test_parse_print_symbolic_edge_cases() -> None:
    assert parse_print_symbolic('"%s", REC->x', "x") == {}
    text = '"%s %s", __print_symbolic(REC->a, { 0x10, "HEX" }, { -1, "NEG" }), __print_symbolic(REC->b, { 1, "B" })'
    assert parse_print_symbolic(text, "a") == {16: "HEX", -1: "NEG"}
    assert parse_print_symbolic(text, "b") == {1: "B"}


@pytest.fixture
def fake_tracefs(tmp_path: Path) -> Path:
    for cat, ev in (("skb", "kfree_skb"), ("tcp", "tcp_send_reset")):
        (tmp_path / "events" / cat / ev).mkdir(parents=True)
        shutil.copy(DATA / f"{ev}.format", tmp_path / "events" / cat / ev / "format")
    return tmp_path


def test_tracefs_check(fake_tracefs: Path) -> None:
    tfs = Tracefs(fake_tracefs)
    assert tfs.check("skb", "kfree_skb", {"reason": 4, "location": None}) is None
    assert tfs.check("tcp", "tcp_send_reset", {"saddr": 4}) == (
        "tracepoint tcp:tcp_send_reset field 'saddr' has size 28, expected 4"
    )
    assert tfs.check("skb", "kfree_skb", {"nosuch": None}) == "tracepoint skb:kfree_skb has no field 'nosuch'"
    assert tfs.check("tcp", "tcp_bogus", {}) == "tracepoint tcp:tcp_bogus does not exist on this kernel"


def test_find_tracefs(tmp_path: Path, fake_tracefs: Path) -> None:
    assert find_tracefs((tmp_path / "nope", fake_tracefs)) == fake_tracefs
    with pytest.raises(TracefsUnavailable, match="mount -t tracefs"):
        find_tracefs((tmp_path / "nope",))


def test_kallsyms(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text(
        "ffffffff81000000 T _stext\n"
        "ffffffff81001000 t tcp_v4_rcv\n"
        "ffffffff81002000 D some_data\n"
        "ffffffff81003000 T nf_hook_slow\n"
        "ffffffffc0000000 t mod_fn\t[nf_tables]\n"
    )
    ks = Kallsyms(path)
    assert ks.usable
    assert ks.lookup(0xFFFFFFFF81001234) == "tcp_v4_rcv+0x234"
    assert ks.lookup(0xFFFFFFFF81002500) == "tcp_v4_rcv+0x1500"  # data symbols are not text
    assert ks.lookup(0xFFFFFFFF81003000) == "nf_hook_slow+0x0"
    assert ks.lookup(0xFFFFFFFFC0000010) == "mod_fn+0x10"
    assert ks.lookup(0x1000) is None and ks.lookup(0) is None


def test_kallsyms_hidden_addresses(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text("0000000000000000 T _stext\n0000000000000000 t tcp_v4_rcv\n")
    ks = Kallsyms(path)
    assert not ks.usable and ks.lookup(0xFFFFFFFF81001234) is None


def _reference_lookup(path: Path):
    """The table as it was kept before it was packed into arrays: lists of ints and names."""
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[1] not in "tTwW" or int(parts[0], 16) == 0:
            continue
        rows.append((int(parts[0], 16), parts[2]))
    rows.sort(key=lambda r: r[0])
    addrs = [a for a, _ in rows]

    def lookup(addr: int) -> str | None:
        i = bisect.bisect_right(addrs, addr) - 1
        if not addr or i < 0 or addr - addrs[i] > 1 << 20:
            return None
        return f"{rows[i][1]}+{addr - addrs[i]:#x}"

    return lookup, addrs


@pytest.mark.kernel  # real addresses in /proc/kallsyms need root
def test_packed_kallsyms_look_up_like_the_lists_on_the_running_kernel(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"  # one snapshot: BPF programs loaded meanwhile add symbols to the live table
    path.write_bytes(Path("/proc/kallsyms").read_bytes())
    ks = Kallsyms(path)
    ref, addrs = _reference_lookup(path)
    assert len(ks) == len(addrs) and ks.usable
    rnd = random.Random(5)
    probes = [a + rnd.randrange(0, 4096) for a in rnd.sample(addrs, 3000)] + addrs[:50] + addrs[-50:] + [1, 0]
    assert [ks.lookup(a) for a in probes] == [ref(a) for a in probes]
