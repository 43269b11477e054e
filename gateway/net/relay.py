"""Byte relay plumbing: TCP_NODELAY through wrappers, and mutual push producers for flow control."""

from __future__ import annotations

from typing import Any


def set_nodelay(transport: Any) -> None:
    """Set TCP_NODELAY on the TCP transport under any TLS or PROXY-protocol wrappers."""
    seen = 0
    while transport is not None and seen < 8:
        setter = getattr(transport, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except (OSError, AttributeError):
                pass
            return
        transport = getattr(transport, "transport", None)
        seen += 1


def couple(a: Any, b: Any) -> None:
    """Make each transport the other's streaming producer.

    When ``a``'s write buffer fills up, reading from ``b`` pauses until it
    drains, and the other way round, so a slow reader never makes the gateway
    buffer more than the transports' own write buffers.
    """
    a.registerProducer(b, True)
    b.registerProducer(a, True)
