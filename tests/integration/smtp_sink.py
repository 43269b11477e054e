"""A real (threaded, blocking) SMTP sink for integration tests.

Dovecot's submission service relays to it (``submission_relay_host`` /
``submission_relay_port``), so tests can check exactly what arrived upstream.

``SMTPSink(port=0).start()`` listens on 127.0.0.1 and speaks enough ESMTP for
a relaying MTA: EHLO advertises PIPELINING, 8BITMIME, SIZE 52428800,
ENHANCEDSTATUSCODES, SMTPUTF8 and DSN (no AUTH, no STARTTLS: Dovecot relays in
plaintext); HELO, MAIL, RCPT, DATA, RSET, NOOP, VRFY and QUIT work, pipelined
commands are answered one by one in order.

* A recipient whose local part starts with ``reject`` gets
  ``550 5.1.1 <addr>: Recipient address rejected: User unknown``; one starting
  with ``tempfail`` gets ``450 4.2.1 <addr>: Recipient address rejected:
  Mailbox temporarily unavailable``.
* DATA is read up to ``CRLF.CRLF`` and dot-unstuffed; the message is stored
  (as :class:`Received`, appended to ``sink.messages``) only when the
  terminating dot arrived.  A transaction cut off by a disconnect mid-DATA is
  *not* stored (its partial content goes to ``sink.discarded`` for diagnosis).
* A message larger than ``max_size`` (default 52428800) is read to the end and
  refused with ``552 5.3.4``; so is ``MAIL ... SIZE=n`` with n > max_size.
* A non-ASCII envelope address without the ``SMTPUTF8`` MAIL parameter gets
  ``553 5.6.7`` (so tests notice if a relay drops the parameter).
* Command lines are limited to ``max_line`` bytes (``500 5.5.2`` beyond);
  message lines may be of any length (read in bounded chunks).

Every command line (not message content) is logged in ``sink.commands`` as
``(session_id, line_without_crlf)``.

Authenticated-upstream mode (opt-in; the defaults above are unchanged): the
sink then plays a provider's submission server such as smtp.gmail.com, for
the gateway's upstream leg.

* ``tls_cert=(cert, key)``: implicit TLS (every accepted socket is wrapped
  before the greeting), or with ``starttls=True`` plaintext until
  ``STARTTLS`` (advertised only before TLS; AUTH only after it).  Bytes
  pipelined behind ``STARTTLS`` are discarded and recorded as a violation.
* ``auth_tokeninfo_url=URL``: ``AUTH XOAUTH2`` is offered and required before
  MAIL, in the two-step form (``AUTH XOAUTH2`` -> ``334 `` -> token line) and
  the initial-response form.  The bearer token is checked with ``GET
  URL<token>`` (the test provider's tokeninfo) and its ``email`` must equal the
  ``user=``.  On failure: ``334 <base64 {"status":"401","schemes":"bearer",
  "scope":"https://mail.google.com/"}>``, then after the client's (empty) line
  ``535 5.7.8 Username and Password not accepted``, as Gmail does.
* ``passwords={user: password}``: ``AUTH PLAIN`` and ``AUTH LOGIN`` (with or
  without initial response) against that table; ``auth_mechanisms=`` narrows
  what EHLO offers, e.g. ``["LOGIN"]``.
* The AUTH command line is limited to ``max_line`` like every command (RFC
  4954: a client must not use the initial response when the line would be
  too long), SASL response lines to ``MAX_AUTH_LINE`` (12288).  Response
  lines are logged in ``commands`` too; each AUTH goes to ``sink.auth`` as an
  :class:`AuthAttempt`.
* ``extensions=[...]`` replaces what EHLO advertises (``DEFAULT_EXTENSIONS``;
  ``"SIZE"`` is shown as ``SIZE <max_size>``), and the sink then behaves as a
  server without the missing ones: a MAIL/RCPT parameter of an extension it
  did not advertise (SIZE, BODY, SMTPUTF8, RET/ENVID/NOTIFY/ORCPT) gets
  ``555 5.5.4``; without ENHANCEDSTATUSCODES no reply carries an enhanced
  code; without 8BITMIME a message with 8-bit bytes is accepted but recorded
  as a violation; without PIPELINING the sink waits ``pipelining_probe``
  seconds after each command line and records a violation if the client's
  next bytes are already there (sent before the reply was).

Violations of the protocol by the client go to ``sink.violations`` as
:class:`Violation` (session, kind, detail).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import re
import socket
import socketserver
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Union

DEFAULT_MAX_SIZE = 52428800
DEFAULT_MAX_LINE = 4096
DEFAULT_EXTENSIONS = ("PIPELINING", "8BITMIME", "SIZE", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN")
MAX_AUTH_LINE = 12288  # RFC 4954 section 4: SASL response lines
XOAUTH2_ERROR = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}
XOAUTH2_REFUSED = "535 5.7.8 Username and Password not accepted"
_CHUNK = 65536
_ENHANCED = re.compile(r"\A([0-9]{3}[ -])[245]\.[0-9]{1,3}\.[0-9]{1,3} ")
#: MAIL/RCPT parameter -> the EHLO extension that allows it (others always pass).
_PARAM_EXTENSION = {b"SIZE": "SIZE", b"BODY": "8BITMIME", b"SMTPUTF8": "SMTPUTF8",
                    b"RET": "DSN", b"ENVID": "DSN", b"NOTIFY": "DSN", b"ORCPT": "DSN"}


@dataclass
class Received:
    """One message accepted by the sink (after dot-unstuffing)."""

    mail_from: bytes          # reverse-path without <>, b"" for the null sender
    mail_params: list[bytes]  # MAIL FROM parameters as sent, e.g. [b"BODY=8BITMIME", b"SIZE=12"]
    rcpts: list[bytes]        # accepted forward-paths without <>, in RCPT order
    data: bytes               # message content, dot-unstuffed, without the final ".\r\n"
    helo: bytes               # the EHLO/HELO argument of the session
    #: Parameters of each accepted RCPT (parallel to ``rcpts``), e.g. [[b"NOTIFY=NEVER"]].
    rcpt_params: list[list[bytes]] = field(default_factory=list)
    #: Which session (connection) it came from; see ``SMTPSink.commands``.
    session: int = 0
    #: The user the session authenticated as (authenticated-upstream mode), else None.
    auth_user: str | None = None
    #: Whether the session ran over TLS (implicit or after STARTTLS).
    tls: bool = False

    @property
    def trace_header(self) -> bytes:
        """The leading ``Received:`` field (with its folded lines), or b""."""
        return split_received(self.data)[0]

    @property
    def original(self) -> bytes:
        """``data`` without the leading ``Received:`` field that Dovecot's
        submission service prepends -- i.e. what the submitting client sent
        (Dovecot also turns bare LF into CRLF)."""
        return split_received(self.data)[1]


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """Split off the first header field if it is ``Received:``.

    Returns (that field including folded continuation lines and CRLF, rest).
    Dovecot 2.3 submission prepends exactly one such field, e.g.::

        Received: from client.example ([127.0.0.1])
        \tby localhost with ESMTPSA
        \tid juwdECNqBGsyWQAAg+zDdQ
        \t(envelope-from <a@example.com>)
        \tfor <r@example.org>; Mon, 23 Nov 2026 16:30:27 +0000

    (``for <...>`` only with exactly one recipient.)
    """
    if data[:9].lower() != b"received:":
        return b"", data
    end = 0
    while True:
        nl = data.find(b"\n", end)
        if nl < 0:
            return data, b""
        end = nl + 1
        if data[end:end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]


@dataclass(frozen=True)
class AuthAttempt:
    """One AUTH exchange (authenticated-upstream mode)."""

    session: int
    mechanism: str          # "XOAUTH2", "PLAIN" or "LOGIN"
    user: str               # user= / authentication identity ("" when undecodable)
    ok: bool
    initial_response: bool  # the credentials came on the AUTH line itself (one step)
    response_length: int    # length of the (base64) line that carried the credentials


@dataclass(frozen=True)
class Violation:
    """A protocol violation by the client, e.g. kind "pipelining" without PIPELINING."""

    session: int
    kind: str    # "pipelining", "starttls-injection", "8bit", "sasl", "tls" (handshake failed)
    detail: str


Where = Union[None, str, bytes, Callable[[Received], bool]]


def _matcher(where: Where) -> Callable[[Received], bool]:
    if where is None:
        return lambda r: True
    if callable(where):
        return where
    addr = where.encode() if isinstance(where, str) else where
    addr = addr.lower()
    return lambda r: addr == r.mail_from.lower() or addr in (a.lower() for a in r.rcpts)


def _parse_path(arg: bytes) -> tuple[bytes, list[bytes]] | None:
    """``<path> PARAMS`` -> (path without <>, [params]); None on syntax error.

    Honors quoted local parts (``<"a>b"@x>``); tolerates a space before ``<``.
    """
    arg = arg.lstrip(b" ")
    if not arg.startswith(b"<"):
        return None
    i, quoted = 1, False
    while i < len(arg):
        c = arg[i:i + 1]
        if quoted and c == b"\\":
            i += 2
            continue
        if c == b'"':
            quoted = not quoted
        elif c == b">" and not quoted:
            break
        i += 1
    else:
        return None
    path = arg[1:i]
    rest = arg[i + 1:]
    if rest and not rest.startswith(b" "):
        return None
    return path, rest.split()


class _Disconnect(Exception):
    pass


class _Reader:
    """Buffered reads from a (TLS) socket that can tell whether the peer sent more."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        data = self.sock.recv(_CHUNK)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def readline(self, limit: int) -> bytes:
        """Up to ``limit`` bytes through the next LF; fewer (without LF) at EOF."""
        buf = self.buf
        start = 0
        while True:
            lf = buf.find(b"\n", start, limit)
            if lf >= 0 or len(buf) >= limit:
                end = lf + 1 if lf >= 0 else limit
                line = bytes(buf[:end])
                del buf[:end]
                return line
            start = len(buf)
            if not self._fill():
                line = bytes(buf)
                buf.clear()
                return line

    def poll(self) -> bool:
        """True if bytes from the peer are waiting (never blocks; EOF is not data)."""
        if self.buf:
            return True
        if self.eof:
            return False
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0)
        try:
            data = self.sock.recv(_CHUNK)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        finally:
            self.sock.settimeout(timeout)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True


