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

Authenticated-upstream mode (opt-in; the defaults above are unchanged):
TLS or STARTTLS (``tls_cert=``, ``starttls=``), AUTH XOAUTH2 checked against
a tokeninfo URL (``auth_tokeninfo_url=``), AUTH PLAIN/LOGIN (``passwords=``,
``auth_mechanisms=``), a chosen EHLO list (``extensions=``) and detectors of
client protocol violations (``sink.auth``, ``sink.violations``); see
``smtp_sink_auth.py``, which implements it.

This module is the server (options, lifecycle, records, queries); one
connection's dialogue is in ``smtp_sink_session.py``.
"""

from __future__ import annotations

import itertools
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Union

from .smtp_sink_auth import MAX_AUTH_LINE, XOAUTH2_ERROR, XOAUTH2_REFUSED, AuthAttempt, AuthSink, Violation
from .smtp_sink_session import Received, _Session, split_received

DEFAULT_MAX_SIZE = 52428800
DEFAULT_MAX_LINE = 4096
DEFAULT_EXTENSIONS = ("PIPELINING", "8BITMIME", "SIZE", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN")

Where = Union[None, str, bytes, Callable[[Received], bool]]


def _matcher(where: Where) -> Callable[[Received], bool]:
    if where is None:
        return lambda r: True
    if callable(where):
        return where
    addr = where.encode() if isinstance(where, str) else where
    addr = addr.lower()
    return lambda r: addr == r.mail_from.lower() or addr in (a.lower() for a in r.rcpts)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class SMTPSink(AuthSink):
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
        self._setup_auth(tls_cert, starttls, auth_tokeninfo_url, passwords, auth_mechanisms)
        #: EHLO keywords advertised (before STARTTLS / AUTH).
        self.extensions: list[str] = list(extensions)
        self._extension_names = {e.split()[0].upper() for e in self.extensions if e.strip()}
        self.pipelining = self.has("PIPELINING")
        self.pipelining_probe = pipelining_probe
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
            self._clear_auth()

    def has(self, extension: str) -> bool:
        """Whether EHLO advertises ``extension`` (e.g. "PIPELINING")."""
        return extension.upper() in self._extension_names

    # ------------------------------------------------------------- internal
    def _ehlo_keywords(self) -> list[str]:
        return [f"SIZE {self.max_size}" if e.upper() == "SIZE" else e for e in self.extensions]

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
