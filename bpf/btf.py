"""A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`): struct member offsets and enum values.

The sensor reads a few kernel struct fields (an skb's packet headers, a socket's network namespace). Those
layouts change between kernels and the installed headers may belong to another kernel, so every offset the
BPF programs use comes from the running kernel's BTF, parsed here at start-up. Only what the sensor needs
is implemented: struct/union members (including members of anonymous structs and unions, as in
`sk_buff`'s `struct_group`s), typedef/const/volatile resolution, and enum/enum64 values.

    btf = Btf.load()
    btf.offsetof("sk_buff", "head")          # -> byte offset
    btf.offsetof("net", "ns.inum")           # dotted path through nested members
    btf.enum("skb_drop_reason")["SKB_DROP_REASON_NETFILTER_DROP"]

Format: Documentation/bpf/btf.rst (header, type section of `struct btf_type` records each followed by a
kind-specific tail, string section).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F

# BTF kinds (include/uapi/linux/btf.h)
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD = 1, 2, 3, 4, 5, 6, 7
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_FUNC, KIND_FUNC_PROTO = 8, 9, 10, 11, 12, 13
KIND_VAR, KIND_DATASEC, KIND_FLOAT, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 14, 15, 16, 17, 18, 19

# Bytes that follow the 12-byte btf_type header: fixed part, and per-vlen-entry part.
_TAIL = {
    KIND_INT: (4, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0),
    KIND_ENUM64: (0, 12),
}
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class BtfError(Exception):
    """BTF is missing, malformed, or lacks a type or member the caller asked for."""


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 when not a bitfield


class Btf:
    """Parsed BTF blob. Types are indexed in one pass; members are decoded on demand."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x} (big-endian BTF is not supported)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._types_start = hdr_len + type_off
        self._strs = data[hdr_len + str_off : hdr_len + str_off + str_len]
        # _index[type_id] = (kind, vlen, kind_flag, name_off, size_or_type, tail_offset); id 0 is void.
        self._index: list[tuple[int, int, int, int, int, int]] = [(0, 0, 0, 0, 0, 0)]
        self._by_name: dict[tuple[int, str], list[int]] = {}
        pos, end = self._types_start, self._types_start + type_len
        unpack = struct.Struct("<III").unpack_from
        tails = _TAIL
        while pos < end:
            name_off, info, size_or_type = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            fixed, per = tails.get(kind, (0, 0))
            self._index.append((kind, vlen, info >> 31, name_off, size_or_type, pos + 12))
            pos += 12 + fixed + per * vlen
        if pos != end:
            raise BtfError("BTF type section is truncated or has an unknown kind")

    @classmethod
    def load(cls, path: Path | str = VMLINUX_BTF) -> Btf:
        try:
            return cls(Path(path).read_bytes())
        except OSError as exc:
            raise BtfError(f"cannot read BTF at {path}: {exc.strerror or exc}") from exc

    # -- lookup -------------------------------------------------------------------------------------------

    def _name(self, off: int) -> str:
        end = self._strs.index(b"\0", off)
        return self._strs[off:end].decode()

    def _ensure_names(self) -> None:
        if self._by_name:
            return
        for type_id, (kind, _vlen, _kf, name_off, _s, _t) in enumerate(self._index):
            if name_off and kind in (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_TYPEDEF):
                self._by_name.setdefault((kind, self._name(name_off)), []).append(type_id)

    def __len__(self) -> int:
        return len(self._index) - 1

    def find(self, name: str, kinds: tuple[int, ...] = (KIND_STRUCT, KIND_UNION)) -> int:
        """Type id of the first complete type named `name` of one of `kinds`."""
        self._ensure_names()
        for kind in kinds:
            for type_id in self._by_name.get((kind, name), ()):
                return type_id
        raise BtfError(f"type {name!r} not found in BTF")

    def kind(self, type_id: int) -> int:
        return self._index[type_id][0]

    def type_name(self, type_id: int) -> str:
        return self._name(self._index[type_id][3]) if self._index[type_id][3] else ""

    def size(self, type_id: int) -> int:
        type_id = self.resolve(type_id)
        kind, _vlen, _kf, _n, size_or_type, tail = self._index[type_id]
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _idx, nelems = struct.unpack_from("<III", self._data, tail)
            return self.size(elem) * nelems
        return size_or_type

    def resolve(self, type_id: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the underlying type."""
        for _ in range(64):
            kind, _vlen, _kf, _n, size_or_type, _tail = self._index[type_id]
            if kind not in _MODIFIERS:
                return type_id
            type_id = size_or_type
        raise BtfError("type modifier chain too long")

    def members(self, type_id: int) -> list[Member]:
        kind, vlen, kind_flag, _n, _s, tail = self._index[self.resolve(type_id)]
        if kind not in (KIND_STRUCT, KIND_UNION):
            raise BtfError(f"type {self.type_name(type_id)!r} is not a struct or union")
        out = []
        for i in range(vlen):
            name_off, mtype, offset = struct.unpack_from("<III", self._data, tail + 12 * i)
            if kind_flag:
                out.append(Member(self._name(name_off), mtype, offset & 0xFFFFFF, offset >> 24))
            else:
                out.append(Member(self._name(name_off), mtype, offset, 0))
        return out

    def _member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(bit offset, member type id) of `name` in a struct/union, looking inside anonymous members."""
        for m in self.members(type_id):
            if m.name == name:
                return m.bit_offset, m.type_id
        for m in self.members(type_id):
            if not m.name and self.kind(self.resolve(m.type_id)) in (KIND_STRUCT, KIND_UNION):
                found = self._member(m.type_id, name)
                if found is not None:
                    return m.bit_offset + found[0], found[1]
        return None

    def member_offset(self, struct_name: str, path: str) -> tuple[int, int]:
        """(byte offset, size in bytes) of a dotted member path in a struct or union."""
        type_id = self.find(struct_name)
        bits = 0
        for part in path.split("."):
            found = self._member(type_id, part)
            if found is None:
                raise BtfError(f"struct {struct_name!r} has no member {path!r} (at {part!r})")
            bits += found[0]
            type_id = found[1]
        if bits % 8:
            raise BtfError(f"{struct_name}.{path} is a bitfield; byte offsets only")
        return bits // 8, self.size(type_id)

    def offsetof(self, struct_name: str, path: str) -> int:
        return self.member_offset(struct_name, path)[0]

    def enum(self, name: str) -> dict[str, int]:
        """Values of enum `name` (enum or enum64), by enumerator name."""
        type_id = self.find(name, (KIND_ENUM, KIND_ENUM64))
        kind, vlen, kind_flag, _n, _s, tail = self._index[type_id]
        out: dict[str, int] = {}
        if kind == KIND_ENUM:
            fmt = "<Ii" if kind_flag else "<II"
            for i in range(vlen):
                name_off, val = struct.unpack_from(fmt, self._data, tail + 8 * i)
                out[self._name(name_off)] = val
        else:
            for i in range(vlen):
                name_off, lo, hi = struct.unpack_from("<III", self._data, tail + 12 * i)
                val = (hi << 32) | lo
                if kind_flag and val >= 1 << 63:
                    val -= 1 << 64
                out[self._name(name_off)] = val
        return out


# The struct fields the BPF programs read, as (-D macro name, struct, member path). The sensor passes each
# as `-DNAME=offset`; nothing in the C code uses a header's layout.
SENSOR_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("OFF_SKB_HEAD", "sk_buff", "head"),
    ("OFF_SKB_NETWORK_HEADER", "sk_buff", "network_header"),
    ("OFF_SKB_TRANSPORT_HEADER", "sk_buff", "transport_header"),
    ("OFF_SKB_DEV", "sk_buff", "dev"),
    ("OFF_SKB_SK", "sk_buff", "sk"),
    ("OFF_NETDEV_ND_NET", "net_device", "nd_net.net"),
    ("OFF_SK_NET", "sock_common", "skc_net.net"),
    ("OFF_NET_INUM", "net", "ns.inum"),
    ("OFF_SKC_DADDR", "sock_common", "skc_daddr"),
    ("OFF_SKC_RCV_SADDR", "sock_common", "skc_rcv_saddr"),
    ("OFF_SKC_DPORT", "sock_common", "skc_dport"),
    ("OFF_SKC_NUM", "sock_common", "skc_num"),
    ("OFF_SKC_FAMILY", "sock_common", "skc_family"),
    ("OFF_SKC_V6_DADDR", "sock_common", "skc_v6_daddr"),
    ("OFF_SKC_V6_RCV_SADDR", "sock_common", "skc_v6_rcv_saddr"),
)


