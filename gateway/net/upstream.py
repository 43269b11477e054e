"""The upstream leg before hand-over: a response reader with one waiter, shared by IMAP and SMTP."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from gateway.net.relay import set_nodelay
from gateway.net.transport import transport_of

MAX_RESPONSE = 256 * 1024


class UpstreamError(Exception):
    """The upstream could not be reached or used; the message is safe to show to the client."""

    code = "upstream"  # the login's reason code in logs and metrics


class UpstreamAuthError(UpstreamError):
    """The upstream refused our credentials (token or password)."""

    code = "upstream-auth"


class OAuth2Unavailable(UpstreamError):
    """No access token: the OAuth2 refresh failed (the provider refused it or could not be reached)."""

    code = "oauth2"


class ProviderThrottled(UpstreamError):
    """The provider asked us to back off this account for ``delay`` seconds."""

    code = "throttled"

    def __init__(self, delay: float) -> None:
        super().__init__(f"Provider throttled this account, retry in {max(1, math.ceil(delay))} s")
        self.delay = delay


@dataclass(frozen=True)
class Credentials:
    """What the gateway logs in upstream with."""

    mechanism: str  # "XOAUTH2", or the leg's password mechanism ("LOGIN" for IMAP, "PASSWORD" for SMTP)
    user: str
    secret: str


def closed_reason(reason: Failure) -> str:
    """Why the upstream connection ended, in words for the client."""
    if reason.check(SSL.Error):
        detail = "certificate verify failed" if "certificate verify failed" in str(reason.value) else "handshake failed"
        return f"upstream TLS error: {detail}"
    return "upstream closed the connection"


class ResponseReader(Protocol):
    """Reads whole responses until ``relay_to`` hands every later byte to a sink.

    Subclasses say what a whole response is in ``_take_response``.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._responses: deque[bytes] = deque()
        self._waiter: defer.Deferred[bytes] | None = None
        self._closed: Failure | None = None
        self._sink: Any = None
        self._on_close: Any = None

    def _take_response(self) -> bytes | None:
        """Remove and return one complete response from ``self._buffer``, or None."""
        raise NotImplementedError

    # Twisted callbacks
    def connectionMade(self) -> None:
        set_nodelay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.write(data)
            return
        self._buffer += data
        while (response := self._take_response()) is not None:
            self._responses.append(response)
        if len(self._buffer) > MAX_RESPONSE:
            self._buffer = b""
            transport_of(self).loseConnection()
        if self._responses and self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.callback(self._responses.popleft())

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._closed = reason
        if self._sink is not None:
            self._sink.flush()
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(UpstreamError(closed_reason(reason)))
        if self._on_close is not None:
            callback, self._on_close = self._on_close, None
            callback()

    def read_response(self) -> defer.Deferred[bytes]:
        """The next complete response from the server."""
        if self._responses:
            return defer.succeed(self._responses.popleft())
        if self._closed is not None:
            return defer.fail(UpstreamError(closed_reason(self._closed)))
        self._waiter = defer.Deferred(self._forget_waiter)
        return self._waiter

    def _forget_waiter(self, waiter: defer.Deferred[bytes]) -> None:
        if self._waiter is waiter:
            self._waiter = None

    @property
    def closed(self) -> bool:
        """The connection has ended."""
        return self._closed is not None

    def on_close(self, callback: Any) -> None:
        """Call ``callback()`` when the connection ends (replaces any earlier one)."""
        self._on_close = callback

    def take_back(self) -> None:
        """Stop relaying: later bytes are read as responses again (a connection given back to a pool)."""
        self._sink = None
        self._on_close = None
        self._buffer = b""
        self._responses.clear()

    def relay_to(self, sink: Any, on_close: Any) -> bytes:
        """From now on every byte goes to ``sink.write``; returns what was read but not consumed.

        ``sink`` also has ``flush()``, called when the connection ends;
        ``on_close`` is called after that.
        """
        self._sink = sink
        self._on_close = on_close
        leftover = b"".join(self._responses) + self._buffer
        self._responses.clear()
        self._buffer = b""
        return leftover