class _Session(socketserver.BaseRequestHandler):
    sink: "SMTPSink"

    # --------------------------------------------------------------- plumbing
    def setup(self) -> None:
        self.sock: socket.socket = self.request
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = _Reader(self.sock)
        self.sid = self.sink._register(self.sock)
        self.helo = b""
        self.tls = False
        self.auth_user: str | None = None
        self.reset()

    def finish(self) -> None:
        try:
            if self.sock is not self.request:  # the TLS socket took over the descriptor
                self.sock.close()
        finally:
            self.sink._unregister(self.sock, self.sid)

    def reset(self) -> None:
        self.mail_from: bytes | None = None
        self.mail_params: list[bytes] = []
        self.rcpts: list[bytes] = []
        self.rcpt_params: list[list[bytes]] = []

    def reply(self, text: str) -> None:
        if not self.sink.has("ENHANCEDSTATUSCODES"):
            text = _ENHANCED.sub(r"\1", text)
        self.sock.sendall(text.encode("utf-8") + b"\r\n")

    def read_command(self, limit: int = 0, *, probe: bool = True) -> bytes | None:
        limit = limit or self.sink.max_line
        line = self.reader.readline(limit + 2)
        if not line:
            raise _Disconnect
        if not line.endswith(b"\n"):
            # Too long: swallow the rest of the line, bounded per read.
            while not line.endswith(b"\n"):
                line = self.reader.readline(_CHUNK)
                if not line:
                    raise _Disconnect
            return None  # too long
        line = line.rstrip(b"\r\n")
        if probe:
            self.probe(line)
        return line

    def probe(self, line: bytes) -> None:
        """Without PIPELINING: is the client's next command here before our reply?"""
        if self.sink.pipelining:
            return
        if self.sink.pipelining_probe and not self.reader.buf:
            time.sleep(self.sink.pipelining_probe)
        if self.reader.poll():
            ahead = bytes(self.reader.buf[:100]).split(b"\r\n")[0]
            self.sink._violation(self.sid, "pipelining",
                                 f"{ahead!r} arrived before the reply to {line[:100]!r}")

    def start_tls(self) -> bool:
        """Wrap the connection in TLS (server side); False if the handshake failed."""
        raw, context = self.sock, self.sink._tls_context
        assert context is not None
        raw.settimeout(10)
        try:
            self.sock = context.wrap_socket(raw, server_side=True)
        except (OSError, ValueError) as e:
            self.sink._violation(self.sid, "tls", f"handshake failed: {e}")
            return False
        self.sock.settimeout(None)
        self.sink._swap(raw, self.sock)
        self.reader = _Reader(self.sock)
        self.tls = True
        return True

    # ---------------------------------------------------------------- session
    def handle(self) -> None:
        try:
            if self.sink.implicit_tls and not self.start_tls():
                return
            self.reply("220 sink.test ESMTP test sink")
            while True:
                line = self.read_command(self.sink.max_line)
                if line is None:
                    self.sink._log(self.sid, b"<line too long>")
                    self.reply("500 5.5.2 Line too long")
                    continue
                self.sink._log(self.sid, line)
                verb, _, arg = line.partition(b" ")
                verb = verb.upper()
                handler = getattr(self, "smtp_" + verb.decode("ascii", "replace"), None)
                if verb in (b"AUTH", b"STARTTLS") and not self.sink._offers(verb):
                    handler = None
                if handler is None or not verb.isalpha():
                    self.reply("500 5.5.2 Command unrecognized")
                    continue
                if handler(arg) is False:
                    return
        except (_Disconnect, ConnectionError, OSError):
            return

    def smtp_EHLO(self, arg: bytes) -> None:
        if not arg.strip():
            self.reply("501 5.5.4 EHLO requires a domain or address literal")
            return
        self.helo = arg.strip()
        self.reset()
        caps = ["sink.test", *self.sink._ehlo_keywords()]
        if self.sink.starttls and not self.tls:
            caps.append("STARTTLS")
        elif self.sink.mechanisms:
            caps.append("AUTH " + " ".join(self.sink.mechanisms))
        for c in caps[:-1]:
            self.reply("250-" + c)
        self.reply("250 " + caps[-1])

    def smtp_HELO(self, arg: bytes) -> None:
        if not arg.strip():
            self.reply("501 5.5.4 HELO requires a domain")
            return
        self.helo = arg.strip()
        self.reset()
        self.reply("250 sink.test")

    def smtp_STARTTLS(self, arg: bytes) -> bool:
        if self.tls:
            self.reply("554 5.5.1 TLS already active")
            return True
        if arg.strip():
            self.reply("501 5.5.4 Syntax: STARTTLS")
            return True
        self.reply("220 2.0.0 Ready to start TLS")
        if self.reader.buf:  # RFC 3207 section 4: pipelined plaintext must be discarded
            self.sink._violation(self.sid, "starttls-injection",
                                 f"{bytes(self.reader.buf[:100])!r} pipelined behind STARTTLS")
            self.reader.buf.clear()
        if not self.start_tls():
            return False
        self.helo = b""
        self.reset()
        return True

    def _unsupported_param(self, params: list[bytes]) -> bytes | None:
        for p in params:
            keyword = p.partition(b"=")[0].upper()
            ext = _PARAM_EXTENSION.get(keyword)
            if ext is not None and not self.sink.has(ext):
                return keyword
        return None

    def smtp_MAIL(self, arg: bytes) -> None:
        if not self.helo:
            self.reply("503 5.5.1 Send EHLO/HELO first")
            return
        if self.sink.mechanisms and self.auth_user is None:
            self.reply("530 5.7.0 Authentication required")
            return
        if self.mail_from is not None:
            self.reply("503 5.5.1 Nested MAIL command")
            return
        if arg[:5].upper() != b"FROM:":
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return
        parsed = _parse_path(arg[5:])
        if parsed is None:
            self.reply("501 5.1.7 Bad sender address syntax")
            return
        path, params = parsed
        bad = self._unsupported_param(params)
        if bad is not None:
            self.reply(f"555 5.5.4 Unsupported parameter {bad.decode('ascii', 'replace')}")
            return
        upper = [p.upper() for p in params]
        for p in upper:
            if p.startswith(b"SIZE="):
                try:
                    size = int(p[5:])
                except ValueError:
                    self.reply("501 5.5.4 Bad SIZE parameter")
                    return
                if size > self.sink.max_size:
                    self.reply("552 5.3.4 Message size exceeds fixed limit")
                    return
        if not path.isascii() and b"SMTPUTF8" not in upper:
            self.reply("553 5.6.7 Non-ASCII sender address requires SMTPUTF8")
            return
        self.mail_from, self.mail_params = path, params
        self.rcpts, self.rcpt_params = [], []
        self.reply("250 2.1.0 Ok")

    def smtp_RCPT(self, arg: bytes) -> None:
        if self.mail_from is None:
            self.reply("503 5.5.1 Need MAIL command")
            return
        if arg[:3].upper() != b"TO:":
            self.reply("501 5.5.4 Syntax: RCPT TO:<address> [parameters]")
            return
        parsed = _parse_path(arg[3:])
        if parsed is None or not parsed[0]:
            self.reply("501 5.1.3 Bad recipient address syntax")
            return
        path, params = parsed
        bad = self._unsupported_param(params)
        if bad is not None:
            self.reply(f"555 5.5.4 Unsupported parameter {bad.decode('ascii', 'replace')}")
            return
        if not path.isascii() and b"SMTPUTF8" not in (p.upper() for p in self.mail_params):
            self.reply("553 5.6.7 Non-ASCII recipient address requires SMTPUTF8")
            return
        local = path.rpartition(b"@")[0].strip(b'"').lower()
        shown = path.decode("utf-8", "replace")
        if local.startswith(b"reject"):
            self.reply(f"550 5.1.1 <{shown}>: Recipient address rejected: User unknown")
            return
        if local.startswith(b"tempfail"):
            self.reply(f"450 4.2.1 <{shown}>: Recipient address rejected: "
                       "Mailbox temporarily unavailable")
            return
        self.rcpts.append(path)
        self.rcpt_params.append(params)
        self.reply("250 2.1.5 Ok")

    def _received(self, data: bytes) -> Received:
        return Received(self.mail_from or b"", self.mail_params, self.rcpts, data, self.helo,
                        self.rcpt_params, self.sid, self.auth_user, self.tls)

    def smtp_DATA(self, arg: bytes) -> None:
        if self.mail_from is None:
            self.reply("503 5.5.1 Need MAIL command")
            return
        if not self.rcpts:
            self.reply("554 5.5.1 No valid recipients")
            return
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        chunks: list[bytes] = []
        size = 0
        too_big = False
        eight_bit = False
        at_line_start = True
        max_size = self.sink.max_size
        while True:
            piece = self.reader.readline(_CHUNK)
            if not piece:
                self.sink._discard(self._received(b"".join(chunks)))
                raise _Disconnect
            if at_line_start:
                if piece == b".\r\n":
                    break
                if piece.startswith(b"."):
                    piece = piece[1:]
            at_line_start = piece.endswith(b"\n")
            eight_bit = eight_bit or not piece.isascii()
            if not too_big:
                size += len(piece)
                if size > max_size:
                    too_big = True
                    chunks = []
                else:
                    chunks.append(piece)
        self.probe(b".")
        if eight_bit and not self.sink.has("8BITMIME"):
            self.sink._violation(self.sid, "8bit", "8-bit message data, 8BITMIME not advertised")
        if too_big:
            self.reply("552 5.3.4 Message size exceeds fixed limit")
        else:
            qid = self.sink._store(self._received(b"".join(chunks)))
            self.reply(f"250 2.0.0 Ok: queued as SINK{qid:06d}")
        self.reset()

    def smtp_BDAT(self, arg: bytes) -> bool:
        # CHUNKING is not advertised; a BDAT chunk cannot be skipped safely.
        self.reply("502 5.5.1 BDAT not supported")
        return False

    def smtp_RSET(self, arg: bytes) -> None:
        self.reset()
        self.reply("250 2.0.0 Ok")

    def smtp_NOOP(self, arg: bytes) -> None:
        self.reply("250 2.0.0 Ok")

    def smtp_VRFY(self, arg: bytes) -> None:
        self.reply("252 2.0.0 Cannot VRFY user, but will accept message")

    def smtp_QUIT(self, arg: bytes) -> bool:
        self.reply("221 2.0.0 Bye")
        return False

    # ------------------------------------------------------------------- AUTH
    def smtp_AUTH(self, arg: bytes) -> None:
        if not self.helo:
            self.reply("503 5.5.1 Send EHLO first")
        elif self.sink.starttls and not self.tls:
            self.reply("530 5.7.0 Must issue a STARTTLS command first")
        elif self.auth_user is not None:
            self.reply("503 5.5.1 Already authenticated")
        elif self.mail_from is not None:
            self.reply("503 5.5.1 AUTH not permitted during a mail transaction")
        else:
            mechanism, _, initial = arg.strip().partition(b" ")
            name = mechanism.upper().decode("ascii", "replace")
            if name not in self.sink.mechanisms:
                self.reply("504 5.5.4 Unrecognized authentication type")
                return
            getattr(self, "auth_" + name)(initial.strip())

    def sasl_response(self, challenge: str) -> bytes | None:
        """Send ``334 challenge`` and read the client's line; None when answered already."""
        self.reply("334 " + challenge)
        line = self.read_command(MAX_AUTH_LINE)
        if line is None:
            self.sink._log(self.sid, b"<line too long>")
            self.reply("500 5.5.6 Authentication exchange line is too long")
            return None
        self.sink._log(self.sid, line)
        if line == b"*":
            self.reply("501 5.7.0 Authentication aborted")
            return None
        return line

    def _done(self, mechanism: str, user: str, ok: bool, initial: bool, length: int,
              failure: str = "535 5.7.8 Authentication credentials invalid") -> None:
        self.sink._auth(AuthAttempt(self.sid, mechanism, user, ok, initial, length))
        if ok:
            self.auth_user = user
            self.reply("235 2.7.0 Accepted")
        elif failure:
            self.reply(failure)

    def auth_XOAUTH2(self, initial: bytes) -> None:
        response = initial or self.sasl_response("")
        if response is None:
            return
        user, token = _parse_xoauth2(response)
        ok = user is not None and self.sink._token_email(token) == user.lower()
        self._done("XOAUTH2", user or "", ok, bool(initial), len(response), failure="")
        if ok:
            return
        challenge = base64.b64encode(json.dumps(XOAUTH2_ERROR).encode()).decode()
        answer = self.sasl_response(challenge)
        if answer is None:
            return
        if answer:
            self.sink._violation(self.sid, "sasl",
                                 f"XOAUTH2 error challenge answered with {answer[:40]!r}, not an empty line")
        self.reply(XOAUTH2_REFUSED)

    def auth_PLAIN(self, initial: bytes) -> None:
        response = initial or self.sasl_response("")
        if response is None:
            return
        parts = _b64(response).split(b"\0")
        user, ok = "", False
        if len(parts) == 3:
            authzid, authcid, password = (p.decode("utf-8", "replace") for p in parts)
            user = authcid
            ok = authzid in ("", authcid) and self.sink.passwords.get(authcid) == password
        self._done("PLAIN", user, ok, bool(initial), len(response))

    def auth_LOGIN(self, initial: bytes) -> None:
        name = initial or self.sasl_response("VXNlcm5hbWU6")
        if name is None:
            return
        secret = self.sasl_response("UGFzc3dvcmQ6")
        if secret is None:
            return
        user = _b64(name).decode("utf-8", "replace")
        password = _b64(secret).decode("utf-8", "replace")
        self._done("LOGIN", user, self.sink.passwords.get(user) == password, bool(initial),
                   len(secret))


