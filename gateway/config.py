"""Configuration: gateway.yaml loaded, defaulted and validated into frozen dataclasses."""

from __future__ import annotations

import dataclasses
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

IP_STRATEGIES = ("ipv4_only", "ipv6_only", "ipv4_then_ipv6", "ipv6_then_ipv4")
ADDRESS_STRATEGIES = ("default", "static", "random")


class ConfigError(Exception):
    """A bad configuration: the message is one line naming the key."""


@dataclass(frozen=True)
class TLSConfig:
    cert: str = "certs/gateway.pem"
    key: str = "certs/gateway.key"


ZERO_OK = {"zero_ok": True}  # field metadata: 0 is a valid value (it turns the feature off)


@dataclass(frozen=True)
class PoolConfig:
    idle_ttl: float = field(default=60.0, metadata=ZERO_OK)   # 0 turns pooling off
    max_idle_per_account: int = field(default=2, metadata=ZERO_OK)


@dataclass(frozen=True)
class IMAPConfig:
    listen: tuple[str, ...] = ("ssl:2993",)
    starttls_listen: tuple[str, ...] = ()
    allow_plaintext_login: bool = False
    preauth_timeout: float = 60.0
    login_timeout: float = 45.0
    max_pending: int = 1048576
    pool: PoolConfig = field(default_factory=PoolConfig)
    max_connections_per_account: int = field(default=15, metadata=ZERO_OK)  # 0 = no cap
    limit_wait: float = field(default=5.0, metadata=ZERO_OK)
    idle_timeout: float = field(default=1860.0, metadata=ZERO_OK)  # relayed session without a byte; 0 = none


@dataclass(frozen=True)
class SMTPConfig:
    listen: tuple[str, ...] = ("tcp:2587",)
    implicit_tls_listen: tuple[str, ...] = ()
    hostname: str = "localhost"
    allow_plaintext_login: bool = False
    max_message_size: int = 36700160
    preauth_timeout: float = 60.0
    login_timeout: float = 45.0
    max_pending: int = 262144
    max_connections_per_account: int = field(default=10, metadata=ZERO_OK)  # 0 = no cap
    limit_wait: float = field(default=5.0, metadata=ZERO_OK)


@dataclass(frozen=True)
class APIConfig:
    listen: str = "tcp:3000:interface=127.0.0.1"
    public_url: str = "http://127.0.0.1:3000"  # how browsers reach this listener (OAuth2 links, callback)
    dashboard_session_ttl: float = 28800.0     # seconds a dashboard sign-in lasts (its cookie's Max-Age)


@dataclass(frozen=True)
class OAuth2Config:
    state_ttl: float = 900.0  # seconds a hosted authorization link (and its state) stays valid


@dataclass(frozen=True)
class UpstreamConfig:
    ca_file: str | None = None
    connect_timeout: float = 15.0
    refresh_margin: float = 120.0
    forward_client_ip: bool = False  # IMAP ID x-originating-ip/-port before authenticating upstream


@dataclass(frozen=True)
class WarmupConfig:
    days: int = field(default=0, metadata=ZERO_OK)  # ramp of a new source address; 0 = no warm-up


@dataclass(frozen=True)
class NetworkConfig:
    local_addresses: tuple[str, ...] = ()
    address_strategy: str = "default"
    ip_strategy: Any = "ipv4_then_ipv6"
    proxy: str | None = None
    no_proxy: tuple[str, ...] = ()
    domain_pools: dict[str, Any] = field(default_factory=dict)  # {domain: [address, ...]}
    ehlo_names: dict[str, Any] = field(default_factory=dict)  # {source address: EHLO name}
    hosts: dict[str, Any] = field(default_factory=dict)  # {host name: [address, ...]}, before DNS
    connect_attempts: int = 2
    warmup: WarmupConfig = field(default_factory=WarmupConfig)


REPUTATION_POLICIES = ("exclude", "warn")


@dataclass(frozen=True)
class ReputationConfig:
    zones: Any = ()                   # [{host: zen.spamhaus.org, name: Spamhaus ZEN}, ...]
    nameservers: tuple[str, ...] = ()  # ["127.0.0.1:53"]; empty: the system's resolvers
    interval: float = 3600.0          # seconds between scheduled checks of every address in every zone
    timeout: float = 5.0              # seconds one lookup (A, then TXT) may take before it is unknown
    concurrency: int = 50             # lookups in flight at most
    policy: str = "exclude"           # exclude | warn


