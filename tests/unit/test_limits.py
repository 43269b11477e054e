"""Abuse limits on a fake clock: failure delays per address and per account, lockouts, caps."""

from __future__ import annotations

from gateway.config import LimitsConfig
from gateway.limits import MAX_DELAY, AuthLimiter, ConnectionLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(**settings) -> tuple[AuthLimiter, Clock]:
    clock = Clock()
    base = {"auth_failures": 3, "auth_window": 60.0, "auth_lockout_after": 8, "auth_lockout": 30.0}
    return AuthLimiter(LimitsConfig(**{**base, **settings}), clock), clock


def test_delays_start_past_the_threshold_grow_and_are_capped():
    auth, _ = limiter()
    delays = [auth.failed("192.0.2.1", f"acct{i}", "imap") for i in range(8)]
    assert delays == [0, 0, 0, 0.5, 1.0, 2.0, 4.0, MAX_DELAY]


def test_failures_for_one_account_from_many_addresses_slow_it_but_never_lock_anyone_out():
    """Guessing one account from 20 addresses: its failures are delayed; no address is locked."""
    auth, _ = limiter()
    delays = [auth.failed(f"198.51.100.{i}", "victim", "imap") for i in range(20)]
    assert delays[:3] == [0, 0, 0] and delays[3] == 0.5 and delays[-1] == MAX_DELAY
    assert not any(auth.locked(f"198.51.100.{i}") for i in range(20))


def test_an_address_is_locked_out_past_lockout_after_and_released_later():
    auth, clock = limiter()
    for i in range(9):
        auth.failed("192.0.2.1", f"a{i}", "smtp")
    assert auth.locked("192.0.2.1") and not auth.locked("192.0.2.2")
    clock.now += 29
    assert auth.locked("192.0.2.1")
    clock.now += 2
    assert not auth.locked("192.0.2.1")


def test_a_success_clears_the_address_and_old_failures_leave_the_window():
    auth, clock = limiter()
    for i in range(3):
        auth.failed("192.0.2.1", f"a{i}", "imap")
    auth.succeeded("192.0.2.1")
    assert auth.failed("192.0.2.1", "b", "imap") == 0
    for i in range(3):
        auth.failed("192.0.2.7", f"c{i}", "imap")
    clock.now += 61
    assert auth.failed("192.0.2.7", "d", "imap") == 0


def test_exempt_addresses_are_never_throttled_or_capped():
    auth, _ = limiter(exempt=("10.0.0.0/8",), max_connections_per_ip=1)
    assert all(auth.failed("10.1.2.3", "x", "imap") == 0 for _ in range(20))
    assert not auth.locked("10.1.2.3")
    conns = ConnectionLimiter(LimitsConfig(exempt=("10.0.0.0/8",), max_connections_per_ip=1), auth)
    assert all(conns.admit_address("10.1.2.3") for _ in range(5))


def test_connection_caps_per_address_and_in_all():
    auth, _ = limiter()
    conns = ConnectionLimiter(LimitsConfig(max_connections_per_ip=2, max_connections=3), auth)
    assert conns.admit("a") and conns.admit_address("192.0.2.1")
    assert conns.admit("b") and conns.admit_address("192.0.2.1")
    assert conns.admit("c") and not conns.admit_address("192.0.2.1")  # per address: 2
    assert conns.admit_address("192.0.2.2")
    assert not conns.admit("d")                                       # in all: 3
    conns.release()
    conns.release_address("192.0.2.1")
    assert conns.admit("e") and conns.admit_address("192.0.2.1")