def _b64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return b""


def _parse_xoauth2(response: bytes) -> tuple[str | None, str]:
    """base64 ``user=U^Aauth=Bearer T^A^A`` -> (U, T); (None, "") if malformed."""
    raw = _b64(response)
    if not raw.endswith(b"\x01\x01"):
        return None, ""
    fields: dict[bytes, bytes] = {}
    for item in raw[:-2].split(b"\x01"):
        key, _, value = item.partition(b"=")
        fields[key] = value
    user, auth = fields.get(b"user"), fields.get(b"auth", b"")
    if not user or auth[:7].lower() != b"bearer ":
        return None, ""
    return user.decode("utf-8", "replace"), auth[7:].decode("ascii", "replace")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class SMTPSink:
    """Threaded SMTP sink on ``host`` (127.0.0.1) and ``port`` (0 = ephemeral)."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", *,
                 max_size: int = DEFAULT_MAX_SIZE, max_line: int = DEFAULT_MAX_LINE,
                 tls_cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None, starttls: bool = False,
                 auth_tokeninfo_url: str | None = None,
                 passwords: Mapping[str, str] | None = None,
                 auth_mechanisms: Sequence[str] | None = None,
                 extensions: Iterable[str] = DEFAULT_EXTENSIONS,
                 pipelining_probe: float = 0.05) -> None:
        """See the module docstring; the keyword options after ``max_line`` are the
        authenticated-upstream mode (``tls_cert`` is a (cert, key) pair of paths)."""
        self.host = host
        self._requested_port = port
        self.max_size = max_size
        self.max_line = max_line
        if starttls and tls_cert is None:
            raise ValueError("starttls=True needs tls_cert")
        self._tls_context: ssl.SSLContext | None = None
        if tls_cert is not None:
            self._tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls_context.load_cert_chain(str(tls_cert[0]), str(tls_cert[1]))
        self.starttls = starttls
        self.implicit_tls = tls_cert is not None and not starttls
        self.tokeninfo_url = auth_tokeninfo_url
        self.passwords: dict[str, str] = dict(passwords or {})
        offered = (["PLAIN", "LOGIN"] if passwords is not None else []) + \
            (["XOAUTH2"] if auth_tokeninfo_url else [])
        #: SASL mechanisms offered after TLS (none: AUTH unknown, as by default).
        self.mechanisms: list[str] = [m.upper() for m in (auth_mechanisms or offered)]
        unknown = set(self.mechanisms) - set(offered)
        if unknown:
            raise ValueError(f"mechanisms {sorted(unknown)} need passwords= / auth_tokeninfo_url=")
        #: EHLO keywords advertised (before STARTTLS / AUTH).
        self.extensions: list[str] = list(extensions)
        self._extension_names = {e.split()[0].upper() for e in self.extensions if e.strip()}
        self.pipelining = self.has("PIPELINING")
        self.pipelining_probe = pipelining_probe
        #: AUTH exchanges, in order.
        self.auth: list[AuthAttempt] = []
        #: Protocol violations by clients, in order.
        self.violations: list[Violation] = []
        #: Accepted messages, in the order their final dot arrived.
        self.messages: list[Received] = []
        #: Transactions cut off mid-DATA by a disconnect (never in ``messages``).
        self.discarded: list[Received] = []
        #: Every command line received: (session id, line without CRLF).
        self.commands: list[tuple[int, bytes]] = []
        #: Number of connections accepted so far (session ids are 1..sessions).
        self.sessions = 0
        #: Ids of sessions whose connection has ended.
        self.closed: set[int] = set()
        self._cond = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._sids = itertools.count(1)
        self._qids = itertools.count(1)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "SMTPSink":
        if self._server is not None:
            return self

        class Handler(_Session):
            pass

        Handler.sink = self
        self._server = _Server((self.host, self._requested_port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"smtp-sink-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._cond:
            conns = list(self._conns)
        for c in conns:
            try:  # the plain socket's shutdown (also under TLS): wakes the session's recv
                socket.socket.shutdown(c, socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "SMTPSink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("sink not started")
        return self._server.server_address[1]

    # -------------------------------------------------------------- queries
    def find(self, where: Where = None) -> list[Received]:
        """Stored messages matching ``where``: None (all), an address (sender or
        any recipient, case-insensitive) or a predicate."""
        match = _matcher(where)
        with self._cond:
            return [m for m in self.messages if match(m)]

    def wait_for(self, count: int = 1, timeout: float = 10.0,
                 where: Where = None) -> list[Received]:
        """Wait until at least ``count`` messages matching ``where`` are stored
        and return them; raise ``TimeoutError`` after ``timeout`` seconds."""
        match = _matcher(where)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if match(m)]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"sink: {len(found)} of {count} messages after "
                                       f"{timeout}s ({len(self.messages)} stored in all)")
                self._cond.wait(min(remaining, 0.5))

    def commands_of(self, session: int) -> list[bytes]:
        """Command lines of one session (see ``Received.session``)."""
        with self._cond:
            return [line for sid, line in self.commands if sid == session]

    def session_of(self, needle: Union[str, bytes]) -> int | None:
        """Id of the first session with a command line containing ``needle``
        (case-insensitive), e.g. ``sink.session_of("RCPT TO:<x@example.org>")``."""
        n = (needle.encode() if isinstance(needle, str) else needle).lower()
        with self._cond:
            for sid, line in self.commands:
                if n in line.lower():
                    return sid
        return None

    def wait_closed(self, session: int, timeout: float = 10.0) -> None:
        """Wait until the connection of ``session`` has ended (TimeoutError)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while session not in self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"sink session {session} still open after {timeout}s")
                self._cond.wait(min(remaining, 0.5))

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()
            self.discarded.clear()
            self.commands.clear()
            self.auth.clear()
            self.violations.clear()

    def has(self, extension: str) -> bool:
        """Whether EHLO advertises ``extension`` (e.g. "PIPELINING")."""
        return extension.upper() in self._extension_names

    # ------------------------------------------------------------- internal
    def _ehlo_keywords(self) -> list[str]:
        return [f"SIZE {self.max_size}" if e.upper() == "SIZE" else e for e in self.extensions]

    def _offers(self, verb: bytes) -> bool:
        return bool(self.mechanisms) if verb == b"AUTH" else self.starttls

    def _token_email(self, token: str) -> str | None:
        """The lower-cased ``email`` the tokeninfo endpoint gives for ``token``, else None."""
        if not self.tokeninfo_url or not token:
            return None
        url = self.tokeninfo_url + urllib.parse.quote(token, safe="")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                info = json.loads(resp.read())
        except (OSError, ValueError):  # urllib.error.HTTPError is an OSError
            return None
        email = info.get("email") if isinstance(info, dict) else None
        return email.lower() if isinstance(email, str) else None

    def _swap(self, old: socket.socket, new: socket.socket) -> None:
        with self._cond:
            self._conns.discard(old)
            self._conns.add(new)

    def _violation(self, sid: int, kind: str, detail: str) -> None:
        with self._cond:
            self.violations.append(Violation(sid, kind, detail))

    def _auth(self, attempt: AuthAttempt) -> None:
        with self._cond:
            self.auth.append(attempt)
            self._cond.notify_all()

    def _register(self, conn: socket.socket) -> int:
        with self._cond:
            self._conns.add(conn)
            self.sessions += 1
            return next(self._sids)

    def _unregister(self, conn: socket.socket, sid: int) -> None:
        with self._cond:
            self._conns.discard(conn)
            self.closed.add(sid)
            self._cond.notify_all()

    def _log(self, sid: int, line: bytes) -> None:
        with self._cond:
            self.commands.append((sid, line))

    def _store(self, msg: Received) -> int:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()
            return next(self._qids)

    def _discard(self, msg: Received) -> None:
        with self._cond:
            self.discarded.append(msg)
            self._cond.notify_all()


__all__ = [
    "DEFAULT_EXTENSIONS", "MAX_AUTH_LINE", "XOAUTH2_ERROR", "XOAUTH2_REFUSED", "AuthAttempt",
    "Received", "SMTPSink", "Violation", "split_received",
]
