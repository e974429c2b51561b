"""The redactor's rules (prober/redact.py): targets by syntax, free text by known secrets, log records."""

from __future__ import annotations

import logging

import pytest

from prober.redact import (
    REDACTED,
    LogRedaction,
    Redactor,
    known_redactor,
    label_target,
    learn,
    redact_text,
    redact_url,
    remember,
    secrets_of,
    url_secrets,
)
from prober.spec import ModuleSpec, ProbeSpec

R = REDACTED


@pytest.mark.parametrize(("target", "shown"), [
    ("http://user:pass@h.test/x", f"http://{R}@h.test/x"),
    ("http://tok3n@h.test/", f"http://{R}@h.test/"),  # username only
    ("http://a:b@h.test:8080/p", f"http://{R}@h.test:8080/p"),  # one-character password
    ("http://h.test/p?token=abc&page=2", f"http://h.test/p?token={R}&page={R}"),
    ("http://h.test/p?secretonly", f"http://h.test/p?{R}"),  # an item without '=' may be the secret
    ("http://h.test/p?empty=&x", f"http://h.test/p?empty=&{R}"),
    ("http://h.test/p#frag", f"http://h.test/p#{R}"),
    ("https://[fd96::10]:443/p?k=v#f", f"https://[fd96::10]:443/p?k={R}#{R}"),
    ("http://u@v@h.test/", f"http://{R}@h.test/"),  # the last '@' ends the userinfo
    ("http://h.test/a@b", "http://h.test/a@b"),  # an '@' in the path is not userinfo
    ("http://[broken/?t=x", f"http://[broken/?t={R}"),  # urllib refuses it; the syntax rule does not
    ("tok3n@srv.test:80", f"{R}@srv.test:80"),  # a TCP target with userinfo
    ("srv1.lab.test:8080", "srv1.lab.test:8080"),
    ("resolv.conf", "resolv.conf"),
    ("http://h.test", "http://h.test"),
])
def test_redact_url(target, shown):
    assert redact_url(target) == shown
    assert redact_url(shown) == shown  # idempotent: a result redacted twice looks the same


def test_label_target_drops_what_redact_url_replaces():
    assert label_target("http://u:p@h.test/x?q=1#f") == "http://h.test/x"
    assert label_target("http://tok3n@H.test:8080/x") == "http://h.test:8080/x"
    assert label_target("tok3n@srv.test:80") == "srv.test:80"
    assert label_target("https://[fd96::10]:443/p?x") == "https://[fd96::10]:443/p"


def test_url_secrets_raw_and_decoded():
    assert url_secrets("http://us%40r:p%2Fw@h/?a=b%20c&flag#f") == (
        "us%40r:p%2Fw", "us@r:p/w", "us%40r", "us@r", "p%2Fw", "p/w", "b%20c", "b c", "flag", "f",
        "dXNAcjpwL3c=")  # base64("us@r:p/w"): the Basic credentials a client sends


def _spec(target="http://h.test/", headers=None):
    module = ModuleSpec.model_validate({"prober": "http", "http": {"headers": headers or {}}})
    return ProbeSpec(name="p", module=module, target=target, interval=10)


def test_secrets_of_every_place():
    spec = _spec("http://usr:pw@h.test/?token=qv1#frag", {"Authorization": "Bearer t0k", "X-K": "ab"})
    assert set(secrets_of(spec)) == {"Bearer t0k", "ab", "usr:pw", "usr", "pw", "qv1", "frag",
                                     "dXNyOnB3"}


def test_long_secrets_anywhere_short_header_values_as_whole_tokens_only():
    red = Redactor.for_spec(_spec("http://h.test/?v=1", {"X-Long": "longsecret", "X-Two": "ab", "X-One": "7"}))
    # long: even glued to other text
    assert red.text("xxlongsecretyy") == f"xx{R}yy"
    # short header values: alone they go, inside a word or a number they stay
    assert red.text("sent b'ab' and ab, then 7") == f"sent b'{R}' and {R}, then {R}"
    assert red.text("tab abc 127.0.0.17:80") == "tab abc 127.0.0.17:80"
    # a short query value is not searched for in free text (it would wreck every address)...
    assert red.text("connect to 127.0.0.1:80 failed") == "connect to 127.0.0.1:80 failed"
    # ...the URL rule takes it where it appears: in a URL
    assert red.text("GET http://h.test/?v=1 failed") == f"GET http://h.test/?v={R} failed"


def test_urls_in_free_text_keep_their_punctuation():
    text = "redirect to http://u:p@h.test/x?t=s3cr3t. (see https://h.test/#frag), done"
    assert redact_text(text) == f"redirect to http://{R}@h.test/x?t={R}. (see https://h.test/#{R}), done"


def test_whitespace_is_no_secret():
    assert Redactor([" ", "", "\t"]).text("a b\tc") == "a b\tc"


def test_log_records_lose_remembered_secrets_in_message_and_traceback():
    remember(_spec("http://h.test/", {"X-Api-Key": "k9", "Authorization": "Bearer logcanary123"}))
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "probe failed: %s key=%s url=%s",
                               ("Bearer logcanary123", "k9", "http://me:pw@h.test/?q=zz"), None)
    try:
        raise ValueError("bad header b'k9' for Bearer logcanary123")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert LogRedaction().filter(record)
    out = logging.Formatter().format(record)
    assert "logcanary123" not in out and "'k9'" not in out and "pw@" not in out and "zz" not in out
    assert f"key={R}" in out and f"b'{R}'" in out and "ValueError" in out


def test_a_learned_token_leaves_log_lines_and_probe_text_however_short():
    """A fetched OAuth2 token (`learn`) is a header value: a short one is still redacted as a whole word, in the
    probe's text and in every log line."""
    red = Redactor.for_spec(_spec())
    for token in ("zq7", "Cn-learned-canary-42"):
        learn(red, token)
        line = f"GET failed: Authorization: Bearer {token} (retry)"
        assert red.text(line) == f"GET failed: Authorization: Bearer {R} (retry)"
        assert known_redactor().text(line) == f"GET failed: Authorization: Bearer {R} (retry)"


def test_a_probe_redactor_keeps_the_last_learned_tokens_only():
    """Tokens rotate for as long as the config lives: a probe's redactor holds the last 8 (and the short-match
    list with them), not every token it ever saw."""
    red = Redactor.for_spec(_spec(headers={"X-K": "ab"}))
    base_secrets, base_allowed = len(red.secrets), len(red._allowed)
    for i in range(50):
        learn(red, f"rotating-token-{i}")
    assert len(red.secrets) == base_secrets + 8 and len(red._allowed) == base_allowed + 8
    assert red.text("rotating-token-49 ab rotating-token-1") == f"{R} {R} rotating-token-1"


@pytest.mark.parametrize("padding", [0, 100])  # one regular expression, or (many secrets) the prefix table
def test_many_secrets_same_rules(padding):
    filler = [f"filler-secret-{i}" for i in range(padding)]
    red = Redactor([*filler, "abcd", "abcdef-long", "ab"], short_ok=["ab"])
    assert red.text("x abcdef-long y abcdz ab tab filler-secret-7") == (
        f"x {R} y {R}z {R} tab " + (R if padding else "filler-secret-7"))
    assert red.text("") == "" and red.text("nothing here") == "nothing here"
