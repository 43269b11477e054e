"""Source-address reputation: DNSBL checks with twisted.names, on a schedule and on demand, and which
addresses are listed (so that `NetworkPolicy` leaves them out of SMTP selection).

A check is one A lookup of ``<address reversed>.<zone>`` (and, when listed,
one TXT lookup for the reason) within `reputation.timeout` seconds; NXDOMAIN
or no A record is clean; a timeout, SERVFAIL, REFUSED or an error code of the
zone is unknown, which never clears a listing. Lookups run through one
`DeferredSemaphore` of `reputation.concurrency`, and a run feeds it from at
most that many workers, so 500 addresses x 20 zones are 10,000 lookups of
which at most `concurrency` are in flight (and as many UDP sockets open).

An address stays listed in a zone from an answer that lists it until an
answer that does not; `excluded()` is every address listed anywhere (under
`reputation.policy: warn`, nothing). Results and listings are kept in the
store (settings document `reputation`), so a restart keeps them; zones set
through the API are the settings document `reputation-zones` (none stored:
gateway.yaml's).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Iterable, Sequence

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dns_error

from gateway.config import ReputationConfig
from gateway.metrics import REPUTATION_CHECKS, REPUTATION_EXCLUDED, REPUTATION_LISTED
from gateway.net.dnsbl import Zone, parse_nameservers, parse_zones, query_name, verdict
from gateway.store.base import iso_utc

log = Logger()

SETTINGS_ZONES = "reputation-zones"
SETTINGS_RESULTS = "reputation"
MAX_ADDRESSES = 10000      # addresses in one run (the rest wait for the pools to shrink; logged)
MAX_REASON = 500           # characters of TXT text kept


@dataclass(frozen=True)
class Result:
    """One address in one zone: listed True/False, or None (unknown) with the reason in ``reason``."""

    address: str
    zone: str
    listed: bool | None
    code: str | None
    reason: str | None
    checked: float  # POSIX time

    def document(self) -> dict[str, Any]:
        """The JSON form of `GET /v1/reputation`."""
        return {"address": self.address, "zone": self.zone, "listed": self.listed, "code": self.code,
                "reason": self.reason, "checked": iso_utc(self.checked)}

    def stored(self) -> list[Any]:
        return [self.address, self.zone, self.listed, self.code, self.reason, self.checked]

    @classmethod
    def from_stored(cls, row: Sequence[Any]) -> "Result":
        address, zone, listed, code, reason, checked = row
        return cls(str(address), str(zone), listed, code, reason, float(checked))

    @property
    def outcome(self) -> str:
        return {True: "listed", False: "clean", None: "unknown"}[self.listed]


def make_resolver(reactor: Any, servers: Sequence[tuple[str, int]]) -> Any:
    """A twisted.names resolver asking ``servers``, else the system's (/etc/resolv.conf)."""
    from twisted.names import client

    if servers:
        return client.Resolver(servers=list(servers), reactor=reactor)
    return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)


def _why_unknown(error: BaseException, timeout: float) -> str:
    if isinstance(error, (defer.TimeoutError, dns_error.DNSQueryTimeoutError, defer.CancelledError)):
        return f"no answer within {timeout:g} s"
    if isinstance(error, dns_error.DNSServerError):
        return "the name server answered SERVFAIL"
    if isinstance(error, dns_error.DNSQueryRefusedError):
        return "the name server answered REFUSED"
    if isinstance(error, dns_error.DomainError):
        return f"the name server answered {type(error).__name__}"
    return f"lookup failed: {type(error).__name__}: {str(error)[:200]}"


