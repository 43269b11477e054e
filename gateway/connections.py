"""Live sessions: what /v1/connections shows and what the metrics count."""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable

from gateway.metrics import RELAYED, SESSIONS


class Session:
    """One relayed session, as listed by /v1/connections."""

    def __init__(self, registry: "Connections", protocol: str, account: str, client: str,
                 upstream: str, source: str | None, proxy: str | None, pooled: bool = False) -> None:
        self._registry = registry
        self.id = next(registry._ids)
        self.protocol = protocol
        self.account = account
        self.client = client
        self.upstream = upstream
        self.source = source
        self.proxy = proxy
        self.pooled = pooled  # the upstream connection was reused from the pool
        self.token_id: str | None = None  # the client token's public id (for ?disconnect=true)
        self.ender: Callable[[], None] | None = None  # ends the session (set by the protocol)
        self.started = time.time()
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0
        self._clock = registry.clock
        self.last_active = self._clock()  # when the last byte was relayed, either way
        self._up = RELAYED.labels(protocol, "to_upstream")
        self._down = RELAYED.labels(protocol, "to_client")

    def to_upstream(self, n: int) -> None:
        self.bytes_to_upstream += n
        self.last_active = self._clock()
        self._up.inc(n)

    def to_client(self, n: int) -> None:
        self.bytes_to_client += n
        self.last_active = self._clock()
        self._down.inc(n)

    def close(self) -> None:
        self._registry._close(self)

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id, "protocol": self.protocol, "account": self.account,
            "client": self.client, "upstream": self.upstream,
            "localAddress": self.source, "proxy": self.proxy, "pooled": self.pooled,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "bytesToUpstream": self.bytes_to_upstream, "bytesToClient": self.bytes_to_client,
        }


class Connections:
    """Registry of live relayed sessions."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.clients: set[Any] = set()  # every client connection, logged in or not (for shutdown)
        self._ids = itertools.count(1)
        self._sessions: dict[int, Session] = {}

    def open(self, protocol: str, account: str, client: str, upstream: str,
             source: str | None = None, proxy: str | None = None, pooled: bool = False) -> Session:
        session = Session(self, protocol, account, client, upstream, source, proxy, pooled)
        self._sessions[session.id] = session
        SESSIONS.labels(protocol).inc()
        return session

    def _close(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is not None:
            SESSIONS.labels(session.protocol).dec()

    def end(self, session_id: int) -> bool:
        """End one live session (the administrator's DELETE); False when there is none."""
        session = self._sessions.get(session_id)
        if session is None or session.ender is None:
            return False
        session.ender()
        return True

    def end_token(self, token_id: str) -> int:
        """End every live session that logged in with this token; how many."""
        ended = 0
        for session in list(self._sessions.values()):
            if session.token_id == token_id and session.ender is not None:
                session.ender()
                ended += 1
        return ended

    def snapshot(self) -> list[dict[str, Any]]:
        return [s.view() for s in self._sessions.values()]

    def __len__(self) -> int:
        return len(self._sessions)
