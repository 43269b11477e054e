"""ProxyEndpoint on in-memory transports: hand-over of the real transport, errors, timeout, cancel."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.net.httpconnect import ConnectClient
from gateway.net.socks import Socks5Client
from gateway.net.tunnel import ProxyEndpoint, ProxyError, ProxyUnreachable

SOCKS_OK = b"\x05\x00" + b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x10"


class Wire(StringTransport):
    """A TCP-like transport that delivers to whatever its ``protocol`` attribute is now."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: Any = None
        self.tls_started: Any = None

    def deliver(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self, reason: Failure) -> None:
        self.protocol.connectionLost(reason)

    def startTLS(self, options: Any) -> None:
        self.tls_started = options


@implementer(IStreamClientEndpoint)
class Inner:
    """Connects at once over a Wire, or fails with ``error``."""

    def __init__(self, error: Exception | None = None, pending: bool = False) -> None:
        self.wire = Wire()
        self.error = error
        self.pending: defer.Deferred[Any] | None = defer.Deferred() if pending else None

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.error is not None:
            return defer.fail(self.error)
        if self.pending is not None:
            return self.pending
        protocol = factory.buildProtocol(None)
        self.wire.protocol = protocol
        protocol.makeConnection(self.wire)
        return defer.succeed(protocol)


class App(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = reason


def endpoint(inner: Inner, reactor: MemoryReactorClock | None = None, machine: Any = None) -> ProxyEndpoint:
    return ProxyEndpoint(inner, machine or (lambda: Socks5Client("127.0.0.1", 993)),
                         reactor or MemoryReactorClock(), timeout=5, label="127.0.0.1:1080")


def result(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_after_the_handshake_the_app_owns_the_real_transport():
    inner = Inner()
    d = endpoint(inner).connect(Factory.forProtocol(App))
    assert inner.wire.value() == b"\x05\x01\x00"
    inner.wire.clear()
    inner.wire.deliver(SOCKS_OK + b"* OK greeting\r\n")
    app = result(d)
    assert isinstance(app, App)
    assert app.transport is inner.wire and inner.wire.protocol is app  # rewired: no middle layer
    assert app.received == b"* OK greeting\r\n"
    inner.wire.deliver(b"more")
    assert app.received.endswith(b"more")
    app.transport.startTLS("opts")  # STARTTLS reaches the real transport
    assert inner.wire.tls_started == "opts"


def test_a_refusal_fails_with_a_proxy_error_and_closes():
    inner = Inner()
    d = endpoint(inner, machine=lambda: Socks5Client("127.0.0.1", 993, "u", "secret")).connect(
        Factory.forProtocol(App))
    inner.wire.deliver(b"\x05\x02\x01\x01")
    with pytest.raises(ProxyError) as info:
        result(d)
    assert str(info.value) == "proxy: SOCKS5 authentication refused"
    assert inner.wire.disconnecting or inner.wire.disconnected


def test_http_connect_refusal_text():
    inner = Inner()
    d = endpoint(inner, machine=lambda: ConnectClient("h", 993)).connect(Factory.forProtocol(App))
    inner.wire.deliver(b"HTTP/1.1 403 Forbidden\r\n\r\n")
    with pytest.raises(ProxyError, match="^proxy: HTTP CONNECT refused: 403 Forbidden$"):
        result(d)


def test_no_answer_times_out():
    reactor = MemoryReactorClock()
    inner = Inner()
    d = endpoint(inner, reactor).connect(Factory.forProtocol(App))
    reactor.advance(4.9)
    assert not d.called
    reactor.advance(0.2)
    with pytest.raises(ProxyError, match="no answer from proxy 127.0.0.1:1080 within 5 s"):
        result(d)


def test_proxy_closing_mid_handshake():
    inner = Inner()
    d = endpoint(inner).connect(Factory.forProtocol(App))
    inner.wire.lose(Failure(ConnectionDone()))
    with pytest.raises(ProxyError, match="ended the connection during the handshake"):
        result(d)


def test_proxy_unreachable():
    d = endpoint(Inner(error=ConnectionRefusedError("111: Connection refused"))).connect(Factory.forProtocol(App))
    with pytest.raises(ProxyUnreachable) as info:
        result(d)
    assert str(info.value) == "proxy: cannot connect to proxy 127.0.0.1:1080: Connection refused"


def test_cancel_while_connecting_and_while_handshaking():
    inner = Inner(pending=True)
    d = endpoint(inner).connect(Factory.forProtocol(App))
    d.cancel()
    with pytest.raises(defer.CancelledError):
        result(d)

    inner = Inner()
    d = endpoint(inner).connect(Factory.forProtocol(App))
    d.cancel()
    with pytest.raises(defer.CancelledError):
        result(d)
    assert inner.wire.disconnecting or inner.wire.disconnected


def test_tls_to_the_upstream_starts_on_the_tunnel():
    """wrapClientTLS(ProxyEndpoint): after the handshake the TLS ClientHello goes out on the wire."""
    inner = Inner()
    tls = wrapClientTLS(optionsForClientTLS("imap.example.com"), endpoint(inner))
    d = tls.connect(Factory.forProtocol(App))
    inner.wire.deliver(SOCKS_OK[:2])
    inner.wire.clear()
    inner.wire.deliver(SOCKS_OK[2:])
    app = result(d)
    assert isinstance(app, App)
    hello = inner.wire.value()
    assert hello[:1] == b"\x16" and hello[1:2] == b"\x03"  # a TLS handshake record
    assert b"imap.example.com" in hello  # SNI names the upstream, not the proxy


def test_a_machine_that_cannot_be_built_fails_cleanly():
    d = endpoint(Inner(), machine=lambda: Socks5Client("name.example", 1)).connect(Factory.forProtocol(App))
    with pytest.raises(ProxyError, match="socks5h"):
        result(d)
