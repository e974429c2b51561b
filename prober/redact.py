"""The one redactor: what every output (result, label, page, log line, file) shows instead of a secret.

Secrets a probe can carry, and where they come from:

- a URL's userinfo (`http://user:password@host/`, and a bare `http://tok3n@host/`), also in a
  `user@host:port` TCP target, and the `Basic base64(user:password)` an HTTP client sends for it,
- its query values (`?token=...`) and its fragment,
- every configured header value (`http.headers`, any length), plus a module's basic-auth password or
  bearer token where such a field exists.

Two ways of redacting, because outputs hold two kinds of text:

1. **Structured: a target.** `redact_url()` takes the URL apart by its syntax (no decoding, so it works on
   URLs that `urllib` refuses) and rebuilds it with the userinfo, every query value and the fragment
   replaced: `http://<redacted>@host:8080/p?token=<redacted>&page=<redacted>#<redacted>`. Query keys stay
   (they say what the probe asks for); a query item without `=` is redacted whole, since it may be the
   secret itself. Nothing is compared with a known secret, so a 1-character password is as safe as a long
   one and nothing else in the target is touched. The host and path are kept as they are: a secret written
   into a path (`/hooks/T0KEN`) is not recognised. `label_target()` is the stricter form for metric labels:
   userinfo, query and fragment are dropped, not replaced, so a label stays the same across secret rotation.
2. **Free text: an error detail, a captured header, a log line.** Here a secret has no field to sit in, so
   (a) every URL in the text is redacted structurally as above, and (b) the known secrets of the probe
   (`secrets_of()`) are replaced where they occur. Substring replacement of a short secret everywhere would
   mangle unrelated text (a header value `ok` inside `broken`, `1` inside `127.0.0.1`), so:
   - a secret of `LONG` (4) characters or more is replaced wherever it occurs, even inside a longer word;
   - a shorter header value (1-3 characters) is replaced only as a whole token: not glued to a letter or
     digit on either side (`b'ab'` and `value ab,` lose it; `abc` and `tab` keep their letters). Glued to
     other letters or digits it is left as it is: the price of not mangling text (README says so);
   - a short userinfo, query value or fragment is not searched for in free text at all: in free text those
     appear inside a URL, which step (a) handles, and searching for `?page=1`'s `1` would wreck every
     address and number in the text.
   Whitespace-only values are not secrets.

Who uses what:

- `ProbeResult.target` is `redact_url(spec.target)` and `error_detail` / `captured_headers` go through the
  probe's `Redactor` (`prober.attempt.build_result`: the one from `Prepared`, built once per spec), so
  everything made from a result — verdict facts and summary, `/api/recent`, the JSON lines, `diagnose` text,
  `--json` and recordings — starts out redacted.
- Outputs that show a spec's target themselves use `redact_url` (status page, `check-config`, `diagnose`'s
  document and recordings, config error messages); metric labels use `label_target` (`clean_target`).
- `connprobe.sinks.verdict_document` applies the structural rules once more (a result built elsewhere).
- Log lines: `LogRedaction`, put on the log handlers by `connprobe agent` and `connprobe diagnose`
  (`install_log_redaction`), redacts each record's message and traceback with the URL rule and every secret
  of every probe prepared in this process (`remember()`).
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import urllib.parse
from collections.abc import Iterable

__all__ = [
    "LONG",
    "REDACTED",
    "LogRedaction",
    "Redactor",
    "install_log_redaction",
    "known_redactor",
    "label_target",
    "learn",
    "redact",
    "redact_text",
    "redact_url",
    "remember",
    "secrets_of",
    "url_secrets",
]

REDACTED = "<redacted>"
LONG = 4  # secrets at least this long are replaced anywhere in free text; shorter ones only as whole tokens
_REGEX_MAX = 64  # more long secrets than this are looked up by prefix instead of one regular expression

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>`]+")
_TRAILING = ".,;:!)]}"


def _split(url: str) -> tuple[str, str, str, str | None, str | None]:
    """(scheme://, authority, path, query or None, fragment or None), by syntax only."""
    m = _SCHEME.match(url)
    prefix = m.group(0) if m else ""
    rest = url[len(prefix):]
    rest, hsep, fragment = rest.partition("#")
    rest, qsep, query = rest.partition("?")
    slash = rest.find("/")
    authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    return prefix, authority, path, (query if qsep else None), (fragment if hsep else None)


def _redact_query(query: str) -> str:
    items = []
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if not eq:
            items.append(REDACTED if key else "")
        else:
            items.append(f"{key}={REDACTED}" if value else f"{key}=")
    return "&".join(items)


def redact_url(url: str) -> str:
    """A target as it may be shown: userinfo, query values and fragment replaced by `<redacted>`.

    Works on URLs (`http://u:p@h/x?k=v#f`) and on `[userinfo@]host[:port]` targets alike; idempotent.
    """
    if not url:
        return url
    prefix, authority, path, query, fragment = _split(url)
    if "@" in authority:
        authority = f"{REDACTED}@{authority.rpartition('@')[2]}"
    out = prefix + authority + path
    if query is not None:
        out += "?" + _redact_query(query)
    if fragment is not None:
        out += "#" + (REDACTED if fragment else "")
    return out


def label_target(target: str) -> str:
    """A target fit for a metric label: a URL keeps scheme, host, port and path; userinfo, query and
    fragment go (the host is normalised: lower case, IPv6 in brackets, an explicit port kept)."""
    prefix, authority, path, _query, _fragment = _split(target)
    authority = authority.rpartition("@")[2]
    if not prefix:
        return authority + path
    try:
        u = urllib.parse.urlsplit(f"{prefix}{authority}{path}")
        host = u.hostname or ""
        port = u.port
    except ValueError:
        return prefix + authority + path
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, "", ""))


