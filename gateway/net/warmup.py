"""Warm-up of new source addresses: a growing share of new connections over `network.warmup.days`.

Providers rate-limit mail from an address they have never seen. An address
that appears in a pool (default, domain or account pool) while warm-up is on
starts at 1/days of the weight of a warm address in the address picker and
grows linearly to the full weight over `days` days:

    share(t) = 1/days + (1 - 1/days) * t / (days * 86400)     (then 1)

The picker uses the weights for both strategies that use a pool: `random`
draws with these weights, `static` uses weighted rendezvous hashing (an
account goes to the address with the highest ``weight / -ln(hash)``), so an
address holds about ``weight / sum(weights)`` of the accounts, and while it
warms up accounts only ever move to it, never between the others.

When warm-up is first turned on, the addresses already in the pools are taken
as warm. An address removed from every pool keeps its state for `days` days
(a pool edited for an hour does not cost its addresses their reputation);
added again after that, it warms up again. The state lives in the store
(settings document `warmup`), so
a restart does not restart the ramp; the operator can restart or skip the
warm-up of one address (`POST /v1/settings/network/warmup`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from twisted.logger import Logger

from gateway.metrics import WARMUP_SHARE
from gateway.store.base import NotFound, ValidationError, iso_utc

log = Logger()

DAY = 86400.0
SETTINGS_NAME = "warmup"
ACTIONS = ("restart", "skip")


def share(started: float | None, now: float, days: int) -> float:
    """The weight of an address whose warm-up started at ``started`` (None: warm), from 1/days to 1."""
    if days <= 0 or started is None:
        return 1.0
    elapsed = max(0.0, now - started)
    if elapsed >= days * DAY:
        return 1.0
    first = 1.0 / days
    return first + (1.0 - first) * elapsed / (days * DAY)


class Warmup:
    """Which pool addresses are warming up and since when; their weights for the address picker."""

    def __init__(self, days: int, store: Any, wall: Callable[[], float]) -> None:
        self.days = days
        self._store = store
        self._wall = wall
        self._started: dict[str, float | None] = {}
        self._gone: dict[str, float] = {}  # address in no pool -> since when
        self._warming: dict[str, float] = {}  # the addresses of _started still on their ramp
        self._memory: dict[str, Any] | None = None  # the document, when there is no store
        self._published: set[str] = set()

    # The picker's view ---------------------------------------------------------

    def weights(self) -> dict[str, float]:
        """The weight of every address still warming up; every other address weighs 1."""
        if self.days <= 0 or not self._warming:
            return {}
        now = self._wall()
        weights = {}
        for address, started in self._warming.items():  # only those not yet warm: few, not the pool
            weight = share(started, now, self.days)
            if weight < 1.0:
                weights[address] = weight
        return weights

    def state(self, address: str) -> dict[str, Any]:
        """`{started, share}` of one address (started null: warm, or warm-up off)."""
        started = self._started.get(address) if self.days > 0 else None
        return {"started": iso_utc(started) if started is not None else None,
                "share": round(share(started, self._wall(), self.days), 4)}

    def view(self, addresses: Iterable[str]) -> dict[str, dict[str, Any]]:
        """GET /v1/settings/network `warmup`: `{address: {started, share}}` for every pool address."""
        return {address: self.state(address) for address in addresses}

    # Keeping up with the pools ---------------------------------------------------

    async def _load(self) -> dict[str, Any] | None:
        if self._store is None:
            return self._memory
        doc: dict[str, Any] | None = await self._store.get_settings(SETTINGS_NAME)
        return doc

    async def _save(self, started: Mapping[str, float | None], gone: Mapping[str, float]) -> None:
        doc = {"addresses": dict(sorted(started.items())), "gone": dict(sorted(gone.items()))}
        if self._store is None:
            self._memory = doc
        else:
            await self._store.put_settings(SETTINGS_NAME, doc)

    async def refresh(self, addresses: Iterable[str]) -> None:
        """Read the stored state; start the warm-up of addresses new to the pools; forget those in no pool
        for `days` days."""
        pool = list(dict.fromkeys(addresses))
        if self.days > 0:
            doc = await self._load()
            started: dict[str, float | None] = dict((doc or {}).get("addresses") or {})
            gone: dict[str, float] = dict((doc or {}).get("gone") or {})
            now, changed = self._wall(), False
            for address in pool:
                if gone.pop(address, None) is not None:
                    changed = True
                if address not in started:
                    started[address] = None if doc is None else now  # first time on: what is there is warm
                    changed = True
                    if doc is not None:
                        log.info("Source address {address} is new: it warms up over {days} days, from "
                                 "{first:.0%} of its fair share of new connections", event="warmup.start",
                                 address=address, days=self.days, first=1.0 / self.days, why="new")
            in_pool = set(pool)
            for address in [a for a in started if a not in in_pool]:
                if address not in gone:
                    gone[address] = now
                    changed = True
                elif now - gone[address] >= self.days * DAY:
                    del started[address], gone[address]
                    changed = True
            if changed:
                await self._save(started, gone)
            self._keep(started, gone)
        self._publish(pool)

    def _keep(self, started: dict[str, float | None], gone: dict[str, float]) -> None:
        now = self._wall()
        self._started, self._gone = started, gone
        self._warming = {address: since for address, since in started.items()
                         if since is not None and share(since, now, self.days) < 1.0}

    def _publish(self, pool: list[str]) -> None:
        """gateway_warmup_share{source} for every pool address; gone addresses lose their series."""
        for address in pool:
            WARMUP_SHARE.labels(address).set(self.state(address)["share"])
        for address in self._published - set(pool):
            try:
                WARMUP_SHARE.remove(address)
            except KeyError:
                pass
        self._published = set(pool)

    async def act(self, address: str, action: str, pool: Iterable[str]) -> dict[str, Any]:
        """An operator's `restart` (the ramp starts again now) or `skip` (warm at once) for ``address``."""
        if action not in ACTIONS:
            raise ValidationError(f"action must be one of {', '.join(ACTIONS)}")
        pool = list(pool)
        if address not in pool:
            raise NotFound(f"{address} is not in any source-address pool")
        if self.days <= 0:
            raise ValidationError("warm-up is off (network.warmup.days is 0 in gateway.yaml)")
        await self.refresh(pool)
        started = dict(self._started)
        started[address] = self._wall() if action == "restart" else None
        await self._save(started, self._gone)
        self._keep(started, self._gone)
        self._publish(pool)
        if action == "restart":
            log.info("Warm-up of source address {address} restarted by the operator: {days} days from "
                     "{first:.0%} of its fair share", event="warmup.start", address=address, days=self.days,
                     first=1.0 / self.days, why="restart")
        else:
            log.info("Warm-up of source address {address} skipped by the operator: full share now",
                     event="warmup.skip", address=address)
        return {"address": address, **self.state(address)}
