"""Warm-up of new source addresses on a fake clock: the ramp, 10,000 simulated picks per point of the
schedule for both pool strategies, the stored state and the operator's restart and skip."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from twisted.internet import defer

from gateway import metrics
from gateway.config import ConfigError, load_config
from gateway.net.addresses import rendezvous
from gateway.net.ipstrategy import IPV4
from gateway.net.policy import NetworkPolicy
from gateway.net.warmup import DAY, share
from gateway.store.base import NotFound, ValidationError, iso_utc
from gateway.store.records import Routing

from dnsbl_fakes import MemoryStore  # tests/unit/dnsbl_fakes.py

WARM = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
NEW = "127.0.0.5"
T0 = 1_700_000_000.0
PICKS = 10000


def run(coroutine: Any) -> Any:
    out: list[Any] = []
    defer.Deferred.fromCoroutine(coroutine).addBoth(out.append)
    assert out, "did not finish"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


class Wall:
    """The fake wall clock warm-up reads."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def days(self, days: float) -> None:
        self.now = T0 + days * DAY


def warm_policy(strategy: str, store: MemoryStore, wall: Wall, days: int = 7, seed: int = 11) -> NetworkPolicy:
    config = load_config(None, {"network": {"local_addresses": WARM, "address_strategy": strategy,
                                            "warmup": {"days": days}}})
    return NetworkPolicy(config.network, store, clock=lambda: 0.0, rng=random.Random(seed),
                         bindable=lambda a: None, wall=wall)


def expected_share(days: float, warmup_days: int = 7) -> float:
    """The new address's expected part of the picks: its weight over the sum of the weights."""
    weight = share(T0, T0 + days * DAY, warmup_days)
    return weight / (len(WARM) + weight)


def tolerance(p: float) -> float:
    """Four standard deviations of a share measured over PICKS independent picks."""
    return 4 * math.sqrt(p * (1 - p) / PICKS)


def test_the_ramp_is_linear_from_one_over_days_to_one():
    assert share(None, T0, 7) == 1.0 and share(T0, T0, 0) == 1.0
    assert share(T0, T0, 7) == pytest.approx(1 / 7)
    assert share(T0, T0 + 3.5 * DAY, 7) == pytest.approx(1 / 7 + 6 / 7 / 2)
    assert share(T0, T0 + 7 * DAY, 7) == 1.0 and share(T0, T0 + 30 * DAY, 7) == 1.0
    assert share(T0, T0 - DAY, 7) == pytest.approx(1 / 7)  # a clock that stepped back: still the start


def test_days_is_checked_at_start_up():
    with pytest.raises(ConfigError, match="network.warmup.days"):
        load_config(None, {"network": {"warmup": {"days": 400}}})
    with pytest.raises(ConfigError, match="unknown config key network.warmup.hours"):
        load_config(None, {"network": {"warmup": {"hours": 4}}})


def add_new_address(strategy: str, store: MemoryStore, wall: Wall) -> NetworkPolicy:
    policy = warm_policy(strategy, store, wall)
    run(policy.settings())  # warm-up's first look: the pool it finds is warm
    assert store.docs["warmup"] == {"addresses": {a: None for a in WARM}, "gone": {}}
    run(policy.update({"localAddresses": [*WARM, NEW]}))
    assert store.docs["warmup"]["addresses"][NEW] == T0
    return policy


@pytest.mark.parametrize("days", [0, 1, 3.5, 6, 7, 9])
def test_random_strategy_shares_over_10000_picks_follow_the_schedule(days):
    store, wall = MemoryStore(), Wall()
    policy = add_new_address("random", store, wall)
    wall.days(days)
    settings = run(policy.settings())
    picks = [policy.source(settings, Routing.from_view({"account": "a"}), IPV4) for _ in range(PICKS)]
    want = expected_share(days)
    assert abs(picks.count(NEW) / PICKS - want) <= tolerance(want), (days, picks.count(NEW), want)
    for address in WARM:  # the warm addresses share the rest evenly
        assert abs(picks.count(address) / PICKS - (1 - want) / 3) <= tolerance((1 - want) / 3)


