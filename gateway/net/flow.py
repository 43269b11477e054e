"""One owner for whether a client connection is read: a set of reasons to pause, before and after login.

Several parties want a client to stop sending: the pre-auth side while the
client does not read our answers, the login while bytes are held for it, the
SMTP relay filter while a reply is pending, the relay while the upstream's
write buffer is full. Each pauses and resumes only its own reason, so none
can resume what another still holds; the transport reads again when the set
is empty.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Flow", "FlowProducer", "OUTPUT", "LOGIN", "FILTER", "UPSTREAM"]

OUTPUT = "client not reading"     # our answers are queued: the client does not read them
LOGIN = "login"                   # the upstream login runs and the held bytes reached their limit
FILTER = "smtp filter"            # the SMTP relay filter holds the client
UPSTREAM = "upstream full"        # the upstream's write buffer is full


class Flow:
    """Pauses a transport's reading while any reason is held."""

    __slots__ = ("_transport", "_reasons")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._reasons: set[str] = set()

    @property
    def paused(self) -> bool:
        return bool(self._reasons)

    def holds(self, reason: str) -> bool:
        return reason in self._reasons

    def pause(self, reason: str) -> None:
        if not self._reasons:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons:
            self._transport.resumeProducing()


class FlowProducer:
    """A push producer (for another transport's registerProducer) that pauses a Flow for one reason.

    ``stopProducing`` does nothing: closing is the session's decision.
    """

    __slots__ = ("flow", "reason", "on_pause", "on_resume")

    def __init__(self, flow: Flow | None, reason: str, on_pause: Any = None, on_resume: Any = None) -> None:
        self.flow = flow
        self.reason = reason
        self.on_pause = on_pause
        self.on_resume = on_resume

    def pauseProducing(self) -> None:
        if self.flow is not None:
            self.flow.pause(self.reason)
        if self.on_pause is not None:
            self.on_pause()

    def resumeProducing(self) -> None:
        if self.flow is not None:
            self.flow.resume(self.reason)
        if self.on_resume is not None:
            self.on_resume()

    def stopProducing(self) -> None:
        pass
