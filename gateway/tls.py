"""TLS material: the listeners' certificate (generated when absent) and upstream trust."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import ffi as _ssl_ffi, lib as _ssl_lib  # session calls pyOpenSSL does not wrap
from twisted.internet import ssl
from twisted.internet.error import VerifyError
from twisted.internet._sslverify import IOpenSSLTrustRoot  # the interface optionsForClientTLS takes
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory  # the package exports only proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

log = Logger()


CA_CERT = "gateway-ca.pem"   # beside tls.cert
CA_KEY = "gateway-ca.key"


def ensure_certificate(cert_path: str, key_path: str, hostname: str | None = None,
                       names: tuple[str, ...] = ()) -> bool:
    """When neither tls.cert nor tls.key exists: a local CA beside them and a certificate it signs.

    The way mkcert does it: clients trust ``gateway-ca.pem`` once (Thunderbird's
    Authorities, the macOS keychain, Python's ``cafile=``), and the server
    certificate is a proper leaf (``CA:FALSE``, serverAuth, SANs for the host
    name, ``localhost``, 127.0.0.1, ::1 and ``names``). An existing CA is reused,
    so a new server certificate stays trusted. When only one of the two files
    exists (a typo in a path) nothing is written: ConfigError names the missing
    one. Keys are written 0600. Returns True when files were generated.
    """
    from gateway.config import ConfigError

    cert_file, key_file = Path(cert_path), Path(key_path)
    if cert_file.exists() and key_file.exists():
        return False
    if cert_file.exists() or key_file.exists():
        missing, present = ("tls.key", "tls.cert") if cert_file.exists() else ("tls.cert", "tls.key")
        missing_path = key_path if cert_file.exists() else cert_path
        raise ConfigError(f"config key {missing}: {missing_path} does not exist while {present} does; "
                          f"nothing is generated over an existing file: fix the path, or remove both "
                          f"to have a local CA and a certificate generated")
    hostname = hostname or socket.gethostname() or "localhost"
    ca_cert_file, ca_key_file = cert_file.parent / CA_CERT, cert_file.parent / CA_KEY
    now = datetime.datetime.now(datetime.timezone.utc)
    if ca_cert_file.exists() and ca_key_file.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_file.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"config key tls.cert: {ca_key_file} is not the EC key of a gateway CA")
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IMAP/SMTP gateway local CA"),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"gateway local CA {hostname}")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(ca_key_file, ca_key)
        ca_cert_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        log.info("Generated a local CA in {ca}: trust it in mail clients (README \"Certificates\")",
                 ca=str(ca_cert_file))
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for name in (hostname, "localhost", *names):
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name.strip("[]"))))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    unique: list[x509.GeneralName] = []
    for alt in alt_names:
        if alt not in unique:
            unique.append(alt)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(unique), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(key_file, key)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("Generated a certificate for {hostname} signed by the local CA in {cert}",
             hostname=hostname, cert=cert_path)
    return True


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def server_options(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """TLS options for listeners and STARTTLS, from the PEM files.

    An unreadable file, one that is not PEM, or a key that does not match the
    certificate is a ConfigError naming the key (one line at start-up).
    """
    from gateway.config import ConfigError

    try:
        cert_pem = Path(cert_path).read_bytes()
    except OSError as e:
        raise ConfigError(f"config key tls.cert: cannot read {cert_path}: {e.strerror}") from None
    try:
        key_pem = Path(key_path).read_bytes()
    except OSError as e:
        raise ConfigError(f"config key tls.key: cannot read {key_path}: {e.strerror}") from None
    try:
        cert = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        chain = [ssl.Certificate.loadPEM(block).original for block in _pem_blocks(cert_pem)[1:]]
        options = ssl.CertificateOptions(
            privateKey=cert.privateKey.original,
            certificate=cert.original,
            extraCertChain=chain or None,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
    except VerifyError:
        raise ConfigError(f"config key tls.key: {key_path} is not the key of the certificate in "
                          f"{cert_path}") from None
    except Exception as e:  # OpenSSL's PEM errors: not a certificate or not a key
        raise ConfigError(f"config key tls.cert: {cert_path} and {key_path} are not a PEM certificate "
                          f"and its key ({_openssl_reason(e)})") from None
    return options


def _openssl_reason(e: BaseException) -> str:
    details = e.args[0] if e.args else None
    if isinstance(details, list) and details and isinstance(details[-1], tuple):
        return str(details[-1][-1]) or type(e).__name__
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__


def _pem_blocks(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [part + marker for part in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in part]


@implementer(IOpenSSLTrustRoot)
class SystemPlusFile:
    """The platform's trust store plus the CAs of one extra PEM file."""

    def __init__(self, ca_file: str | None) -> None:
        self.ca_file = ca_file

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        if self.ca_file:
            context.load_verify_locations(self.ca_file)


def client_options(hostname: str, ca_file: str | None) -> "ResumingClientTLS":
    """Client TLS options that verify ``hostname`` (a name or an IP address) and resume sessions."""
    # @implementer(IOpenSSLTrustRoot) is invisible to mypy (zope interfaces need a plugin).
    return ResumingClientTLS(ssl.optionsForClientTLS(
        hostname, trustRoot=cast(IOpenSSLTrustRoot, SystemPlusFile(ca_file))))


@implementer(IOpenSSLClientConnectionCreator)
class ResumingClientTLS:
    """Client TLS options for one host that offer the host's last TLS session on each new connection.

    A resumed handshake skips the certificate chain and its verification
    (the providers' chains are 3-5 KB and verifying them is most of the
    client's handshake CPU). The session is taken from a connection once it
    has read data (TLS 1.3 tickets arrive after the handshake) and kept as
    DER bytes: a session object shared with a connection that later closes
    without a TLS shutdown is marked not resumable by OpenSSL (seen: handing
    the live object back never resumed, a DER copy does). The server decides
    whether to resume; a full, fully verified handshake is the fallback.
    Dovecot in its default high-security mode (a login process per
    connection) never resumes; Gmail, Microsoft 365 and Dovecot with
    ``service_count = 0`` do. pyOpenSSL wraps none of the OpenSSL calls this
    needs, so they come from its bindings; without them nothing is resumed.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner  # Twisted's ClientTLSOptions
        self._session: bytes | None = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        if self._session is not None:
            try:
                _set_session(connection, self._session)
            except Exception:  # a session OpenSSL will not take: a full handshake
                self._session = None
        return connection

    def remember(self, connection: Any) -> bool:
        """Keep ``connection``'s session for the next one; returns whether it was itself resumed."""
        try:
            resumed = bool(_ssl_lib.SSL_session_reused(connection._ssl))
            session = connection.get_session()
            if session is not None:
                self._session = _session_der(session)
        except Exception:
            return False
        return resumed

    def forget(self) -> None:
        self._session = None


def _session_der(session: SSL.Session) -> bytes:
    size = _ssl_lib.i2d_SSL_SESSION(session._session, _ssl_ffi.NULL)
    if size <= 0:
        raise ValueError("session cannot be encoded")
    buffer = _ssl_ffi.new("unsigned char[]", size)
    _ssl_lib.i2d_SSL_SESSION(session._session, _ssl_ffi.new("unsigned char **", buffer))
    return bytes(_ssl_ffi.buffer(buffer, size))


def _set_session(connection: SSL.Connection, der: bytes) -> None:
    buffer = _ssl_ffi.new("unsigned char[]", der)
    pointer = _ssl_ffi.new("unsigned char **", buffer)
    raw = _ssl_lib.d2i_SSL_SESSION(_ssl_ffi.NULL, _ssl_ffi.cast("const unsigned char **", pointer), len(der))
    if raw == _ssl_ffi.NULL:
        raise ValueError("session cannot be decoded")
    try:
        if not _ssl_lib.SSL_set_session(connection._ssl, raw):  # takes its own reference
            raise ValueError("session refused")
    finally:
        _ssl_lib.SSL_SESSION_free(raw)


TLS_PREFIXES = ("ssl:", "haproxy:ssl:")


def listener_description(description: str, cert_path: str, key_path: str) -> str:
    """Add the gateway's certificate to an ``ssl:`` endpoint string that names none."""
    if not description.startswith(TLS_PREFIXES) or "privateKey=" in description:
        return description

    def quote(path: str) -> str:
        return path.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")

    return f"{description}:privateKey={quote(key_path)}:certKey={quote(cert_path)}"


PROXY_TLS_PREFIX = "haproxy:ssl:"


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The certificate every gateway listener and STARTTLS serves, reloadable (SIGHUP).

    Each new TLS connection takes the current options; a reload swaps them, so
    connections already up keep the certificate they started with and the next
    handshake gets the new one. A reload that fails (missing file, key that does
    not match) keeps the current certificate and says why.
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.options = server_options(cert_path, key_path)  # ConfigError at start-up

    def reload(self) -> str | None:
        """Read the files again; None when the new certificate is in use, else why not."""
        from gateway.config import ConfigError

        try:
            self.options = server_options(self.cert_path, self.key_path)
        except ConfigError as e:
            return str(e)
        return None

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.options.getContext(), None)

    def subject(self) -> str:
        """The current certificate's subject and expiry, for the reload log line."""
        cert = cast(Any, self.options).certificate
        expires = cert.to_cryptography().not_valid_after_utc.strftime("%Y-%m-%d")
        return f"{cert.get_subject().CN or '-'} (expires {expires})"


