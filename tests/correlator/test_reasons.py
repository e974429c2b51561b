"""Every drop reason the kernel can give has a class by what it means — checked against the whole list read
from the running kernel's tracefs, and against the 6.18 list checked in with the decoder's test data."""

from __future__ import annotations

from pathlib import Path

import pytest

from bpf.kernel_compat import Tracefs, parse_format
from correlator.reasons import CLASS_WORDS, DECISIVE, REASON_CLASSES, reason_class

CHECKED_IN = Path(__file__).parents[1] / "bpf" / "data" / "kfree_skb.format"


def unclassified(names) -> list[str]:
    return sorted(n for n in names if reason_class(n) == "other")


def test_every_reason_of_the_checked_in_kernel_list_has_a_class():
    names = parse_format(CHECKED_IN.read_text()).symbolic("reason").values()
    assert len(names) > 100
    assert unclassified(names) == []


@pytest.mark.kernel
def test_every_reason_of_the_running_kernel_has_a_class():
    names = Tracefs().format("skb", "kfree_skb").symbolic("reason").values()
    assert unclassified(names) == [], "give these drop reasons a class in correlator/reasons.py"


def test_a_reason_has_exactly_one_class_and_every_class_has_words():
    seen: dict[str, str] = {}
    for cls, names in REASON_CLASSES.items():
        for n in names:
            assert n not in seen, f"{n} is both {seen[n]} and {cls}"
            seen[n] = cls
    assert set(REASON_CLASSES) | {"other"} == set(CLASS_WORDS)
    assert set(REASON_CLASSES) >= DECISIVE


@pytest.mark.parametrize(("reason", "cls"), [
    ("NETFILTER_DROP", "policy"), ("TC_EGRESS", "program"), ("QDISC_DROP", "loss"),
    ("SOCKET_RCVBUFF", "app"), ("TCP_LISTEN_OVERFLOW", "app"), ("NEIGH_FAILED", "routing"),
    ("IP_OUTNOROUTES", "routing"), ("TCP_OLD_DATA", "local"), ("TCP_CSUM", "local"), ("NO_SOCKET", "no_listener"),
    ("QUEUE_PURGE", "normal"), ("SOMETHING_NEW", "other"), (None, "other"),
])
def test_classes_say_what_the_reason_means(reason, cls):
    assert reason_class(reason) == cls
