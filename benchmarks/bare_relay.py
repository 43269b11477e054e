"""A reference relay: Twisted's port forwarder with TLS on both legs, no parsing, no auth.

    python -m benchmarks.bare_relay --listen PORT --cert CERT --key KEY \\
        --upstream-host 127.0.0.1 --upstream-port PORT --ca CAFILE [--server-name NAME]

Accepts TLS on 127.0.0.1:PORT with the certificate and key given (the
gateway's pair, in the benchmarks), opens a TLS connection to the upstream
(Dovecot's imaps port) verified against CAFILE and ``--server-name`` (default:
the upstream host), and copies bytes both ways. It is the shape of
``twisted.protocols.portforward``: each side is the other's streaming producer,
the client side is paused until the upstream is connected. The only additions
are what the gateway does at the socket level: TCP_NODELAY on both sockets,
and TCP_QUICKACK after each read from the client (clients that send a line in
two writes, like imaplib's AUTHENTICATE, otherwise wait 40 ms for a delayed
ACK: Nagle). Runs in the foreground until killed; warnings and errors go to
stderr.

``bare_relay(...)`` runs it as a subprocess for the other benchmarks.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, cast

from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import ILogFilterPredicate, ILogObserver
from twisted.protocols import portforward

REPO = Path(__file__).resolve().parents[1]


def _reactor() -> Any:
    """The global reactor, imported late so that importing this module installs none."""
    from twisted.internet import reactor

    return reactor


def _tcp_socket(transport: Any) -> socket.socket:
    """The TCP socket under a TLS wrapper."""
    while not isinstance(getattr(transport, "socket", None), socket.socket):
        transport = transport.transport
    return transport.socket


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _quickack(sock: socket.socket) -> None:
    """Acknowledge at once what arrives next (the flag resets itself, so set it after every read)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


class RelayClient(portforward.ProxyClient):
    """The upstream leg."""

    noisy = False

    def connectionMade(self) -> None:
        _nodelay(_tcp_socket(self.transport))
        super().connectionMade()


class RelayClientFactory(portforward.ProxyClientFactory):
    protocol = RelayClient
    noisy = False


class RelayServer(portforward.ProxyServer):
    """The client leg: pauses the client, connects upstream over TLS."""

    noisy = False
    clientProtocolFactory = RelayClientFactory
    factory: RelayFactory
    transport: Any  # TLS over TCP, a push producer and a consumer
    sock: socket.socket

    def connectionMade(self) -> None:
        self.sock = _tcp_socket(self.transport)
        _nodelay(self.sock)
        self.transport.pauseProducing()
        client = self.clientProtocolFactory()
        client.setServer(self)
        _reactor().connectSSL(self.factory.host, self.factory.port, client, self.factory.upstream_tls)

    def dataReceived(self, data: bytes) -> None:
        _quickack(self.sock)
        super().dataReceived(data)


class RelayFactory(portforward.ProxyFactory):
    protocol = RelayServer
    noisy = False

    def __init__(self, host: str, port: int, upstream_tls: IOpenSSLClientConnectionCreator) -> None:
        super().__init__(host, port)
        self.upstream_tls = upstream_tls


def run(listen: int, cert: Path, key: Path, upstream_host: str, upstream_port: int, ca: Path,
        server_name: str | None = None) -> None:
    """Listen on 127.0.0.1:``listen`` and relay to the upstream until the reactor stops."""
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)

    # Begin logging (warnings and up) so that Twisted does not keep every event in memory.
    # (casts: mypy does not see zope's @implementer)
    warnings = cast(ILogFilterPredicate, LogLevelFilterPredicate(LogLevel.warn))
    to_stderr = cast(ILogObserver, textFileLogObserver(sys.stderr))
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, FilteringLogObserver(to_stderr, [warnings]))])
    identity = ssl.PrivateCertificate.loadPEM(cert.read_bytes() + b"\n" + key.read_bytes())
    server_tls = ssl.CertificateOptions(privateKey=identity.privateKey.original,
                                        certificate=identity.original,
                                        raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    upstream_tls = ssl.optionsForClientTLS(server_name or upstream_host,
                                           trustRoot=ssl.Certificate.loadPEM(ca.read_bytes()))
    factory = RelayFactory(upstream_host, upstream_port, upstream_tls)
    reactor = _reactor()
    reactor.listenSSL(listen, factory, server_tls, interface="127.0.0.1")
    reactor.run()


@dataclass
class BareRelay:
    """A running bare relay subprocess."""

    proc: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def bare_relay(*, cert: Path, key: Path, upstream_host: str, upstream_port: int, ca: Path,
               server_name: str | None = None, log_path: Path | None = None,
               timeout: float = 15.0) -> Iterator[BareRelay]:
    """Run the relay as a subprocess until it accepts connections; kill it after."""
    port = _free_port()
    command = [sys.executable, "-m", "benchmarks.bare_relay", "--listen", str(port),
               "--cert", str(cert), "--key", str(key), "--upstream-host", upstream_host,
               "--upstream-port", str(upstream_port), "--ca", str(ca)]
    if server_name:
        command += ["--server-name", server_name]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log)
    finally:
        if log_path:
            log.close()  # type: ignore[union-attr]
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                detail = log_path.read_text(errors="replace") if log_path else ""
                raise RuntimeError(f"bare relay exited with {proc.returncode}\n{detail}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bare relay not accepting on {port} after {timeout} s")
                time.sleep(0.05)
        yield BareRelay(proc, port)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--cert", type=Path, required=True, help="server certificate (PEM)")
    parser.add_argument("--key", type=Path, required=True, help="server private key (PEM)")
    parser.add_argument("--upstream-host", required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--ca", type=Path, required=True, help="CA file verifying the upstream")
    parser.add_argument("--server-name", help="name to verify upstream (default: --upstream-host)")
    args = parser.parse_args()
    run(args.listen, args.cert, args.key, args.upstream_host, args.upstream_port, args.ca,
        args.server_name)


if __name__ == "__main__":
    main()
