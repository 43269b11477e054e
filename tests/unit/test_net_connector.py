"""Connector on MemoryReactorClock: family order, source binding, retries, time budget, proxy choice."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from gateway.config import load_config
from gateway.net.connector import Connector, Route
from gateway.net.policy import NetworkPolicy
from gateway.net.tunnel import ProxyError
from gateway.store.records import Routing


class Resolver:
    """IHostnameResolver answering from a table, synchronously; counts lookups."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def resolveHostName(self, receiver: Any, host: str, port: int = 0, addressTypes: Any = None,
                        transportSemantics: str = "TCP") -> Any:
        self.asked.append(host)
        receiver.resolutionBegan(None)
        for ip in self.table.get(host, []):
            receiver.addressResolved(IPv6Address("TCP", ip, port) if ":" in ip else IPv4Address("TCP", ip, port))
        receiver.resolutionComplete()
        return receiver


def make(network: dict[str, Any] | None = None, table: dict[str, list[str]] | None = None,
         timeout: float = 10) -> tuple[Connector, MemoryReactorClock, Resolver]:
    config = load_config(None, {"network": network or {}, "upstream": {"connect_timeout": timeout}})
    reactor = MemoryReactorClock()
    resolver = Resolver(table if table is not None else {"imap.example.com": ["192.0.2.10", "2001:db8::10"]})
    policy = NetworkPolicy(config.network, bindable=lambda a: None)
    return Connector(reactor, config, policy=policy, resolver=resolver), reactor, resolver


def start(connector: Connector, account: dict[str, Any] | None = None, host: str = "imap.example.com",
          port: int = 993) -> defer.Deferred[Any]:
    return defer.Deferred.fromCoroutine(
        connector.connect(host, port, Factory.forProtocol(Protocol), tls=False,
                          account=Routing.from_view(account) if account is not None else None))


def refuse(reactor: MemoryReactorClock, index: int) -> None:
    factory = reactor.tcpClients[index][2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("111: Connection refused")))


def accept(reactor: MemoryReactorClock, index: int, local: str) -> StringTransport:
    host, port, factory, _timeout, _bind = reactor.tcpClients[index]
    kind = IPv6Address if ":" in local else IPv4Address
    transport = StringTransport(hostAddress=kind("TCP", local, 40000), peerAddress=kind("TCP", host, port))
    protocol = factory.buildProtocol(None)
    transport.protocol = protocol  # as twisted.internet.tcp.Client has it
    protocol.makeConnection(transport)
    return transport


