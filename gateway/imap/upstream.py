"""The upstream IMAP leg: greeting, STARTTLS, XOAUTH2 or LOGIN, our ID, then hand-over to the relay."""

from __future__ import annotations

import itertools
import os
import re
from typing import Any


from gateway.auth.xoauth2 import decode_error, initial_response
from gateway.net.opener import ClientAddress, Leg
from gateway.net.transport import transport_of
from gateway.net.opener import Opened
from gateway.net.throttle import throttle_delay
from gateway.net.upstream import Credentials, ProviderThrottled, ResponseReader, UpstreamAuthError, UpstreamError

__all__ = ["IMAP_KEEPER", "IMAP_LEG", "IMAPKeeper", "UpstreamIMAP", "capabilities_in", "login"]

_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}\r\n$")
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)


class UpstreamIMAP(ResponseReader):
    """Client side of the upstream IMAP connection until ``relay_to`` hands it over."""

    def __init__(self) -> None:
        super().__init__()
        self._tag = 0

    def _take_response(self) -> bytes | None:
        """A line plus any literals it announces ({n} at the end of a line)."""
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                return None
            match = _LITERAL_AT_END.search(self._buffer, 0, end + 1)
            if match:
                start = end + 1 + int(match.group(1))
                if len(self._buffer) < start:
                    return None
                continue
            response, self._buffer = self._buffer[: end + 1], self._buffer[end + 1:]
            return response

    def next_tag(self) -> bytes:
        self._tag += 1
        return b"G%d" % self._tag

    def send(self, line: bytes, tag: bytes | None = None) -> bytes:
        """Write ``TAG line`` without waiting; returns the tag."""
        tag = tag or self.next_tag()
        transport_of(self).write(tag + b" " + line + b"\r\n")
        return tag

    async def command(self, line: bytes, tag: bytes | None = None) -> tuple[bytes, list[bytes]]:
        """Send ``TAG line`` and collect untagged responses until the tagged one."""
        return await self.read_tagged(self.send(line, tag))

    async def read_tagged(self, tag: bytes) -> tuple[bytes, list[bytes]]:
        """Untagged responses until the tagged one; a BYE asking us to back off raises at once."""
        untagged: list[bytes] = []
        while True:
            response = await self.read_response()
            if response.startswith(tag + b" "):
                return response, untagged
            if response[:5].upper() == b"* BYE":
                _check_throttled([response])
            untagged.append(response)


def capabilities_in(responses: list[bytes]) -> bytes | None:
    """The capability list in a CAPABILITY response code or untagged CAPABILITY response."""
    found = None
    for response in responses:
        match = _CAPABILITY_CODE.search(response)
        if match:
            found = match.group(1).strip()
        elif response[:13].upper() == b"* CAPABILITY ":
            found = response[13:].strip()
    return found


def _status(tagged: bytes) -> bytes:
    parts = tagged.rstrip(b"\r\n").split(b" ", 2)
    return parts[1].upper() if len(parts) > 1 else b""


def _text(response: bytes) -> str:
    """Printable ASCII of a server response, for an error message."""
    parts = response.rstrip(b"\r\n").split(b" ", 2)
    raw = parts[2] if len(parts) > 2 else b""
    return "".join(chr(c) if 32 <= c < 127 else "?" for c in raw[:200])


def _quoted(value: str) -> bytes:
    raw = value.encode("utf-8")
    if any(c in raw for c in b"\r\n\0") or any(c > 127 for c in raw):
        return b"{%d+}\r\n" % len(raw) + raw
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _check_throttled(responses: list[bytes]) -> None:
    delay = throttle_delay(responses)
    if delay is not None:
        raise ProviderThrottled(delay)


async def login(proto: UpstreamIMAP, creds: Credentials, *, starttls_options: Any = None,
                gateway_id: bytes = b'("name" "gateway" "version" "0.1")',
                login_id: bytes | None = None) -> bytes:
    """Drive a fresh upstream connection to the authenticated state; returns its capabilities.

    Round trips: the greeting (with capabilities, as Gmail, Microsoft 365 and
    Dovecot send them), then our ID pipelined with AUTHENTICATE (ID is valid
    before authentication, RFC 2971), and the capabilities from the tagged OK.
    """
    greeting = await proto.read_response()
    _check_throttled([greeting])
    if not greeting.upper().startswith(b"* OK"):
        raise UpstreamError(f"upstream greeting refused: {_text(greeting)}")
    caps = capabilities_in([greeting])
    if starttls_options is not None:
        if caps is None:
            tagged, untagged = await proto.command(b"CAPABILITY")
            caps = capabilities_in(untagged)
        if caps is None or b"STARTTLS" not in caps.upper().split():
            raise UpstreamError("upstream does not offer STARTTLS")
        tagged, _ = await proto.command(b"STARTTLS")
        if _status(tagged) != b"OK":
            raise UpstreamError(f"upstream STARTTLS failed: {_text(tagged)}")
        transport_of(proto).startTLS(starttls_options)
        caps = None
    if caps is None:
        tagged, untagged = await proto.command(b"CAPABILITY")
        caps = capabilities_in(untagged) or b""
    words = caps.upper().split()
    # Before authenticating, the ID may carry the client's address (login_id); after, it never does.
    id_tag = proto.send(b"ID " + (login_id or gateway_id)) if b"ID" in words else None

    if creds.mechanism == "XOAUTH2":
        tagged, untagged = await _xoauth2(proto, creds, sasl_ir=b"SASL-IR" in words, first=id_tag)
    else:
        tag = proto.send(b"LOGIN " + _quoted(creds.user) + b" " + _quoted(creds.secret))
        if id_tag is not None:
            await proto.read_tagged(id_tag)
        tagged, untagged = await proto.read_tagged(tag)
    _check_throttled(untagged + [tagged])
    if _status(tagged) != b"OK":
        raise UpstreamAuthError(f"upstream login failed: {_text(tagged)}")
    caps_after = capabilities_in(untagged + [tagged])

    if id_tag is None and caps_after and b"ID" in caps_after.upper().split():
        tagged, untagged = await proto.command(b"ID " + gateway_id)
        _check_throttled(untagged + [tagged])
    if caps_after is None:
        tagged, untagged = await proto.command(b"CAPABILITY")
        _check_throttled(untagged + [tagged])
        caps_after = capabilities_in(untagged) or b"IMAP4rev1"
    return caps_after


