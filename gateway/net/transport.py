"""The static type of a connected protocol's transport.

Twisted declares ``Protocol.transport`` as ``ITransport | None``. A zope
interface does not work as a static type without a mypy plugin: its methods
are declared without ``self``, so every call looks wrong to mypy, and the
``@implementer`` classes under our protocols (TCP, TLS, PROXY-protocol
wrappers) are not seen to provide it. It also names neither the producer
methods nor ``startTLS``, which those transports have.
"""

from __future__ import annotations

import typing
from typing import Any, cast

from twisted.internet.protocol import BaseProtocol


class StreamTransport(typing.Protocol):
    """What the gateway calls on a stream transport: ITransport, ITCPTransport's abort,
    ITLSTransport, IPushProducer and IConsumer."""

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def startTLS(self, contextFactory: Any) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


def transport_of(protocol: BaseProtocol) -> StreamTransport:
    """``protocol.transport`` once connected.

    ``makeConnection`` sets it before ``connectionMade`` and a stream protocol's
    transport is never cleared, so every later callback has one.
    """
    transport = protocol.transport
    assert transport is not None, "protocol used before makeConnection"
    return cast(StreamTransport, transport)