def outcome(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not finished"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


ACCOUNT = {"account": "alice", "email": "alice@example.com"}


def test_ipv4_then_ipv6_binds_each_family_to_its_pool_address():
    connector, reactor, _ = make({"local_addresses": ["127.0.0.2", "::1"], "address_strategy": "static"})
    d = start(connector, ACCOUNT)
    host, port, _f, timeout, bind = reactor.tcpClients[0]
    assert (host, port, bind) == ("192.0.2.10", 993, ("127.0.0.2", 0))
    assert 4.9 < timeout < 5.1  # two candidates share the 10 s budget
    refuse(reactor, 0)
    host, _port, _f, _timeout, bind = reactor.tcpClients[1]
    assert (host, bind) == ("2001:db8::10", ("::1", 0))
    accept(reactor, 1, "::1")
    _protocol, route = outcome(d)
    assert route == Route(source="::1", proxy=None)


def test_ipv6_then_ipv4_and_default_strategy_does_not_bind():
    connector, reactor, _ = make({"ip_strategy": "ipv6_then_ipv4", "local_addresses": ["127.0.0.2"]})
    d = start(connector, ACCOUNT)
    assert reactor.tcpClients[0][0] == "2001:db8::10" and reactor.tcpClients[0][4] is None
    accept(reactor, 0, "2001:db8::1")
    assert outcome(d)[1].source == "2001:db8::1"


def test_only_strategy_without_that_family_is_a_lookup_error():
    connector, reactor, _ = make({"ip_strategy": "ipv6_only"}, {"imap.example.com": ["192.0.2.10"]})
    with pytest.raises(DNSLookupError, match="has no IPv6 address"):
        outcome(start(connector))
    assert reactor.tcpClients == []


def test_retry_expression_changes_family_per_attempt():
    connector, reactor, resolver = make({
        "ip_strategy": [{"if": "retry_num == 0", "then": "ipv6_only"}, {"else": "ipv4_only"}],
        "connect_attempts": 3})
    d = start(connector)
    assert reactor.tcpClients[0][0] == "2001:db8::10"
    refuse(reactor, 0)
    assert reactor.tcpClients[1][0] == "192.0.2.10"
    refuse(reactor, 1)
    assert reactor.tcpClients[2][0] == "192.0.2.10"
    refuse(reactor, 2)
    with pytest.raises(ConnectionRefusedError):
        outcome(d)
    assert len(reactor.tcpClients) == 3


def test_attempts_stop_when_the_time_budget_is_spent():
    connector, reactor, _ = make({"connect_attempts": 5}, {"h": ["192.0.2.1"]}, timeout=3)
    d = start(connector, host="h")
    reactor.advance(3.5)
    refuse(reactor, 0)
    with pytest.raises(ConnectionRefusedError):
        outcome(d)
    assert len(reactor.tcpClients) == 1


def test_unknown_host():
    connector, _reactor, _ = make(table={})
    with pytest.raises(DNSLookupError, match="no such host"):
        outcome(start(connector))


def test_pinned_hosts_and_literals_skip_the_resolver():
    connector, reactor, resolver = make({"hosts": {"Pinned.Example": ["::1", "127.0.0.1"]}})
    start(connector, host="pinned.example")
    start(connector, host="192.0.2.77")
    start(connector, host="[2001:db8::7]")
    assert [c[0] for c in reactor.tcpClients] == ["127.0.0.1", "192.0.2.77", "2001:db8::7"]
    assert resolver.asked == []


def test_random_strategy_picks_per_connection():
    connector, reactor, _ = make({"local_addresses": ["127.0.0.2", "127.0.0.3", "127.0.0.4"],
                                  "address_strategy": "random"}, {"h": ["192.0.2.1"]})
    for _ in range(30):
        start(connector, ACCOUNT, host="h")
    assert {c[4][0] for c in reactor.tcpClients} == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}


def test_account_local_address_overrides_the_pool():
    connector, reactor, _ = make({"local_addresses": ["127.0.0.2"], "address_strategy": "static"},
                                 {"h": ["192.0.2.1"]})
    start(connector, {**ACCOUNT, "localAddress": "127.0.0.9"}, host="h")
    assert reactor.tcpClients[0][4] == ("127.0.0.9", 0)


