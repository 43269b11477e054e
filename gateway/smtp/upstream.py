"""The upstream submission leg: greeting, EHLO, STARTTLS, AUTH XOAUTH2 (two steps) or PLAIN/LOGIN."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from gateway.auth.xoauth2 import decode_error, initial_response
from gateway.net.opener import Leg
from gateway.net.transport import transport_of
from gateway.net.upstream import Credentials, ResponseReader, UpstreamAuthError, UpstreamError

__all__ = ["SMTP_LEG", "SMTPLogin", "UpstreamSMTP", "login"]


class UpstreamSMTP(ResponseReader):
    """Client side of the upstream SMTP connection until ``relay_to`` hands it over."""

    def _take_response(self) -> bytes | None:
        """A whole reply: ``ddd-`` lines up to the ``ddd `` (or bare ``ddd``) line."""
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                return None
            line = self._buffer[start:end + 1]
            if line[3:4] != b"-":
                reply, self._buffer = self._buffer[: end + 1], self._buffer[end + 1:]
                return reply
            start = end + 1

    async def command(self, line: bytes) -> bytes:
        transport_of(self).write(line + b"\r\n")
        return await self.read_response()


@dataclass(frozen=True)
class SMTPLogin:
    """An authenticated upstream: its EHLO reply after TLS, as the relay filter needs it."""

    ehlo: bytes


def code(reply: bytes) -> int:
    try:
        return int(reply[:3])
    except ValueError:
        return 0


def text(reply: bytes) -> str:
    """The reply's last line, printable ASCII, for an error message."""
    last = reply.rstrip(b"\r\n").split(b"\n")[-1].strip()
    return "".join(chr(c) if 32 <= c < 127 else "?" for c in last[:200])


def _extensions(ehlo: bytes) -> set[bytes]:
    words = set()
    for line in ehlo.split(b"\n")[1:]:
        parts = line[4:].strip().upper().split()
        if parts:
            words.add(parts[0])
            if parts[0] == b"AUTH":
                words.update(b"AUTH=" + p for p in parts[1:])
    return words


async def login(proto: UpstreamSMTP, creds: Credentials, *, ehlo_name: str,
                starttls_options: Any = None) -> SMTPLogin:
    """Drive a fresh submission connection to the authenticated state."""
    greeting = await proto.read_response()
    if code(greeting) != 220:
        raise UpstreamError(f"upstream greeting refused: {text(greeting)}")
    name = ehlo_name.encode("idna") if ehlo_name else b"localhost"
    ehlo = await proto.command(b"EHLO " + name)
    if code(ehlo) != 250:
        raise UpstreamError(f"upstream EHLO refused: {text(ehlo)}")
    if starttls_options is not None:
        if b"STARTTLS" not in _extensions(ehlo):
            raise UpstreamError("upstream does not offer STARTTLS")
        reply = await proto.command(b"STARTTLS")
        if code(reply) != 220:
            raise UpstreamError(f"upstream STARTTLS failed: {text(reply)}")
        transport_of(proto).startTLS(starttls_options)
        ehlo = await proto.command(b"EHLO " + name)
        if code(ehlo) != 250:
            raise UpstreamError(f"upstream EHLO refused: {text(ehlo)}")
    extensions = _extensions(ehlo)
    if creds.mechanism == "XOAUTH2":
        reply = await _xoauth2(proto, creds)
    elif b"AUTH=PLAIN" in extensions:
        plain = base64.b64encode(b"\0" + creds.user.encode() + b"\0" + creds.secret.encode())
        reply = await proto.command(b"AUTH PLAIN " + plain)
    else:
        reply = await proto.command(b"AUTH LOGIN")
        if code(reply) == 334:
            reply = await proto.command(base64.b64encode(creds.user.encode()))
        if code(reply) == 334:
            reply = await proto.command(base64.b64encode(creds.secret.encode()))
    if code(reply) != 235:
        raise UpstreamAuthError(f"upstream login failed: {text(reply)}")
    return SMTPLogin(ehlo)


async def _xoauth2(proto: UpstreamSMTP, creds: Credentials) -> bytes:
    """AUTH XOAUTH2 in two steps (long tokens overflow the one-line form); errors decoded."""
    reply = await proto.command(b"AUTH XOAUTH2")
    if code(reply) != 334:
        return reply
    reply = await proto.command(initial_response(creds.user, creds.secret))
    if code(reply) == 334:
        detail = decode_error(reply[4:].strip())
        final = await proto.command(b"")
        raise UpstreamAuthError(f"upstream login failed: {text(final)} {detail}".strip())
    return reply


async def _leg_login(core: Any, proto: UpstreamSMTP, creds: Credentials, starttls: Any, route: Any,
                     client: Any = None) -> SMTPLogin:
    ehlo_name = getattr(core.connector, "ehlo_name", None)
    name = ehlo_name(route) if ehlo_name is not None else core.config.smtp.hostname
    if hasattr(name, "addCallback") or hasattr(name, "__await__"):
        name = await name
    return await login(proto, creds, ehlo_name=name, starttls_options=starttls)


SMTP_LEG = Leg("smtp", UpstreamSMTP, tls_port=465, starttls_port=587, password_mechanism="PASSWORD",
               login=_leg_login)
