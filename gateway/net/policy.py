"""Which source address and which proxy an account's connections use.

Address pools come in three levels, the most specific winning (SpamExperts
style): a pool for the account, a pool for the account's e-mail domain, the
default pool. gateway.yaml gives the default pool (`network.local_addresses`)
and domain pools (`network.domain_pools`); the admin API
(`GET/PUT /v1/settings/network`) stores overrides: the strategy, the default
pool, domain pools and account pools. An account's own `localAddress` beats
every pool. The stored settings are cached for a few seconds, so a change made
by the CLI or another node shows up without a restart.

Two things narrow a pool: warm-up (`gateway.net.warmup`) weighs addresses new
to the pools down in both the random and the static pick, and reputation
(`gateway.net.reputation`): an address listed on a DNSBL is left out of SMTP
connections under `reputation.policy: exclude`. When that leaves no address of
the family in the account's pool, SMTP falls back to the default pool, then to
the operating system's choice, with a `reputation.fallback` log line (once per
pool until the listings change). IMAP keeps using listed addresses.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from twisted.logger import Logger

from gateway.config import NetworkConfig
from gateway.net import addresses
from gateway.net.ipstrategy import IPV4, IPV6
from gateway.net.noproxy import NoProxy
from gateway.net.proxy import ProxySpec
from gateway.net.warmup import Warmup
from gateway.store.base import ValidationError
from gateway.store.records import Routing
from gateway.store.validation import validate_account_id

log = Logger()

SETTINGS_NAME = "network"
SETTINGS_TTL = 5.0
_EDITABLE = ("addressStrategy", "localAddresses", "domainPools", "accountPools")
_READ_ONLY = ("ipStrategy", "proxy", "noProxy", "effective")
MAX_POOLS = 10000
MAX_FALLBACK_NOTES = 1024


@dataclass(frozen=True)
class Settings:
    """The stored overrides (None: use gateway.yaml's value)."""

    address_strategy: str | None = None
    local_addresses: tuple[str, ...] | None = None
    domain_pools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    account_pools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        """The JSON form kept in the store and shown by the API."""
        return {
            "addressStrategy": self.address_strategy,
            "localAddresses": list(self.local_addresses) if self.local_addresses is not None else None,
            "domainPools": {k: list(v) for k, v in sorted(self.domain_pools.items())},
            "accountPools": {k: list(v) for k, v in sorted(self.account_pools.items())},
        }

    @classmethod
    def from_document(cls, doc: Mapping[str, Any] | None) -> "Settings":
        """Rebuild from the store (trusted: it was validated when written)."""
        doc = doc or {}
        local = doc.get("localAddresses")
        return cls(
            address_strategy=doc.get("addressStrategy"),
            local_addresses=tuple(local) if local is not None else None,
            domain_pools={k: tuple(v) for k, v in (doc.get("domainPools") or {}).items()},
            account_pools={k: tuple(v) for k, v in (doc.get("accountPools") or {}).items()},
        )


def _pool(value: Any, key: str, bindable: Callable[[str], str | None]) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValidationError(f"{key} must be a list of IP addresses")
    try:
        pool = addresses.normalize_pool(value)
    except ValueError as e:
        raise ValidationError(f"{key}: {e}") from None
    for address in pool:
        reason = bindable(address)
        if reason is not None:
            raise ValidationError(f"{key}: {address} is not configured on this machine ({reason})")
    return pool


def _pools(value: Any, key: str, check_key: Callable[[str], str],
           bindable: Callable[[str], str | None]) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict):
        raise ValidationError(f"{key} must be an object of lists of IP addresses")
    if len(value) > MAX_POOLS:
        raise ValidationError(f"{key} has more than {MAX_POOLS} entries")
    return {check_key(name): _pool(pool, f"{key}.{name}", bindable) for name, pool in value.items()}


def _domain(name: str) -> str:
    text = name.strip().lower().rstrip(".")
    if not text or "@" in text or "." not in text or any(c.isspace() for c in text) or len(text) > 253:
        raise ValidationError(f"domainPools: {name!r} is not an e-mail domain")
    return text