def test_socks5_proxy_is_dialled_from_the_source_address_and_sent_the_resolved_target():
    connector, reactor, resolver = make({"local_addresses": ["127.0.0.2"], "address_strategy": "static"},
                                        {"imap.example.com": ["192.0.2.10"], "proxy.example": ["198.51.100.5"]})
    d = start(connector, {**ACCOUNT, "proxy": "socks5://u:pw@proxy.example:1080"})
    host, port, _f, _t, bind = reactor.tcpClients[0]
    assert (host, port, bind) == ("198.51.100.5", 1080, ("127.0.0.2", 0))
    wire = accept(reactor, 0, "127.0.0.2")
    assert wire.value() == b"\x05\x02\x00\x02"
    wire.clear()
    wire.protocol.dataReceived(b"\x05\x02")
    assert wire.value() == b"\x01\x01u\x02pw"
    wire.clear()
    wire.protocol.dataReceived(b"\x01\x00")
    assert wire.value() == b"\x05\x01\x00\x01\xc0\x00\x02\x0a\x03\xe1"  # 192.0.2.10:993, resolved here
    wire.protocol.dataReceived(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
    _protocol, route = outcome(d)
    assert route == Route(source="127.0.0.2", proxy="socks5://u:***@proxy.example:1080")
    assert sorted(resolver.asked) == ["imap.example.com", "proxy.example"]


def test_socks5h_and_http_send_the_name_and_do_not_resolve_it():
    for url, first in (("socks5h://127.0.0.1:1080", b"\x05\x01\x00"),
                       ("http://127.0.0.1:3128", b"CONNECT imap.example.com:993 HTTP/1.1\r\n")):
        connector, reactor, resolver = make(table={})
        start(connector, {**ACCOUNT, "proxy": url})
        wire = accept(reactor, 0, "127.0.0.1")
        assert wire.value().startswith(first)
        assert resolver.asked == []


def test_a_proxy_refusal_is_not_retried():
    connector, reactor, _ = make({"proxy": "socks5://127.0.0.1:1080", "connect_attempts": 3})
    d = start(connector, ACCOUNT, host="192.0.2.10")
    wire = accept(reactor, 0, "127.0.0.1")
    wire.protocol.dataReceived(b"\x05\x00\x05\x02")
    with pytest.raises(ProxyError, match="^proxy: SOCKS5 connection not allowed by ruleset \\(reply 2\\)$"):
        outcome(d)
    assert len(reactor.tcpClients) == 1


def test_an_unreachable_proxy_is_retried_then_reported():
    connector, reactor, _ = make({"proxy": "socks5://127.0.0.1:1080", "connect_attempts": 2})
    d = start(connector, ACCOUNT, host="192.0.2.10")
    refuse(reactor, 0)
    refuse(reactor, 1)
    with pytest.raises(ProxyError, match="^proxy: cannot connect to proxy 127.0.0.1:1080: Connection refused$"):
        outcome(d)


def test_no_proxy_hosts_are_dialled_directly():
    connector, reactor, _ = make({"proxy": "socks5://127.0.0.1:1080", "no_proxy": ["*.example.com"]})
    start(connector, ACCOUNT)
    assert reactor.tcpClients[0][:2] == ("192.0.2.10", 993)


def test_starttls_through_an_https_proxy_is_refused_clearly():
    connector, reactor, _ = make({"proxy": "https://127.0.0.1:3129"})
    with pytest.raises(ProxyError, match="STARTTLS upstreams .* cannot be reached through an https:// proxy"):
        outcome(start(connector, ACCOUNT))
    assert reactor.tcpClients == []


def test_an_unparsable_stored_proxy_url_is_a_proxy_error():
    connector, reactor, _ = make()
    with pytest.raises(ProxyError, match="^proxy: invalid proxy URL: SOCKS4 proxies take a user ID"):
        outcome(start(connector, {**ACCOUNT, "proxy": "socks4://u:p@127.0.0.1:1080"}))


def test_resolved_addresses_are_reused_for_a_while_and_forgotten_after_a_failure():
    """One lookup serves the logins of RESOLVED_TTL seconds; a refused connection forgets it."""
    from gateway.net.connector import RESOLVED_TTL

    connector, reactor, resolver = make(table={"imap.example.com": ["192.0.2.10"]})
    for index in range(2):
        d = start(connector)
        accept(reactor, index, "192.0.2.1")
        outcome(d)
    assert resolver.asked == ["imap.example.com"]
    reactor.advance(RESOLVED_TTL + 1)
    d = start(connector)
    accept(reactor, 2, "192.0.2.1")
    outcome(d)
    assert resolver.asked == ["imap.example.com"] * 2
    d = start(connector)
    refuse(reactor, 3)       # the first attempt fails: the second asks the resolver again
    accept(reactor, 4, "192.0.2.1")
    outcome(d)
    assert resolver.asked == ["imap.example.com"] * 3