@dataclass(frozen=True)
class LimitsConfig:
    auth_failures: int = 10           # failures (per address, per account) in the window before delays
    auth_window: float = 300.0
    auth_lockout_after: int = 50      # failures from one address before it is locked out
    auth_lockout: float = 300.0
    exempt: tuple[str, ...] = ()      # CIDRs never throttled or capped
    max_connections_per_ip: int = field(default=100, metadata=ZERO_OK)  # 0 = no cap
    max_connections: int = field(default=10000, metadata=ZERO_OK)       # 0 = no cap


LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"  # text | json (one JSON object per line)


@dataclass(frozen=True)
class Config:
    store: str = "sqlite:var/gateway.db"
    secret_key_file: str = "var/secret.key"
    shutdown_grace: float = field(default=10.0, metadata=ZERO_OK)  # s for commands in flight at SIGTERM
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # who may send a PROXY header
    tls: TLSConfig = field(default_factory=TLSConfig)
    imap: IMAPConfig = field(default_factory=IMAPConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    api: APIConfig = field(default_factory=APIConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    oauth2: OAuth2Config = field(default_factory=OAuth2Config)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)


def _check_type(path: str, value: Any, default: Any, hint: str, zero_ok: bool = False) -> Any:
    """Check one leaf value against the type its field declares (``zero_ok``: 0 is allowed too)."""
    if hint.startswith("tuple"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {path}: expected a list of strings")
        return tuple(value)
    if hint == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config key {path}: expected true or false")
        return value
    if hint == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                (value == 0 and not zero_ok) or value != value or value == float("inf"):
            raise ConfigError(f"config key {path}: expected a {'non-negative' if zero_ok else 'positive'} number")
        return float(value)
    if hint == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not zero_ok):
            raise ConfigError(f"config key {path}: expected a {'non-negative' if zero_ok else 'positive'} integer")
        return value
    if hint == "str":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config key {path}: expected a non-empty string")
        return value
    if hint == "str | None":
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"config key {path}: expected a string or null")
        return value
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {prefix or '(top level)'}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key {where}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        path = f"{prefix}.{name}" if prefix else name
        hint = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if dataclasses.is_dataclass(f.default_factory) if f.default_factory is not dataclasses.MISSING else False:
            values[name] = _build(f.default_factory, data[name], path)  # type: ignore[arg-type]
        else:
            values[name] = _check_type(path, data[name], f.default, hint, bool(f.metadata.get("zero_ok")))
    return cls(**values)


def _validate(config: Config) -> None:
    """Cross-field checks that a type check alone cannot make."""
    import netaddr

    for key, cidrs in (("limits.exempt", config.limits.exempt), ("trusted_proxies", config.trusted_proxies)):
        for cidr in cidrs:
            try:
                netaddr.IPNetwork(cidr)
            except (netaddr.AddrFormatError, ValueError, TypeError):
                raise ConfigError(f"config key {key}: {cidr!r} is not an IP address or CIDR") from None
    store = config.store
    if not (store.startswith("sqlite:") or store.startswith("redis://") or store.startswith("rediss://")):
        raise ConfigError("config key store: expected sqlite:PATH or redis://HOST:PORT/DB (rediss:// for TLS)")
    if not store.startswith("sqlite:"):
        from gateway.store.redis import parse_url

        try:
            parse_url(store)
        except ValueError as e:
            raise ConfigError(f"config key store: {e}") from None
    net = config.network
    if net.address_strategy not in ADDRESS_STRATEGIES:
        raise ConfigError(
            f"config key network.address_strategy: expected one of {', '.join(ADDRESS_STRATEGIES)}"
        )
    _validate_network(net)
    _validate_reputation(config.reputation)
    public = urllib.parse.urlsplit(config.api.public_url)
    if public.scheme not in ("http", "https") or not public.hostname or public.query or public.fragment:
        raise ConfigError("config key api.public_url: expected an http(s) URL like https://gateway.example.com")
    if config.log.format not in LOG_FORMATS:
        raise ConfigError(f"config key log.format: expected one of {', '.join(LOG_FORMATS)}")
    if config.upstream.ca_file is not None and not Path(config.upstream.ca_file).is_file():
        raise ConfigError(f"config key upstream.ca_file: no such file {config.upstream.ca_file}")
    if not (config.imap.listen or config.imap.starttls_listen):
        raise ConfigError("config key imap.listen: at least one IMAP listener is needed")


def _addresses(key: str, value: Any) -> list[str]:
    from gateway.net.addresses import normalize_pool

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"config key {key}: expected a list of IP addresses")
    try:
        return list(normalize_pool(value))
    except ValueError as e:
        raise ConfigError(f"config key {key}: {e}") from None


