"""HTTP requests to OAuth2 providers on Twisted's HTTP client, through the gateway's own connector.

No thread is held by a request: a provider that answers slowly (or one byte
every few seconds) costs a socket, not a worker that logins of other
accounts need. Each request has one deadline for the whole exchange
(connect, TLS, request, every byte of the answer); at the deadline it is
cancelled and its connection aborted. Connections leave by the account's
route: its source address, its proxy or the global one, ``no_proxy``, and
verified TLS, exactly as the IMAP and SMTP legs do.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer

from gateway.store.records import Routing
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.iweb import IAgentEndpointFactory

__all__ = ["HTTPError", "Response", "host_port", "post_form", "request"]

MAX_BODY = 1024 * 1024


class HTTPError(Exception):
    """The request could not be made or answered in time; the message is safe to show."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


@implementer(IStreamClientEndpoint)
class _ConnectorEndpoint:
    """An endpoint that connects through the gateway's Connector (route, proxy, verified TLS)."""

    def __init__(self, connector: Any, host: str, port: int, tls: bool, account: Routing | None) -> None:
        self._connector = connector
        self._host, self._port, self._tls, self._account = host, port, tls, account

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        async def connect() -> Any:
            protocol, _route = await self._connector.connect(
                self._host, self._port, factory, tls=self._tls, account=self._account)
            return protocol
        return defer.Deferred.fromCoroutine(connect())


@implementer(IAgentEndpointFactory)
class _Endpoints:
    def __init__(self, connector: Any, account: Routing | None) -> None:
        self._connector = connector
        self._account = account

    def endpointForURI(self, uri: Any) -> _ConnectorEndpoint:
        host = uri.host.decode("idna") if isinstance(uri.host, bytes) else str(uri.host)
        return _ConnectorEndpoint(self._connector, host.strip("[]"), uri.port, uri.scheme == b"https",
                                  self._account)


async def _exchange(agent: Agent, method: bytes, url: str, headers: Headers, body: bytes | None) -> Response:
    producer: Any = FileBodyProducer(BytesIO(body)) if body is not None else None  # an IBodyProducer
    response: Any = await agent.request(method, url.encode("ascii"), headers, producer)
    if isinstance(response.length, int) and response.length > MAX_BODY:
        response.deliverBody(_Discard())
        raise HTTPError(f"HTTP {response.code}: answer larger than {MAX_BODY} bytes")
    payload = await readBody(response)
    return Response(response.code, payload[:MAX_BODY])


class _Discard:
    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


def host_port(url: str) -> str:
    """``host:port`` of a URL, as error texts name it."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port or (443 if parts.scheme == 'https' else 80)}"


async def request(reactor: Any, connector: Any, method: str, url: str, *, timeout: float,
                  body: str | None = None, account: Routing | None = None,
                  headers: dict[str, str] | None = None) -> Response:
    """One HTTP request through the gateway's connector; the whole exchange within ``timeout``.

    Failures are :class:`HTTPError` naming the host and the cause:
    ``cannot connect to oauth2.googleapis.com:443: DNS lookup failed``,
    ``no complete answer from oauth2.googleapis.com:443 within 15 s``.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent.usingEndpointFactory(reactor, _Endpoints(connector, account), pool=pool)
    sent = Headers({b"Accept": [b"application/json"], b"User-Agent": [b"imap-smtp-gateway"]})
    if body is not None:
        sent.setRawHeaders(b"Content-Type", [b"application/x-www-form-urlencoded"])
    for name, value in (headers or {}).items():
        sent.setRawHeaders(name.encode("ascii"), [value.encode("latin-1")])
    where = host_port(url)

    def timed_out(result: Any, seconds: float) -> Any:
        raise HTTPError(f"no complete answer from {where} within {seconds:.0f} s")

    exchange: defer.Deferred[Response] = defer.Deferred.fromCoroutine(
        _exchange(agent, method.encode("ascii"), url, sent, body.encode("utf-8") if body is not None else None))
    exchange.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
    try:
        return await exchange
    except HTTPError:
        raise
    except defer.CancelledError:
        raise
    except Exception as e:  # connection refused, TLS failure, proxy refusal, malformed answer
        raise HTTPError(f"cannot connect to {where}: {_reason(e)}") from None


async def post_form(reactor: Any, connector: Any, url: str, body: str, *, timeout: float,
                    account: Routing | None = None,
                    headers: dict[str, str] | None = None) -> Response:
    """POST an application/x-www-form-urlencoded ``body`` to ``url``; the whole exchange within ``timeout``."""
    return await request(reactor, connector, "POST", url, timeout=timeout, body=body, account=account,
                         headers=headers)


def _reason(e: BaseException) -> str:
    """One short cause for a failed request; Twisted wraps the causes of a lost request in ``reasons``."""
    from OpenSSL import SSL
    from twisted.internet import error

    reasons = getattr(e, "reasons", None)
    if reasons:
        first = reasons[0]
        e = getattr(first, "value", first)
    if isinstance(e, error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (error.TCPTimedOutError, error.TimeoutError)):
        return "connection timed out"
    if isinstance(e, error.NoRouteError):
        return "no route to host"
    if isinstance(e, SSL.Error):
        details = e.args[0] if e.args else None
        if isinstance(details, list) and details and isinstance(details[-1], tuple):
            return f"TLS: {details[-1][-1]}"
        return "TLS handshake failed"
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