def url_secrets(target: str) -> tuple[str, ...]:
    """The secret parts of a target, raw and percent-decoded: userinfo (both halves, and the Basic
    credentials a client makes of it), query values, fragment."""
    _prefix, authority, _path, query, fragment = _split(target)
    parts: list[str] = []
    if "@" in authority:
        userinfo = authority.rpartition("@")[0]
        user, _, password = userinfo.partition(":")
        parts += [userinfo, user, password]
    if query:
        for item in query.split("&"):
            key, eq, value = item.partition("=")
            parts.append(value if eq else key)
    if fragment:
        parts.append(fragment)
    out: list[str] = []
    for p in parts:
        for form in (p, urllib.parse.unquote_plus(p)):
            if form.strip() and form not in out:
                out.append(form)
    if "@" in authority:  # what an HTTP client sends for it: `Authorization: Basic base64(user:password)`
        user, _, password = authority.rpartition("@")[0].partition(":")
        cred = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
        out.append(base64.b64encode(cred.encode()).decode())
    return tuple(out)


def secrets_of(spec) -> tuple[str, ...]:
    """Every secret a probe spec carries: its module's (header values of any length, basic-auth password,
    bearer token) and its target's (`url_secrets`)."""
    found: list[str] = []
    http = getattr(getattr(spec, "module", None), "http", None)
    if http is not None:
        for value in (*http.headers.values(), *getattr(http, "proxy_headers", {}).values()):
            found.append(_plain(value))
        for field in ("basic_auth", "auth"):
            auth = getattr(http, field, None)
            if auth is not None:
                found += [_plain(getattr(auth, "password", None)), _plain(getattr(auth, "username", None))]
        for field in ("bearer_token", "token"):
            found.append(_plain(getattr(http, field, None)))
        oauth = getattr(http, "oauth2", None)
        if oauth is not None:  # the client secret and the Basic credentials of the token request
            found += oauth.secrets()
    found += url_secrets(getattr(spec, "target", "") or "")
    out: list[str] = []
    for s in found:
        if s and s.strip() and s not in out:
            out.append(s)
    return tuple(out)


def _plain(value) -> str:
    if value is None:
        return ""
    get = getattr(value, "get_secret_value", None)
    return str(get() if get is not None else value)


def _header_secrets(spec) -> set[str]:
    http = getattr(getattr(spec, "module", None), "http", None)
    if http is None:
        return set()
    found = {_plain(v) for v in (*http.headers.values(), *getattr(http, "proxy_headers", {}).values())}
    oauth = getattr(http, "oauth2", None)
    return found | set(oauth.secrets()) if oauth is not None else found


class Redactor:
    """The free-text redactor of one set of secrets (see the module docstring for the rules).

    `short_ok` are the secrets that may be matched even when shorter than `LONG` (header values); other
    short ones (a 1-character query value) are left to the URL rule. A few secrets are one regular
    expression; many (the log redactor holds every probe's) are a table keyed by their first `LONG`
    characters, so a line costs one lookup per character however many secrets there are (Python's `re`
    tries an alternation's branches one by one: 10,000 secrets cost ~10 ms a line).
    """

    __slots__ = ("_allowed", "_base", "_built", "_by_prefix", "_pattern", "secrets")

    def __init__(self, secrets: Iterable[str] = (), short_ok: Iterable[str] | None = None):
        self.secrets = tuple(dict.fromkeys(s for s in secrets if s and s.strip()))
        self._base = len(self.secrets)  # the configured ones; `learn` adds run-time ones after them
        self._allowed = None if short_ok is None else frozenset(short_ok)
        self._built = False  # compiled on the first text to redact: most probes never have one
        self._by_prefix: dict[str, list[str]] | None = None
        self._pattern: re.Pattern | None = None

    def _build(self) -> None:
        allowed = set(self.secrets) if self._allowed is None else self._allowed
        ordered = sorted(self.secrets, key=len, reverse=True)  # the longest of overlapping secrets wins
        long = [s for s in ordered if len(s) >= LONG]
        alts = []
        if len(long) > _REGEX_MAX:
            by_prefix: dict[str, list[str]] = {}
            for s in long:
                by_prefix.setdefault(s[:LONG], []).append(s)
            self._by_prefix = by_prefix
        else:
            alts += [re.escape(s) for s in long]
        alts += [rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])" for s in ordered
                 if len(s) < LONG and s in allowed]
        self._pattern = re.compile("|".join(alts)) if alts else None
        self._built = True

    def learn(self, secret: str, keep: int = 8) -> None:
        """Add a secret known only at run time (a fetched OAuth2 token); the last `keep` such stay (a token
        rotates: an old one is never sent again, and the list must not grow for ever)."""
        if not secret or not secret.strip() or secret in self.secrets:
            return
        before = self.secrets[self._base:]
        learned = (*before, secret)[-keep:]
        if self._allowed is not None:  # the dropped ones go from it too (it must not grow for ever either)
            self._allowed = (self._allowed - (set(before) - set(learned))) | {secret}
        self.secrets = (*self.secrets[: self._base], *learned)
        self._built = False

    @classmethod
    def for_spec(cls, spec) -> Redactor:
        return cls(secrets_of(spec), short_ok=_header_secrets(spec))

    def target(self, target: str) -> str:
        """A target as shown (structural only: see `redact_url`)."""
        return redact_url(target)

    def text(self, text: str) -> str:
        """Free text with its URLs redacted and every known secret replaced."""
        if not text:
            return text
        if not self._built:
            self._build()
        if self._by_prefix is not None:  # long secrets first: a short one must not split a long one
            text = self._scan(text)
        if self._pattern is not None:
            text = self._pattern.sub(REDACTED, text)
        if "://" in text:
            text = _URL_IN_TEXT.sub(_url_match, text)
        return text

    def _scan(self, text: str) -> str:
        table = self._by_prefix
        assert table is not None
        out: list[str] = []
        i = last = 0
        stop = len(text) - LONG
        while i <= stop:
            for s in table.get(text[i:i + LONG], ()):
                if text.startswith(s, i):
                    out += (text[last:i], REDACTED)
                    i = last = i + len(s)
                    break
            else:
                i += 1
        if not out:
            return text
        out.append(text[last:])
        return "".join(out)


