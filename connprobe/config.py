"""connprobe's probe configuration: YAML with blackbox_exporter-like `modules:` and `probes:` using them.

    modules:
      http_2xx:
        prober: http
        timeout: 5s
        http: {valid_status_codes: [200], fail_if_body_not_matches_regexp: ["ok"]}
    probes:
      - name: api
        module: http_2xx
        target: http://srv1.lab.test:8080/ok
        source: netns cp-lab-client
        interval: 15s
    limits: {max_probes: 10000, min_interval: 1s}   # optional; these are the defaults

Parsed once into frozen objects (`prober.spec.ModuleSpec` / `ProbeSpec`); unknown keys are rejected;
every error is one line naming the probe (or module) and the field. `connprobe check-config FILE`
validates without probing (`connprobe/commands/check_config.py`).

Whatever the file holds, loading it ends in a `Config` or a `ConfigError` (one line per problem): not
UTF-8, invalid YAML, a duplicate key, nesting deeper than `MAX_DEPTH`, a self-referencing alias, a value
of the wrong type anywhere — never another exception, never a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, field_validator

from connprobe.cluster.targets import ClusterProbe, is_cluster_probe, split_cluster_probe
from prober.spec import Duration, Frozen, ModuleSpec, ProbeSpec, format_duration

TOP_KEYS = ("modules", "probes", "limits", "node", "peers")
MAX_DEPTH = 32  # the deepest real config is 5 levels; recursion past this is an attack or a mistake
MAX_BYTES = 16 << 20  # a 10,000-probe config is about 1.5 MiB
MAX_ERRORS = 100  # lines reported; the rest are counted
MAX_LINE = 300  # characters in one error line
MAX_LABELS = 10  # `labels:` of one probe
MAX_LABEL_NAME = 64
MAX_LABEL_VALUE = 128
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# label names connprobe's own series (and Prometheus' target labels) use: a probe's `labels:` cannot take them
RESERVED_LABELS = frozenset({"probe", "target", "source", "cause", "result", "phase", "reason", "hook", "kind",
                             "sink", "where", "capability", "trigger", "le", "quantile", "job", "instance",
                             "version", "python", "implementation", "arch", "serving_status",
                             "fingerprint_sha256", "issuer", "subject", "subjectalternative"})


class ConfigError(ValueError):
    """The configuration is invalid; `errors` holds one line per problem (each a single line of text)."""

    def __init__(self, errors: list[str]):
        lines = [_one_line(e) for e in errors[:MAX_ERRORS]]
        if len(errors) > MAX_ERRORS:
            lines.append(f"... and {len(errors) - MAX_ERRORS} more errors")
        super().__init__("\n".join(lines))
        self.errors = lines


class ConfigUnreadable(ConfigError):
    """The file cannot be read at all (missing, no permission, not a regular file): an environment problem,
    not an invalid config (`check-config` exits 2 for it, 1 for an invalid one)."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]")


