"""BTF reader: a synthetic blob with every construct the sensor relies on, plus the running kernel's BTF
cross-checked against bpftool and tracefs (kernel tests)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from bpf.btf import (
    KIND_ENUM,
    KIND_ENUM64,
    KIND_INT,
    KIND_PTR,
    KIND_STRUCT,
    KIND_TYPEDEF,
    KIND_UNION,
    SENSOR_FIELDS,
    Btf,
    BtfError,
    sensor_offsets,
)
from bpf.kernel_compat import Tracefs


class BlobBuilder:
    """Writes a little-endian BTF blob type by type (ids start at 1)."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.next_id = 1

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, name: str, kind: int, vlen: int, size_or_type: int, tail: bytes = b"", kflag: int = 0) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + tail
        self.next_id += 1
        return self.next_id - 1

    def int_(self, name: str, size: int) -> int:
        return self.add(name, KIND_INT, 0, size, struct.pack("<I", size * 8))

    def struct_(self, name: str, size: int, members: list[tuple[str, int, int]], kind: int = KIND_STRUCT,
                kflag: int = 0) -> int:
        tail = b"".join(struct.pack("<III", self.s(n), t, off) for n, t, off in members)
        return self.add(name, kind, len(members), size, tail, kflag)

    def blob(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return hdr + bytes(self.types) + bytes(self.strings)


@pytest.fixture
def synthetic() -> Btf:
    b = BlobBuilder()
    i32 = b.int_("int", 4)  # 1
    ptr = b.add("", KIND_PTR, 0, i32)  # 2
    inner = b.struct_("inner", 8, [("a", i32, 0), ("b", i32, 32)])  # 3
    inner_t = b.add("inner_t", KIND_TYPEDEF, 0, inner)  # 4
    anon_union = b.struct_("", 8, [("x", i32, 0), ("p", ptr, 0)], kind=KIND_UNION)  # 5
    anon_struct = b.struct_("", 4, [("deep", i32, 0)])  # 6
    b.struct_("outer", 32, [("first", i32, 0), ("", anon_union, 64), ("nested", inner_t, 128),
                            ("", anon_struct, 192)])  # 7
    b.struct_("bits", 4, [("lo", i32, (4 << 24) | 0), ("hi", i32, (4 << 24) | 4), ("w", i32, 16)], kflag=1)
    b.add("color", KIND_ENUM, 2, 4, struct.pack("<IiIi", b.s("RED"), 0, b.s("BLUE"), 5))
    b.add("neg", KIND_ENUM, 1, 4, struct.pack("<Ii", b.s("MINUS"), -3), kflag=1)
    b.add("big", KIND_ENUM64, 1, 8, struct.pack("<III", b.s("HUGE"), 0, 1 << 8))
    return Btf(b.blob())


def test_direct_nested_and_anonymous_members(synthetic: Btf) -> None:
    assert synthetic.offsetof("outer", "first") == 0
    assert synthetic.member_offset("outer", "x") == (8, 4)  # inside an anonymous union
    assert synthetic.member_offset("outer", "p") == (8, 8)  # pointer size
    assert synthetic.offsetof("outer", "deep") == 24  # inside an anonymous struct
    assert synthetic.offsetof("outer", "nested.b") == 20  # through a typedef
    assert synthetic.size(synthetic.find("outer")) == 32
    assert len(synthetic) == 11


def test_bitfields_are_refused_but_plain_members_of_the_same_struct_work(synthetic: Btf) -> None:
    assert synthetic.offsetof("bits", "w") == 2
    with pytest.raises(BtfError, match="bitfield"):
        synthetic.offsetof("bits", "hi")


def test_enums(synthetic: Btf) -> None:
    assert synthetic.enum("color") == {"RED": 0, "BLUE": 5}
    assert synthetic.enum("neg") == {"MINUS": -3}
    assert synthetic.enum("big") == {"HUGE": 1 << 40}


def test_missing_things_raise_btf_error(synthetic: Btf) -> None:
    with pytest.raises(BtfError, match=r"no member 'nested\.zz'"):
        synthetic.offsetof("outer", "nested.zz")
    with pytest.raises(BtfError, match="'nosuch' not found"):
        synthetic.offsetof("nosuch", "a")
    with pytest.raises(BtfError, match="bad BTF magic"):
        Btf(b"\0" * 64)
    with pytest.raises(BtfError, match="cannot read BTF"):
        Btf.load(Path("/nonexistent/vmlinux"))


def test_truncated_type_section_is_detected() -> None:
    b = BlobBuilder()
    b.int_("int", 4)
    blob = bytearray(b.blob())
    struct.pack_into("<I", blob, 12, len(b.types) - 2)  # type_len shorter than the records
    with pytest.raises(BtfError, match="truncated"):
        Btf(bytes(blob))


# -- the running kernel --------------------------------------------------------------------------------


def _bpftool_members(struct_name: str) -> dict[str, int]:
    """Byte offsets of a struct's named top-level members according to `bpftool btf dump ... format raw`."""
    out = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(rf"^\[\d+\] STRUCT '{struct_name}' size=\d+ vlen=\d+\n((?:\t.*\n)*)", out, re.M)
    assert m, f"bpftool has no struct {struct_name}"
    members = {}
    for line in m.group(1).splitlines():
        mm = re.match(r"\t'(\w+)' type_id=\d+ bits_offset=(\d+)", line)
        if mm:
            members[mm.group(1)] = int(mm.group(2)) // 8
    return members


@pytest.mark.kernel
def test_running_kernel_offsets_match_bpftool() -> None:
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is not installed (apt-get install bpftool)")
    btf = Btf.load()
    assert len(btf) > 10_000
    offsets = sensor_offsets(btf)
    assert set(offsets) == {macro for macro, _s, _p in SENSOR_FIELDS}
    skb = _bpftool_members("sk_buff")
    assert offsets["OFF_SKB_HEAD"] == skb["head"]
    assert _bpftool_members("net_device")["nd_net"] == offsets["OFF_NETDEV_ND_NET"]
    assert _bpftool_members("ns_common")["inum"] + _bpftool_members("net")["ns"] == offsets["OFF_NET_INUM"]
    assert _bpftool_members("sock")["__sk_common"] + _bpftool_members("sock_common")["skc_net"] == \
        offsets["OFF_SK_NET"]


@pytest.mark.kernel
def test_btf_drop_reasons_agree_with_tracefs_names() -> None:
    btf_enum = Btf.load().enum("skb_drop_reason")
    tracefs = Tracefs().format("skb", "kfree_skb").symbolic("reason")
    assert tracefs, "kfree_skb format has no reason table"
    for number, name in tracefs.items():
        assert btf_enum.get(f"SKB_DROP_REASON_{name}") == number, name
    # The 6.1 headers say NETFILTER_DROP=7; this kernel must not.
    assert btf_enum["SKB_DROP_REASON_NETFILTER_DROP"] == next(k for k, v in tracefs.items() if v == "NETFILTER_DROP")


def test_offsets_cache_round_trip_and_hostile_files(tmp_path, caplog):
    """The running kernel's offsets are cached per kernel build; a cache file that is not a table of offsets is
    ignored (and rewritten), never trusted."""
    from bpf import preload

    if not preload.VMLINUX_BTF.exists():
        pytest.skip("no kernel BTF")
    parsed = preload.kernel_offsets(cache_dir=tmp_path)
    path = preload.offsets_cache_path(tmp_path)
    assert path is not None and path.exists() and (path.stat().st_mode & 0o777) == 0o600
    assert json.loads(path.read_text()) == parsed
    assert preload.kernel_offsets(cache_dir=tmp_path) == parsed
    for bad in ("not json", "[]", "{}", '{"OFF_X": -1}', '{"rm -rf": 1}', json.dumps({**parsed, "OFF_Y": "8"}),
                json.dumps({k: v for k, v in parsed.items() if k != next(iter(parsed))})):
        path.write_text(bad)
        assert preload.kernel_offsets(cache_dir=tmp_path) == parsed, bad
        assert json.loads(path.read_text()) == parsed  # rewritten from BTF
    assert "ignoring the offsets cache" in caplog.text