def _mapping(key: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"config key {key}: expected a mapping with string keys")
    return value


def _validate_network(net: NetworkConfig) -> None:
    """network.*: addresses, pools, strategies, proxy URL and no_proxy patterns."""
    from gateway.net.addresses import normalize_address
    from gateway.net.ipstrategy import ExpressionError, parse_strategy
    from gateway.net.noproxy import NoProxy
    from gateway.net.proxy import ProxySpec

    _addresses("network.local_addresses", list(net.local_addresses))
    for domain, pool in _mapping("network.domain_pools", net.domain_pools).items():
        if "@" in domain or "." not in domain.strip("."):
            raise ConfigError(f"config key network.domain_pools: {domain!r} is not an e-mail domain")
        _addresses(f"network.domain_pools.{domain}", pool)
    for address, name in _mapping("network.ehlo_names", net.ehlo_names).items():
        try:
            normalize_address(address)
        except ValueError as e:
            raise ConfigError(f"config key network.ehlo_names: {e}") from None
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ConfigError(f"config key network.ehlo_names.{address}: expected a host name")
    for name, addresses in _mapping("network.hosts", net.hosts).items():
        _addresses(f"network.hosts.{name}", addresses)
    try:
        parse_strategy(net.ip_strategy)
    except ExpressionError as e:
        raise ConfigError(f"config key network.ip_strategy: {e}") from None
    if net.proxy is not None:
        try:
            ProxySpec.parse(net.proxy)
        except ValueError as e:
            raise ConfigError(f"config key network.proxy: {e}") from None
    try:
        NoProxy.parse(net.no_proxy)
    except ValueError as e:
        raise ConfigError(f"config key network.no_proxy: {e}") from None
    if net.connect_attempts > 10:
        raise ConfigError("config key network.connect_attempts: expected 1 to 10")
    if net.warmup.days > 365:
        raise ConfigError("config key network.warmup.days: expected 0 (no warm-up) to 365")


def _validate_reputation(reputation: ReputationConfig) -> None:
    """reputation.*: DNSBL zones, name servers, the policy and the bounds of a check run."""
    from gateway.net.dnsbl import parse_nameservers, parse_zones

    if not isinstance(reputation.zones, (list, tuple)):
        raise ConfigError("config key reputation.zones: expected a list of {host, name}")
    try:
        parse_zones(list(reputation.zones))
    except ValueError as e:
        raise ConfigError(f"config key reputation.{e}") from None
    try:
        parse_nameservers(reputation.nameservers)
    except ValueError as e:
        raise ConfigError(f"config key reputation.nameservers: {e}") from None
    if reputation.policy not in REPUTATION_POLICIES:
        raise ConfigError(f"config key reputation.policy: expected one of {', '.join(REPUTATION_POLICIES)}")
    if reputation.concurrency > 1000:
        raise ConfigError("config key reputation.concurrency: expected 1 to 1000")
    if reputation.timeout > 60:
        raise ConfigError("config key reputation.timeout: expected at most 60 seconds")


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load ``path`` (or the built-in defaults when None) and validate it."""
    data: Any = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if overrides:
        data = {**data, **overrides}
    config = _build(Config, data, "")
    if path is not None:
        config = _relative_to(config, Path(path).resolve().parent)
    _validate(config)
    return config


def _relative_to(config: Config, base: Path) -> Config:
    """Relative paths in a config file name files beside it, wherever the gateway or CLI starts."""
    def at(value: str) -> str:
        return value if Path(value).is_absolute() else str(base / value)

    store = config.store
    if store.startswith("sqlite:") and not store.startswith("sqlite://"):
        store = "sqlite:" + at(store[len("sqlite:"):])
    return dataclasses.replace(
        config, store=store, secret_key_file=at(config.secret_key_file),
        tls=dataclasses.replace(config.tls, cert=at(config.tls.cert), key=at(config.tls.key)),
        upstream=dataclasses.replace(
            config.upstream, ca_file=at(config.upstream.ca_file) if config.upstream.ca_file else None))


def find_config(given: str | None) -> str | None:
    """The configuration file the server and the CLI use: ``--config``, else $GATEWAY_CONFIG,
    else ./gateway.yaml when it exists, else None (the built-in defaults)."""
    import os

    if given:
        return given
    if os.environ.get("GATEWAY_CONFIG"):
        return os.environ["GATEWAY_CONFIG"]
    return "gateway.yaml" if Path("gateway.yaml").is_file() else None
