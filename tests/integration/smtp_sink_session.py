"""One SMTP sink connection: the plain ESMTP dialogue, and the :class:`Received` records it produces.

The server, its options and the queries are in ``smtp_sink.py`` (the module
docstring there describes the behaviour); the authenticated-upstream mode
(STARTTLS, AUTH, violation detectors) comes in through
:class:`~tests.integration.smtp_sink_auth.AuthSession`.
"""

from __future__ import annotations

import re
import socket
import socketserver
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .smtp_sink_auth import AuthSession

if TYPE_CHECKING:
    from .smtp_sink import SMTPSink

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


class _Session(AuthSession, socketserver.BaseRequestHandler):
    sink: "SMTPSink"

    # --------------------------------------------------------------- plumbing
    def setup(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.attach(self.request)
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

    def attach(self, sock: socket.socket) -> None:
        """Read and write through ``sock`` from now on (the TLS socket after a handshake)."""
        self.sock = sock
        self.reader = _Reader(sock)

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
        self.check_8bit(eight_bit)
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
