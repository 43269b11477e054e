"""Abuse limits: failed logins slowed per address and per account, addresses locked out, connection caps.

An account is never locked (an attacker must not be able to lock its user
out), only slowed. Addresses in ``limits.exempt`` are never throttled or
capped. Everything is per gateway process and forgets itself: entries older
than the window are dropped, and the tables are bounded.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import netaddr
from twisted.logger import Logger

from gateway.config import LimitsConfig
from gateway.metrics import AUTH_DELAYED as DELAYED, AUTH_FAILURES as FAILURES, LOCKOUTS, REFUSED
from gateway.metrics import CLIENT_CONNECTIONS as OPEN

log = Logger()

__all__ = ["AuthLimiter", "ConnectionLimiter", "MAX_DELAY"]

MAX_DELAY = 5.0          # seconds: the longest a failed login's answer is held
FIRST_DELAY = 0.5        # the first delay past the threshold; each further failure doubles it
MAX_TRACKED = 50000      # addresses or accounts followed at once



class _Window:
    """Failure times per key within a sliding window, bounded in keys."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._times: dict[str, deque[float]] = {}

    def add(self, key: str, now: float) -> int:
        times = self._times.get(key)
        if times is None:
            if len(self._times) >= MAX_TRACKED:
                self._sweep(now)
            times = self._times[key] = deque()
        times.append(now)
        return self._count(times, now)

    def count(self, key: str, now: float) -> int:
        times = self._times.get(key)
        return self._count(times, now) if times else 0

    def clear(self, key: str) -> None:
        self._times.pop(key, None)

    def _count(self, times: deque[float], now: float) -> int:
        while times and times[0] <= now - self.window:
            times.popleft()
        return len(times)

    def _sweep(self, now: float) -> None:
        for key in [k for k, t in self._times.items() if not t or t[-1] <= now - self.window]:
            del self._times[key]
        if len(self._times) >= MAX_TRACKED:  # still full of live keys: forget the oldest half
            oldest = sorted(self._times, key=lambda k: self._times[k][-1])
            for key in oldest[: len(oldest) // 2]:
                del self._times[key]


class AuthLimiter:
    """Failed logins counted per client address and per account; delays and address lockouts."""

    def __init__(self, config: LimitsConfig, clock: Callable[[], float]) -> None:
        self._config = config
        self._clock = clock
        self._exempt = netaddr.IPSet(config.exempt)
        self._addresses = _Window(config.auth_window)
        self._accounts = _Window(config.auth_window)
        self._locked: dict[str, float] = {}

    def exempt(self, address: str) -> bool:
        if not address:
            return False
        try:
            return netaddr.IPAddress(address) in self._exempt
        except (netaddr.AddrFormatError, ValueError):
            return False

    def locked(self, address: str) -> bool:
        """Is ``address`` locked out now (every login gets the bad-token answer)?"""
        until = self._locked.get(address)
        if until is None:
            return False
        if until <= self._clock():
            del self._locked[address]
            return False
        return True

    def failed(self, address: str, account: str, protocol: str) -> float:
        """Count a failed login; returns how long to hold its answer (0 for none)."""
        FAILURES.labels(protocol).inc()
        if self.exempt(address):
            return 0.0
        now = self._clock()
        config = self._config
        by_address = self._addresses.add(address, now) if address else 0
        by_account = self._accounts.add(account, now) if account else 0
        if address and by_address > config.auth_lockout_after and not self.locked(address):
            if len(self._locked) >= MAX_TRACKED:
                self._locked = {a: u for a, u in self._locked.items() if u > now}
            self._locked[address] = now + config.auth_lockout
            LOCKOUTS.inc()
            log.warn("Login lockout: address {address} gets the bad-token answer for {seconds:.0f} s after "
                     "{count} failed logins in {window:.0f} s", address=address, seconds=config.auth_lockout,
                     count=by_address, window=config.auth_window)
        excess = max(by_address, by_account) - config.auth_failures
        if excess <= 0:
            return 0.0
        DELAYED.labels(protocol).inc()
        return min(MAX_DELAY, FIRST_DELAY * 2 ** (excess - 1))

    def succeeded(self, address: str) -> None:
        """A successful login clears its address's count (not the account's: others may be guessing it)."""
        if address:
            self._addresses.clear(address)


FD_HEADROOM = 200  # descriptors kept for the store, logs, listeners, the API and DNS


def open_files_cap(config: LimitsConfig) -> int:
    """Raise the soft open-files limit to the hard one; the connection cap the descriptors allow.

    A relayed session holds two descriptors (client and upstream). When the
    limit is below what ``limits.max_connections`` needs, the cap is lowered
    so that connections are refused with an answer before accept() or a
    connect() fails with EMFILE. Returns the cap to use (0 = none).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1048576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    wanted = config.max_connections
    need = 2 * wanted + FD_HEADROOM
    log.info("Open files limit {limit} (hard {hard})", limit=soft,
             hard="unlimited" if hard == resource.RLIM_INFINITY else hard)
    if wanted == 0 or soft >= need:
        return wanted
    cap = max(1, (soft - FD_HEADROOM) // 2)
    log.warn("Open files limit {limit} is below the {need} that limits.max_connections={wanted} needs "
             "(two per session plus {headroom}): connections past {cap} are refused. Raise it: systemd "
             "LimitNOFILE=, docker run --ulimit nofile=N:N, or ulimit -n.",
             limit=soft, need=need, wanted=wanted, headroom=FD_HEADROOM, cap=cap)
    return cap


class ConnectionLimiter:
    """Client connections open now, per address and in all, against limits.max_connections(_per_ip)."""

    def __init__(self, config: LimitsConfig, auth: AuthLimiter, max_connections: int | None = None) -> None:
        self._config = config
        self._auth = auth
        self._max = config.max_connections if max_connections is None else max_connections
        self._per_ip: dict[str, int] = {}
        self._total = 0

    def admit(self, address: str) -> bool:
        """Count a new connection in all; False (not counted) when limits.max_connections is reached."""
        if self._max and self._total >= self._max and \
                not self._auth.exempt(address):
            REFUSED.labels("total").inc()
            return False
        self._total += 1
        OPEN.set(self._total)
        return True

    def admit_address(self, address: str) -> bool:
        """Count it for its client address (known after a PROXY header); False (not counted) over the cap."""
        cap = self._config.max_connections_per_ip
        if cap and address and self._per_ip.get(address, 0) >= cap and not self._auth.exempt(address):
            REFUSED.labels("per_ip").inc()
            return False
        if address:
            self._per_ip[address] = self._per_ip.get(address, 0) + 1
        return True

    def release(self) -> None:
        self._total = max(0, self._total - 1)
        OPEN.set(self._total)

    def release_address(self, address: str) -> None:
        left = self._per_ip.get(address, 0) - 1
        if left > 0:
            self._per_ip[address] = left
        else:
            self._per_ip.pop(address, None)