# Fields only one hook needs: when the running kernel lacks one (or has it as a bitfield), that hook is off.
OPTIONAL_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("OFF_SK_ERR", "sock", "sk_err"),
    ("OFF_SK_PROTOCOL", "sock", "sk_protocol"),
    ("OFF_INET_SPORT", "inet_sock", "inet_sport"),
)


# Where a retransmitted segment's sequence range, its socket's snd_una and segment counters are (optional:
# without them, retransmissions carry no sequence numbers and the correlator says it could not check what
# got through).
SEQ_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("OFF_SKB_CB", "sk_buff", "cb"),
    ("OFF_TCB_SEQ", "tcp_skb_cb", "seq"),
    ("OFF_TCB_END_SEQ", "tcp_skb_cb", "end_seq"),
    ("OFF_TP_SND_UNA", "tcp_sock", "snd_una"),
    ("OFF_TP_DATA_SEGS_OUT", "tcp_sock", "data_segs_out"),
    ("OFF_TP_TOTAL_RETRANS", "tcp_sock", "total_retrans"),
)


def optional_offsets(btf: Btf, fields: tuple[tuple[str, str, str], ...] = OPTIONAL_FIELDS) -> dict[str, int]:
    """Offsets of `fields` (OPTIONAL_FIELDS, SEQ_FIELDS) that this kernel has as plain members (absent ones are
    left out)."""
    out = {}
    for macro, struct_name, path in fields:
        try:
            out[macro] = btf.offsetof(struct_name, path)
        except BtfError:
            continue
    return out


def sensor_offsets(btf: Btf) -> dict[str, int]:
    """Byte offsets of every field in SENSOR_FIELDS, keyed by macro name. Raises BtfError if one is absent."""
    out = {}
    for macro, struct_name, path in SENSOR_FIELDS:
        out[macro] = btf.offsetof(struct_name, path)
    # The sock_common fields are read through a `struct sock *`: add where __sk_common sits in it (0 today;
    # checked instead of assumed).
    base = btf.offsetof("sock", "__sk_common")
    for macro, struct_name, _path in SENSOR_FIELDS:
        if struct_name == "sock_common":
            out[macro] += base
    return out