def validate_settings(body: Any, current: Settings,
                      bindable: Callable[[str], str | None] = addresses.bindable) -> Settings:
    """Apply a PUT body to the current overrides: given keys replace, null resets to gateway.yaml."""
    if not isinstance(body, dict):
        raise ValidationError("body must be an object")
    for key in body:
        if key in _READ_ONLY:
            raise ValidationError(f"{key} is read-only here: set network.* in gateway.yaml")
        if key not in _EDITABLE:
            raise ValidationError(f"unknown field {key} (editable: {', '.join(_EDITABLE)})")
    strategy, local = current.address_strategy, current.local_addresses
    domains, accounts = dict(current.domain_pools), dict(current.account_pools)
    if "addressStrategy" in body:
        strategy = body["addressStrategy"]
        if strategy is not None and strategy not in addresses.STRATEGIES:
            raise ValidationError("addressStrategy must be one of " + ", ".join(addresses.STRATEGIES)
                                  + " (or null for gateway.yaml's)")
    if "localAddresses" in body:
        local = None if body["localAddresses"] is None else _pool(
            body["localAddresses"], "localAddresses", bindable)
    if "domainPools" in body:
        domains = {} if body["domainPools"] is None else _pools(
            body["domainPools"], "domainPools", _domain, bindable)
    if "accountPools" in body:
        accounts = {} if body["accountPools"] is None else _pools(
            body["accountPools"], "accountPools",
            lambda name: validate_account_id(name, "accountPools key"), bindable)
    return Settings(strategy, local, domains, accounts)


def configured_addresses(network: NetworkConfig) -> dict[str, str]:
    """{address: config key} for every source address gateway.yaml names."""
    found: dict[str, str] = {}
    for address in addresses.normalize_pool(network.local_addresses):
        found.setdefault(address, "network.local_addresses")
    for domain, pool in network.domain_pools.items():
        for address in addresses.normalize_pool([pool] if isinstance(pool, str) else pool):
            found.setdefault(address, f"network.domain_pools.{domain}")
    return found


def check_configured(network: NetworkConfig,
                     bindable: Callable[[str], str | None] = addresses.bindable) -> None:
    """Refuse to start when a configured source address is not on this machine."""
    from gateway.config import ConfigError

    for address, key in configured_addresses(network).items():
        reason = bindable(address)
        if reason is not None:
            raise ConfigError(f"config key {key}: {address} is not configured on this machine "
                              f"(cannot bind to it: {reason})")


@dataclass(frozen=True)
class Plan:
    """One connection's choices: a source per family (None: the OS picks) and the proxy."""

    sources: Mapping[int, str | None]
    proxy: ProxySpec | None


def email_domain(account: Routing) -> str:
    email = account.email
    return email.rsplit("@", 1)[1].strip().lower().rstrip(".") if "@" in email else ""


