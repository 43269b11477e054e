"""The SMTP EHLO name for a source address: configured, else its PTR name, else smtp.hostname.

PTR names come from `twisted.names.client` with a short timeout and are
cached for an hour (also when there is none). Loopback, link-local and unspecified addresses are never
looked up: their PTR names say nothing to a mail server.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine, Iterable, Mapping

import netaddr
from twisted.internet import defer
from twisted.logger import Logger

from gateway.net import addresses

log = Logger()

PTR_TIMEOUT = 2.0
CACHE_SECONDS = 3600.0
MAX_CACHE = 4096
# A coroutine function or one returning a Deferred: what defer.ensureDeferred accepts.
PtrLookup = Callable[[str], "Coroutine[Any, Any, str | None] | defer.Deferred[str | None]"]


def _plain_name(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return bool(name) and len(name) <= 253 and all(
        label and len(label) <= 63 and all(c.isalnum() or c == "-" for c in label) for label in labels)


def twisted_names_ptr(reactor: Any, timeout: float = PTR_TIMEOUT,
                      servers: list[tuple[str, int]] | None = None) -> PtrLookup:
    """A PTR lookup through twisted.names: ``servers``, else those of /etc/resolv.conf."""
    from twisted.names import client, dns

    if servers is not None:
        resolver = client.Resolver(servers=servers, reactor=reactor)
    else:
        resolver = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    seconds = (max(1, int(timeout)),)

    async def lookup(address: str) -> str | None:
        name = netaddr.IPAddress(address).reverse_dns.rstrip(".")
        answers, _authority, _additional = await resolver.lookupPointer(name, timeout=seconds)
        for record in answers:
            if record.type == dns.PTR:
                return str(record.payload.name)
        return None

    return lookup


class EhloNames:
    """EHLO name per source address: `network.ehlo_names`, else PTR, else the configured hostname.

    `name_for` answers at once (SMTP logins must not wait on DNS): from the map,
    from the PTR cache, else the hostname while a lookup starts in the
    background for the next connection. `warm()` looks up the pool addresses at
    start-up, so their PTR names are ready before the first SMTP login.
    """

    def __init__(self, reactor: Any, configured: Mapping[str, str], hostname: str,
                 ptr: PtrLookup | None = None, timeout: float = PTR_TIMEOUT) -> None:
        self._reactor = reactor
        self._configured = {addresses.normalize_address(k): v for k, v in configured.items()}
        self._hostname = hostname
        self._ptr = ptr
        self._timeout = timeout
        self._cache: dict[str, tuple[str, float]] = {}
        self._pending: dict[str, list[defer.Deferred[str]]] = {}

    def name_for(self, source: str | None) -> str:
        """The EHLO name to use now for a connection that left from ``source``."""
        address = self._address(source)
        if address is None:
            return self._hostname
        configured = self._configured.get(address)
        if configured:
            return configured
        if not self._worth_looking_up(address):
            return self._hostname
        cached = self._cache.get(address)
        if cached is not None and cached[1] > self._reactor.seconds():
            return cached[0]
        self.lookup(address)
        return self._hostname

    def warm(self, sources: Iterable[str]) -> defer.Deferred[list[str]]:
        """Start PTR lookups for ``sources`` (e.g. the configured pools); fires when all are done."""
        wanted = [a for a in map(self._address, sources)
                  if a is not None and a not in self._configured and self._worth_looking_up(a)]
        return defer.gatherResults([self.lookup(a) for a in dict.fromkeys(wanted)])

    def lookup(self, address: str) -> defer.Deferred[str]:
        """Look up (once at a time per address) and cache the PTR name of ``address``."""
        waiters = self._pending.get(address)
        result: defer.Deferred[str] = defer.Deferred()
        if waiters is not None:
            waiters.append(result)
            return result
        self._pending[address] = [result]

        def store(name: str) -> None:
            if len(self._cache) >= MAX_CACHE:
                self._cache.clear()
            self._cache[address] = (name, self._reactor.seconds() + CACHE_SECONDS)
            for waiter in self._pending.pop(address, []):
                waiter.callback(name)

        defer.Deferred.fromCoroutine(self._lookup(address)).addCallback(store)
        return result

    @staticmethod
    def _address(source: str | None) -> str | None:
        if not source:
            return None
        try:
            return addresses.normalize_address(source)
        except ValueError:
            return None

    @staticmethod
    def _worth_looking_up(address: str) -> bool:
        ip = netaddr.IPAddress(address)
        return not (ip.is_loopback() or ip.is_link_local() or int(ip) == 0)

    async def _lookup(self, address: str) -> str:
        if self._ptr is None:
            self._ptr = twisted_names_ptr(self._reactor, self._timeout)
        lookup: defer.Deferred[str | None] = defer.ensureDeferred(self._ptr(address))
        lookup.addTimeout(self._timeout, self._reactor)
        try:
            name = await lookup
        except Exception as e:  # no PTR, NXDOMAIN, timeout: all mean "use the hostname"
            log.debug("No PTR name for {address}: {error}", address=address, error=type(e).__name__)
            return self._hostname
        if not name or not _plain_name(name):
            return self._hostname
        return name.rstrip(".")
