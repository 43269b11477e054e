"""DNSBL checks on a fake clock with a scripted twisted.names-shaped resolver, and the SMTP exclusion in
the address picker. The real twisted.names server on loopback is in tests/integration/test_reputation.py."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from gateway import metrics
from gateway.config import load_config
from gateway.net.addresses import rendezvous
from gateway.net.dnsbl import query_name
from gateway.net.ipstrategy import IPV4
from gateway.net.policy import NetworkPolicy, Settings
from gateway.net.reputation import Reputation
from gateway.store.records import Routing

from dnsbl_fakes import MemoryStore, ScriptedResolver  # tests/unit/dnsbl_fakes.py

ZONES = [{"host": "bl.test", "name": "Test BL"}, {"host": "clean.test", "name": "Clean"}]


def run(coroutine: Any) -> Any:
    out: list[Any] = []
    defer.Deferred.fromCoroutine(coroutine).addBoth(out.append)
    assert out, "did not finish"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def reputation(sources: list[str], resolver: Any, *, clock: Any = None, store: Any = None, **config: Any
               ) -> Reputation:
    settings = load_config(None, {"reputation": {"zones": ZONES, "nameservers": ["127.0.0.1:5353"], **config}})
    async def source_addresses() -> list[str]:
        return list(sources)
    return Reputation(clock or task.Clock(), settings.reputation, store, source_addresses, resolver=resolver)


@pytest.fixture
def events():
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


LISTED = {query_name("127.0.0.3", "bl.test"): (["127.0.0.2"], "Listed: see https://bl.test/127.0.0.3")}


def test_listed_clean_and_the_reason_from_txt(events):
    rep = reputation(["127.0.0.2", "127.0.0.3"], ScriptedResolver(LISTED))
    results = {(r.address, r.zone): r for r in run(rep.check())}
    assert len(results) == 4
    listed = results[("127.0.0.3", "bl.test")]
    assert (listed.listed, listed.code, listed.reason) == (True, "127.0.0.2", "Listed: see https://bl.test/127.0.0.3")
    assert all(results[key].listed is False for key in results if key != ("127.0.0.3", "bl.test"))
    assert rep.excluded() == {"127.0.0.3"}
    assert [(e["address"], e["zone"]) for e in named(events, "reputation.listed")] == [("127.0.0.3", "bl.test")]
    assert metrics.REGISTRY.get_sample_value("gateway_reputation_listed", {"zone": "bl.test"}) == 1
    assert metrics.REGISTRY.get_sample_value("gateway_reputation_listed", {"zone": "clean.test"}) == 0
    assert metrics.REGISTRY.get_sample_value("gateway_reputation_excluded") == 1
    assert [r.document()["checked"] for r in rep.results()][0].endswith("Z")


def test_one_by_one_one_by_all_all_by_one_all_by_all():
    resolver = ScriptedResolver(LISTED)
    rep = reputation(["127.0.0.2", "127.0.0.3"], resolver)
    assert [(r.address, r.zone) for r in run(rep.check("127.0.0.3", "bl.test"))] == [("127.0.0.3", "bl.test")]
    assert [(r.address, r.zone) for r in run(rep.check("127.0.0.3"))] == [("127.0.0.3", "bl.test"),
                                                                        ("127.0.0.3", "clean.test")]
    assert [(r.address, r.zone) for r in run(rep.check(zone="clean.test"))] == [("127.0.0.2", "clean.test"),
                                                                              ("127.0.0.3", "clean.test")]
    assert len(run(rep.check())) == 4
    assert [name for kind, name, _t in resolver.asked if kind == "A"][:2] == [
        "3.0.0.127.bl.test", "3.0.0.127.bl.test"]


def test_a_zone_that_never_answers_is_unknown_exactly_at_its_timeout():
    """Fake clock: nothing at timeout - 0.01 s, unknown at the timeout, and the lookup is given up."""
    clock = task.Clock()
    resolver = ScriptedResolver(default="hang")
    rep = reputation(["127.0.0.2"], resolver, clock=clock, timeout=3)
    done = defer.Deferred.fromCoroutine(rep.check(zone="bl.test"))
    clock.advance(2.99)
    assert not done.called and len(resolver.pending) == 1
    assert resolver.asked[0][2] == (3.0,)  # the resolver's own retry timeout fits in ours
    clock.advance(0.02)
    assert done.called
    [result] = done.result
    assert (result.listed, result.reason) == (None, "no answer within 3 s")
    assert resolver.pending[0].called  # cancelled, not left to fire later


@pytest.mark.parametrize("answer, reason", [
    ("servfail", "the name server answered SERVFAIL"),
    (["127.255.255.254"], "error code"),
    (["10.1.2.3"], "not a 127.0.0.x code"),
])
def test_servfail_and_error_codes_are_unknown_never_clean(answer, reason):
    rep = reputation(["127.0.0.3"], ScriptedResolver({query_name("127.0.0.3", "bl.test"): answer}))
    [result] = run(rep.check(zone="bl.test"))
    assert result.listed is None and reason in result.reason


def test_unknown_keeps_a_listing_and_only_a_clean_answer_ends_it(events):
    clock = task.Clock()
    resolver = ScriptedResolver(LISTED)
    rep = reputation(["127.0.0.3"], resolver, clock=clock, timeout=2)
    run(rep.check())
    assert rep.excluded() == {"127.0.0.3"}
    version = rep.version
    resolver.script[query_name("127.0.0.3", "bl.test")] = "servfail"
    run(rep.check())
    resolver.script[query_name("127.0.0.3", "bl.test")] = "hang"
    waiting = defer.Deferred.fromCoroutine(rep.check())
    clock.advance(2)
    assert waiting.called and rep.excluded() == {"127.0.0.3"} and rep.version == version
    resolver.script[query_name("127.0.0.3", "bl.test")] = "nx"
    run(rep.check())
    assert rep.excluded() == frozenset() and rep.version == version + 1
    assert named(events, "reputation.delisted")[0]["action"] == "back in SMTP selection"
    assert metrics.REGISTRY.get_sample_value("gateway_reputation_listed", {"zone": "bl.test"}) == 0


def test_policy_warn_lists_but_excludes_nothing():
    rep = reputation(["127.0.0.3"], ScriptedResolver(LISTED), policy="warn")
    run(rep.check())
    assert rep.listed() == {"127.0.0.3"} and rep.excluded() == frozenset()


def test_results_and_listings_survive_a_restart_through_the_store():
    store = MemoryStore()
    rep = reputation(["127.0.0.2", "127.0.0.3"], ScriptedResolver(LISTED), store=store)
    run(rep.check())
    again = reputation(["127.0.0.2", "127.0.0.3"], ScriptedResolver(), store=store)
    run(again.load())
    assert again.excluded() == {"127.0.0.3"}
    assert [r.document() for r in again.results()] == [r.document() for r in rep.results()]


def test_removing_a_zone_drops_its_listings_and_new_zones_are_checked_in_the_background():
    resolver = ScriptedResolver(LISTED)
    rep = reputation(["127.0.0.3"], resolver, store=MemoryStore())
    run(rep.check())
    assert rep.excluded() == {"127.0.0.3"}
    from gateway.net.dnsbl import Zone

    run(rep.set_zones((Zone("clean.test", "Clean"), Zone("new.test", "New")), "test"))
    assert rep.excluded() == frozenset()
    assert {r.zone for r in rep.results()} == {"clean.test", "new.test"}  # new.test checked at once
    assert metrics.REGISTRY.get_sample_value("gateway_reputation_listed", {"zone": "bl.test"}) is None
    run(rep.set_zones(None, "test"))
    assert [z.host for z in run(rep.zones())] == ["bl.test", "clean.test"]


def test_500_addresses_by_20_zones_never_have_more_lookups_in_flight_than_the_bound():
    """10,000 lookups with concurrency 50: the resolver never has more than 50 unanswered, every pair
    is asked once, in a bounded number of rounds."""
    zones = [{"host": f"z{i}.test", "name": f"Z{i}"} for i in range(20)]
    sources = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(500)]
    resolver = ScriptedResolver(hold=True)
    rep = reputation(sources, resolver, zones=zones, concurrency=50)
    done = defer.Deferred.fromCoroutine(rep.check())
    assert resolver.outstanding == 50  # the first 50 went out; 9,950 wait their turn
    rounds = 0
    while resolver.release() and rounds < 1000:
        rounds += 1
    assert done.called and len(done.result) == 10000 and all(r.listed is False for r in done.result)
    assert resolver.most_outstanding == 50 and resolver.outstanding == 0
    assert sorted(name for kind, name, _t in resolver.asked) == sorted(
        query_name(a, z["host"]) for a in sources for z in zones)
    assert rounds == 10000 // 50


def test_listed_lookups_and_their_txt_lookups_share_the_bound():
    sources = [f"10.1.0.{i}" for i in range(1, 201)]
    script = {query_name(a, "bl.test"): (["127.0.0.2"], "listed") for a in sources[::3]}
    resolver = ScriptedResolver(script, hold=True)
    rep = reputation(sources, resolver, concurrency=7)
    done = defer.Deferred.fromCoroutine(rep.check())
    rounds = 0
    while resolver.release() and rounds < 1000:
        rounds += 1
    assert done.called and resolver.most_outstanding == 7
    assert len([1 for kind, _n, _t in resolver.asked if kind == "TXT"]) == len(sources[::3])
    assert rep.listed() == set(sources[::3])


# The address picker -------------------------------------------------------------


class Listed:
    """The part of Reputation the policy asks."""

    def __init__(self, excluded: set[str]) -> None:
        self._excluded = frozenset(excluded)
        self.version = 1

    def excluded(self) -> frozenset[str]:
        return self._excluded


POOL = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def picker(strategy: str, excluded: set[str], **network: Any) -> NetworkPolicy:
    config = load_config(None, {"network": {"local_addresses": POOL, "address_strategy": strategy, **network}})
    policy = NetworkPolicy(config.network, None, clock=lambda: 0.0, rng=random.Random(7), bindable=lambda a: None)
    policy.reputation = Listed(excluded)
    return policy


def test_smtp_avoids_a_listed_address_imap_keeps_it():
    p = picker("random", {"127.0.0.3"})
    settings = run(p.settings())
    smtp = {p.source(settings, Routing.from_view({"account": "a"}), IPV4, "smtp") for _ in range(300)}
    imap = {p.source(settings, Routing.from_view({"account": "a"}), IPV4, "imap") for _ in range(300)}
    assert smtp == {"127.0.0.2", "127.0.0.4"} and imap == set(POOL)


def test_static_moves_only_the_accounts_of_the_excluded_address():
    p = picker("static", {"127.0.0.3"})
    settings = run(p.settings())
    moved = kept = 0
    for i in range(2000):
        account = Routing(account=f"acct{i}")
        before = rendezvous(f"acct{i}", POOL)
        now = p.source(settings, account, IPV4, "smtp")
        if before == "127.0.0.3":
            assert now in ("127.0.0.2", "127.0.0.4") and now == rendezvous(f"acct{i}", ["127.0.0.2", "127.0.0.4"])
            moved += 1
        else:
            assert now == before
            kept += 1
    assert moved > 500 and kept > 1000


def test_an_all_listed_pool_falls_back_to_the_default_pool_then_to_the_os_with_one_line(events):
    p = picker("static", {"127.0.0.3", "127.0.0.5"})
    settings = Settings(account_pools={"pinned": ("127.0.0.5",), "three": ("127.0.0.3",)})
    for _ in range(5):
        assert p.source(settings, Routing.from_view({"account": "three"}), IPV4, "smtp") in ("127.0.0.2", "127.0.0.4")
        assert p.source(settings, Routing.from_view({"account": "three"}), IPV4, "imap") == "127.0.0.3"
    # an account's own listed localAddress falls back the same way
    assert p.source(settings, Routing.from_view({"account": "x", "localAddress": "127.0.0.3"}), IPV4, "smtp") in ("127.0.0.2",
                                                                                             "127.0.0.4")
    fallbacks = named(events, "reputation.fallback")
    assert [(e["pool_level"], e["to"]) for e in fallbacks] == [("account", "the default pool"),
                                                          ("account localAddress", "the default pool")]
    everything = picker("random", set(POOL))
    settings = run(everything.settings())
    assert everything.source(settings, Routing.from_view({"account": "a"}), IPV4, "smtp") is None  # the OS chooses
    assert everything.source(settings, Routing.from_view({"account": "a"}), IPV4, "smtp") is None
    assert named(events, "reputation.fallback")[-1]["to"] == "the operating system's choice"
    assert len(named(events, "reputation.fallback")) == 3
    view = run(everything.describe({"account": "a", "email": "a@x.example"}, None))
    assert view["excluded"] == POOL


def test_listings_change_and_the_fallback_is_logged_again(events):
    p = picker("random", set(POOL))
    settings = run(p.settings())
    p.source(settings, Routing.from_view({"account": "a"}), IPV4, "smtp")
    p.reputation.version += 1  # type: ignore[union-attr]
    p.source(settings, Routing.from_view({"account": "a"}), IPV4, "smtp")
    assert len(named(events, "reputation.fallback")) == 2


def test_the_schedule_checks_at_start_and_every_interval_until_stopped():
    clock = task.Clock()
    resolver = ScriptedResolver(LISTED)
    rep = reputation(["127.0.0.3"], resolver, clock=clock, store=MemoryStore(), interval=100)

    def lookups() -> int:
        return sum(1 for kind, _name, _timeout in resolver.asked if kind == "A")
    rep.start()
    assert lookups() == 2 and rep.excluded() == {"127.0.0.3"}
    clock.advance(99.9)
    assert lookups() == 2
    clock.advance(0.1)
    assert lookups() == 4
    rep.stop()
    clock.advance(1000)
    assert lookups() == 4
