"""Client-facing TLS listeners: the certificate added, and `haproxy:ssl:` reading the PROXY header before TLS."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.application import strports
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from gateway.tls import ServerTLS, TLSListeners, ensure_certificate, listener_endpoint

# Twisted's `ssl:` endpoint parser builds its CertificateOptions from pyOpenSSL objects.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


class Recorder(Protocol):
    """Greets, then records what it receives and the peer it sees at that moment."""

    def __init__(self) -> None:
        self.received = b""
        self.peer: object = None

    def connectionMade(self) -> None:
        self.transport.write(b"* OK ready\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.peer = self.transport.getPeer()


class HeaderThen(Protocol):
    """What HAProxy does with `send-proxy`: the header in clear, then the client's own bytes (TLS)."""

    def __init__(self, header: bytes, inner: Protocol) -> None:
        self.header, self.inner = header, inner

    def makeConnection(self, transport: object) -> None:
        transport.write(self.header)  # type: ignore[attr-defined]
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: object = None) -> None:
        self.inner.connectionLost(reason)


def listen(description: str, tmp_path: Path) -> tuple[MemoryReactorClock, str, Factory]:
    """Start a listener from ``description`` on a MemoryReactor; returns it, the string parsed, our factory."""
    cert, key = str(tmp_path / "gw.pem"), str(tmp_path / "gw.key")
    ensure_certificate(cert, key, hostname="localhost")
    reactor = MemoryReactorClock()
    parsed, parse_with = listener_endpoint(description, ServerTLS(cert, key), reactor)
    factory = Factory.forProtocol(Recorder)
    strports.service(parsed, factory, reactor=parse_with).privilegedStartService()
    return reactor, parsed, factory


def test_ssl_listener_gets_the_gateway_certificate(tmp_path):
    """`ssl:` without a key names the gateway's cert and key, and listens with the reactor's own TLS
    and the gateway's reloadable certificate (not options the endpoint parser read once)."""
    reactor, parsed, factory = listen("ssl:2993:interface=127.0.0.1", tmp_path)
    assert parsed.startswith("ssl:2993:interface=127.0.0.1:privateKey=") and ":certKey=" in parsed
    port, listening, ctx, _backlog, interface = reactor.sslServers[0]
    assert (port, listening, interface) == (2993, factory, "127.0.0.1") and not reactor.tcpServers
    assert isinstance(ctx, ServerTLS)


def test_haproxy_ssl_layers_proxy_outside_tls(tmp_path):
    """`haproxy:ssl:` listens on plain TCP with the PROXY parser outermost and TLS inside it:
    Twisted's own `haproxy:` parser would put TLS outside and expect the header inside TLS."""
    reactor, parsed, factory = listen("haproxy:ssl:2993:interface=127.0.0.1", tmp_path)
    assert parsed.startswith("ssl:2993:")
    assert not reactor.sslServers
    port, outer, _backlog, interface = reactor.tcpServers[0]
    assert (port, interface) == (2993, "127.0.0.1")
    assert isinstance(outer, HAProxyWrappingFactory)
    assert isinstance(outer.wrappedFactory, TLSMemoryBIOFactory)
    assert outer.wrappedFactory.wrappedFactory is factory


def test_haproxy_ssl_accepts_header_in_clear_then_tls(tmp_path):
    """Bytes as HAProxy sends them (PROXY v1 header in clear, then a TLS handshake) reach the
    gateway protocol decrypted, and it sees the client's address from the header."""
    reactor, _parsed, _factory = listen("haproxy:ssl:2993:interface=127.0.0.1", tmp_path)
    server = reactor.tcpServers[0][1].buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    trust = ssl.Certificate.loadPEM((tmp_path / "gateway-ca.pem").read_bytes())
    client_app = Recorder()
    client_tls = TLSMemoryBIOFactory(ssl.optionsForClientTLS("localhost", trustRoot=trust), True,
                                     Factory.forProtocol(lambda: client_app), clock=reactor).buildProtocol(None)
    client = HeaderThen(b"PROXY TCP4 127.0.0.2 127.0.0.1 5555 2993\r\n", client_tls)
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
                         clock=reactor)
    pump.flush()
    assert client_app.received == b"* OK ready\r\n"  # the server's greeting, through TLS
    gateway_side = server.wrappedProtocol.wrappedProtocol
    assert gateway_side.received == b"* OK ready\r\n"  # the client Recorder's greeting, decrypted
    assert (gateway_side.peer.host, gateway_side.peer.port) == ("127.0.0.2", 5555)


