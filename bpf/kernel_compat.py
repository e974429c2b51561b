"""What the running kernel offers, read from the kernel itself rather than from installed headers.

- tracefs format files: whether a tracepoint exists, its fields (name, C type, offset, size), and the
  `__print_symbolic()` tables that map a field's numbers to names (drop reasons, reset reasons);
- `/proc/kallsyms`: kernel text addresses to symbol names (drop locations).

Every function takes the tracefs root / kallsyms path as a parameter so tests can run on recorded files.
"""

from __future__ import annotations

import array
import bisect
import re
from dataclasses import dataclass
from pathlib import Path

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
KALLSYMS = Path("/proc/kallsyms")


class TracefsUnavailable(Exception):
    """No mounted tracefs with an `events/` directory was found."""


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    ctype: str  # e.g. "__u8", "enum skb_drop_reason", "const void *"
    offset: int
    size: int
    signed: bool
    array_len: int | None = None


@dataclass(frozen=True, slots=True)
class TracepointFormat:
    category: str
    event: str
    fields: dict[str, Field]
    print_fmt: str

    def symbolic(self, field: str) -> dict[int, str]:
        return parse_print_symbolic(self.print_fmt, field)


def find_tracefs(candidates: tuple[Path, ...] = TRACEFS_CANDIDATES) -> Path:
    for path in candidates:
        if (path / "events").is_dir():
            return path
    raise TracefsUnavailable(
        "tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing, as root)"
    )


_FIELD_RE = re.compile(r"^\s*field:(?P<decl>[^;]+);\s*offset:(\d+);\s*size:(\d+);\s*signed:(\d+);", re.M)


def parse_format(text: str, category: str = "", event: str = "") -> TracepointFormat:
    """Parse a tracefs `format` file (fields and `print fmt`). Common fields (common_*) are kept."""
    fields: dict[str, Field] = {}
    for m in _FIELD_RE.finditer(text):
        decl = m.group("decl").strip()
        array_len = None
        am = re.match(r"^(.*?)\s*\[(\d*)\]$", decl)
        if am:
            decl = am.group(1)
            array_len = int(am.group(2)) if am.group(2) else 0
        nm = re.match(r"^(.*?)([A-Za-z_][A-Za-z0-9_]*)$", decl)
        if not nm:
            continue
        ctype, name = nm.group(1).strip(), nm.group(2)
        fields[name] = Field(name, ctype, int(m.group(2)), int(m.group(3)), m.group(4) == "1", array_len)
    pm = re.search(r"^print fmt:\s*(.*)$", text, re.M)
    return TracepointFormat(category, event, fields, pm.group(1) if pm else "")


def parse_print_symbolic(print_fmt: str, field: str) -> dict[int, str]:
    """Numbers → names from the `__print_symbolic(REC->field, { 2, "NAME" }, ...)` table of a print fmt.

    Entries whose number is a macro name (e.g. `{ TCP_ESTABLISHED, "..." }`) are skipped: only numeric
    entries are trustworthy. Returns {} when the field has no symbolic table.
    """
    start = print_fmt.find(f"__print_symbolic(REC->{field},")
    if start < 0:
        return {}
    # The table ends at the parenthesis that closes __print_symbolic(
    depth, end = 0, len(print_fmt)
    for i in range(start + len("__print_symbolic"), len(print_fmt)):
        ch = print_fmt[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                end = i
                break
    table = print_fmt[start:end]
    out = {}
    for num, name in re.findall(r"\{\s*(-?(?:0x[0-9a-fA-F]+|\d+))\s*,\s*\"([^\"]*)\"\s*\}", table):
        out[int(num, 0)] = name
    return out


class Tracefs:
    """Reads tracepoint format files under one tracefs root."""

    def __init__(self, root: Path | None = None):
        self.root = find_tracefs((root,)) if root is not None else find_tracefs()

    def exists(self, category: str, event: str) -> bool:
        return (self.root / "events" / category / event / "format").is_file()

    def format(self, category: str, event: str) -> TracepointFormat:
        path = self.root / "events" / category / event / "format"
        return parse_format(path.read_text(), category, event)

    def check(self, category: str, event: str, required: dict[str, int | None]) -> str | None:
        """None when the tracepoint exists with every required field; else why not.

        `required` maps field name → expected size in bytes, or None to only require presence. The BPF
        programs read fields through bcc's structs generated from these same format files; the size check
        catches layout changes the C code depends on (e.g. tcp_send_reset's sockaddr-sized addresses).
        """
        if not self.exists(category, event):
            return f"tracepoint {category}:{event} does not exist on this kernel"
        try:
            fmt = self.format(category, event)
        except OSError as exc:
            return f"tracepoint {category}:{event}: cannot read format: {exc.strerror or exc}"
        for name, size in required.items():
            field = fmt.fields.get(name)
            if field is None:
                return f"tracepoint {category}:{event} has no field {name!r}"
            if size is not None and field.size != size:
                return f"tracepoint {category}:{event} field {name!r} has size {field.size}, expected {size}"
        return None


class Kallsyms:
    """Kernel text address → `symbol+0xoff` from /proc/kallsyms (needs root to see real addresses).

    Held compactly (the table has ~120,000 text symbols): addresses in one `array('Q')`, names in one bytes
    blob with an `array('I')` of offsets — ~4 MiB instead of ~16 MiB as lists of ints and strings."""

    def __init__(self, path: Path = KALLSYMS):
        rows: list[tuple[int, bytes]] = []
        with open(path, "rb") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3 or parts[1] not in b"tTwW":
                    continue
                addr = int(parts[0], 16)
                if addr == 0:
                    continue
                rows.append((addr, parts[2]))
        rows.sort(key=lambda r: r[0])  # stable: equal addresses keep the file's order
        self._addrs = array.array("Q", [r[0] for r in rows])
        self._blob = b"".join(r[1] for r in rows)
        offsets = array.array("I", [0])
        at = 0
        for _, name in rows:
            at += len(name)
            offsets.append(at)
        self._offsets = offsets
        self.usable = bool(self._addrs)  # all-zero addresses: kptr_restrict hides them

    def __len__(self) -> int:
        return len(self._addrs)

    def lookup(self, addr: int) -> str | None:
        if not addr or not self._addrs:
            return None
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        off = addr - self._addrs[i]
        if off > 1 << 20:  # far past the last symbol: not kernel text we know
            return None
        name = self._blob[self._offsets[i]:self._offsets[i + 1]].decode("utf-8", "replace")
        return f"{name}+{off:#x}"

