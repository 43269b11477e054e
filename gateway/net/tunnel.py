"""Run a proxy handshake on a connection, then give the application the connection itself.

`ProxyEndpoint(inner, handshake, ...)` connects `inner` (TCP, or TLS to an
https:// proxy), runs the sans-io `handshake` (SOCKS or CONNECT), and then
hands the real transport to the application's protocol, txtorcon style: the
transport's protocol is replaced, so data goes straight to the application and
`transport.startTLS()` (IMAP STARTTLS) works on the tunnelled connection.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionRefusedError
from twisted.internet.error import TimeoutError as TxTimeoutError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.net.proxy import Handshake, HandshakeError


class ProxyError(ConnectError):
    """The proxy refused, failed or could not be reached; str() is safe to show: `proxy: ...`."""

    def __init__(self, reason: str) -> None:
        super().__init__(string=reason)
        self.reason = reason if reason.startswith("proxy: ") else f"proxy: {reason}"

    def __str__(self) -> str:
        return self.reason


class ProxyUnreachable(ProxyError):
    """No connection to the proxy itself (worth trying another address or attempt)."""


def describe_failure(error: BaseException) -> str:
    """A short reason for a connection error, e.g. `Connection refused`, `timed out`."""
    if isinstance(error, ConnectionRefusedError):
        return "Connection refused"
    if isinstance(error, (TxTimeoutError, defer.TimeoutError)):
        return "timed out"
    os_error = getattr(error, "osError", None)
    if isinstance(os_error, str) and os_error:
        return os_error.split(":", 1)[-1].strip().rstrip(".") or os_error
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:160]


def _take_over(transport: Any, protocol: Any) -> bool:
    """Make ``transport`` deliver to ``protocol`` directly; False when it cannot be rewired."""
    if isinstance(transport, TLSMemoryBIOProtocol):
        transport.wrappedProtocol = protocol
        return True
    if hasattr(transport, "protocol"):  # twisted.internet.tcp.Client (behind endpoints' wrapper)
        transport.protocol = protocol
        return True
    return False


class _Handshake(Protocol):
    """Speaks the proxy protocol until the tunnel is up, then steps aside."""

    transport: Any

    def __init__(self, machine: Handshake, factory: Any, done: defer.Deferred[IProtocol],
                 reactor: Any, timeout: float, label: str) -> None:
        self._machine = machine
        self._factory = factory
        self._done: defer.Deferred[IProtocol] | None = done
        self._reactor = reactor
        self._timeout = timeout
        self._label = label
        self._timer: Any = None
        self._wrapped: Any = None

    def connectionMade(self) -> None:
        self._timer = self._reactor.callLater(self._timeout, self._timed_out)
        self.transport.write(self._machine.start())

    def dataReceived(self, data: bytes) -> None:
        if self._wrapped is not None:  # only when the transport could not be rewired
            self._wrapped.dataReceived(data)
            return
        if self._done is None:
            return
        try:
            step = self._machine.receive_data(data)
        except HandshakeError as e:
            self._fail(ProxyError(str(e)))
            return
        if step.send:
            self.transport.write(step.send)
        if step.done:
            self._hand_over(step.leftover)

    def _hand_over(self, leftover: bytes) -> None:
        self._cancel_timer()
        wrapped = self._factory.buildProtocol(self.transport.getPeer())
        if wrapped is None:
            self._fail(ProxyError("connection refused by the application"))
            return
        if not _take_over(self.transport, wrapped):
            self._wrapped = wrapped
        wrapped.makeConnection(self.transport)
        done, self._done = self._done, None
        if done is not None:
            done.callback(wrapped)
        if leftover:
            wrapped.dataReceived(leftover)

    def _fail(self, error: ProxyError) -> None:
        self._cancel_timer()
        done, self._done = self._done, None
        self.transport.abortConnection()
        if done is not None:
            done.errback(error)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(ProxyError(f"no answer from proxy {self._label} within {self._timeout:.0f} s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._cancel_timer()
        if self._wrapped is not None:
            self._wrapped.connectionLost(reason)
            return
        done, self._done = self._done, None
        if done is not None:
            why = describe_failure(reason.value) if not reason.check(ConnectionDone) else "closed"
            done.errback(ProxyError(f"proxy {self._label} ended the connection during the handshake ({why})"))


@implementer(IStreamClientEndpoint)
class ProxyEndpoint:
    """An endpoint that tunnels through a proxy reached by ``inner``."""

    def __init__(self, inner: Any, handshake: Callable[[], Handshake], reactor: Any, *,
                 timeout: float, label: str) -> None:
        self._inner = inner
        self._handshake = handshake
        self._reactor = reactor
        self._timeout = timeout
        self._label = label

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        handshakes: list[_Handshake] = []
        connecting: list[defer.Deferred[Any]] = []

        def cancel(_: defer.Deferred[IProtocol]) -> None:
            if handshakes:
                handshakes[0].abort()
            elif connecting:
                connecting[0].cancel()

        done: defer.Deferred[IProtocol] = defer.Deferred(cancel)
        try:
            machine = self._handshake()
        except HandshakeError as e:
            return defer.fail(ProxyError(str(e)))

        def build() -> _Handshake:
            protocol = _Handshake(machine, factory, done, self._reactor, self._timeout, self._label)
            handshakes.append(protocol)
            return protocol

        handshake_factory = Factory.forProtocol(build)
        handshake_factory.noisy = False
        inner = self._inner.connect(handshake_factory)
        connecting.append(inner)

        def unreachable(failure: Failure) -> None:
            if done.called:
                return None
            if failure.check(defer.CancelledError):
                done.errback(failure)
                return None
            done.errback(ProxyUnreachable(
                f"cannot connect to proxy {self._label}: {describe_failure(failure.value)}"))
            return None

        inner.addCallbacks(lambda _: None, unreachable)
        return done