class TLSListeners:
    """The reactor a gateway TLS listener's ``ssl:`` endpoint is parsed with: it listens with the
    gateway's reloadable :class:`ServerTLS` instead of the options the endpoint parser built from
    the files once, and, for ``haproxy:ssl:``, reads the PROXY header before TLS.

    Twisted's ``haproxy:`` parser wraps the endpoint that follows it, so
    ``haproxy:ssl:`` decrypts first and expects the PROXY header inside the TLS
    stream. HAProxy sends it in clear before the client's ClientHello, and the
    handshake fails on it. With ``proxy_header`` the port is plain TCP with the
    PROXY parser outermost and TLS inside it.
    """

    def __init__(self, reactor: Any, server_tls: ServerTLS, proxy_header: bool) -> None:
        self._reactor = reactor
        self.server_tls = server_tls
        self.proxy_header = proxy_header

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,
                  interface: str = "") -> Any:
        if not self.proxy_header:
            return self._reactor.listenSSL(port, factory, self.server_tls, backlog=backlog, interface=interface)
        creator = cast(IOpenSSLServerConnectionCreator, self.server_tls)  # @implementer, invisible to mypy
        tls = TLSMemoryBIOFactory(creator, False, factory, clock=self._reactor)
        return self._reactor.listenTCP(port, HAProxyWrappingFactory(tls), backlog=backlog, interface=interface)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def listener_endpoint(description: str, server_tls: ServerTLS, reactor: Any) -> tuple[str, Any]:
    """The endpoint string of a client-facing listener and the reactor to parse it with.

    An ``ssl:`` or ``haproxy:ssl:`` listener that names no key of its own serves
    ``server_tls`` (reloaded on SIGHUP); one with its own ``privateKey=`` keeps
    what it names, read once.
    """
    if not description.startswith(TLS_PREFIXES) or "privateKey=" in description:
        return description, reactor
    description = listener_description(description, server_tls.cert_path, server_tls.key_path)
    if description.startswith(PROXY_TLS_PREFIX):
        return description[len("haproxy:"):], TLSListeners(reactor, server_tls, proxy_header=True)
    return description, TLSListeners(reactor, server_tls, proxy_header=False)