def _one_line(text: str) -> str:
    """Control characters escaped (a name with a line break cannot split a line), length capped."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"


class Limits(Frozen):
    """`limits:` in the config: what the agent accepts at most (defaults here; each may be set)."""

    max_probes: int = Field(default=10_000, ge=1, le=1_000_000)  # probes in one config
    min_interval: Duration = 1.0  # no probe runs more often than this


_WATCH = re.compile(r"(tcp|udp)/([0-9]{1,5})")
MAX_PEERS = 1000
MAX_NODE_NETNS = 1024


class NodeSettings(Frozen):
    """`node:` — this agent's node, for cross-node evidence (README, "Cross-node evidence"). Read at start-up."""

    name: str | None = Field(default=None, min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._-]+$")
    # the network namespaces of this node (names under /run/netns, or /proc/PID/ns/net paths): the kernel sensor
    # reports only their events; unset: every namespace (one node, the default)
    netns: tuple[str, ...] | None = Field(default=None, min_length=1, max_length=MAX_NODE_NETNS)
    watch: tuple[str, ...] = Field(default=(), max_length=256)  # ports watched at all times: "tcp/8080"
    peer_token_file: str | None = Field(default=None, min_length=1, max_length=4096)  # peers present this token

    @field_validator("watch")
    @classmethod
    def _watch(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            m = _WATCH.fullmatch(item)
            if m is None or not 0 < int(m.group(2)) < 65536:
                raise ValueError(f"{item[:40]!r} is not PROTO/PORT (tcp/8080, udp/53)")
        return v

    @field_validator("netns")
    @classmethod
    def _netns(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for item in v or ():
            if not item or "\x00" in item or len(item) > 4096:
                raise ValueError(f"{item[:40]!r} is not a namespace name or path")
        return v


class PeerSettings(Frozen):
    """One entry of `peers:` — the agent that answers for the addresses in `cidr`."""

    cidr: str
    url: str = Field(max_length=2048)
    token_file: str | None = Field(default=None, min_length=1, max_length=4096)
    ca_file: str | None = Field(default=None, min_length=1, max_length=4096)  # https: the CA that signed the peer
    cert_file: str | None = Field(default=None, min_length=1, max_length=4096)  # mTLS: this agent's certificate
    key_file: str | None = Field(default=None, min_length=1, max_length=4096)
    timeout: Duration = 0.5  # the question's deadline

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ValueError(f"{v[:60]!r} is not an address range (10.0.2.0/24, fd00::/64)") from None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        try:
            ok = re.fullmatch(r"https?://[^\s/?#@]+(/[^\s?#]*)?", v) is not None and urlsplit(v).port != 0
        except ValueError:  # a port out of range, an unclosed [IPv6 bracket
            ok = False
        if not ok:
            raise ValueError(f"{v[:60]!r} is not an http(s)://HOST:PORT URL of a peer agent")
        return v.rstrip("/")

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float) -> float:
        if v > 10:
            raise ValueError("a question to a peer waits at most 10s")
        return v


@dataclass(frozen=True)
class Config:
    modules: dict[str, ModuleSpec]
    probes: tuple[ProbeSpec, ...]
    limits: Limits = field(default_factory=Limits)
    # probes written with cluster names (`source: pod NS/NAME`, `svc/NS/NAME:PORT` targets): expanded by the
    # agent with --kubernetes (connprobe.cluster.targets.ClusterProbe)
    templates: tuple[Any, ...] = ()
    node: NodeSettings = field(default_factory=NodeSettings)
    peers: tuple[PeerSettings, ...] = ()


_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser: 3x faster at 10,000 probes


class _Loader(_SafeLoader):
    """yaml's safe loader that rejects a key given twice in one mapping (YAML says keys are unique;
    PyYAML silently keeps the last). Keys brought in by a `<<` merge may be overridden, as YAML allows."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # unhashable: the base class says so
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def _yaml_depth(text: str, filename: str) -> None:
    """Reject nesting deeper than MAX_DEPTH before the (recursive) composer sees it."""
    depth = 0
    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError([f"{filename}:{event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep"])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_shape(raw: Any) -> None:
    """Depth through aliases, and no alias that contains itself (iterative; each node visited once)."""
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(raw, False)]
    while stack:
        node, done = stack.pop()
        if not isinstance(node, dict | list):
            continue
        key = id(node)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if done:
            on_path.discard(key)
            depth[key] = 1 + max((depth.get(id(c), 0) for c in children if isinstance(c, dict | list)), default=0)
            if depth[key] > MAX_DEPTH:
                raise ConfigError([f"config: nested more than {MAX_DEPTH} levels deep (through aliases)"])
            continue
        if key in depth:
            continue
        if key in on_path:
            raise ConfigError(["config: a YAML alias refers to a collection that contains it"])
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if isinstance(c, dict | list))


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required",
}


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _format(owner: str, exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        loc = (prefix,) if prefix else ()
        loc += tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # a union/literal branch name (e.g. "float") adds nothing for the reader
        loc = tuple(p for p in loc if p not in ("constrained-float", "float", "str", "int"))
        msg = _MESSAGES.get(err["type"], err["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif msg.startswith("Assertion failed, "):
            msg = msg[len("Assertion failed, ") :]
        msg = msg.replace("Input should be", "must be")
        where = _loc(loc)
        lines.append(f"{owner}: {where}: {msg}" if where else f"{owner}: {msg}")
    return lines


def _load_yaml(text: str, filename: str) -> Any:
    try:
        _yaml_depth(text, filename)
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader (with the duplicate-key check)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark is not None else filename
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    except ConfigError:
        raise
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError([f"{filename}: invalid YAML: {exc}"]) from None
    _check_shape(raw)
    return raw


def parse_config(text: str, filename: str = "<config>", *, blackbox: bool = False,
                 base_dir: Path | None = None) -> Config:
    """Validate a whole config; raises ConfigError listing every problem found (and nothing else).

    `blackbox`: the text is a blackbox_exporter `blackbox.yml` (only `modules:`, read with blackbox's defaults:
    `connprobe.blackbox`). `base_dir`: where relative file names in modules (ca_file, bearer_token_file...)
    are taken from (default: the working directory)."""
    try:
        return _parse(text, filename, blackbox, base_dir)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError([f"{filename}: nested too deeply to load"]) from None
    except Exception as exc:  # a loader failure nobody foresaw: still one line, never a traceback
        raise ConfigError([f"{filename}: cannot load: {type(exc).__name__}: {exc}"]) from None


def _key(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


_S = TypeVar("_S", bound=Frozen)


def _section(raw: dict, key: str, model: type[_S], fields: str, errors: list[str]) -> _S:
    """The optional top-level mapping `key` validated as `model`; its defaults when absent or wrong (the
    problems appended to `errors`)."""
    body = raw.get(key)
    if body is not None:
        if not isinstance(body, dict):
            errors.append(f"config: {key}: must be a mapping ({fields})")
        else:
            try:
                return model.model_validate(body)
            except ValidationError as exc:
                errors.extend(_format("config", exc, prefix=key))
    return model()


def _parse(text: str, filename: str, blackbox: bool = False, base_dir: Path | None = None) -> Config:
    from connprobe.blackbox import translate_module

    if len(text) > MAX_BYTES:
        raise ConfigError([f"{filename}: larger than {MAX_BYTES >> 20} MiB"])
    raw = _load_yaml(text, filename)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config: top level must be a mapping with {', '.join(TOP_KEYS)}"])
    top = ("modules",) if blackbox else TOP_KEYS
    errors: list[str] = [f"config: {_key(k)}: unknown key (expected {', '.join(top)})" for k in raw if k not in top]
    if blackbox:
        raw = {k: v for k, v in raw.items() if k == "modules"}

    limits = _section(raw, "limits", Limits, "max_probes, min_interval", errors)
    node = _section(raw, "node", NodeSettings, "name, netns, watch, peer_token_file", errors)
    peers: list[PeerSettings] = []
    raw_peers = raw.get("peers") or []
    if not isinstance(raw_peers, list):
        errors.append("config: peers: must be a list of {cidr, url, token_file}")
        raw_peers = []
    if len(raw_peers) > MAX_PEERS:
        errors.append(f"config: peers: {len(raw_peers)} entries, more than {MAX_PEERS}")
        raw_peers = []
    for i, body in enumerate(raw_peers):
        if not isinstance(body, dict):
            errors.append(f"config: peers[{i}]: must be a mapping (cidr, url, token_file)")
            continue
        try:
            peers.append(PeerSettings.model_validate(body))
        except ValidationError as exc:
            errors.extend(_format("config", exc, prefix=f"peers[{i}]"))

    modules: dict[str, ModuleSpec] = {}
    raw_modules = raw.get("modules") or {}
    if not isinstance(raw_modules, dict):
        errors.append("config: modules: must be a mapping of module name to settings")
        raw_modules = {}
    bad_modules: set[str] = set()
    for key, body in raw_modules.items():
        name = _key(key)
        owner = f'module "{name}"'
        if not isinstance(body, dict):
            errors.append(f"{owner}: must be a mapping")
            bad_modules.add(name)
            continue
        body, mapped_errors = translate_module(body, base_dir, blackbox_defaults=blackbox)
        if mapped_errors:
            errors.extend(f"{owner}: {e}" for e in mapped_errors)
            bad_modules.add(name)
        try:
            spec = ModuleSpec.model_validate(body)
        except ValidationError as exc:
            errors.extend(_format(owner, exc))
            bad_modules.add(name)
            continue
        if name not in bad_modules:
            modules[name] = spec

    probes: list[ProbeSpec] = []
    templates: list[ClusterProbe] = []
    raw_probes = raw.get("probes") or []
    if not isinstance(raw_probes, list):
        errors.append("config: probes: must be a list of probes")
        raw_probes = []
    if len(raw_probes) > limits.max_probes:
        errors.append(f"config: probes: {len(raw_probes)} probes, more than limits.max_probes ({limits.max_probes})")
        raw_probes = []
    seen: dict[str, int] = {}
    for i, body in enumerate(raw_probes):
        if not isinstance(body, dict):
            errors.append(f"probes[{i}]: must be a mapping")
            continue
        name = body.get("name")
        owner = f'probe "{name}"' if isinstance(name, str) and name else f"probes[{i}]"
        if not (isinstance(name, str) and name):
            errors.append(f"{owner}: name: required" if name is None else f"{owner}: name: must be a non-empty string")
            continue
        if name in seen:
            errors.append(f"{owner}: name: duplicate (first defined as probes[{seen[name]}])")
            continue
        seen[name] = i
        module_name = body.get("module")
        if module_name is None:
            errors.append(f"{owner}: module: required")
            continue
        if not isinstance(module_name, str):
            errors.append(f"{owner}: module: must be a module name, got {_shown(module_name)}")
            continue
        if module_name in bad_modules:
            continue  # its module's own errors are reported already
        if module_name not in modules:
            known = ", ".join(sorted(_key(m) for m in raw_modules)) or "none defined"
            errors.append(f'{owner}: module: unknown module "{module_name}" (known: {known})')
            continue
        parts = None
        if is_cluster_probe(body):
            try:
                body, parts = split_cluster_probe(body, modules[module_name].prober)
            except ValueError as exc:
                errors.append(f"{owner}: {exc}")
                continue
        try:
            probe = ProbeSpec.model_validate({**body, "module": modules[module_name]})
        except ValidationError as exc:
            errors.extend(_format(owner, exc))
            continue
        label_errors = labels_errors(probe.labels)
        if label_errors:
            errors.extend(f"{owner}: labels: {e}" for e in label_errors)
            continue
        if probe.interval < limits.min_interval:
            errors.append(f"{owner}: interval: {format_duration(probe.interval)} is shorter than "
                          f"limits.min_interval ({format_duration(limits.min_interval)})")
            continue
        if parts is not None:
            templates.append(ClusterProbe(probe, parts))
        else:
            probes.append(probe)
    if errors:
        raise ConfigError(errors)
    return Config(modules=modules, probes=tuple(probes), limits=limits, templates=tuple(templates), node=node,
                  peers=tuple(peers))


def labels_errors(labels: dict[str, str]) -> list[str]:
    """What is wrong with a probe's `labels:` (one line each; [] when fine): Prometheus label-name syntax, no
    name connprobe's own series use, at most MAX_LABELS, values of at most MAX_LABEL_VALUE printable characters."""
    errors = []
    if len(labels) > MAX_LABELS:
        errors.append(f"{len(labels)} labels, at most {MAX_LABELS}")
    for name, value in labels.items():
        if len(name) > MAX_LABEL_NAME or not LABEL_NAME.fullmatch(name):
            errors.append(f"{_shown(name)}: not a label name (letters, digits and _, not starting with a digit, "
                          f"at most {MAX_LABEL_NAME} characters)")
        elif name.startswith("__"):
            errors.append(f"{_shown(name)}: names starting with __ are reserved for Prometheus")
        elif name in RESERVED_LABELS:
            errors.append(f"{_shown(name)}: connprobe's own label (reserved: {', '.join(sorted(RESERVED_LABELS))})")
        elif len(value) > MAX_LABEL_VALUE:
            errors.append(f"{name}: value longer than {MAX_LABEL_VALUE} characters")
        elif not value.isprintable():
            errors.append(f"{name}: value {_shown(value)} has a control character")
    return errors


def load_config(path: str | Path, *, blackbox: bool = False) -> Config:
    """Read and validate a config file (`blackbox`: a blackbox_exporter file); relative file names inside it
    are taken from its directory."""
    p = Path(path)
    return parse_config(_read_text(p), str(p), blackbox=blackbox, base_dir=p.parent)


def is_blackbox_file(path: str | Path) -> bool:
    """Whether the file given as a connprobe config is recognisably a blackbox_exporter `blackbox.yml`
    (`connprobe.blackbox.looks_like_blackbox`); a file that cannot be read or parsed is not (its loading then
    says why)."""
    from connprobe.blackbox import looks_like_blackbox

    try:
        raw = yaml.safe_load(_read_text(Path(path)))
    except Exception:  # unreadable, not YAML, not UTF-8: load_config reports it
        return False
    return looks_like_blackbox(raw)


def _read_text(p: Path) -> str:
    try:
        # O_NONBLOCK: a FIFO put where the config should be must not hang the reader (nor a reload's lock)
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigUnreadable([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigUnreadable([f"{p}: cannot read: not a regular file"])
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigUnreadable([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise ConfigError([f"{p}: larger than {MAX_BYTES >> 20} MiB"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{p}:{line}: not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}"]) from None
    return text
