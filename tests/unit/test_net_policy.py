"""Pool levels, stored settings, the start-up check, config validation and EHLO names."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from gateway.config import ConfigError, load_config
from gateway.net.addresses import rendezvous
from gateway.net.ehlo import EhloNames
from gateway.net.ipstrategy import IPV4, IPV6
from gateway.net.policy import NetworkPolicy, Settings, check_configured, validate_settings
from gateway.store.base import ValidationError
from gateway.store.records import Routing


def run(coroutine: Any) -> Any:
    out: list[Any] = []
    defer.Deferred.fromCoroutine(coroutine).addBoth(out.append)
    assert out
    return out[0]


class MemoryStore:
    def __init__(self) -> None:
        self.docs: dict[str, Any] = {}
        self.reads = 0

    async def get_settings(self, name: str) -> Any:
        self.reads += 1
        return self.docs.get(name)

    async def put_settings(self, name: str, data: Any) -> None:
        self.docs[name] = data


def policy(network: dict[str, Any], store: Any = None, clock: Any = None) -> NetworkPolicy:
    config = load_config(None, {"network": network})
    return NetworkPolicy(config.network, store, clock=clock or (lambda: 0.0), bindable=lambda a: None)


POOLS = {"local_addresses": ["127.0.0.2", "127.0.0.3", "::1"], "address_strategy": "static",
         "domain_pools": {"corp.example": ["127.0.0.4"]}}


def test_most_specific_pool_wins():
    p = policy(POOLS)
    settings = Settings(account_pools={"bob": ("127.0.0.5",)})
    assert p.pool_for(settings, Routing.from_view({"account": "ann", "email": "ann@other.example"})) == (
        ("127.0.0.2", "127.0.0.3", "::1"), "default")
    assert p.pool_for(settings, Routing.from_view({"account": "cid", "email": "cid@CORP.example"})) == (("127.0.0.4",), "domain")
    assert p.pool_for(settings, Routing.from_view({"account": "bob", "email": "bob@corp.example"})) == (("127.0.0.5",), "account")
    assert p.source(settings, Routing.from_view({"account": "bob", "email": "b@corp.example", "localAddress": "127.0.0.9"}),
                    IPV4) == "127.0.0.9"
    # a localAddress of the other family leaves this family to the pool
    assert p.source(settings, Routing.from_view({"account": "ann", "email": "a@x.example", "localAddress": "127.0.0.9"}),
                    IPV6) == "::1"


def test_stored_settings_override_config_and_null_resets():
    p = policy(POOLS)
    base = Settings()
    new = validate_settings({"addressStrategy": "random", "localAddresses": ["127.0.0.7"],
                             "domainPools": {"Corp.Example.": ["127.0.0.8"]}}, base, lambda a: None)
    assert p.strategy(new) == "random" and p.default_pool(new) == ("127.0.0.7",)
    assert p.domain_pools(new) == {"corp.example": ("127.0.0.8",)}
    reset = validate_settings({"addressStrategy": None, "localAddresses": None}, new, lambda a: None)
    assert p.strategy(reset) == "static" and p.default_pool(reset) == ("127.0.0.2", "127.0.0.3", "::1")
    assert reset.domain_pools == {"corp.example": ("127.0.0.8",)}  # untouched keys stay
    assert Settings.from_document(new.document()) == new


@pytest.mark.parametrize("body, message", [
    ([], "body must be an object"),
    ({"ipStrategy": "ipv6_only"}, "read-only"),
    ({"proxy": None}, "read-only"),
    ({"pools": {}}, "unknown field pools"),
    ({"addressStrategy": "sticky"}, "addressStrategy must be one of"),
    ({"localAddresses": "127.0.0.2"}, "must be a list"),
    ({"localAddresses": ["127.0.0.256"]}, "not an IPv4 or IPv6 address"),
    ({"localAddresses": ["192.0.2.99"]}, "192.0.2.99 is not configured on this machine"),
    ({"domainPools": {"not a domain": []}}, "not an e-mail domain"),
    ({"domainPools": ["x"]}, "must be an object"),
    ({"accountPools": {"has space": ["127.0.0.2"]}}, "accountPools key"),
])
def test_bad_settings_are_validation_errors(body, message):
    bindable = lambda a: "Cannot assign requested address" if a.startswith("192.0.2.") else None  # noqa: E731
    with pytest.raises(ValidationError, match=message):
        validate_settings(body, Settings(), bindable)


def test_settings_are_cached_for_a_few_seconds_and_updated_at_once():
    now = [0.0]
    store = MemoryStore()
    p = policy(POOLS, store, clock=lambda: now[0])
    run(p.settings())
    run(p.settings())
    assert store.reads == 1
    store.docs["network"] = Settings(address_strategy="default").document()
    now[0] = 10.0
    assert p.strategy(run(p.settings())) == "default"
    view = run(p.update({"accountPools": {"ann": ["127.0.0.3"]}}))
    assert view["accountPools"] == {"ann": ["127.0.0.3"]} and view["effective"]["addressStrategy"] == "default"
    assert run(p.settings()).account_pools == {"ann": ("127.0.0.3",)}


def test_describe_shows_the_assignment():
    p = policy({**POOLS, "proxy": "socks5://u:secret@127.0.0.1:1080", "no_proxy": ["localhost"]})
    shown = run(p.describe({"account": "ann", "email": "ann@x.example"}, "imap.x.example"))
    assert shown == {"addressStrategy": "static", "pool": ["127.0.0.2", "127.0.0.3", "::1"],
                     "poolLevel": "default", "localAddress": rendezvous("ann", ["127.0.0.2", "127.0.0.3"]),
                     "localAddressIPv6": "::1", "proxy": "socks5://u:***@127.0.0.1:1080",
                     "smtpLocalAddress": rendezvous("ann", ["127.0.0.2", "127.0.0.3"]), "excluded": []}
    assert run(p.describe({"account": "ann", "email": "a@x.example"}, "localhost"))["proxy"] is None


def test_start_up_check_names_the_key_and_address():
    config = load_config(None, {"network": {"local_addresses": ["127.0.0.1"],
                                            "domain_pools": {"corp.example": ["192.0.2.99"]}}})
    with pytest.raises(ConfigError, match="config key network.domain_pools.corp.example: 192.0.2.99 is not "
                                          "configured on this machine"):
        check_configured(config.network)
    check_configured(load_config(None, {"network": {"local_addresses": ["127.0.0.1"]}}).network)


@pytest.mark.parametrize("network, message", [
    ({"local_addresses": ["nope"]}, "network.local_addresses: 'nope' is not an IPv4"),
    ({"address_strategy": "sticky"}, "network.address_strategy"),
    ({"ip_strategy": "ipv5"}, "network.ip_strategy: strategy: expected one of"),
    ({"ip_strategy": [{"if": "__import__('os')", "then": "ipv4_only"}, {"else": "ipv6_only"}]},
     "network.ip_strategy: rule 1 if:"),
    ({"ip_strategy": [{"if": "retry_num == 0", "then": "ipv4_only"}]}, "network.ip_strategy: the last rule"),
    ({"ip_strategy": 4}, "network.ip_strategy"),
    ({"proxy": "ftp://x"}, "network.proxy: proxy must be a URL"),
    ({"no_proxy": ["bad pattern"]}, "network.no_proxy"),
    ({"domain_pools": {"x@y": ["127.0.0.1"]}}, "network.domain_pools"),
    ({"domain_pools": {"corp.example": ["x"]}}, "network.domain_pools.corp.example"),
    ({"domain_pools": ["x"]}, "network.domain_pools: expected a mapping"),
    ({"ehlo_names": {"127.0.0.1": "has space"}}, "network.ehlo_names.127.0.0.1"),
    ({"ehlo_names": {"host": "x"}}, "network.ehlo_names"),
    ({"hosts": {"h": ["x"]}}, "network.hosts.h"),
    ({"connect_attempts": 11}, "network.connect_attempts"),
    ({"connect_attempts": 0}, "network.connect_attempts"),
    ({"proxies": []}, "unknown config key network.proxies"),
])
def test_config_errors_are_one_line_naming_the_key(network, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, {"network": network})
    text = str(info.value)
    assert message in text and "\n" not in text


class Ptr:
    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, address: str) -> defer.Deferred[str | None]:
        self.asked.append(address)
        answer = self.answers.get(address)
        if isinstance(answer, defer.Deferred):
            return answer
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


def test_ehlo_name_from_map_then_ptr_then_hostname():
    reactor = MemoryReactorClock()
    ptr = Ptr({"198.51.100.7": "mail7.example.net.", "198.51.100.8": None,
               "198.51.100.9": Exception("NXDOMAIN"), "198.51.100.10": "bad name!"})
    names = EhloNames(reactor, {"198.51.100.1": "out1.example.net"}, "gw.example.net", ptr=ptr)
    assert names.name_for("198.51.100.1") == "out1.example.net"
    assert names.name_for("198.51.100.7") == "gw.example.net"  # lookup started, not waited for
    assert names.name_for("198.51.100.7") == "mail7.example.net"  # cached now
    for address in ("198.51.100.8", "198.51.100.9", "198.51.100.10"):
        names.name_for(address)
        assert names.name_for(address) == "gw.example.net"
    assert names.name_for(None) == "gw.example.net"
    assert names.name_for("127.0.0.2") == "gw.example.net" and "127.0.0.2" not in ptr.asked
    assert names.name_for("::1") == "gw.example.net"
    assert ptr.asked.count("198.51.100.7") == 1


def test_ehlo_warm_up_and_ptr_timeout():
    reactor = MemoryReactorClock()
    slow: defer.Deferred[str | None] = defer.Deferred()
    ptr = Ptr({"198.51.100.7": "mail7.example.net", "198.51.100.8": slow})
    names = EhloNames(reactor, {}, "gw.example.net", ptr=ptr, timeout=2)
    done = names.warm(["198.51.100.7", "198.51.100.8", "127.0.0.1", "198.51.100.7"])
    assert not done.called
    reactor.advance(2.5)
    assert done.called
    assert names.name_for("198.51.100.7") == "mail7.example.net"
    assert names.name_for("198.51.100.8") == "gw.example.net"
    assert ptr.asked == ["198.51.100.7", "198.51.100.8"]


@pytest_twisted.ensureDeferred
async def test_twisted_names_ptr_lookup_against_a_loopback_dns_server():
    """The real PTR path: twisted.names client -> a twisted.names server on 127.0.0.1 (UDP)."""
    from twisted.internet import reactor
    from twisted.names import common, dns, error, server

    from gateway.net.ehlo import twisted_names_ptr

    class PtrOnly(common.ResolverBase):
        def _lookup(self, name, cls, type, timeout):  # noqa: A002 - twisted's signature
            if type == dns.PTR and name == b"7.100.51.198.in-addr.arpa":
                record = dns.RRHeader(name=name, type=dns.PTR, payload=dns.Record_PTR(b"mail7.example.net"))
                return defer.succeed(([record], [], []))
            return defer.fail(error.DomainError(name))

    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(server.DNSServerFactory(clients=[PtrOnly()])),
                             interface="127.0.0.1")
    try:
        lookup = twisted_names_ptr(reactor, 2, servers=[("127.0.0.1", port.getHost().port)])
        assert await lookup("198.51.100.7") == "mail7.example.net"
        names = EhloNames(reactor, {}, "gw.example.net", ptr=lookup)
        assert await names.warm(["198.51.100.7", "198.51.100.8"]) == ["mail7.example.net", "gw.example.net"]
        assert names.name_for("198.51.100.7") == "mail7.example.net"
    finally:
        await port.stopListening()
