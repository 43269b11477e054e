"""Fakes for the DNSBL tests: a store of settings documents and a resolver answering from a script."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError


class MemoryStore:
    def __init__(self) -> None:
        self.docs: dict[str, Any] = {}

    async def get_settings(self, name: str) -> Any:
        return self.docs.get(name)

    async def put_settings(self, name: str, data: Any) -> None:
        self.docs[name] = data

    async def list_accounts(self) -> list[dict[str, Any]]:
        return []


class ScriptedResolver:
    """lookupAddress/lookupText as twisted.names' client answers them, from a script per query name:
    a list of A codes (or (codes, TXT text)), "nx", "servfail" or "hang" (a Deferred nobody fires).
    With ``hold``, every answer waits in ``held`` until the test releases it. ``most_outstanding``
    counts the lookups asked and not yet answered, at their highest."""

    def __init__(self, script: dict[str, Any] | None = None, default: Any = "nx", hold: bool = False) -> None:
        self.script = dict(script or {})
        self.default = default
        self.hold = hold
        self.asked: list[tuple[str, str, Any]] = []
        self.pending: list[defer.Deferred[Any]] = []
        self.held: list[tuple[defer.Deferred[Any], defer.Deferred[Any]]] = []
        self.outstanding = self.most_outstanding = 0

    def _waiting(self) -> defer.Deferred[Any]:
        waiting: defer.Deferred[Any] = defer.Deferred()
        self.outstanding += 1
        self.most_outstanding = max(self.most_outstanding, self.outstanding)

        def answered(result: Any) -> Any:
            self.outstanding -= 1
            return result
        waiting.addBoth(answered)
        return waiting

    def _scripted(self, kind: int, name: str) -> defer.Deferred[Any]:
        what = self.script.get(name, self.default)
        if what == "nx":
            return defer.fail(DNSNameError(name))
        if what == "servfail":
            return defer.fail(DNSServerError(name))
        codes, text = what if isinstance(what, tuple) else (what, None)
        if kind == dns.A:
            records = [dns.RRHeader(name, dns.A, payload=dns.Record_A(code)) for code in codes]
        else:
            records = [dns.RRHeader(name, dns.TXT, payload=dns.Record_TXT(text.encode()))] if text else []
        return defer.succeed((records, [], []))

    def _answer(self, kind: int, name: str) -> defer.Deferred[Any]:
        if self.script.get(name, self.default) == "hang":
            waiting = self._waiting()
            self.pending.append(waiting)
            return waiting
        if self.hold:
            waiting = self._waiting()
            self.held.append((waiting, self._scripted(kind, name)))
            return waiting
        return self._scripted(kind, name)

    def release(self) -> int:
        """Answer every held lookup (answers may ask new ones, held for the next release)."""
        batch, self.held = self.held, []
        for waiting, answer in batch:
            answer.chainDeferred(waiting)
        return len(batch)

    def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred[Any]:
        self.asked.append(("A", name, timeout))
        return self._answer(dns.A, name)

    def lookupText(self, name: str, timeout: Any = None) -> defer.Deferred[Any]:
        self.asked.append(("TXT", name, timeout))
        return self._answer(dns.TXT, name)
