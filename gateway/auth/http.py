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

from twisted.internet import defer
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.iweb import IAgentEndpointFactory

__all__ = ["HTTPError", "Response", "post_form"]

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

    def __init__(self, connector: Any, host: str, port: int, tls: bool, account: dict[str, Any] | None) -> None:
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
    def __init__(self, connector: Any, account: dict[str, Any] | None) -> None:
        self._connector = connector
        self._account = account

    def endpointForURI(self, uri: Any) -> _ConnectorEndpoint:
        host = uri.host.decode("idna") if isinstance(uri.host, bytes) else str(uri.host)
        return _ConnectorEndpoint(self._connector, host.strip("[]"), uri.port, uri.scheme == b"https",
                                  self._account)


async def _exchange(agent: Agent, url: str, headers: Headers, body: bytes) -> Response:
    producer: Any = FileBodyProducer(BytesIO(body))  # an IBodyProducer (zope interfaces are invisible to mypy)
    response: Any = await agent.request(b"POST", url.encode("ascii"), headers, producer)
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


def _timed_out(result: Any, timeout: float) -> Any:
    raise HTTPError(f"no complete answer within {timeout:.0f} s")


async def post_form(reactor: Any, connector: Any, url: str, body: str, *, timeout: float,
                    account: dict[str, Any] | None = None,
                    headers: dict[str, str] | None = None) -> Response:
    """POST an application/x-www-form-urlencoded ``body`` to ``url``; the whole exchange within ``timeout``."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent.usingEndpointFactory(reactor, _Endpoints(connector, account), pool=pool)
    sent = Headers({b"Content-Type": [b"application/x-www-form-urlencoded"],
                    b"Accept": [b"application/json"], b"User-Agent": [b"imap-smtp-gateway"]})
    for name, value in (headers or {}).items():
        sent.setRawHeaders(name.encode("ascii"), [value.encode("latin-1")])
    exchange: defer.Deferred[Response] = defer.Deferred.fromCoroutine(
        _exchange(agent, url, sent, body.encode("utf-8")))
    exchange.addTimeout(timeout, reactor, onTimeoutCancel=_timed_out)
    try:
        return await exchange
    except HTTPError:
        raise
    except defer.CancelledError:
        raise
    except Exception as e:  # connection refused, TLS failure, proxy refusal, malformed answer
        raise HTTPError(_reason(e)) from None


def _reason(e: BaseException) -> str:
    """One line for a failed request; Twisted wraps the causes of a lost request in ``reasons``."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        first = reasons[0]
        e = getattr(first, "value", first)
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