class NetworkPolicy:
    """Source addresses and proxies for accounts, from gateway.yaml plus stored settings."""

    def __init__(self, network: NetworkConfig, store: Any = None, *,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 bindable: Callable[[str], str | None] = addresses.bindable,
                 wall: Callable[[], float] = time.time) -> None:
        self.network = network
        self._store = store
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self._bindable = bindable
        self._default_pool = addresses.normalize_pool(network.local_addresses)
        self._domain_pools = {
            domain.strip().lower().rstrip("."): addresses.normalize_pool(
                [pool] if isinstance(pool, str) else pool)
            for domain, pool in network.domain_pools.items()
        }
        self.proxy = ProxySpec.parse(network.proxy) if network.proxy else None
        self.no_proxy = NoProxy.parse(network.no_proxy)
        self._settings = Settings()
        self._loaded_at: float | None = None
        self.warmup = Warmup(network.warmup.days, store, wall)
        self.reputation: Any = None  # gateway.net.reputation.Reputation, set by the service
        self._fallbacks: set[tuple[Any, ...]] = set()
        self._fallbacks_version = 0

    # Stored settings -------------------------------------------------------

    async def settings(self) -> Settings:
        """The stored overrides, re-read from the store at most every SETTINGS_TTL seconds (and the
        warm-up state, which notices addresses new to the pools)."""
        now = self._clock()
        if self._loaded_at is None or now - self._loaded_at >= SETTINGS_TTL:
            self._loaded_at = now
            try:
                if self._store is not None:
                    self._settings = Settings.from_document(await self._store.get_settings(SETTINGS_NAME))
                await self.warmup.refresh(self.pool_addresses(self._settings))
            except Exception as e:  # keep serving with what we had
                log.warn("Cannot read network settings from the store: {error}", error=str(e))
        return self._settings

    def settings_changed(self) -> None:
        """Another gateway stored new settings (the store's event): read them at the next use."""
        self._loaded_at = None

    async def maintain(self) -> None:
        """Re-read the settings now: new pool addresses start warming up and the warm-up metrics move
        even when no connection asks (the service calls this every minute)."""
        self._loaded_at = None
        await self.settings()

    async def update(self, body: Any) -> dict[str, Any]:
        """PUT /v1/settings/network: validate, store, use at once; returns the new view."""
        current = Settings.from_document(await self._store.get_settings(SETTINGS_NAME))
        new = validate_settings(body, current, self._bindable)
        await self.warmup.refresh(self.pool_addresses(current))  # what was there before is not new
        await self._store.put_settings(SETTINGS_NAME, new.document())
        self._settings, self._loaded_at = new, self._clock()
        await self.warmup.refresh(self.pool_addresses(new))
        log.info("Network settings changed: strategy={strategy} default pool={pool} "
                 "{domains} domain pools, {accounts} account pools",
                 strategy=self.strategy(new), pool=",".join(self.default_pool(new)) or "-",
                 domains=len(new.domain_pools), accounts=len(new.account_pools))
        return self.view(new)

    def view(self, settings: Settings) -> dict[str, Any]:
        """GET /v1/settings/network: the stored overrides, gateway.yaml's values, the effective ones."""
        net = self.network
        return {
            **settings.document(),
            "effective": {
                "addressStrategy": self.strategy(settings),
                "localAddresses": list(self.default_pool(settings)),
                "domainPools": {k: list(v) for k, v in sorted(self.domain_pools(settings).items())},
            },
            "config": {
                "addressStrategy": net.address_strategy,
                "localAddresses": list(self._default_pool),
                "domainPools": {k: list(v) for k, v in sorted(self._domain_pools.items())},
                "ipStrategy": net.ip_strategy,
                "proxy": self.proxy.masked if self.proxy else None,
                "noProxy": list(net.no_proxy),
                "warmup": {"days": net.warmup.days},
            },
            "warmup": self.warmup.view(self.pool_addresses(settings)),
        }

    async def warmup_action(self, body: Any) -> dict[str, Any]:
        """POST /v1/settings/network/warmup {address, action: restart|skip}."""
        if not isinstance(body, dict):
            raise ValidationError("body must be an object")
        for key in body:
            if key not in ("address", "action"):
                raise ValidationError(f"unknown field {key} (expected address, action)")
        try:
            address = addresses.normalize_address(body.get("address"))
        except ValueError as e:
            raise ValidationError(f"address: {e}") from None
        if not isinstance(body.get("action"), str):
            raise ValidationError("action must be restart or skip")
        self._loaded_at = None
        settings = await self.settings()
        return await self.warmup.act(address, body["action"], self.pool_addresses(settings))

    # Pools -----------------------------------------------------------------

    def strategy(self, settings: Settings) -> str:
        return settings.address_strategy or self.network.address_strategy

    def default_pool(self, settings: Settings) -> tuple[str, ...]:
        return settings.local_addresses if settings.local_addresses is not None else self._default_pool

    def domain_pools(self, settings: Settings) -> dict[str, tuple[str, ...]]:
        return {**self._domain_pools, **settings.domain_pools}

    def pool_addresses(self, settings: Settings) -> list[str]:
        """Every address of the default, domain and account pools, once each."""
        found = dict.fromkeys(self.default_pool(settings))
        for pools in (self.domain_pools(settings), settings.account_pools):
            for pool in pools.values():
                found.update(dict.fromkeys(pool))
        return list(found)

    async def source_addresses(self) -> list[str]:
        """What the gateway may send from: every pool address and every account's `localAddress`."""
        found = dict.fromkeys(self.pool_addresses(await self.settings()))
        if self._store is not None:
            for account in await self._store.list_accounts():
                try:
                    found.setdefault(addresses.normalize_address(Routing.from_view(account).local_address))
                except ValueError:
                    pass
        return list(found)

    def pool_for(self, settings: Settings, account: Routing) -> tuple[tuple[str, ...], str]:
        """(pool, level) for an account: its own pool, its domain's, else the default."""
        own = settings.account_pools.get(account.account)
        if own:
            return own, "account"
        domain = self.domain_pools(settings).get(email_domain(account))
        if domain:
            return domain, "domain"
        return self.default_pool(settings), "default"

    def excluded(self, purpose: str) -> frozenset[str]:
        """Addresses connections for ``purpose`` ("imap", "smtp", ...) must not leave from."""
        if purpose != "smtp" or self.reputation is None:
            return frozenset()
        excluded: frozenset[str] = self.reputation.excluded()
        return excluded

    @staticmethod
    def _override(account: Routing, family: int) -> str | None:
        """The account's own `localAddress` when it is of ``family``."""
        try:
            address = addresses.normalize_address(account.local_address)
        except ValueError:
            return None
        return address if addresses.family_of(address) == family else None

    def source(self, settings: Settings, account: Routing, family: int,
               purpose: str = "imap") -> str | None:
        """The source address for one connection of ``family`` (random picks anew each call)."""
        excluded = self.excluded(purpose)
        override = self._override(account, family)
        if override is not None:
            if override not in excluded:
                return override
            return self._fall_back(settings, account, family, excluded, (override,), "account localAddress")
        pool, level = self.pool_for(settings, account)
        if self.strategy(settings) == "default":
            return None
        candidates = [a for a in addresses.of_family(pool, family) if a not in excluded]
        if candidates:
            return self._pick(settings, account, candidates, family)
        if not addresses.of_family(pool, family):
            return None  # the pool has no address of this family: the OS chooses
        return self._fall_back(settings, account, family, excluded, pool, level)

    def _pick(self, settings: Settings, account: Routing, candidates: list[str],
              family: int) -> str | None:
        return addresses.pick(self.strategy(settings), candidates, account.account, family,
                              self._rng, self.warmup.weights())

    def _fall_back(self, settings: Settings, account: Routing, family: int,
                   excluded: frozenset[str], pool: tuple[str, ...], level: str) -> str | None:
        """Every address of the account's pool is excluded: the default pool's others, else the OS."""
        if level != "default" and self.strategy(settings) != "default":
            candidates = [a for a in addresses.of_family(self.default_pool(settings), family) if a not in excluded]
            if candidates:
                self._note_fallback(account, pool, level, "the default pool")
                return self._pick(settings, account, candidates, family)
        self._note_fallback(account, pool, level, "the operating system's choice")
        return None

    def _note_fallback(self, account: Routing, pool: tuple[str, ...], level: str, to: str) -> None:
        """One log line per pool and fallback until the listings change (not one per connection)."""
        version = getattr(self.reputation, "version", 0)
        if version != self._fallbacks_version or len(self._fallbacks) >= MAX_FALLBACK_NOTES:
            self._fallbacks, self._fallbacks_version = set(), version
        key = (pool, level, to)
        if key in self._fallbacks:
            return
        self._fallbacks.add(key)
        log.warn("Every address of the {pool_level} pool {pool} is listed on a DNSBL: SMTP for account "
                 "{account} (and others of that pool) leaves from {to}", event="reputation.fallback",
                 pool_level=level, pool=",".join(pool), account=account.account or "-", to=to)

    def _assigned(self, settings: Settings, account: Routing, family: int,
                  purpose: str = "imap") -> str | None:
        """The fixed source for ``family`` (override or static pick); None for random and default."""
        override = self._override(account, family)
        if override is not None and override not in self.excluded(purpose):
            return override
        if self.strategy(settings) != "static":
            return None
        return self.source(settings, account, family, purpose)

    # Proxies ---------------------------------------------------------------

    def proxy_for(self, account: Routing | None, host: str) -> ProxySpec | None:
        """The account's proxy, else the global one; None when no_proxy matches ``host``."""
        url = account.proxy if account is not None else None
        spec = ProxySpec.parse(url) if url else self.proxy
        if spec is None or (host and self.no_proxy.matches(host)):
            return None
        return spec

    # Putting it together ---------------------------------------------------

    async def plan(self, account: Routing | None, host: str, purpose: str = "imap") -> Plan:
        """Sources for both families and the proxy for one ``purpose`` ("imap", "smtp") connection to
        ``host``."""
        account = account or Routing()
        settings = await self.settings()
        sources = {family: self.source(settings, account, family, purpose) for family in (IPV4, IPV6)}
        return Plan(sources, self.proxy_for(account, host))

    async def describe(self, view: Mapping[str, Any], host: str | None) -> dict[str, Any]:
        """The `network` object of GET /v1/account/{id} (``view``: the API's view of the account)."""
        account = Routing.from_view(view)
        settings = await self.settings()
        pool, level = self.pool_for(settings, account)
        strategy = self.strategy(settings)
        assigned = {family: self._assigned(settings, account, family) for family in (IPV4, IPV6)}
        smtp = {family: self._assigned(settings, account, family, "smtp") for family in (IPV4, IPV6)}
        excluded = self.excluded("smtp")
        own = [a for a in (self._override(account, IPV4), self._override(account, IPV6)) if a]
        if account.local_address:
            level = "account localAddress"
        proxy = self.proxy_for(account, host or "")
        return {
            "addressStrategy": strategy,
            "pool": list(pool),
            "poolLevel": level,
            "localAddress": assigned[IPV4] or assigned[IPV6],
            "localAddressIPv6": assigned[IPV6],
            "smtpLocalAddress": smtp[IPV4] or smtp[IPV6],
            "excluded": [a for a in dict.fromkeys([*own, *pool]) if a in excluded],
            "proxy": proxy.masked if proxy else None,
        }
