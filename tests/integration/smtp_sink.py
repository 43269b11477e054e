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
"""

from __future__ import annotations

import itertools
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Union

DEFAULT_MAX_SIZE = 52428800
DEFAULT_MAX_LINE = 4096
_CHUNK = 65536


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


class _Session(socketserver.StreamRequestHandler):
    sink: "SMTPSink"
    rbufsize = _CHUNK
    wbufsize = 0  # replies go out immediately (one reply per command, in order)
    disable_nagle_algorithm = True

    # --------------------------------------------------------------- plumbing
    def setup(self) -> None:
        super().setup()
        self.sid = self.sink._register(self.connection)
        self.helo = b""
        self.reset()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.sink._unregister(self.connection, self.sid)

    def reset(self) -> None:
        self.mail_from: bytes | None = None
        self.mail_params: list[bytes] = []
        self.rcpts: list[bytes] = []
        self.rcpt_params: list[list[bytes]] = []

    def reply(self, text: str) -> None:
        self.wfile.write(text.encode("utf-8") + b"\r\n")

    def read_command(self) -> bytes | None:
        line = self.rfile.readline(self.sink.max_line + 2)
        if not line:
            raise _Disconnect
        if not line.endswith(b"\n"):
            # Too long: swallow the rest of the line, bounded per read.
            while not line.endswith(b"\n"):
                line = self.rfile.readline(_CHUNK)
                if not line:
                    raise _Disconnect
            return None  # too long
        return line.rstrip(b"\r\n")

    # ---------------------------------------------------------------- session
    def handle(self) -> None:
        self.reply("220 sink.test ESMTP test sink")
        try:
            while True:
                line = self.read_command()
                if line is None:
                    self.sink._log(self.sid, b"<line too long>")
                    self.reply("500 5.5.2 Line too long")
                    continue
                self.sink._log(self.sid, line)
                verb, _, arg = line.partition(b" ")
                verb = verb.upper()
                handler = getattr(self, "smtp_" + verb.decode("ascii", "replace"), None)
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
        caps = ["sink.test", "PIPELINING", "8BITMIME", f"SIZE {self.sink.max_size}",
                "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"]
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

    def smtp_MAIL(self, arg: bytes) -> None:
        if not self.helo:
            self.reply("503 5.5.1 Send EHLO/HELO first")
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
        at_line_start = True
        max_size = self.sink.max_size
        while True:
            piece = self.rfile.readline(_CHUNK)
            if not piece:
                self.sink._discard(Received(self.mail_from, self.mail_params, self.rcpts,
                                            b"".join(chunks), self.helo, self.rcpt_params,
                                            self.sid))
                raise _Disconnect
            if at_line_start:
                if piece == b".\r\n":
                    break
                if piece.startswith(b"."):
                    piece = piece[1:]
            at_line_start = piece.endswith(b"\n")
            if not too_big:
                size += len(piece)
                if size > max_size:
                    too_big = True
                    chunks = []
                else:
                    chunks.append(piece)
        if too_big:
            self.reply("552 5.3.4 Message size exceeds fixed limit")
        else:
            msg = Received(self.mail_from, self.mail_params, self.rcpts, b"".join(chunks),
                           self.helo, self.rcpt_params, self.sid)
            qid = self.sink._store(msg)
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


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class SMTPSink:
    """Threaded SMTP sink on ``host`` (127.0.0.1) and ``port`` (0 = ephemeral)."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", *,
                 max_size: int = DEFAULT_MAX_SIZE, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.host = host
        self._requested_port = port
        self.max_size = max_size
        self.max_line = max_line
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
            try:
                c.shutdown(socket.SHUT_RDWR)
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

    # ------------------------------------------------------------- internal
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


__all__ = ["SMTPSink", "Received", "split_received"]