def test_other_listeners_are_parsed_unchanged(tmp_path):
    """`haproxy:tcp:` and `tcp:` strings pass through as written, parsed with the real reactor."""
    server_tls = ServerTLS.__new__(ServerTLS)  # never asked for a certificate here
    server_tls.cert_path, server_tls.key_path = "c.pem", "k.pem"
    for description in ("haproxy:tcp:2143:interface=127.0.0.1", "tcp:2587",
                        "ssl:2993:privateKey=own.key:certKey=own.pem"):
        reactor = MemoryReactorClock()
        assert listener_endpoint(description, server_tls, reactor) == (description, reactor)
    plain_tls = listener_endpoint("ssl:2993", server_tls, MemoryReactorClock())[1]
    assert isinstance(plain_tls, TLSListeners) and not plain_tls.proxy_header


def test_first_start_makes_a_local_ca_and_a_leaf_it_signs(tmp_path):
    """Neither file: gateway-ca.pem (CA:TRUE, key 0600) and a CA:FALSE serverAuth leaf with SANs for the
    host name, localhost, loopback and the listen addresses, verifying against the CA."""
    import os
    import stat

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert, key = tmp_path / "certs" / "gw.pem", tmp_path / "certs" / "gw.key"
    assert ensure_certificate(str(cert), str(key), hostname="mail.example", names=("192.0.2.5",))
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "gateway-ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ExtendedKeyUsageOID.SERVER_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"mail.example", "localhost"}
    assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} == {"192.0.2.5", "127.0.0.1", "::1"}
    leaf.verify_directly_issued_by(ca)
    for secret in (key, tmp_path / "certs" / "gateway-ca.key"):
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    # A new leaf (both files removed) is signed by the same CA: clients keep trusting it.
    cert.unlink(), key.unlink()
    assert ensure_certificate(str(cert), str(key), hostname="mail.example")
    x509.load_pem_x509_certificate(cert.read_bytes()).verify_directly_issued_by(ca)
    assert not ensure_certificate(str(cert), str(key))  # both exist: used as they are


def test_one_file_missing_is_refused_without_touching_the_other(tmp_path):
    """tls.cert exists and tls.key is a typo: one line naming tls.key, and the certificate is untouched."""
    import pytest

    from gateway.config import ConfigError

    cert, key = tmp_path / "gw.pem", tmp_path / "gw.key"
    ensure_certificate(str(cert), str(key), hostname="localhost")
    before = cert.read_bytes()
    with pytest.raises(ConfigError, match=r"^config key tls\.key: .*gw\.kye does not exist while tls\.cert"):
        ensure_certificate(str(cert), str(tmp_path / "gw.kye"))
    with pytest.raises(ConfigError, match=r"^config key tls\.cert: "):
        ensure_certificate(str(tmp_path / "gw.pme"), str(key))
    assert cert.read_bytes() == before and not (tmp_path / "gw.kye").exists()


def test_a_key_that_does_not_match_or_a_bad_file_is_one_line_naming_the_key(tmp_path):
    import pytest

    from gateway.config import ConfigError
    from gateway.tls import server_options

    ensure_certificate(str(tmp_path / "a.pem"), str(tmp_path / "a.key"), hostname="localhost")
    ensure_certificate(str(tmp_path / "b.pem"), str(tmp_path / "b.key"), hostname="localhost")
    with pytest.raises(ConfigError, match=r"^config key tls\.key: .*b\.key is not the key of the certificate"):
        server_options(str(tmp_path / "a.pem"), str(tmp_path / "b.key"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"^config key tls\.cert: .* are not a PEM certificate and its key"):
        server_options(str(tmp_path / "junk.pem"), str(tmp_path / "a.key"))
    assert server_options(str(tmp_path / "a.pem"), str(tmp_path / "a.key")) is not None