async def _xoauth2(proto: UpstreamIMAP, creds: Credentials, sasl_ir: bool,
                   first: bytes | None = None) -> tuple[bytes, list[bytes]]:
    """AUTHENTICATE XOAUTH2; a failure challenge is answered empty and its JSON error reported.

    ``first``: the tag of a command sent just before (our ID), whose answer comes first.
    """
    initial = initial_response(creds.user, creds.secret)
    tag = proto.next_tag()
    if sasl_ir:
        transport_of(proto).write(tag + b" AUTHENTICATE XOAUTH2 " + initial + b"\r\n")
    else:
        transport_of(proto).write(tag + b" AUTHENTICATE XOAUTH2\r\n")
    if first is not None:
        await proto.read_tagged(first)
    sent_initial = sasl_ir
    untagged: list[bytes] = []
    while True:
        response = await proto.read_response()
        if response.startswith(tag + b" "):
            return response, untagged
        if not response.startswith(b"+"):
            if response[:5].upper() == b"* BYE":
                _check_throttled([response])
            untagged.append(response)
            continue
        if not sent_initial:
            transport_of(proto).write(initial + b"\r\n")
            sent_initial = True
            continue
        # A challenge after our token is the provider's error (base64 JSON); answer empty.
        detail = decode_error(response[1:].strip())
        transport_of(proto).write(b"\r\n")
        tagged, more = await proto.read_tagged(tag)
        _check_throttled(untagged + more + [tagged])
        if detail and _status(tagged) != b"OK":
            raise UpstreamAuthError(f"upstream login failed: {_text(tagged)} {detail}".strip())
        return tagged, untagged + more


async def _leg_login(core: Any, proto: UpstreamIMAP, creds: Credentials, starttls: Any, route: Any,
                     client: ClientAddress | None) -> bytes:
    forward = client if core.config.upstream.forward_client_ip and client and client.host else None
    return await login(proto, creds, starttls_options=starttls, gateway_id=core.imap_id,
                       login_id=id_with_client(core.imap_id, forward) if forward else None)


def id_with_client(gateway_id: bytes, client: ClientAddress) -> bytes:
    """Our ID list with the client's address (RFC 2971 fields Dovecot honours from its
    login_trusted_networks, and Gmail and Microsoft 365 log): sent before authenticating only."""
    extra = b' "x-originating-ip" ' + _quoted(client.host)
    if client.port:
        extra += b' "x-originating-port" "' + str(client.port).encode() + b'"'
    return gateway_id[:-1] + extra + b")"


IMAP_LEG = Leg("imap", UpstreamIMAP, tls_port=993, starttls_port=143, password_mechanism="LOGIN",
               login=_leg_login)


_fresh = itertools.count(1)
_PREFIX = os.urandom(3).hex().upper().encode()


def fresh_tag() -> bytes:
    """A tag no client of this process has been answered with: a random prefix and a counter."""
    return b"GW%s%d" % (_PREFIX, next(_fresh))


class IMAPKeeper:
    """Resets a given-back IMAP connection to the authenticated state and resyncs it before reuse."""

    async def reset(self, opened: Opened, selected: bool) -> None:
        """UNSELECT when a mailbox is selected; an upstream without UNSELECT is not kept (CLOSE expunges)."""
        if not selected:
            return
        if b"UNSELECT" not in bytes(opened.result).upper().split():
            raise UpstreamError("a mailbox is selected and the upstream has no UNSELECT")
        tagged, _ = await opened.protocol.command(b"UNSELECT", fresh_tag())
        if _status(tagged) != b"OK":
            raise UpstreamError(f"UNSELECT refused: {_text(tagged)}")

    async def resync(self, opened: Opened) -> None:
        """NOOP under a fresh tag, read to its tagged OK; only `* OK`/`* NO` notes may come before it."""
        tagged, untagged = await opened.protocol.command(b"NOOP", fresh_tag())
        for response in untagged:
            if response[:5].upper() not in (b"* OK ", b"* NO "):
                raise UpstreamError(f"unexpected response to NOOP: {_text(response)}")
        if _status(tagged) != b"OK":
            raise UpstreamError(f"NOOP answered {_text(tagged)}")


IMAP_KEEPER = IMAPKeeper()
