"""Source-address pools: rendezvous stability, strategies, families, the bind check, no_proxy."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.net.addresses import bindable, normalize_address, normalize_pool, pick, rendezvous
from gateway.net.ipstrategy import IPV4, IPV6
from gateway.net.noproxy import NoProxy

POOL = [f"10.0.0.{i}" for i in range(1, 9)]
ACCOUNTS = [f"account-{i}" for i in range(2000)]


def test_rendezvous_is_deterministic_and_order_independent():
    for account in ACCOUNTS[:50]:
        assert rendezvous(account, POOL) == rendezvous(account, list(reversed(POOL)))
    assert rendezvous("a", []) is None


def test_removing_an_address_moves_only_its_accounts():
    before = {a: rendezvous(a, POOL) for a in ACCOUNTS}
    smaller = [a for a in POOL if a != "10.0.0.3"]
    after = {a: rendezvous(a, smaller) for a in ACCOUNTS}
    moved = {a for a in ACCOUNTS if before[a] != after[a]}
    assert moved == {a for a in ACCOUNTS if before[a] == "10.0.0.3"}
    assert moved  # and those really moved, spread over the rest
    assert len({after[a] for a in moved}) > 3


def test_adding_an_address_moves_only_accounts_to_it():
    before = {a: rendezvous(a, POOL) for a in ACCOUNTS}
    after = {a: rendezvous(a, POOL + ["10.0.0.99"]) for a in ACCOUNTS}
    moved = {a for a in ACCOUNTS if before[a] != after[a]}
    assert moved and all(after[a] == "10.0.0.99" for a in moved)
    assert len(moved) < len(ACCOUNTS) / 4  # about 1/9 of them


def test_rendezvous_spreads_evenly():
    counts = Counter(rendezvous(a, POOL) for a in ACCOUNTS)
    assert set(counts) == set(POOL)
    assert max(counts.values()) < 1.35 * len(ACCOUNTS) / len(POOL)


@given(st.lists(st.integers(1, 254), min_size=2, max_size=12, unique=True), st.text(min_size=1, max_size=20))
@settings(max_examples=200, deadline=None)
def test_removal_property(octets, account):
    pool = [f"192.0.2.{o}" for o in octets]
    chosen = rendezvous(account, pool)
    for gone in pool:
        rest = [a for a in pool if a != gone]
        if gone != chosen:
            assert rendezvous(account, rest) == chosen


def test_pick_by_strategy_and_family():
    pool = ["127.0.0.2", "::1", "127.0.0.3", "fd00::5"]
    assert pick("default", pool, "a", IPV4) is None
    assert pick("static", pool, "a", IPV4) == rendezvous("a", ["127.0.0.2", "127.0.0.3"])
    assert pick("static", pool, "a", IPV6) == rendezvous("a", ["::1", "fd00::5"])
    assert pick("static", ["127.0.0.2"], "a", IPV6) is None  # no IPv6 in the pool: the OS picks
    rng = random.Random(7)
    seen = Counter(pick("random", pool, "a", IPV4, rng) for _ in range(200))
    assert set(seen) == {"127.0.0.2", "127.0.0.3"}


def test_normalize_addresses():
    assert normalize_address(" [::0001] ") == "::1"
    assert normalize_pool(["127.0.0.2", "127.0.0.2", "::1"]) == ("127.0.0.2", "::1")
    for bad in ["127.000.0.1", "1.2.3", "host.example", "", "1.2.3.4/24", 5, None, "::g"]:
        with pytest.raises(ValueError):
            normalize_address(bad)


def test_bindable_checks_the_machine():
    assert bindable("127.0.0.1") is None
    assert bindable("192.0.2.99") is not None  # TEST-NET-1, never configured here


@pytest.mark.parametrize("host, expected", [
    ("localhost", True), ("LOCALHOST.", True), ("a.corp.example", True), ("a.b.corp.example", True),
    ("corp.example", False), ("evilcorp.example", False), ("x.example.org", True), ("example.org", False),
    ("127.0.0.1", True), ("127.255.0.9", True), ("128.0.0.1", False), ("::1", True), ("[::1]", True),
    ("0:0:0:0:0:0:0:1", True), ("::2", False), ("fd00::7", True), ("10.1.2.3", True), ("10.1.2.4", False),
    ("imap.gmail.com", False), ("localhost.evil.example", False),
])
def test_no_proxy_patterns(host, expected):
    patterns = ["localhost", "*.corp.example", ".example.org", "127.0.0.0/8", "[::1]", "fd00::/8", "10.1.2.3"]
    assert NoProxy.parse(patterns).matches(host) is expected


def test_no_proxy_star_and_empty():
    assert NoProxy.parse(["*"]).matches("anything.example")
    assert not NoProxy.parse([]).matches("localhost")


@pytest.mark.parametrize("pattern", ["a b", "*", "*.", "10.0.0.0/33", "..x", "", "a/b", "x:y"])
def test_no_proxy_bad_patterns(pattern):
    if pattern == "*":
        NoProxy.parse([pattern])
        return
    with pytest.raises(ValueError):
        NoProxy.parse([pattern])