def _url_match(m: re.Match) -> str:
    url = m.group(0)
    tail = ""
    while url and url[-1] in _TRAILING:
        tail = url[-1] + tail
        url = url[:-1]
    return redact_url(url) + tail


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Free text with its URLs redacted and the given secrets (all treated as header values) replaced."""
    if not secrets:
        return _URL_IN_TEXT.sub(_url_match, text) if text and "://" in text else text
    return Redactor(secrets).text(text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Same as `redact_text` (the name older call sites use)."""
    return redact_text(text, secrets)


# -- log lines ---------------------------------------------------------------------------------------------

_known_lock = threading.Lock()
_known: dict[str, bool] = {}  # secret -> may be matched when short (a header value)
_known_redactor: Redactor | None = Redactor()
_MAX_KNOWN = 100_000  # a target's own secrets beyond this many are left to the URL rule (module ones never)


_learned: dict[str, None] = {}  # run-time secrets (fetched tokens), the most recent `_MAX_LEARNED`
_MAX_LEARNED = 4096


def learn(redactor: Redactor | None, secret: str) -> None:
    """A secret known only at run time (an OAuth2 token): taught to a probe's redactor and to every log line's."""
    global _known_redactor
    if redactor is not None:
        redactor.learn(secret)
    if not secret or not secret.strip():
        return
    with _known_lock:
        if secret in _learned:
            return
        _learned[secret] = None
        while len(_learned) > _MAX_LEARNED:
            del _learned[next(iter(_learned))]
        _known_redactor = None


def remember(spec) -> None:
    """Add a probe's secrets to those every log line is scrubbed of. A module's secrets (bounded by the
    config) are always kept; a target's (a `/probe` caller can make up any number) up to `_MAX_KNOWN`."""
    global _known_redactor
    secrets = secrets_of(spec)
    headers = _header_secrets(spec)
    module = {s for s in secrets_of(_ModuleOnly(spec))}
    with _known_lock:
        for s in secrets:
            if s in _known or (s not in module and len(_known) >= _MAX_KNOWN):
                continue
            _known[s] = s in headers
            _known_redactor = None


class _ModuleOnly:
    """A spec's module without its target (for `secrets_of`)."""

    def __init__(self, spec):
        self.module = getattr(spec, "module", None)
        self.target = ""


def known_redactor() -> Redactor:
    """The redactor of every remembered secret (rebuilt on first use after `remember` added one)."""
    global _known_redactor
    red = _known_redactor
    if red is None:
        with _known_lock:
            red = _known_redactor
            if red is None:
                # a fetched token is sent as a header value: a short one is matched as a whole word, as those are
                red = _known_redactor = Redactor([*_known, *_learned],
                                                 short_ok=[*(s for s, short in _known.items() if short), *_learned])
    return red


class LogRedaction(logging.Filter):
    """A handler filter: the record's message and traceback, redacted with every remembered secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        red = known_redactor()
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let logging report it as it would
            return True
        record.msg, record.args = red.text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = red.text(record.exc_text)
        if record.stack_info:
            record.stack_info = red.text(record.stack_info)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Put `LogRedaction` on every handler of `logger` (the root logger) that lacks it; call after the
    handlers are set up (e.g. after `logging.basicConfig`)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, LogRedaction) for f in handler.filters):
            handler.addFilter(LogRedaction())