def test_static_strategy_gives_the_new_address_its_share_of_10000_accounts_and_moves_accounts_only_to_it():
    store, wall = MemoryStore(), Wall()
    policy = add_new_address("static", store, wall)
    accounts = [Routing(account=f"acct{i}") for i in range(PICKS)]
    before = {a.account: rendezvous(a.account, WARM) for a in accounts}
    for days in (0, 2, 4, 6, 7, 10):
        wall.days(days)
        settings = run(policy.settings())
        now = {a.account: policy.source(settings, a, IPV4) for a in accounts}
        want = expected_share(days)
        got = sum(1 for address in now.values() if address == NEW) / PICKS
        assert abs(got - want) <= tolerance(want), (days, got, want)
        for account, address in now.items():
            assert address in (before[account], NEW), (days, account, before[account], address)
            if before[account] == NEW:
                assert address == NEW, (days, account)  # once moved, it stays
        before = now
    assert policy.source(settings, Routing.from_view({"account": "acct1"}), IPV4) == rendezvous("acct1", [*WARM, NEW])  # warm: plain


def test_view_metrics_and_state_across_a_restart():
    store, wall = MemoryStore(), Wall()
    policy = add_new_address("random", store, wall)
    wall.days(3.5)
    view = policy.view(run(policy.settings()))
    assert view["config"]["warmup"] == {"days": 7}
    assert view["warmup"][NEW] == {"started": iso_utc(T0), "share": round(1 / 7 + 6 / 7 / 2, 4)}
    assert view["warmup"][WARM[0]] == {"started": None, "share": 1.0}
    run(policy.maintain())
    assert metrics.REGISTRY.get_sample_value("gateway_warmup_share", {"source": NEW}) == pytest.approx(
        1 / 7 + 6 / 7 / 2, abs=1e-4)
    restarted = warm_policy("random", store, wall)
    assert restarted.view(run(restarted.settings()))["warmup"][NEW]["started"] == iso_utc(T0)


def test_operator_restarts_and_skips_a_warm_up():
    store, wall = MemoryStore(), Wall()
    policy = add_new_address("random", store, wall)
    wall.days(8)
    assert policy.view(run(policy.settings()))["warmup"][NEW]["share"] == 1.0
    shown = run(policy.warmup_action({"address": NEW, "action": "restart"}))
    assert shown == {"address": NEW, "started": iso_utc(T0 + 8 * DAY), "share": round(1 / 7, 4)}
    assert store.docs["warmup"]["addresses"][NEW] == T0 + 8 * DAY
    settings = run(policy.settings())
    picks = [policy.source(settings, Routing.from_view({"account": "a"}), IPV4) for _ in range(PICKS)]
    assert abs(picks.count(NEW) / PICKS - expected_share(0)) <= tolerance(expected_share(0))
    assert run(policy.warmup_action({"address": WARM[1], "action": "skip"}))["share"] == 1.0
    assert run(policy.warmup_action({"address": NEW, "action": "skip"})) == {"address": NEW, "started": None,
                                                                             "share": 1.0}
    with pytest.raises(NotFound):
        run(policy.warmup_action({"address": "127.0.0.9", "action": "skip"}))
    for body in ({"address": NEW, "action": "later"}, {"address": "x", "action": "skip"}, {"address": NEW},
                 {"address": NEW, "action": "skip", "days": 3}, []):
        with pytest.raises(ValidationError):
            run(policy.warmup_action(body))


def test_an_address_out_of_the_pools_keeps_its_state_for_the_warm_up_length_then_starts_again():
    store, wall = MemoryStore(), Wall()
    policy = add_new_address("random", store, wall)
    wall.days(2)
    run(policy.update({"localAddresses": WARM}))  # NEW removed for a while
    assert store.docs["warmup"]["gone"] == {NEW: T0 + 2 * DAY}
    wall.days(3)
    run(policy.update({"localAddresses": [*WARM, NEW]}))  # back within 7 days: its ramp goes on
    assert store.docs["warmup"]["addresses"][NEW] == T0 and store.docs["warmup"]["gone"] == {}
    run(policy.update({"localAddresses": WARM}))
    wall.days(3 + 7)
    run(policy.maintain())  # 7 days in no pool: forgotten
    assert NEW not in store.docs["warmup"]["addresses"] and store.docs["warmup"]["gone"] == {}
    run(policy.update({"localAddresses": [*WARM, NEW]}))
    assert store.docs["warmup"]["addresses"][NEW] == T0 + 10 * DAY  # new again


def test_warm_up_off_changes_nothing():
    off = warm_policy("random", MemoryStore(), Wall(), days=0)
    run(off.update({"localAddresses": [*WARM, NEW]}))
    assert off.warmup.weights() == {} and off.view(run(off.settings()))["warmup"][NEW] == {"started": None,
                                                                                         "share": 1.0}
    with pytest.raises(ValidationError, match="warm-up is off"):
        run(off.warmup_action({"address": NEW, "action": "restart"}))