class Reputation:
    """DNSBL results per (source address, zone); runs checks; says which addresses are excluded."""

    def __init__(self, reactor: Any, config: ReputationConfig, store: Any,
                 sources: Callable[[], Awaitable[list[str]]], *, resolver: Any = None,
                 wall: Callable[[], float] | None = None) -> None:
        self._reactor = reactor
        self.config = config
        self.policy = config.policy
        self._config_zones = parse_zones(list(config.zones))
        self._servers = parse_nameservers(config.nameservers)
        self._resolver = resolver
        self._store = store
        self._sources = sources
        self._wall = wall or reactor.seconds
        self._semaphore = defer.DeferredSemaphore(config.concurrency)
        self._results: dict[tuple[str, str], Result] = {}
        self._listed: dict[str, set[str]] = {}  # address -> zones whose last definite answer listed it
        self._memory_zones: tuple[Zone, ...] | None = None  # stored zones when there is no store
        self._zone_labels: set[str] = set()
        self._loop: task.LoopingCall | None = None
        self._stopped = False
        self._background: set[defer.Deferred[Any]] = set()
        self.version = 0  # changes whenever the set of listed addresses changes

    # What the address picker asks ------------------------------------------------

    def listed(self) -> frozenset[str]:
        """Addresses listed in at least one zone."""
        return frozenset(self._listed)

    def excluded(self) -> frozenset[str]:
        """Addresses SMTP must not use: the listed ones under policy exclude, none under warn."""
        return self.listed() if self.policy == "exclude" else frozenset()

    def results(self) -> list[Result]:
        return [self._results[key] for key in sorted(self._results)]

    # Zones ------------------------------------------------------------------------

    async def zones(self) -> tuple[Zone, ...]:
        """The zones in use: the stored ones (API), else gateway.yaml's."""
        if self._store is None:
            stored = self._memory_zones
        else:
            doc = await self._store.get_settings(SETTINGS_ZONES)
            stored = None if not doc or doc.get("zones") is None else parse_zones(doc["zones"])
        return self._config_zones if stored is None else stored

    async def set_zones(self, zones: tuple[Zone, ...] | None, how: str) -> tuple[Zone, ...]:
        """Replace the zones (None: back to gateway.yaml's); results of removed zones are dropped, new
        zones are checked for every address in the background."""
        before = {zone.host for zone in await self.zones()}
        if self._store is None:
            self._memory_zones = zones
        else:
            await self._store.put_settings(
                SETTINGS_ZONES, {"zones": None if zones is None else [z.document() for z in zones]})
        now = await self.zones()
        hosts = {zone.host for zone in now}
        log.info("DNSBL zones changed ({how}): {count} zones: {zones}", event="reputation.zones", how=how,
                 count=len(now), zones=",".join(sorted(hosts)) or "-")
        self._forget(keep_zone=lambda zone: zone in hosts)
        await self._save(hosts)
        added = [zone for zone in now if zone.host not in before]
        if added:
            self._in_background(self._run_sources(added, "zones"))
        return now

    # Checks -----------------------------------------------------------------------

    async def check(self, address: str | None = None, zone: str | None = None,
                    trigger: str = "api") -> list[Result]:
        """Check ``address`` (None: every source address) in ``zone`` (None: every zone) now."""
        zones = [z for z in await self.zones() if zone is None or z.host == zone]
        if address is not None:
            return await self._run([address], zones, trigger)
        return await self._run_sources(zones, trigger)

    async def _run_sources(self, zones: Sequence[Zone], trigger: str) -> list[Result]:
        sources = list(dict.fromkeys(await self._sources()))
        known = set(sources)
        self._forget(keep_address=lambda address: address in known)
        return await self._run(sources, zones, trigger)

    async def _run(self, addresses: Sequence[str], zones: Sequence[Zone], trigger: str) -> list[Result]:
        if len(addresses) > MAX_ADDRESSES:
            log.warn("{count} source addresses: checking the first {most} only", event="reputation.check",
                     count=len(addresses), most=MAX_ADDRESSES)
            addresses = addresses[:MAX_ADDRESSES]
        total = len(addresses) * len(zones)
        if total == 0:
            return []
        started = self._reactor.seconds()
        work = itertools.product(addresses, zones)  # shared: each pair is taken by exactly one worker
        results: list[Result] = []

        async def worker() -> None:
            for address, zone in work:
                results.append(await self._check_one(address, zone))

        workers = min(self.config.concurrency, total)
        await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(workers)],
                                  consumeErrors=True)
        await self._save({zone.host for zone in await self.zones()})
        counts = {kind: sum(1 for r in results if r.outcome == kind) for kind in ("listed", "clean", "unknown")}
        log.info("DNSBL check ({trigger}): {addresses} addresses x {zones} zones: {listed} listed, {clean} clean, "
                 "{unknown} unknown in {seconds:.1f} s; {excluded} addresses {what}", event="reputation.check",
                 trigger=trigger, addresses=len(addresses), zones=len(zones), seconds=self._reactor.seconds() - started,
                 excluded=len(self._listed),
                 what="excluded from SMTP" if self.policy == "exclude" else "listed (policy warn: still used)",
                 **counts)
        return sorted(results, key=lambda r: (r.address, r.zone))

    async def _check_one(self, address: str, zone: Zone) -> Result:
        async with self._semaphore:
            try:
                result = await self._lookup(address, zone)
            except Exception as e:  # a bug must not stop the run: unknown, never clean
                result = Result(address, zone.host, None, None, _why_unknown(e, self.config.timeout), self._wall())
        self._note(result)
        return result

    async def _lookup(self, address: str, zone: Zone) -> Result:
        name = query_name(address, zone.host)
        deadline = self._reactor.seconds() + self.config.timeout
        try:
            answers = await self._query("lookupAddress", name, deadline)
        except dns_error.DNSNameError:
            return Result(address, zone.host, False, None, None, self._wall())
        except Exception as e:
            return Result(address, zone.host, None, None, _why_unknown(e, self.config.timeout), self._wall())
        found = verdict([record.payload.dottedQuad() for record in answers if record.type == dns.A])
        reason = found.why
        if found.listed:
            try:
                texts = await self._query("lookupText", name, deadline)
                reason = "; ".join(b"".join(record.payload.data).decode("utf-8", "replace")
                                   for record in texts if record.type == dns.TXT)[:MAX_REASON] or None
            except Exception:
                reason = None  # still listed: the TXT record is only the zone's explanation
        return Result(address, zone.host, found.listed, found.code, reason, self._wall())

    async def _query(self, method: str, name: str, deadline: float) -> list[Any]:
        """The answer records of one lookup, failing with TimeoutError at ``deadline``."""
        if self._resolver is None:
            self._resolver = make_resolver(self._reactor, self._servers)
        remaining = deadline - self._reactor.seconds()
        if remaining <= 0:
            raise defer.TimeoutError(name)
        servers = len(getattr(self._resolver, "servers", []) or []) + len(getattr(self._resolver, "dynServers", []) or [])
        lookup: defer.Deferred[Any] = getattr(self._resolver, method)(name, timeout=(remaining / max(servers, 1),))
        lookup.addTimeout(remaining, self._reactor)
        answers, _authority, _additional = await lookup
        return list(answers)

    # State --------------------------------------------------------------------------

    def _note(self, result: Result) -> None:
        REPUTATION_CHECKS.labels(result.outcome).inc()
        self._results[(result.address, result.zone)] = result
        version = self.version
        zones = self._listed.setdefault(result.address, set())
        if result.listed is True and result.zone not in zones:
            zones.add(result.zone)
            self.version += 1
            log.warn("Source address {address} is listed in {zone} ({code}{why}): {action}",
                     event="reputation.listed", address=result.address, zone=result.zone, code=result.code,
                     why=f": {result.reason}" if result.reason else "", policy=self.policy,
                     action="left out of SMTP until a check is clean" if self.policy == "exclude"
                     else "still used for SMTP (reputation.policy: warn)")
        elif result.listed is False and result.zone in zones:
            zones.discard(result.zone)
            self.version += 1
            log.info("Source address {address} is no longer listed in {zone}: {action}",
                     event="reputation.delisted", address=result.address, zone=result.zone,
                     listed_in=len(zones),
                     action=f"still listed in {len(zones)} zones" if zones else "back in SMTP selection")
        elif result.listed is None:
            log.debug("DNSBL lookup of {address} in {zone} unknown: {reason}", address=result.address,
                      zone=result.zone, reason=result.reason)
        if not zones:
            del self._listed[result.address]
        if self.version != version:
            self._publish()

    def _forget(self, keep_address: Callable[[str], bool] = lambda a: True,
                keep_zone: Callable[[str], bool] = lambda z: True) -> None:
        """Drop results and listings of addresses no longer in use or zones no longer configured."""
        self._results = {key: r for key, r in self._results.items() if keep_address(key[0]) and keep_zone(key[1])}
        listed: dict[str, set[str]] = {}
        for address, zones in self._listed.items():
            kept = {zone for zone in zones if keep_zone(zone)}
            if kept and keep_address(address):
                listed[address] = kept
        if listed != self._listed:
            self.version += 1
        self._listed = listed
        self._publish()

    def _publish(self, zones: Iterable[str] | None = None) -> None:
        """gateway_reputation_listed{zone} and gateway_reputation_excluded from the listings."""
        per_zone: dict[str, int] = {zone: 0 for zone in (zones if zones is not None else self._zone_labels)}
        for listed_in in self._listed.values():
            for zone in listed_in:
                per_zone[zone] = per_zone.get(zone, 0) + 1
        for zone, count in per_zone.items():
            REPUTATION_LISTED.labels(zone).set(count)
        for zone in self._zone_labels - set(per_zone):
            try:
                REPUTATION_LISTED.remove(zone)
            except KeyError:
                pass
        self._zone_labels = set(per_zone)
        REPUTATION_EXCLUDED.set(len(self.excluded()))

    async def _save(self, zones: set[str]) -> None:
        self._publish(zones)
        if self._store is None:
            return
        await self._store.put_settings(SETTINGS_RESULTS, {
            "results": [r.stored() for r in self.results()],
            "listed": {address: sorted(zones) for address, zones in sorted(self._listed.items())},
        })

    async def load(self) -> None:
        """Results and listings of the last run (kept across restarts), for the zones in use."""
        zones = {zone.host for zone in await self.zones()}
        doc = await self._store.get_settings(SETTINGS_RESULTS) if self._store is not None else None
        if doc:
            for row in doc.get("results") or []:
                result = Result.from_stored(row)
                self._results[(result.address, result.zone)] = result
            self._listed = {address: set(listed) for address, listed in (doc.get("listed") or {}).items()
                            if listed}
        self._forget(keep_zone=lambda zone: zone in zones)
        self._publish(zones)
        if self._listed:
            log.info("DNSBL listings from the last checks: {addresses}", event="reputation.loaded",
                     addresses=", ".join(f"{a} ({','.join(sorted(z))})" for a, z in sorted(self._listed.items())))

    # Schedule -------------------------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """Load the stored results, then check every address now and every `reputation.interval` s."""
        loaded = defer.Deferred.fromCoroutine(self.load())
        loaded.addErrback(lambda failure: log.failure("Cannot load DNSBL results", failure))
        loaded.addCallback(lambda _: self._start_loop())
        return loaded

    def _start_loop(self) -> None:
        if self._stopped:
            return
        self._loop = task.LoopingCall(lambda: defer.Deferred.fromCoroutine(self._scheduled()))
        self._loop.clock = self._reactor
        self._loop.start(self.config.interval, now=True).addErrback(
            lambda failure: log.failure("DNSBL schedule stopped", failure))

    async def _scheduled(self) -> None:
        try:
            await self.check(trigger="schedule")
        except Exception:  # the store or a bug: try again at the next interval
            log.failure("Scheduled DNSBL check failed")

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        running: defer.Deferred[Any] = defer.Deferred.fromCoroutine(work)
        self._background.add(running)
        running.addErrback(lambda failure: log.failure("DNSBL check failed", failure))
        running.addBoth(lambda _: self._background.discard(running))

    def stop(self) -> None:
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
